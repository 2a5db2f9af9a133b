"""Speculative decoding: a draft proposes gamma tokens, the target scores all gamma + 1
positions in one call, and each row keeps its own number of them.

One step, per row (`SpeculativeGenerator`, both halves jit-compiled):
  1. the draft (`jaxllm.drafts`) proposes x_1..x_gamma after the pending token t (the
     newest token, not yet in the target's cache), drawn from its distributions q;
  2. the target runs [t, x_1..x_gamma] through its cache (`logits_at="all"`): p_0..p_gamma;
  3. greedy mode accepts x_i while it equals argmax p_{i-1}; sampling mode accepts x_i
     with probability min(1, p(x_i) / q(x_i)). The first rejected position i draws its
     token from norm(max(0, p_{i-1} - q_i)); with every draft accepted, a bonus token is
     drawn from p_gamma. The output is then distributed as the target's own sampling
     (Leviathan et al. 2023; Chen et al. 2023): lossless. p and q are filtered alike
     (`jaxllm.sampling.filter_logits`: temperature, top-k, top-p);
  4. each row's cache rolls back to what it kept (`cache.rollback(lengths[B])`): a row
     that accepted a drafts keeps t, x_1..x_a and emits a + 1 tokens.

Greedy mode emits the target's own greedy tokens, token for token, also over a compressed
target cache (KIVI with a residual window, int8/FireQ): the target's cache runs in its
speculative mode (`speculative_cache`), where a verify chunk is attended as one-token steps
would and, for KIVI, only the tokens a row keeps are written (a deferred commit in
`rollback`), so the output equals `Generator`'s with the same `make_cache`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.decoding import GenerationResult, Generator, bucket, left_pad, raise_if_not_finite
from jaxllm.drafts import Draft
from jaxllm.kv_cache import DenseKVCache, GroupQuantizedKVCache, TokenQuantizedKVCache
from jaxllm.kv_cache.base import update_rows
from jaxllm.kv_cache.token_quantized import ROLLBACK_SLACK
from jaxllm.model import Llama
from jaxllm.sampling import MIN_TEMPERATURE, SamplingConfig, filter_logits

MODES = ("greedy", "sample")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
  """gamma: draft tokens per target call (>= 1). mode: "greedy" (accept while the draft
  equals the target's argmax; needs greedy sampling) or "sample" (lossless rejection
  sampling, any `SamplingConfig`)."""

  gamma: int = 4
  mode: str = "greedy"

  def __post_init__(self):
    if isinstance(self.gamma, bool) or not isinstance(self.gamma, int) or self.gamma < 1:
      raise ValueError(f"gamma must be an int >= 1 (draft tokens per step), got {self.gamma!r}")
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


@dataclasses.dataclass
class SpeculativeStats:
  """Per row: target calls (the prefill included, while the row was generating), draft
  tokens proposed and accepted, tokens generated (EOS included)."""

  target_calls: list[int]
  drafted: list[int]
  accepted: list[int]
  generated: list[int]

  @property
  def acceptance_rate(self) -> float:
    """alpha: accepted / drafted over all rows."""
    return sum(self.accepted) / max(sum(self.drafted), 1)

  @property
  def tokens_per_target_call(self) -> float:
    """Generated tokens per target call over all rows (plain decoding: 1)."""
    return sum(self.generated) / max(sum(self.target_calls), 1)


@dataclasses.dataclass
class SpeculativeResult(GenerationResult):
  stats: SpeculativeStats


@dataclasses.dataclass
class _Loop:
  """Device state between steps, and the host's view of the rows."""

  cache: object  # the target's cache: count - 1 tokens per active row
  draft_state: object
  history: jax.Array  # [B, T] int32, tokens by slot (prompt left-padded)
  count: jax.Array  # [B] int32, slots of `history` filled (pending token included)
  remaining: np.ndarray  # [B] tokens each row still wants (0: finished)


def rollback_depth(cache) -> tuple[int | None, str]:
  """(how many tokens of a verify chunk `cache` can roll back exactly in its speculative
  mode; None: any, why). KIVI with a residual window commits only kept tokens (any
  depth); without one its partial group cannot be read as one-token steps (0)."""
  if isinstance(cache, GroupQuantizedKVCache):
    if cache.spec.residual == 0:
      return 0, (
        f"{cache.name} has no residual window: its pending partial group is read "
        "quantize-dequantized with statistics over the tokens present at each step, so a "
        "verify chunk cannot be read as one-token steps would read it"
      )
    return None, ""
  if isinstance(cache, TokenQuantizedKVCache) and cache.spec.residual:
    return ROLLBACK_SLACK, (
      f"{cache.name}'s exact window of the newest tokens stays exact only through rollbacks "
      f"of up to ROLLBACK_SLACK={ROLLBACK_SLACK} tokens"
    )
  return None, ""


def speculative_cache(cache, gamma: int):
  """The target cache for verify chunks of gamma + 1 tokens: a compressed cache in its
  speculative mode (`for_speculation`; ValueError where it has none), a dense one as is."""
  if isinstance(cache, (GroupQuantizedKVCache, TokenQuantizedKVCache)):
    return cache.for_speculation(gamma)
  return cache


def accept_greedy(logits, drafts):
  """Greedy acceptance: (accepted drafts a [B], next token [B]: argmax of p_a)."""
  best = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, gamma + 1]
  a = jnp.sum(jnp.cumprod(drafts == best[:, :-1], axis=1), axis=1).astype(jnp.int32)
  return a, jnp.take_along_axis(best, a[:, None], axis=1)[:, 0]


def accept_sampled(p, q, drafts, key):
  """Lossless acceptance. p [B, gamma + 1, V] target and q [B, gamma, V] draft probabilities
  (filtered alike), drafts [B, gamma]. Accepts x_i with probability min(1, p(x_i) / q(x_i));
  the first rejected position draws from norm(max(0, p - q)), or from p_gamma (bonus) when
  every draft is accepted. Returns (accepted drafts a [B], next token [B])."""
  b, gamma = drafts.shape
  u_key, draw_key = jax.random.split(key)
  px = jnp.take_along_axis(p[:, :-1], drafts[..., None], axis=-1)[..., 0]
  qx = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
  u = jax.random.uniform(u_key, (b, gamma))
  a = jnp.sum(jnp.cumprod(u * qx < px, axis=1), axis=1).astype(jnp.int32)
  q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # q_gamma = 0: bonus from p
  p_a = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]
  q_a = jnp.take_along_axis(q_pad, a[:, None, None], axis=1)[:, 0]
  residual = jnp.maximum(p_a - q_a, 0.0)
  # all-zero only when p_a == q_a, where rejection has probability 0: fall back to p_a
  residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_a)
  return a, jax.random.categorical(draw_key, jnp.log(residual), axis=-1).astype(jnp.int32)


class SpeculativeGenerator(Generator):
  """`Generator` with draft-and-verify steps.

  Args:
    target_model: the model whose output distribution (or greedy output) is reproduced.
    draft: a `jaxllm.drafts.Draft` (`LookupDraft`, `LayerSkipDraft`, `ModelDraft`).
    config: `SpeculativeConfig` (gamma, mode).
    make_cache: the target's `CacheFactory` (None: dense), as for `Generator`.
    max_cache_len, prompt_bucket: as for `Generator`.

  Host-side checks (ValueError) before any work: a draft vocabulary other than the
  target's; a draft that cannot run with this cache; gamma deeper than the target's cache
  can roll back (`rollback_depth`) or a compressed cache without a speculative mode
  (`speculative_cache`); in `generate`, a prompt + max_new_tokens + gamma
  beyond max_cache_len (a verify step writes gamma tokens past the last one kept).
  """

  def __init__(
    self,
    target_model: Llama,
    draft: Draft,
    config: SpeculativeConfig,
    make_cache=None,
    max_cache_len: int | None = None,
    prompt_bucket: int = 64,
  ):
    if not isinstance(config, SpeculativeConfig):
      raise ValueError(f"config must be a SpeculativeConfig, got {type(config).__name__}")
    super().__init__(target_model, max_cache_len, prompt_bucket, make_cache)
    vocab = self.config.vocab_size
    if draft.vocab_size is not None and draft.vocab_size != vocab:
      raise ValueError(
        f"the draft ({draft.name}) has a vocabulary of {draft.vocab_size} tokens, the target "
        f"{vocab}: speculative decoding needs the same vocabulary"
      )
    start = jnp.zeros((1,), jnp.int32)
    if make_cache is None:
      make = lambda: DenseKVCache.create(self.config, 1, self.max_cache_len, self.dtype, start)
    else:
      make = lambda: make_cache(1, self.max_cache_len, start)
    cache = jax.eval_shape(make)
    draft.check(target_model, cache)
    depth, why = rollback_depth(cache)
    if depth is not None and config.gamma > depth:
      raise ValueError(
        f"gamma={config.gamma} is deeper than the target cache can roll back: a verify step "
        f"rolls back up to gamma tokens, and {why}; use gamma <= {depth}"
        + (" (this cache cannot roll back at all)" if depth == 0 else "")
      )
    jax.eval_shape(lambda: speculative_cache(make(), config.gamma))  # its ValueError
    self.draft, self.spec = draft, config
    self._draft_init = jax.jit(draft.init, static_argnames=("capacity",))
    self._propose = jax.jit(
      draft.propose, static_argnames=("gamma", "sampling"), donate_argnames=("state", "cache")
    )
    self._verify = jax.jit(
      self._verify_fn,
      static_argnames=("sampling", "stop_at_eos"),
      donate_argnames=("cache", "history"),
    )

  # -- jitted body ---------------------------------------------------------------------

  def _verify_fn(
    self, params, cache, history, count, remaining, drafts, q, key, *, sampling, stop_at_eos
  ):
    """Scores [pending, drafts] in one call, accepts per row, rolls the cache back.

    Returns (cache, history, count, out [B, gamma + 1] (row b's first `emit[b]` are its
    new tokens), emit [B], remaining [B], accepted drafts [B], finite [B])."""
    b, gamma = drafts.shape
    pending = jnp.take_along_axis(history, (count - 1)[:, None], axis=1)
    kept = cache.length
    logits, cache = self._model(params)(
      jnp.concatenate([pending, drafts], axis=1), cache=cache, logits_at="all"
    )
    finite = jnp.isfinite(logits).all(axis=(1, 2))
    if self.spec.mode == "greedy":
      a, nxt = accept_greedy(logits, drafts)
    else:
      v = logits.shape[-1]
      p = jax.nn.softmax(filter_logits(logits.reshape(-1, v), sampling), axis=-1)
      q = jax.nn.one_hot(drafts, v, dtype=jnp.float32) if q is None else q
      a, nxt = accept_sampled(p.reshape(b, gamma + 1, v), q, drafts, key)
    j = jnp.arange(gamma + 1, dtype=jnp.int32)[None]
    padded = jnp.concatenate([drafts, nxt[:, None]], axis=1)
    out = jnp.where(j < a[:, None], padded, nxt[:, None])
    emit = jnp.minimum(a + 1, remaining)
    eos = jnp.zeros_like(emit, dtype=bool)
    if stop_at_eos:
      hit = (out == self.config.eos_id) & (j < emit[:, None])
      eos = hit.any(axis=1)
      emit = jnp.where(eos, jnp.argmax(hit, axis=1).astype(jnp.int32) + 1, emit)
    remaining = jnp.where(eos, 0, remaining - emit)
    # a row that finishes goes back to its old length (or the least its cache can keep),
    # so later steps, which still write its slots (static shapes), stay within the capacity
    done = jnp.maximum(kept, cache.rollback_floor())
    cache = cache.rollback(jnp.where(remaining > 0, kept + 1 + a, done))
    history = update_rows(history, out, count, 1)
    return cache, history, count + emit, out, emit, remaining, a, finite

  # -- loop ----------------------------------------------------------------------------

  def validate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    super().validate(prompts, max_new_tokens)
    gamma = self.spec.gamma
    for i, p in enumerate(prompts):
      if len(p) + max_new_tokens + gamma > self.max_cache_len:
        raise ValueError(
          f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} and "
          f"gamma={gamma} it needs {len(p) + max_new_tokens + gamma} cache slots (a verify "
          f"step writes gamma tokens past the last one kept) but the cache holds "
          f"{self.max_cache_len}"
        )

  def _begin(self, prompts, max_new_tokens, sampling, key, stop_at_eos):
    """Prefills target and draft; returns (loop, first token ids [B], finite [B])."""
    gamma = self.spec.gamma
    length = min(
      bucket(max(map(len, prompts)), self.prompt_bucket),
      self.max_cache_len - max_new_tokens - gamma,
    )
    capacity = bucket(length + max_new_tokens + gamma, self.prompt_bucket)
    tokens, start = left_pad(prompts, length, self.config.pad_id)
    first, finite, cache = self._prefill(
      self.params, tokens, start, key, capacity=capacity, sampling=sampling
    )
    cache = speculative_cache(cache, gamma)
    draft_state = self._draft_init(self.draft.params, tokens, start, capacity=capacity)
    first = np.asarray(first)
    history = np.zeros((len(prompts), capacity), np.int32)
    history[:, :length], history[:, length] = tokens, first
    remaining = np.full((len(prompts),), max_new_tokens - 1, np.int32)
    if stop_at_eos:
      remaining[first == self.config.eos_id] = 0
    count = jnp.full((len(prompts),), length + 1, jnp.int32)
    loop = _Loop(cache, draft_state, jnp.asarray(history), count, remaining)
    return loop, first, np.asarray(finite)

  def _iterate(self, loop: _Loop, key, sampling, stop_at_eos):
    """One draft-and-verify step; returns (loop, out [B, gamma + 1], emit [B],
    accepted [B], finite [B]) on the host."""
    draft_key, verify_key = jax.random.split(key)
    draft_state, cache, drafts, q = self._propose(
      self.draft.params,
      loop.draft_state,
      loop.cache,
      loop.history,
      loop.count,
      draft_key,
      gamma=self.spec.gamma,
      sampling=sampling,
    )
    cache, history, count, out, emit, remaining, a, finite = self._verify(
      self.params,
      cache,
      loop.history,
      loop.count,
      jnp.asarray(loop.remaining),
      drafts,
      q,
      verify_key,
      sampling=sampling,
      stop_at_eos=stop_at_eos,
    )
    out, emit, remaining, a, finite = jax.device_get((out, emit, remaining, a, finite))
    loop = _Loop(cache, draft_state, history, count, np.array(remaining))
    return loop, out, emit, a, finite

  def generate(
    self,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    key: jax.Array | None = None,
    on_tokens: Callable[[np.ndarray], None] | None = None,
    stop_at_eos: bool = True,
  ) -> SpeculativeResult:
    """Generates up to `max_new_tokens` per prompt, as `Generator.generate` does.

    `on_tokens` is called with [B] ids, one call per token position of a step: a step
    gives each row between 1 and gamma + 1 tokens, and -1 stands for "no token in this
    call" (a row that finished, or that accepted fewer drafts than another). Appending a
    row's ids other than -1 gives its output, EOS included, as with `Generator`.
    """
    self.validate(prompts, max_new_tokens)
    if self.spec.mode == "greedy" and not sampling.greedy:
      raise ValueError(
        f"mode 'greedy' needs greedy sampling (temperature < {MIN_TEMPERATURE}), got "
        f"temperature {sampling.temperature}; use SpeculativeConfig(mode='sample')"
      )
    if key is None:
      if not sampling.greedy:
        raise ValueError(
          f"sampling with temperature {sampling.temperature} (>= {MIN_TEMPERATURE}, not "
          "greedy) needs an explicit PRNG key"
        )
      key = jax.random.key(0)
    b, gamma = len(prompts), self.spec.gamma
    key, first_key = jax.random.split(key)
    loop, first, finite = self._begin(prompts, max_new_tokens, sampling, first_key, stop_at_eos)
    raise_if_not_finite(finite, 0)
    rows = [[int(t)] for t in first]
    calls, drafted, accepted = np.ones(b, int), np.zeros(b, int), np.zeros(b, int)
    if on_tokens is not None:
      on_tokens(first.copy())
    step = 0
    while loop.remaining.any():
      step += 1
      active = loop.remaining > 0
      key, step_key = jax.random.split(key)
      loop, out, emit, a, finite = self._iterate(loop, step_key, sampling, stop_at_eos)
      raise_if_not_finite(finite | ~active, step)
      calls += active
      drafted += gamma * active
      accepted += np.where(active, a, 0)
      for row in np.flatnonzero(emit):
        rows[row].extend(out[row, : emit[row]].tolist())
      if on_tokens is not None:
        for j in range(int(emit.max(initial=0))):
          on_tokens(np.where(j < emit, out[:, j], -1).astype(np.int32))
    loop.cache.check_overflow()
    results, finished = [], []
    for row in rows:
      hit = row.index(self.config.eos_id) if stop_at_eos and self.config.eos_id in row else None
      results.append(row if hit is None else row[:hit])
      finished.append(hit is not None)
    stats = SpeculativeStats(
      calls.tolist(), drafted.tolist(), accepted.tolist(), [len(r) for r in rows]
    )
    return SpeculativeResult(tokens=results, finished=finished, stats=stats)
