"""Block reconstruction: int4 weights with learned rounding, block by block (AutoRound-style).

GPTQ rounds each linear so that the linear's own output stays close. This module
instead rounds all of a decoder block's int4 linears together, so that the output
of the whole block stays close. The layers are taken in order, and for each one:

  * the targets are the float (smoothed) block's outputs on the float model's
    hidden states, and the inputs are the hidden states that the
    already-quantized layers before it produce;
  * each int4 weight is fake-quantized on its group grid with two learned
    parts, both passed straight through the rounding and the scale storage for
    the gradients (`WeightFormat.fake_quantize`; a format is learnable when it
    has one), and the block runs them through the ``linear`` op's xla path after
    rounding the activations as the format's matmul does
    (`WeightFormat.fake_quantize_activations`), so FireQ's per-token FP8
    activations are in the loss as well:
      - rounding offsets v in [-1/2, 1/2], with ``code = round(w / scale + v)``
        (for w4a16, measured from the group minimum);
      - per-group range multipliers in [1/2, 1]: for w4a16 one each on the
        minimum and the maximum, for FireQ one on the absmax;
  * `Reconstruction.steps` of signed gradient descent minimize the block's mean
    squared output error, one calibration window per step, with step
    ``lr * sign(grad)`` and lr decayed linearly to 0;
  * the layer then keeps either the learned weights or the recipe's own
    (GPTQ or round-to-nearest on the same inputs), whichever reproduces the
    block better over all calibration windows.

The learned weights are stored as ordinary `QTensor`s, on exactly the grid the
fake quantization trained: the codes, scales and offsets are those the kernels read.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm import ops
from jaxllm.model import run_block
from jaxllm.quant.calibrate import block_output
from jaxllm.quant.formats import WeightFormat, format_names
from jaxllm.quant.qtensor import QTensor
from jaxllm.quant.recipes import QuantSpec, Reconstruction

_RANGE_FLOOR = 0.5  # range multipliers are kept in [_RANGE_FLOOR, 1]


def _fake_quantize(spec: QuantSpec, w2, learned, tensor_scale):
  """(dequantized w2 [K', N], codes [K', N], stored grid parts) under the learned parts.

  `learned` is ``(v [K', N], low [G, N], high [G, N])``; with v = 0 and both
  multipliers 1 this is the round-to-nearest grid of `spec.quantize`. The format
  (`WeightFormat.fake_quantize`) decides what each part moves.
  """
  v, low, high = learned
  k, n = w2.shape
  g = spec.group_size or k
  wg = w2.reshape(k // g, g, n)
  fmt = spec.format
  scale_dtype = spec.scale_dtype or fmt.scale_dtypes[0]
  w_hat, codes, parts = fmt.fake_quantize(
    wg, (v.reshape(wg.shape), low, high), tensor_scale, scale_dtype
  )
  return w_hat.reshape(k, n), codes.reshape(k, n), parts


@dataclasses.dataclass(frozen=True)
class _Linear:
  """One learnable linear of a block (static): where it lives, its spec and shapes."""

  module: str
  name: str
  spec: QuantSpec
  shape: tuple[int, ...]  # the float weight's
  contract_dims: int
  k_pad: int  # zero rows appended to K


@dataclasses.dataclass(frozen=True)
class _FakeQuantized:
  """A fake-quantized weight (a `jaxllm.ops.QuantizedWeight`): the linear rounds its
  activations as the stored model's matmul will (FireQ: FP8 per token, straight
  through), then multiplies by the dequantized matrix, which carries the gradients
  of the learned parts."""

  padded: jax.Array  # [K', N] f32, on the int4 grid
  format: WeightFormat
  shape: tuple[int, ...]
  contract_dims: int
  k_pad: int

  matmul_op = "linear"

  def matmul_operands(self, rows: jax.Array) -> tuple:
    x = jnp.pad(rows, ((0, 0), (0, self.k_pad))) if self.k_pad else rows
    x = self.format.fake_quantize_activations(x)
    return (x, self.padded.astype(rows.dtype))


def _prepare(layer, module: str, name: str, spec: QuantSpec, contract: int):
  """(static `_Linear`, round-to-nearest QTensor, padded f32 weight [K', N], tensor scale)."""
  if not spec.format.learnable:
    raise ValueError(
      f"block reconstruction learns {format_names('learnable')} weights, not {spec.format.name!r}"
    )
  w = getattr(getattr(layer, module), name).get_value()
  rtn = spec.quantize(w, contract, clip_search=False)
  w2 = jnp.pad(jnp.asarray(w, jnp.float32).reshape(rtn.k, -1), ((0, rtn.k_pad), (0, 0)))
  tensor_scale = jnp.ones((1, 1)) if rtn.tensor_scale is None else rtn.tensor_scale
  lin = _Linear(module, name, spec, tuple(w.shape), contract, rtn.k_pad)
  return lin, rtn, (w2, tensor_scale)


def _initial(spec: QuantSpec, w2: jax.Array):
  k, n = w2.shape
  groups = k // (spec.group_size or k)
  return (jnp.zeros((k, n)), jnp.ones((groups, n)), jnp.ones((groups, n)))


def _with_weights(graphdef, state, weights: Mapping[tuple[str, str], jax.Array]):
  """A fresh copy of the layer with the given (module, name) weights."""
  layer = nnx.merge(graphdef, state, copy=True)
  for (module, name), w in weights.items():
    getattr(getattr(layer, module), name).set_value(w)
  return layer


def _fake_weights(linears, arrays, learned):
  out = {}
  for lin, (w2, tensor_scale), parts in zip(linears, arrays, learned):
    w_hat = _fake_quantize(lin.spec, w2, parts, tensor_scale)[0]
    out[(lin.module, lin.name)] = _FakeQuantized(
      w_hat, lin.spec.format, lin.shape, lin.contract_dims, lin.k_pad
    )
  return out


# The loss differentiates through the block, so it runs the xla implementations
# whatever the model's kernels are.
_DIFFERENTIABLE = ops.KernelConfig(implementation="xla")


def _learned_loss(graphdef, linears, cfg, state, arrays, learned, x, target):
  layer = _with_weights(graphdef, state, _fake_weights(linears, arrays, learned))
  return jnp.mean((run_block(layer, x, cfg, _DIFFERENTIABLE) - target) ** 2)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _signed_step(graphdef, linears, cfg, state, arrays, learned, x, target, lr):
  grads = jax.grad(_learned_loss, argnums=5)(
    graphdef, linears, cfg, state, arrays, learned, x, target
  )

  def move(p, g, lo, hi):
    return jnp.clip(p - lr * jnp.sign(g), lo, hi)

  return tuple(
    (move(v, gv, -0.5, 0.5), move(a, ga, _RANGE_FLOOR, 1.0), move(b, gb, _RANGE_FLOOR, 1.0))
    for (v, a, b), (gv, ga, gb) in zip(learned, grads)
  )


def block_error(layer, inputs, targets, cfg, kernels) -> float:
  """Mean squared error of `layer`'s outputs on `inputs` against `targets` (lists of [B, S, E])."""
  errors = [
    jnp.mean((block_output(layer, x, cfg, kernels) - y) ** 2) for x, y in zip(inputs, targets)
  ]
  return float(jnp.mean(jnp.stack(errors)))


def learn_block(
  layer,
  specs: Mapping[tuple[str, str, int], QuantSpec],
  inputs: list[jax.Array],
  targets: list[jax.Array],
  cfg,
  kernels,
  config: Reconstruction = Reconstruction(),
) -> tuple[dict[tuple[str, str], QTensor], float]:
  """Learns the rounding of a float block's linears; the layer itself is left unchanged.

  Args:
    layer: a decoder `Block` whose listed linears are still float.
    specs: ``(module, name, contract_dims) -> QuantSpec`` of the linears to learn
      (w4a16 or fireq_w4a8); the others stay as they are.
    inputs, targets: equally long lists of hidden states [B, S, E]: the block's
      inputs and the outputs it should reproduce.
    cfg, kernels: the model's config and kernel choice.
    config: steps and learning rate.

  Returns:
    ``({(module, name): QTensor}, mean squared output error over all inputs)``.

  Raises:
    ValueError: a weight format that cannot be learned, no inputs, or unequal lists.
  """
  if not inputs or len(inputs) != len(targets):
    raise ValueError(
      f"block reconstruction needs equally many inputs and targets (>= 1), "
      f"got {len(inputs)} and {len(targets)}"
    )
  prepared = [_prepare(layer, m, n, spec, c) for (m, n, c), spec in specs.items()]
  linears = tuple(p[0] for p in prepared)
  arrays = tuple(p[2] for p in prepared)
  graphdef, state = nnx.split(layer)
  learned = tuple(_initial(lin.spec, w2) for lin, (w2, _) in zip(linears, arrays))
  for step in range(config.steps):
    j = step % len(inputs)
    lr = config.learning_rate * (1.0 - step / config.steps)
    learned = _signed_step(
      graphdef, linears, cfg, state, arrays, learned, inputs[j], targets[j], lr
    )
  quantized = {}
  for (lin, rtn, (w2, tensor_scale)), parts in zip(prepared, learned):
    _, codes, grid = _fake_quantize(lin.spec, w2, parts, tensor_scale)
    values = lin.spec.format.pack_codes(codes)
    quantized[(lin.module, lin.name)] = rtn.replace(values=values, **grid)
  trial = _with_weights(graphdef, state, quantized)
  return quantized, block_error(trial, inputs, targets, cfg, kernels)


@dataclasses.dataclass(frozen=True)
class LayerChoice:
  """What block reconstruction kept for one layer, and the block errors it compared."""

  layer: int
  learned_error: float  # inf where the layer has nothing to learn
  own_error: float  # the recipe's own method (GPTQ or round-to-nearest)

  @property
  def kept(self) -> str:
    return "learned" if self.learned_error < self.own_error else "own"

  def __str__(self) -> str:
    ratio = f" ({self.learned_error / self.own_error:.2f}x)" if self.own_error > 0 else ""
    return (
      f"layer {self.layer}: learned {self.learned_error:.4g}, own {self.own_error:.4g}"
      f"{ratio} -> {self.kept}"
    )


def reconstruct_layers(
  student,
  teacher,
  embed_windows: list[jax.Array],
  specs_of_layer: Callable[[int], Mapping[tuple[str, str, int], QuantSpec]],
  quantize_own: Callable[[int, list[jax.Array]], None],
  config: Reconstruction = Reconstruction(),
  progress: bool = False,
  on_choice: Callable[[LayerChoice], None] | None = None,
) -> list[LayerChoice]:
  """Quantizes `student`'s layers in place, each by learned rounding or its own method.

  Args:
    student: the (smoothed) float model to quantize, layer by layer.
    teacher: a float copy of it, which gives the targets.
    embed_windows: the calibration windows' embeddings, a list of [B, S, E].
    specs_of_layer: ``i -> {(module, name, contract): spec}``, layer i's linears to learn.
    quantize_own: ``(i, inputs)`` quantizes layer i of `student` in place by the
      recipe's own method (GPTQ or round-to-nearest) on those inputs.
    config: steps and learning rate.
    progress: a tqdm bar over the layers on stderr, and a line per layer on its choice.
    on_choice: called with each layer's `LayerChoice` as soon as it is made.

  Returns:
    One `LayerChoice` per layer, in order.
  """
  cfg, kernels = student.config, student.kernels
  hidden_float, hidden_quant = list(embed_windows), list(embed_windows)
  layers = enumerate(zip(student.layers, teacher.layers))
  if progress:
    import tqdm  # pylint: disable=import-outside-toplevel

    layers = tqdm.tqdm(layers, desc="block reconstruction", total=len(student.layers), leave=False)
  choices = []
  for i, (layer, reference) in layers:
    targets = [block_output(reference, x, cfg, kernels) for x in hidden_float]
    specs = specs_of_layer(i)
    learned, learned_error = {}, float("inf")
    if specs:
      learned, learned_error = learn_block(
        layer, specs, hidden_quant, targets, cfg, kernels, config
      )
    quantize_own(i, hidden_quant)
    own_error = block_error(layer, hidden_quant, targets, cfg, kernels)
    choice = LayerChoice(i, learned_error, own_error)
    if choice.kept == "learned":
      for (module, name), qt in learned.items():
        getattr(getattr(layer, module), name).set_value(qt)
    if progress and specs:
      layers.write(str(choice), file=sys.stderr)  # stdout stays the caller's
    choices.append(choice)
    if on_choice is not None:
      on_choice(choice)
    hidden_quant = [block_output(layer, x, cfg, kernels) for x in hidden_quant]
    hidden_float = targets
  return choices
