"""Calibration: per-channel activation statistics of every linear layer's input.

One jitted function runs the model with ``taps`` and reduces each tapped input to
its per-channel absolute maximum over batch and positions, so full activations
never leave it. Statistics are keyed like the taps:

  * ``{i}.attn_in`` [E]: input of q/k/v (after attn_norm);
  * ``{i}.o_in`` [H, D]: input of the o projection (attention output per head);
  * ``{i}.mlp_in`` [E]: input of gate/up (after mlp_norm);
  * ``{i}.down_in`` [F]: input of down.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.model import Llama, run_block

LINEAR_INPUTS = ("attn_in", "o_in", "mlp_in", "down_in")
# Fewer tokens per window than this make position-dependent statistics meaningless.
MIN_CALIBRATION_TOKENS = 16


def check_windows(windows, vocab_size: int, min_tokens: int = MIN_CALIBRATION_TOKENS) -> np.ndarray:
  """`windows` as an int array [N, length], or a ValueError naming what is wrong."""
  windows = np.asarray(windows)
  if windows.ndim != 2 or not np.issubdtype(windows.dtype, np.integer):
    raise ValueError(
      f"calibration windows must be int [N, length], got {windows.dtype}{list(windows.shape)}"
    )
  if windows.shape[0] == 0:
    raise ValueError("calibration set is empty: give at least one window of token ids")
  if windows.shape[1] < min_tokens:
    raise ValueError(
      f"calibration windows are too short: {windows.shape[1]} tokens each, "
      f"need at least {min_tokens}"
    )
  if windows.min() < 0 or windows.max() >= vocab_size:
    raise ValueError(
      f"calibration token ids must lie in [0, {vocab_size}), got [{windows.min()}, {windows.max()}]"
    )
  return windows


def _reduce_linear_inputs(model: Llama, windows, batch_size, reduce, combine, desc, progress):
  """Runs `model` over `windows` in batches inside one jit, applies
  ``reduce(name, x)`` to every tapped linear input and folds the batches with
  `combine`; returns name -> jax array."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  graphdef, state = nnx.split(model)

  @jax.jit
  def batch_stats(state, tokens):
    taps = {}
    nnx.merge(graphdef, state)(tokens, logits_at="last", taps=taps)
    return {
      name: reduce(name, x.astype(jnp.float32))
      for name, x in taps.items()
      if name.split(".", 1)[1] in LINEAR_INPUTS
    }

  batches = range(0, len(windows), batch_size)
  if progress:
    import tqdm  # pylint: disable=import-outside-toplevel

    batches = tqdm.tqdm(batches, desc=desc, unit="batch", leave=False)
  total = None
  for lo in batches:
    got = batch_stats(state, jnp.asarray(windows[lo : lo + batch_size], jnp.int32))
    total = got if total is None else jax.tree.map(combine, total, got)
  return total


def _channel_absmax(name: str, x: jax.Array) -> jax.Array:
  channel_axes = 2 if name.endswith(".o_in") else 1
  return jnp.max(jnp.abs(x), axis=tuple(range(x.ndim - channel_axes)))


def _gram(name: str, x: jax.Array) -> jax.Array:
  channels = x.shape[-2] * x.shape[-1] if name.endswith(".o_in") else x.shape[-1]
  x2 = x.reshape(-1, channels)
  return jnp.dot(x2.T, x2, precision=jax.lax.Precision.HIGHEST)


def activation_absmax(
  model: Llama,
  windows,
  batch_size: int = 1,
  min_tokens: int = MIN_CALIBRATION_TOKENS,
  progress: bool = False,
) -> dict[str, np.ndarray]:
  """Per-channel max |x| of every linear layer's input over calibration `windows`.

  Args:
    model: the (float) model to calibrate.
    windows: int [N, length] token ids, N >= 1, length >= `min_tokens`.
    batch_size: windows per forward pass (a short last batch runs on its own).
    min_tokens: shortest window accepted.
    progress: tqdm bar on stderr.

  Returns:
    name -> float32 array (see the module docstring for names and shapes).

  Raises:
    ValueError: empty set, windows too short, or ids outside the vocabulary.
  """
  windows = check_windows(windows, model.config.vocab_size, min_tokens)
  stats = _reduce_linear_inputs(
    model, windows, batch_size, _channel_absmax, jnp.maximum, "calibration", progress
  )
  return {k: np.asarray(v) for k, v in stats.items()}


def input_hessians(
  model: Llama,
  windows,
  batch_size: int = 1,
  min_tokens: int = MIN_CALIBRATION_TOKENS,
  progress: bool = False,
) -> dict[str, np.ndarray]:
  """GPTQ Hessians ``2 X^T X / tokens`` [C, C] of every linear layer's input.

  Keys are those of `activation_absmax`; ``{i}.o_in``'s [H, D] channels are
  flattened to H*D (the o projection's K). One jitted reduction per batch; the
  full activations never leave it. Raises like `activation_absmax`.
  """
  windows = check_windows(windows, model.config.vocab_size, min_tokens)
  total = _reduce_linear_inputs(model, windows, batch_size, _gram, jnp.add, "hessians", progress)
  n_tokens = windows.shape[0] * windows.shape[1]
  return {k: np.asarray(v) * (2.0 / n_tokens) for k, v in total.items()}


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _block_pass(graphdef, state, x, cfg, kernels, grams: bool):
  """Layer output [B, S, E], or (grams=True) the grams of its linear inputs."""
  taps = {}
  y = run_block(nnx.merge(graphdef, state), x, cfg, kernels, taps.__setitem__)
  if not grams:
    return y
  return {
    name: _gram(f".{name}", v.astype(jnp.float32))
    for name, v in taps.items()
    if name in LINEAR_INPUTS
  }


def block_output(layer, x: jax.Array, cfg, kernels) -> jax.Array:
  """One decoder layer's output [B, S, E] on a cacheless chunk x [B, S, E] (jitted)."""
  graphdef, state = nnx.split(layer)
  return _block_pass(graphdef, state, x, cfg, kernels, False)


def block_hessians(layer, inputs, cfg, kernels, n_tokens: int, prefix: str = "") -> dict:
  """GPTQ Hessians ``2 X^T X / n_tokens`` of `layer`'s linear inputs over the hidden
  states `inputs` (a list of [B, S, E]), keyed ``{prefix}{input}``."""
  graphdef, state = nnx.split(layer)
  total = None
  for x in inputs:
    got = _block_pass(graphdef, state, x, cfg, kernels, True)
    total = got if total is None else jax.tree.map(jnp.add, total, got)
  return {f"{prefix}{name}": np.asarray(h) * (2.0 / n_tokens) for name, h in total.items()}


@nnx.jit
def _embed(model: Llama, tokens: jax.Array) -> jax.Array:
  return model.embed_tokens(tokens)


def embed_windows(model: Llama, windows, batch_size: int = 1) -> list[jax.Array]:
  """The embeddings [B, S, E] of `windows`, `batch_size` windows at a time."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  return [
    _embed(model, jnp.asarray(windows[lo : lo + batch_size], jnp.int32))
    for lo in range(0, len(windows), batch_size)
  ]


def layerwise_hessians(
  model: Llama,
  windows,
  batch_size: int = 1,
  min_tokens: int = MIN_CALIBRATION_TOKENS,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
  """Sequential GPTQ's Hessians: yields ``(i, {"{i}.{input}": H})`` layer by layer.

  Layer i's Hessians (as `input_hessians`) come from its inputs as the layers
  before it compute them *when the generator resumes*: a caller that quantizes
  layer i before asking for layer i + 1 makes every later layer see the quantized
  model's activations (GPTQ's sequential mode). The hidden states [N, S, E]
  between layers are kept, so the whole pass costs one forward. Raises like
  `activation_absmax`.
  """
  windows = check_windows(windows, model.config.vocab_size, min_tokens)
  cfg, kernels = model.config, model.kernels
  hidden = embed_windows(model, windows, batch_size)
  n_tokens = windows.shape[0] * windows.shape[1]
  for i, layer in enumerate(model.layers):
    yield i, block_hessians(layer, hidden, cfg, kernels, n_tokens, f"{i}.")
    hidden = [block_output(layer, x, cfg, kernels) for x in hidden]  # as the caller left it
