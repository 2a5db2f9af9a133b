"""Drafts for speculative decoding (`jaxllm.speculative`): what proposes the gamma tokens
the target then verifies in one call.

A draft follows the `Draft` protocol. `SpeculativeGenerator` jit-compiles its `init` and
`propose` (gamma and the sampling config static) and keeps the target's token history
on the device: ``history`` [B, T] int32 holds each row's tokens by cache slot (left
padding first), ``count`` [B] the slots filled, the newest (``history[b, count[b] - 1]``,
the *pending* token) not yet in the target's cache. The target cache holds exactly
``count - 1`` tokens per row when `propose` is called.

Four drafts:
  * `LookupDraft`: prompt lookup, an n-gram match of the newest tokens in the prompt and
    the generated text; no model, deterministic proposals (q one-hot).
  * `LayerSkipDraft`: the target's first N layers, its final norm and shared LM head; it
    shares the target's parameter arrays and writes into the first N layers of the
    target's own dense cache (the target's verify call overwrites those slots with the
    same keys and values), so it needs no cache of its own.
  * `ModelDraft`: any model with the target's vocabulary (e.g. a quantized copy of the
    target, `quantized_draft`) with a dense cache of its own.
  * `EasySpecDraft`: the target's first N layers run layer-parallel in groups
    (`jaxllm.layer_parallel`), with a dense cache of its own that an exact pass over the
    accepted tokens recalibrates at every step.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm import layer_parallel
from jaxllm.kv_cache import DenseKVCache
from jaxllm.kv_cache.base import slice_rows
from jaxllm.model import Llama
from jaxllm.sampling import SamplingConfig, filter_logits, sample


class Draft(Protocol):
  """What `jaxllm.speculative.SpeculativeGenerator` needs of a draft.

  Attributes:
    name: short name for reports ("lookup", "layerskip", ...).
    vocab_size: the vocabulary the draft's distributions q are over (None: it proposes
      ids taken from the text itself, so any vocabulary).
    params: pytree handed to `init` and `propose` (None for a draft without weights).
  """

  name: str
  vocab_size: int | None
  params: Any

  def check(self, target: Llama, cache: Any) -> None:
    """Host-side check against the target and its cache (shapes only); ValueError."""
    ...

  def init(self, params, tokens: jax.Array, start: jax.Array, *, capacity: int) -> Any:
    """The draft's state after the left-padded prompts tokens [B, L] (first valid slot
    `start` [B]), with room for `capacity` slots."""
    ...

  def propose(self, params, state, cache, history, count, key, *, gamma: int, sampling):
    """Proposes `gamma` tokens per row after the pending token.

    Returns (state, cache, tokens int32 [B, gamma], q): `cache` is the target's cache
    with its lengths unchanged (a draft may write past them, as the layer-skip draft
    does); q float32 [B, gamma, V] holds the distributions the tokens were drawn from,
    filtered by `sampling` exactly as the target's (`filter_logits`), or None when the
    proposals are deterministic (q one-hot at each proposed token).
    """
    ...


def _at(history: jax.Array, index: jax.Array) -> jax.Array:
  """history[b, index[b]] for every row: [B]."""
  return jnp.take_along_axis(history, index[:, None], axis=1)[:, 0]


def _model_fn(model: Llama):
  """(graphdef-bound builder params -> Llama, the model's params as a pure dict)."""
  graphdef, state = nnx.split(model)

  def build(params) -> Llama:
    fresh = jax.tree.map(lambda x: x, state)
    fresh.replace_by_pure_dict(params)
    return nnx.merge(graphdef, fresh)

  return build, state.to_pure_dict()


def _draw(model: Llama, first: jax.Array, cache, keys, gamma: int, sampling: SamplingConfig):
  """`gamma` autoregressive draft steps: feeds `first` [B, S] then each drawn token.
  Returns (cache, tokens [B, gamma], q [B, gamma, V])."""
  tokens, probs, x = [], [], first
  for i in range(gamma):
    logits, cache = model(x, cache=cache, logits_at="last")
    logits = logits[:, -1]
    token = sample(logits, keys[i], sampling)
    tokens.append(token)
    probs.append(jax.nn.softmax(filter_logits(logits, sampling), axis=-1))
    x = token[:, None]
  return cache, jnp.stack(tokens, 1), jnp.stack(probs, 1)


def _first_layers(owner: str, target: Llama, num_layers: int) -> Llama:
  """A model of the target's first `num_layers` layers, final norm and LM head (new
  modules, the target's arrays); ValueError unless 1 <= num_layers < the target's depth."""
  depth = target.config.num_layers
  if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers:
    raise ValueError(f"{owner}: num_layers must be an int >= 1, got {num_layers!r}")
  if num_layers >= depth:
    raise ValueError(
      f"{owner}: num_layers={num_layers} is as deep as the target or deeper "
      f"({depth} layers); a layer-skip draft must use fewer layers than the target"
    )
  model = nnx.merge(*nnx.split(target))  # new modules, the same arrays
  model.layers = nnx.List([model.layers[i] for i in range(num_layers)])
  model.config = target.config.replace(num_layers=num_layers)
  return model


class LookupDraft:
  """Prompt lookup: finds the most recent earlier occurrence of the row's newest n tokens
  (n from `max_ngram` down to `min_ngram`, the longest that matches) in the prompt and
  generated text and proposes what followed it; where the continuation reaches the
  newest token it repeats the matched period. No match: the pending token repeated."""

  name = "lookup"
  vocab_size = None
  params = None

  def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
    if not 1 <= min_ngram <= max_ngram:
      raise ValueError(
        f"LookupDraft needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}"
      )
    self.max_ngram, self.min_ngram = max_ngram, min_ngram

  def check(self, target: Llama, cache: Any) -> None:
    del target, cache

  def init(self, params, tokens, start, *, capacity):
    del params, tokens, start, capacity

  def propose(self, params, state, cache, history, count, key, *, gamma, sampling):
    del params, key, sampling
    start = cache.start
    slots = jnp.arange(history.shape[1], dtype=jnp.int32)[None]  # [1, T]
    best = jnp.full(count.shape, -1, jnp.int32)
    for n in range(self.max_ngram, self.min_ngram - 1, -1):
      # match[b, j]: the n tokens ending at slot j equal the row's newest n tokens
      match = jnp.ones(history.shape, bool)
      for k in range(n):
        newest = _at(history, jnp.maximum(count - n + k, 0))[:, None]
        match &= jnp.roll(history, n - 1 - k, axis=1) == newest
      valid = (slots >= start[:, None] + n - 1) & (slots < count[:, None] - 1)
      found = jnp.max(jnp.where(match & valid, slots, -1), axis=1)
      best = jnp.where(best < 0, found, best)
    last = count - 1
    period = jnp.maximum(last - best, 1)
    offset = jnp.arange(gamma, dtype=jnp.int32)[None]
    at = jnp.where(best[:, None] >= 0, best[:, None] + 1 + offset % period[:, None], last[:, None])
    return state, cache, jnp.take_along_axis(history, at, axis=1), None


class LayerSkipDraft:
  """The target's first `num_layers` layers, final norm and LM head as the draft (early
  exit). Shares the target's parameter arrays and the first layers of its dense cache:
  layer i < N sees the same inputs in the draft and in the target, so the keys and values
  the draft writes for its tokens are those the target's verify call writes again."""

  name = "layerskip"

  def __init__(self, target: Llama, num_layers: int):
    self.num_layers = num_layers
    self.vocab_size = target.config.vocab_size
    self._build, self.params = _model_fn(_first_layers("LayerSkipDraft", target, num_layers))

  def check(self, target: Llama, cache: Any) -> None:
    del target
    if not isinstance(cache, DenseKVCache):
      raise ValueError(
        f"LayerSkipDraft writes into the target's dense cache; the target cache is "
        f"{type(cache).__name__}: use a dense target cache (make_cache=None)"
      )

  def init(self, params, tokens, start, *, capacity):
    del params, tokens, start, capacity

  def propose(self, params, state, cache, history, count, key, *, gamma, sampling):
    n = self.num_layers
    view = cache.replace(keys=cache.keys[:n], values=cache.values[:n])
    pending = _at(history, count - 1)[:, None]
    view, tokens, q = _draw(
      self._build(params), pending, view, jax.random.split(key, gamma), gamma, sampling
    )
    cache = cache.replace(keys=view.keys + cache.keys[n:], values=view.values + cache.values[n:])
    return state, cache, tokens, q


class ModelDraft:
  """Any model with the target's vocabulary as the draft, with a dense cache of its own.

  Its cache holds the row's tokens up to the one before the pending token, or one more
  (after a step whose every draft was accepted, the last draft was never fed): `propose`
  rolls it back to ``count - 2`` tokens and feeds the last two tokens as one chunk."""

  def __init__(self, model: Llama, name: str = "model"):
    self.name = name
    self.vocab_size = model.config.vocab_size
    self.config = model.config
    self.dtype = model.dtype
    self._build, self.params = _model_fn(model)

  def check(self, target: Llama, cache: Any) -> None:
    del target, cache

  def init(self, params, tokens, start, *, capacity):
    _, chunk = self._build(params)(tokens, start=start, logits_at="last")
    return chunk.grow(capacity)

  def propose(self, params, state, cache, history, count, key, *, gamma, sampling):
    state = state.rollback(count - 2)
    last_two = jnp.stack([_at(history, count - 2), _at(history, count - 1)], 1)
    state, tokens, q = _draw(
      self._build(params), last_two, state, jax.random.split(key, gamma), gamma, sampling
    )
    return state, cache, tokens, q


class EasySpecDraft:
  """EasySpec: the target's first `num_layers` layers, final norm and LM head, the layers
  run layer-parallel in groups of `group_size` (`jaxllm.layer_parallel`; when `group_size`
  does not divide `num_layers` the last group is smaller), with a dense cache of its own
  (so the target's cache may be of any kind).

  Each `propose` call:
    1. *calibration*: the draft's cache rolls back to its exact tokens, and one exact,
       sequential pass over the tokens since then (the ones the target accepted in the last
       step and the pending token; a fixed chunk of gamma + 1 slots of `history` from each
       row's own cache length, the slots past ``count`` cut off again by a per-row
       `rollback`) rewrites their keys and values as the layers in order give them, so the
       approximate keys and values of the drafting steps never stay in the cache;
    2. the first draft token is drawn from that pass's logits at the pending token, which
       are exact (the layer-skip draft's), and each of the other gamma - 1 from a
       layer-parallel step fed the previous draft token;
    3. the cache rolls back to the exact tokens (``count`` per row).
  With `group_size` 1 every step is sequential: the layer-skip draft's proposals.

  `fuse` runs each group with its weights joined (`layer_parallel.fuse_group`, copies
  made here: one q/k/v matmul per group, batched output and gate/up matmuls, one down
  matmul); False (the default) runs the `Block` modules one by one from the group's input
  and copies nothing. On one CPU device at batch 1 a draft step reads every weight once
  either way and the fused form was not measurably faster (docs/results.md).
  """

  name = "easyspec"

  def __init__(self, target: Llama, num_layers: int, group_size: int = 2, fuse: bool = False):
    model = _first_layers("EasySpecDraft", target, num_layers)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
      raise ValueError(
        f"EasySpecDraft: group_size must be an int >= 1 (layers run from one input), "
        f"got {group_size!r}"
      )
    self.num_layers, self.group_size, self.fuse = num_layers, group_size, fuse
    self.groups = layer_parallel.layer_groups(num_layers, group_size)
    self.vocab_size = target.config.vocab_size
    self._build, model_params = _model_fn(model)
    fused = None
    if fuse:
      fused = [layer_parallel.fuse_group([model.layers[i] for i in g], g[0]) for g in self.groups]
    self.params = {"model": model_params, "fused": fused}

  def check(self, target: Llama, cache: Any) -> None:
    del target, cache

  def init(self, params, tokens, start, *, capacity):
    _, chunk = self._build(params["model"])(tokens, start=start, logits_at="last")
    return chunk.grow(capacity)

  def calibrate(self, params, state: DenseKVCache, history, count, width: int):
    """The calibration pass: `state` rolled back to its exact tokens (at most
    ``count - 1``), then the layers in order over `width` slots of `history` from there;
    returns (the cache holding exactly ``count`` tokens per row, exact last hidden states
    at each row's pending token [B, 1, E]). `width` must cover the tokens since the last
    calibration (the pending token included)."""
    model = self._build(params["model"])
    state = state.rollback(count - 1)
    at = state.length
    hidden, state = layer_parallel.forward(model, slice_rows(history, at, width, 1), state)
    pending = jnp.take_along_axis(hidden, (count - 1 - at)[:, None, None], axis=1)
    return state.rollback(count), pending

  def propose(self, params, state, cache, history, count, key, *, gamma, sampling):
    model = self._build(params["model"])
    state, hidden = self.calibrate(params, state, history, count, gamma + 1)
    keys = jax.random.split(key, gamma)
    tokens, probs = [], []
    for i in range(gamma):
      if i:
        hidden, state = layer_parallel.forward(
          model, tokens[-1][:, None], state, self.groups, params["fused"]
        )
      logits = layer_parallel.logits(model, hidden)[:, -1]
      tokens.append(sample(logits, keys[i], sampling))
      probs.append(jax.nn.softmax(filter_logits(logits, sampling), axis=-1))
    return state.rollback(count), cache, jnp.stack(tokens, 1), jnp.stack(probs, 1)


def quantized_draft(target: Llama, method: str = "w4a16", group_size: int | None = 32):
  """A `ModelDraft` of a copy of `target` with its linear weights quantized by
  `jaxllm.quant.quantize_model` (`method`: a weight format of `jaxllm.quant.FORMATS`,
  e.g. "w4a16", "w8a8"); the target keeps its weights."""
  from jaxllm.quant.apply import quantize_model  # pylint: disable=import-outside-toplevel

  graphdef, state = nnx.split(target)
  # new Variables (nnx.merge(*nnx.split(m)) would share m's): target keeps its weights
  copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
  return ModelDraft(quantize_model(copy, method, group_size), name=f"quantized-{method}")
