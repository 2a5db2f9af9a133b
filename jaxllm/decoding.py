"""Batched generation: one jitted prefill, one jitted decode step, static shapes.

Prompts are left-padded to a length bucket so one compiled prefill serves many
prompt lengths; the decode step donates the cache, so it is updated in place
and never retraced per token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import threading
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import sharding
from jaxllm import sharded
from jaxllm.kv_cache import CacheFactory, DenseKVCache, check_cache_factory
from jaxllm.model import Llama
from jaxllm.params import logical_axes
from jaxllm.sampling import MIN_TEMPERATURE, SamplingConfig, sample


def bucket(n: int, multiple: int = 64) -> int:
  """Smallest multiple of `multiple` that is >= n."""
  return -(-n // multiple) * multiple


@dataclasses.dataclass
class GenerationResult:
  tokens: list[list[int]]  # generated ids per prompt (EOS excluded)
  finished: list[bool]  # stopped at EOS rather than at max_new_tokens


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
  """[B, length] int32 tokens and [B] start slots for left-padded prompts."""
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  start = np.zeros((len(prompts),), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p) :] = p
    start[i] = length - len(p)
  return tokens, start


def _sample_checked(logits: jax.Array, key: jax.Array, sampling: SamplingConfig):
  """(sampled ids int32 [B], finite bool [B]: no NaN/inf in the row's logits [B, V])."""
  return sample(logits, key, sampling), jnp.isfinite(logits).all(axis=-1)


def raise_if_not_finite(finite: np.ndarray, step: int) -> None:
  """Raises ValueError naming the first row whose logits at `step` held NaN/inf
  (step 0: the prefill, which gives the first token; step n: the n-th decode step)."""
  if not finite.all():
    row = int(np.flatnonzero(~finite)[0])
    raise ValueError(
      f"logits at step {step}, row {row} are not finite: the weights or activations hold NaN/inf"
    )


class Generator:
  """Holds a split model and its compiled prefill/decode functions.

  Args:
    model: the model to run.
    max_cache_len: cap on prompt + generated tokens, in [1, config.max_seq_len]
      (None: the model's max_seq_len).
    prompt_bucket: prompts are left-padded to a multiple of this many tokens.
    make_cache: a `jaxllm.kv_cache.CacheFactory` (``make_cache(batch, capacity,
      start)``, e.g. ``kv_cache.cache_factory("kivi2", config, dtype)``) building the
      (compressed) cache generation runs through; by default a dense cache holding
      the prefill chunk as computed.
    mesh: run sharded on this `jax.sharding.Mesh` (axes `sharding.MESH_AXES`): the
      params are placed by their logical names (`sharding_report` says what the mesh
      could not divide), every jitted step runs under ``jax.set_mesh`` and pins the
      cache to its sharding (`jaxllm.sharded.constrain_cache`), so it stays sharded
      across steps. None: the mesh the model's params are already placed on
      (`jaxllm.sharded.shard_model`), if any, else one device.
    rules: the logical-axis rules (`sharding.DEFAULT_RULES`).
    strict: with `mesh`, a param dimension the mesh does not divide is a ValueError.

  Each step's logits are checked for NaN/inf inside the jitted prefill and decode
  step (one bool per row, fetched with the sampled ids), and `generate` raises
  ValueError naming the step and row; it also raises if the cache overflowed.
  """

  def __init__(
    self,
    model: Llama,
    max_cache_len: int | None = None,
    prompt_bucket: int = 64,
    make_cache: CacheFactory | None = None,
    mesh: Mesh | None = None,
    rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
    strict: bool = False,
  ):
    self.config = model.config
    limit = model.config.max_seq_len
    if max_cache_len is None:
      max_cache_len = limit
    if (
      isinstance(max_cache_len, bool)
      or not isinstance(max_cache_len, numbers.Integral)
      or not 1 <= max_cache_len <= limit
    ):
      raise ValueError(
        f"max_cache_len must be an int in [1, {limit}] (the model's max_seq_len) or None, "
        f"got {max_cache_len!r}"
      )
    if (
      isinstance(prompt_bucket, bool)
      or not isinstance(prompt_bucket, numbers.Integral)
      or prompt_bucket < 1
    ):
      raise ValueError(f"prompt_bucket must be an int >= 1, got {prompt_bucket!r}")
    if make_cache is not None:
      check_cache_factory(make_cache, "Generator")
    self.dtype = model.dtype  # activations and KV cache (params may be quantized)
    self.graphdef, self.state = nnx.split(model)
    # Jitted functions take the params as a plain dict: JAX flattens it in C++, so
    # each decode step dispatches faster than with an nnx.State of Variables.
    self.params = self.state.to_pure_dict()
    self.rules = rules
    self.sharding_report = sharding.ShardingReport()
    if mesh is None:
      mesh = sharded.mesh_of(self.params)
    elif not isinstance(mesh, Mesh):
      raise TypeError(f"Generator: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    else:
      self.params, self.sharding_report = sharding.shard_params_with_report(
        self.params, logical_axes(model), mesh, rules, strict
      )
    self.mesh = mesh
    self.max_cache_len = int(max_cache_len)
    self.prompt_bucket = int(prompt_bucket)
    self.make_cache = make_cache
    self._prefill = jax.jit(self._prefill_fn, static_argnames=("capacity", "sampling"))
    self._step = jax.jit(self._step_fn, static_argnames=("sampling",), donate_argnames=("cache",))
    self._compiled_steps: set = set()

  # -- jitted bodies -------------------------------------------------------------------

  def _mesh_context(self):
    """``jax.set_mesh(self.mesh)`` (thread-local: each thread that traces enters it)."""
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def _pinned(self, ids, finite, cache):
    """Under a mesh: the cache constrained to its sharding, ids and flags replicated."""
    if self.mesh is None:
      return ids, finite, cache
    replicated = NamedSharding(jax.sharding.get_abstract_mesh(), PartitionSpec())
    ids, finite = (jax.lax.with_sharding_constraint(x, replicated) for x in (ids, finite))
    return ids, finite, sharded.constrain_cache(cache, self.rules)

  def _model(self, params) -> Llama:
    state = jax.tree.map(lambda x: x, self.state)  # a fresh State to fill with tracers
    state.replace_by_pure_dict(params)
    return nnx.merge(self.graphdef, state)

  def _prefill_fn(self, params, tokens, start, key, *, capacity, sampling):
    model = self._model(params)
    if self.make_cache is None:
      logits, chunk = model(tokens, start=start, logits_at="last")
      cache = chunk.grow(capacity)
    else:
      empty = self.make_cache(tokens.shape[0], capacity, start)
      logits, cache = model(tokens, cache=empty, logits_at="last")
    return self._pinned(*_sample_checked(logits[:, -1], key, sampling), cache)

  def _step_fn(self, params, cache, tokens, key, *, sampling):
    model = self._model(params)
    logits, cache = model(tokens[:, None], cache=cache, logits_at="last")
    return self._pinned(*_sample_checked(logits[:, -1], key, sampling), cache)

  def _compile_step(self, batch: int, capacity: int, sampling: SamplingConfig) -> None:
    """Compiles the decode step for this shape ahead of time (jit caches the result)."""
    signature = (batch, capacity, sampling)
    if signature in self._compiled_steps:
      return
    start = jnp.zeros((batch,), jnp.int32)
    if self.make_cache is None:
      make = lambda: DenseKVCache.create(self.config, batch, capacity, self.dtype, start)
    else:
      make = lambda: self.make_cache(batch, capacity, start)
    cache = jax.eval_shape(make)
    tokens = jax.ShapeDtypeStruct((batch,), jnp.int32)
    if self.mesh is not None:  # the shardings the prefill hands the step
      shardings, _ = sharded.cache_shardings(cache, self.mesh, self.rules)
      cache = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cache, shardings
      )
      tokens = jax.ShapeDtypeStruct(
        (batch,), jnp.int32, sharding=NamedSharding(self.mesh, PartitionSpec())
      )
    key = jax.eval_shape(lambda: jax.random.key(0))
    with self._mesh_context():
      self._step.lower(self.params, cache, tokens, key, sampling=sampling).compile()
    self._compiled_steps.add(signature)

  # -- public API ----------------------------------------------------------------------

  def validate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if isinstance(prompts, (str, bytes)) or not len(prompts):
      raise ValueError("prompts must be a non-empty list of token-id lists")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    for i, p in enumerate(prompts):
      if len(p) == 0:
        raise ValueError(f"prompt {i} is empty: give at least one token")
      bad = [t for t in p if not 0 <= int(t) < self.config.vocab_size]
      if bad:
        raise ValueError(
          f"prompt {i} has token ids outside [0, {self.config.vocab_size}): {bad[:5]}"
        )
      if len(p) + max_new_tokens > self.max_cache_len:
        raise ValueError(
          f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it needs "
          f"{len(p) + max_new_tokens} cache slots but the cache holds {self.max_cache_len}"
        )

  def generate(
    self,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    key: jax.Array | None = None,
    on_tokens: Callable[[np.ndarray], None] | None = None,
    stop_at_eos: bool = True,
  ) -> GenerationResult:
    """Generates up to `max_new_tokens` per prompt.

    Args:
      prompts: token-id lists, any lengths.
      max_new_tokens: cap on generated tokens per prompt.
      sampling: sampling configuration (greedy by default).
      key: PRNG key; required unless sampling is greedy.
      on_tokens: called with each step's [B] new ids (streaming).
      stop_at_eos: stop a row at the EOS id.
    """
    self.validate(prompts, max_new_tokens)
    if key is None:
      if not sampling.greedy:
        raise ValueError(
          f"sampling with temperature {sampling.temperature} (>= {MIN_TEMPERATURE}, not "
          "greedy) needs an explicit PRNG key"
        )
      key = jax.random.key(0)
    length = min(
      bucket(max(map(len, prompts)), self.prompt_bucket), self.max_cache_len - max_new_tokens
    )
    capacity = bucket(length + max_new_tokens, self.prompt_bucket)
    tokens, start = left_pad(prompts, length, self.config.pad_id)
    keys = jax.random.split(key, max_new_tokens)
    # The decode step compiles on a second thread while prefill compiles and runs,
    # so neither the first token nor the second waits for both compiles in series.
    step_compile = threading.Thread(
      target=self._compile_step, args=(len(prompts), capacity, sampling), daemon=True
    )
    if max_new_tokens > 1:
      step_compile.start()
    with self._mesh_context():
      next_tok, finite, cache = self._prefill(
        self.params, tokens, start, keys[0], capacity=capacity, sampling=sampling
      )
    out = np.zeros((len(prompts), max_new_tokens), np.int32)
    done = np.zeros((len(prompts),), bool)
    n = 0
    for n in range(max_new_tokens):
      ids = np.asarray(next_tok)
      raise_if_not_finite(np.asarray(finite), n)
      out[:, n] = ids
      if on_tokens is not None:
        on_tokens(np.where(done, -1, ids))
      if stop_at_eos:
        done |= ids == self.config.eos_id
      if done.all() or n + 1 == max_new_tokens:
        break
      if n == 0:
        step_compile.join()
      with self._mesh_context():
        next_tok, finite, cache = self._step(
          self.params, cache, next_tok, keys[n + 1], sampling=sampling
        )
    cache.check_overflow()  # cannot fire: `validate` bounds the lengths, nothing rolls back
    results, finished = [], []
    for row in out[:, : n + 1]:
      hit = np.flatnonzero(row == self.config.eos_id) if stop_at_eos else []
      results.append(row[: hit[0]].tolist() if len(hit) else row.tolist())
      finished.append(bool(len(hit)))
    return GenerationResult(tokens=results, finished=finished)
