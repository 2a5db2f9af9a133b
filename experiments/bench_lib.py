"""Flag-free pieces the speed runners share: `bench_kernels`, `bench_decode`, `device_check`.

A runner module defines its absl flags when it is imported, so one runner cannot
import another (their flags would clash: both bench runners define ``--reps``);
what two of them use lives here. Heavy imports (jax) happen inside functions, so
importing a runner still does not import jax.

  * Kernel shapes: `MATMUL_SHAPES` and `KV_HEADS` per shape set
    (`pallas_kernels.shapes` names), `copies_for`.
  * Timing: `time_calls` (first call, then reps), `measure` (into a result row).
  * KIVI inputs: `random_kivi_layer`, `kivi_layers` (random codes, scales, window, drawn
    with numpy: jax's random programs take seconds to compile per shape on CPU).
  * Decode speed: `JaxllmBench` (the Generator's compiled prefill and decode step).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time

from pallas_kernels import shapes

# The linears measured per shape set: all of SmolLM2's; Llama-3-8B's square attention
# and MLP up projections; two of the tiny model's (CPU tests).
BENCH_LINEARS = {
  "smollm2": None,
  "llama3_8b": ("attn_q_o", "mlp_gate_up"),
  "tiny": ("attn_q", "mlp_down"),
}
# (name, K, N) of each linear per shape set; M is the caller's.
MATMUL_SHAPES = {
  model: tuple((f"{model}.{lin.name}", lin.k, lin.n) for lin in shapes.get(model).select(names))
  for model, names in BENCH_LINEARS.items()
}
# (num_heads, num_kv_heads, head_dim) per shape set.
KV_HEADS = {model: shapes.get(model).kv_heads for model in BENCH_LINEARS}
COPY_BUDGET_BYTES = 256 << 20


def copies_for(bf16_bytes: int, copies: int | None = None) -> int:
  """Operand sets per timed call: `copies` when given, else enough distinct sets for
  `COPY_BUDGET_BYTES` of bf16 (2..16), so a small operand is not re-read from cache."""
  if copies is not None:
    return copies
  return max(2, min(16, COPY_BUDGET_BYTES // max(bf16_bytes, 1)))


def time_calls(fn, args, reps: int) -> tuple[float, list[float]]:
  """(first-call seconds, per-rep seconds) of ``fn(*args)``, synced to the device."""
  import jax  # pylint: disable=import-outside-toplevel

  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return first, times


def error_text(e: BaseException) -> str:
  """One line naming an exception: its type and its first 400 characters."""
  return f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"


def measure(name: str, run, args, copies: int, row: dict, reps: int) -> dict:
  """Times ``run(*args)`` (one call = `copies` ops) into `row`: ``first_call_s``,
  ``us`` (median per op), ``us_min``, ``us_max`` and ``us_spread`` (max - min). An
  exception becomes ``row["error"]`` (printed), and the caller goes on."""
  try:
    first, times = time_calls(run, args, reps)
  except Exception as e:  # pylint: disable=broad-except  # reported per case, run goes on
    row["error"] = error_text(e)
    print(f"  {name}: {row['error']}", flush=True)
    return row
  row["first_call_s"] = first
  row["us"] = statistics.median(times) / copies * 1e6
  row["us_min"] = min(times) / copies * 1e6
  row["us_max"] = max(times) / copies * 1e6
  row["us_spread"] = row["us_max"] - row["us_min"]
  return row


# ------------------------------------------------------------------------ KIVI inputs


def random_kivi_layer(rng, cache):
  """The cache's first layer filled with random codes, scales and window from the numpy
  Generator `rng` (host-side: no random-number program to compile per shape):
  (store, k_residual, v_residual)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  layer = cache.layers[0]
  store = layer.store

  def codes(a):
    return jnp.asarray(rng.integers(0, 256, a.shape, np.int32), a.dtype)

  def uniform(a, lo, hi):
    return jnp.asarray(rng.uniform(lo, hi, a.shape).astype(np.float32), a.dtype)

  def normal(a):
    return jnp.asarray(rng.standard_normal(a.shape, np.float32), a.dtype)

  store = store._replace(
    k_packed=codes(store.k_packed),
    k_scale=uniform(store.k_scale, 0.02, 0.2),
    k_zero=uniform(store.k_zero, -1.0, 1.0),
    v_packed=codes(store.v_packed),
    v_scale=uniform(store.v_scale, 0.02, 0.2),
    v_zero=uniform(store.v_zero, -1.0, 1.0),
  )
  return store, normal(layer.k_residual), normal(layer.v_residual)


def kivi_layers(
  seed: int, spec, heads: tuple[int, int, int], batch: int, context: int, dtype, copies
):
  """`copies` random KIVI layers of `spec` (a `jaxllm.kv_cache.CacheSpec`) holding `context`
  tokens per row, for ``quantized_kv_attention``; copy i from ``numpy`` seed (seed, i).

  Returns:
    (layers, quantized_length): each layer is (store, k_residual, v_residual); the first
    `quantized_length` tokens are in the store, the rest of `context` in the window.
  """
  import numpy as np  # pylint: disable=import-outside-toplevel

  from jaxllm import kv_cache  # pylint: disable=import-outside-toplevel
  from jaxllm.config import SMOLLM2_135M  # pylint: disable=import-outside-toplevel

  hq, hkv, d = heads
  cfg = SMOLLM2_135M.replace(num_layers=1, num_heads=hq, num_kv_heads=hkv, head_dim=d)
  cache = kv_cache.create_cache(spec, cfg, batch, context, dtype)
  g = spec.group_size
  quantized_length = ((context - spec.residual) // g) * g
  layers = [random_kivi_layer(np.random.default_rng([seed, i]), cache) for i in range(copies)]
  return layers, quantized_length


# ----------------------------------------------------------------------- decode speed


def median_s(fn, reps: int) -> float:
  """Median seconds of `fn()` over `reps` runs after one warm-up; fn returns its own time."""
  fn()
  return statistics.median(fn() for _ in range(reps))


def random_prompts(batch: int, length: int, vocab: int, seed: int):
  import numpy as np  # pylint: disable=import-outside-toplevel

  lo, hi = (100, vocab - 100) if vocab > 400 else (0, vocab)
  return np.random.default_rng(seed).integers(lo, hi, size=(batch, length)).tolist()


class JaxllmBench:
  """Times the Generator's compiled prefill and decode step for one pipeline."""

  def __init__(self, pipe, reps: int, seed: int):
    import jax  # pylint: disable=import-outside-toplevel

    from jaxllm.sampling import SamplingConfig  # pylint: disable=import-outside-toplevel

    self.pipe, self.gen, self.reps, self.seed = pipe, pipe.generator, reps, seed
    self.sampling, self.key = SamplingConfig(), jax.random.key(seed)

  def _prepare(self, batch: int, prompt_len: int, new_tokens: int):
    from jaxllm.decoding import bucket, left_pad  # pylint: disable=import-outside-toplevel

    gen = self.gen
    prompts = random_prompts(batch, prompt_len, gen.config.vocab_size, self.seed)
    length = bucket(prompt_len, gen.prompt_bucket)
    capacity = bucket(length + new_tokens + 1, gen.prompt_bucket)
    if capacity > gen.max_cache_len:
      raise ValueError(
        f"{prompt_len} prompt + {new_tokens} new tokens need {capacity} cache "
        f"slots; {gen.config.name} holds {gen.max_cache_len}"
      )
    tokens, start = left_pad(prompts, length, gen.config.pad_id)
    return tokens, start, capacity

  def _prefill(self, tokens, start, capacity):
    prefill = self.gen._prefill  # pylint: disable=protected-access
    return prefill(
      self.gen.params, tokens, start, self.key, capacity=capacity, sampling=self.sampling
    )

  def prefill_tok_s(self, prompt_len: int, new_tokens: int) -> float:
    import jax  # pylint: disable=import-outside-toplevel

    tokens, start, capacity = self._prepare(1, prompt_len, new_tokens)

    def once():
      t0 = time.perf_counter()
      jax.block_until_ready(self._prefill(tokens, start, capacity))
      return time.perf_counter() - t0

    return prompt_len / median_s(once, self.reps)

  def decode_tok_s(self, batch: int, prompt_len: int, new_tokens: int) -> float:
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    tokens, start, capacity = self._prepare(batch, prompt_len, new_tokens)
    step = self.gen._step  # pylint: disable=protected-access

    def once():
      # The prefill and the step return (ids, ..., cache).
      out = jax.block_until_ready(self._prefill(tokens, start, capacity))
      tok, cache = out[0], out[-1]
      t0 = time.perf_counter()
      for _ in range(new_tokens):
        out = step(self.gen.params, cache, tok, self.key, sampling=self.sampling)
        tok, cache = out[0], out[-1]
        np.asarray(tok)  # the host needs each step's ids, as in Generator.generate
      jax.block_until_ready(cache)
      return time.perf_counter() - t0

    return batch * new_tokens / median_s(once, self.reps)

  def prefill_sweep_point(self, prompt_len: int) -> dict:
    """Compile time, run time and first-token time of the prefill of one
    `prompt_len`-token prompt (left-padded to the Generator's bucket, in a cache
    of one more slot, or of max_cache_len when that is the whole model)."""
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    from jaxllm.decoding import bucket, left_pad  # pylint: disable=import-outside-toplevel

    gen = self.gen
    length = bucket(prompt_len, gen.prompt_bucket)
    if length > gen.max_cache_len:
      raise ValueError(
        f"a {prompt_len}-token prompt pads to {length} tokens; {gen.config.name} holds "
        f"{gen.max_cache_len}"
      )
    capacity = min(bucket(length + 1, gen.prompt_bucket), gen.max_cache_len)
    prompts = random_prompts(1, prompt_len, gen.config.vocab_size, self.seed)
    tokens, start = left_pad(prompts, length, gen.config.pad_id)

    def prefill_fn(*args, **kwargs):  # a new function: jit reuses no earlier trace or compile
      return gen._prefill_fn(*args, **kwargs)  # pylint: disable=protected-access

    prefill = jax.jit(prefill_fn, static_argnames=("capacity", "sampling"))
    with persistent_cache_off():
      t0 = time.perf_counter()
      lowered = prefill.lower(
        gen.params, tokens, start, self.key, capacity=capacity, sampling=self.sampling
      )
      t1 = time.perf_counter()
      compiled = lowered.compile()
      t2 = time.perf_counter()
    out = compiled(gen.params, tokens, start, self.key)  # (ids, ..., cache)
    np.asarray(out[0])  # the first token, on the host
    t3 = time.perf_counter()
    del out
    runs = []
    for _ in range(self.reps):
      t = time.perf_counter()
      jax.block_until_ready(compiled(gen.params, tokens, start, self.key))
      runs.append(time.perf_counter() - t)
    run_s = statistics.median(runs)
    return {
      "prompt_len": prompt_len,
      "padded_len": length,
      "lower_s": t1 - t0,
      "compile_s": t2 - t0,
      "run_s": run_s,
      "run_min_s": min(runs),
      "run_max_s": max(runs),
      "tok_s": prompt_len / run_s,
      "first_token_s": t3 - t0,
    }


@contextlib.contextmanager
def persistent_cache_off():
  """JAX's persistent compilation cache off inside (so a compile is timed as one,
  not read back from disk), as it was after."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental.compilation_cache import (  # pylint: disable=import-outside-toplevel
    compilation_cache,
  )

  enabled = jax.config.jax_enable_compilation_cache
  log = logging.getLogger(compilation_cache.reset_cache.__module__)  # logs each reset at INFO
  level = log.level
  log.setLevel(max(level, logging.WARNING))
  # JAX decides once per process whether to use the cache; reset_cache makes it decide again.
  compilation_cache.reset_cache()
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()
    log.setLevel(level)
