"""Prefill and decode speed of jaxllm, beside llama.cpp and transformers.

  python -m experiments.bench_decode [--model=smollm2-135m] [--peers] [--reps=3]

Every figure is the median of --reps timed repetitions after one untimed
warm-up, with results synced to the host (block_until_ready / np.asarray):
  * prefill: the Generator's jitted prefill on one --prompt_len-token prompt;
  * decode: --new_tokens greedy steps of the Generator's jitted decode step
    after an untimed prefill of a --decode_prompt_len-token prompt, fetching
    each step's ids to the host as `Generator.generate` does; batch 1 (in
    --dtype and in bfloat16) and batch 16 (tokens/s summed over the batch);
  * first call: wall time of a fresh Python process that loads the model and
    generates one token (`python -m jaxllm.generate --max_new_tokens=1`;
    interpreter start, imports, load, compile and exit included), and the
    time to first token that process reports for itself;
  * read bandwidth: a jitted sum over a --bandwidth_mib MiB float32 array, and
    from it the batch-1 decode bound ``bandwidth / bytes of all weights``.
Peers (when installed, never for --model=tiny) run the same GGUF file:
llama.cpp on its own (quantized) weights with os.cpu_count() threads, and
transformers dequantized to float32.
"""

from __future__ import annotations

import importlib.util
import os
import re
import statistics
import subprocess
import sys
import time

from absl import app, flags

from experiments import common

NAME = "bench_decode"
common.define_common_flags(NAME, ("model", "gguf", "out_dir", "seed", "dtype"))
_PEERS = flags.DEFINE_bool("peers", True, "Also measure llama.cpp and transformers if installed.")
_REPS = flags.DEFINE_integer("reps", 3, "Timed repetitions per figure (median).", lower_bound=3)
_PROMPT_LEN = flags.DEFINE_integer(
  "prompt_len", 512, "Prompt tokens for the prefill figure.", lower_bound=1
)
_DECODE_PROMPT_LEN = flags.DEFINE_integer(
  "decode_prompt_len", 64, "Prompt tokens before the timed decode steps.", lower_bound=1
)
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "Timed decode steps.", lower_bound=1)
_BANDWIDTH_MIB = flags.DEFINE_integer(
  "bandwidth_mib", 512, "Array size for the bandwidth probe.", lower_bound=1
)
_FIRST_CALL = flags.DEFINE_bool("first_call", True, "Measure first-call latency in a subprocess.")
FLAGS = flags.FLAGS

LARGE_BATCH = 16
FIRST_CALL_PROMPT = "The capital of France is"
FIRST_CALL_SNIPPET = """
import sys
from jaxllm.pipeline import load_pipeline
model, gguf, dtype, prompt = sys.argv[1], sys.argv[2] or None, sys.argv[3], sys.argv[4]
pipe = load_pipeline(model, gguf, dtype)
ids = pipe.tokenizer.encode(prompt) if pipe.tokenizer else [5, 6, 7, 8, 9]
pipe.generator.generate([ids], max_new_tokens=1)
"""


def _median_s(fn, reps: int) -> float:
  """Median seconds of `fn()` over `reps` runs after one warm-up; fn returns its own time."""
  fn()
  return statistics.median(fn() for _ in range(reps))


def _prompts(batch: int, length: int, vocab: int, seed: int):
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
    prompts = _prompts(batch, prompt_len, gen.config.vocab_size, self.seed)
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

    return prompt_len / _median_s(once, self.reps)

  def decode_tok_s(self, batch: int, prompt_len: int, new_tokens: int) -> float:
    import jax  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    tokens, start, capacity = self._prepare(batch, prompt_len, new_tokens)
    step = self.gen._step  # pylint: disable=protected-access

    def once():
      tok, cache = jax.block_until_ready(self._prefill(tokens, start, capacity))
      t0 = time.perf_counter()
      for _ in range(new_tokens):
        tok, cache = step(self.gen.params, cache, tok, self.key, sampling=self.sampling)
        np.asarray(tok)  # the host needs each step's ids, as in Generator.generate
      jax.block_until_ready(cache)
      return time.perf_counter() - t0

    return batch * new_tokens / _median_s(once, self.reps)


def read_bandwidth_gbps(mib: int, reps: int) -> float:
  """GB/s of a jitted float32 sum over a `mib` MiB array (median of reps)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  x = jax.block_until_ready(jnp.ones((mib * 2**20 // 4,), jnp.float32))
  total = jax.jit(jnp.sum)

  def once():
    t0 = time.perf_counter()
    jax.block_until_ready(total(x))
    return time.perf_counter() - t0

  seconds = _median_s(once, max(reps, 5))
  return mib * 2**20 / seconds / 1e9


def weight_bytes(model) -> int:
  """Bytes of every parameter (a tied embedding is one array, counted once)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def first_call_s() -> tuple[float | None, float | None, str]:
  """Seconds until a fresh process has generated one token.

  Returns:
    (wall seconds of the whole process: interpreter start, imports, load,
    compile, one token, exit; the process's own time to first token when it
    reports one, as `jaxllm.generate` does; how it was run).
  """
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(p for p in (common.REPO_ROOT, os.environ.get("PYTHONPATH")) if p),
  )
  attempts = []
  if FLAGS.model == "smollm2-135m" and importlib.util.find_spec("jaxllm.generate") is not None:
    cmd = [
      sys.executable,
      "-m",
      "jaxllm.generate",
      f"--prompt={FIRST_CALL_PROMPT}",
      "--max_new_tokens=1",
      f"--dtype={FLAGS.dtype}",
    ]
    if FLAGS.gguf:
      cmd.append(f"--gguf={FLAGS.gguf}")
    attempts.append(("python -m jaxllm.generate --max_new_tokens=1", cmd))
  attempts.append(
    (
      "python -c load_pipeline+generate(max_new_tokens=1)",
      [
        sys.executable,
        "-c",
        FIRST_CALL_SNIPPET,
        FLAGS.model,
        FLAGS.gguf or "",
        FLAGS.dtype,
        FIRST_CALL_PROMPT,
      ],
    )
  )
  errors = []
  for method, cmd in attempts:
    t0 = time.perf_counter()
    proc = subprocess.run(
      cmd, capture_output=True, text=True, env=env, cwd=common.REPO_ROOT, check=False
    )
    seconds = time.perf_counter() - t0
    if proc.returncode == 0:
      reported = re.search(r"first token after ([0-9.]+)s", proc.stderr)
      return seconds, float(reported.group(1)) if reported else None, method
    tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
    errors.append(f"{method}: exit {proc.returncode}: {tail}")
  return None, None, "failed: " + " | ".join(errors)


def measure_peers(
  gguf: str, prompt_len: int, decode_prompt_len: int, new_tokens: int, reps: int
) -> tuple[dict, dict]:
  """Peer figures (None when a peer is missing or fails) and notes on each."""
  from experiments import peers  # pylint: disable=import-outside-toplevel

  out = dict.fromkeys(
    (
      "llamacpp_prefill_tok_s",
      "llamacpp_decode_bs1_tok_s",
      "hf_prefill_tok_s",
      "hf_decode_bs1_tok_s",
    )
  )
  notes = {}
  if peers.llamacpp_available():
    try:
      out["llamacpp_prefill_tok_s"] = peers.llamacpp_prefill_tok_s(gguf, prompt_len, reps)
      out["llamacpp_decode_bs1_tok_s"] = peers.llamacpp_decode_tok_s(
        gguf, new_tokens, prompt_len=decode_prompt_len, reps=reps
      )
      notes["llamacpp"] = f"GGUF weights as stored, n_threads={os.cpu_count()}"
    except Exception as e:  # noqa: BLE001  # a failing peer must not sink the bench
      notes["llamacpp"] = f"failed: {type(e).__name__}: {e}"
  else:
    notes["llamacpp"] = "not installed"
  if peers.hf_available():
    try:
      model, _ = peers.load_hf(gguf, "float32")
      out["hf_prefill_tok_s"] = peers.hf_prefill_tok_s(model, prompt_len, reps)
      out["hf_decode_bs1_tok_s"] = peers.hf_decode_tok_s(model, decode_prompt_len, new_tokens, reps)
      notes["hf"] = "transformers, GGUF dequantized to float32"
      del model
    except Exception as e:  # noqa: BLE001  # a failing peer must not sink the bench
      notes["hf"] = f"failed: {type(e).__name__}: {e}"
  else:
    notes["hf"] = "not installed"
  return out, notes


def _ratio(a, b):
  return a / b if a is not None and b else None


def _fmt(x, spec=".1f"):
  return "-" if x is None else format(x, spec)


def print_table(s: dict) -> None:
  print(
    f"{'tokens/s':24s} {'jaxllm':>9s} {'llama.cpp':>10s} {'HF':>9s} "
    f"{'x_vs_llamacpp':>14s} {'x_vs_hf':>8s}"
  )
  rows = [
    (f"prefill {s['prompt_len']} {s['dtype']}", "prefill", "", "prefill"),
    ("prefill bfloat16", "prefill", "_bf16", "prefill"),
    (f"decode bs1 {s['dtype']}", "decode_bs1", "", "decode_bs1"),
    ("decode bs1 bfloat16", "decode_bs1", "_bf16", "decode_bs1"),
    (f"decode bs{LARGE_BATCH} {s['dtype']} (sum)", "decode_bs16", "", "decode_bs1"),
    (f"decode bs{LARGE_BATCH} bf16 (sum)", "decode_bs16", "_bf16", "decode_bs1"),
  ]
  for label, ours, suffix, peer in rows:
    print(
      f"{label:24s} {_fmt(s[f'jaxllm_{ours}{suffix}_tok_s']):>9s} "
      f"{_fmt(s[f'llamacpp_{peer}_tok_s']):>10s} {_fmt(s[f'hf_{peer}_tok_s']):>9s} "
      f"{_fmt(s[f'x_vs_llamacpp_{ours}{suffix}'], '.2f'):>14s} "
      f"{_fmt(s[f'x_vs_hf_{ours}{suffix}'], '.2f'):>8s}"
    )
  print(f"{'read bandwidth (GB/s)':24s} {_fmt(s['read_bandwidth_GBps'], '.2f'):>9s}")
  print(f"{'bs1 decode / bw limit':24s} {_fmt(s['decode_bs1_vs_bw_limit'], '.3f'):>9s}")
  print(f"{'first call (s)':24s} {_fmt(s['first_call_s'], '.2f'):>9s}  fresh process, wall")
  print(
    f"{'first token (s)':24s} {_fmt(s['first_call_in_process_s'], '.2f'):>9s}  "
    "as the process reports it (after imports)"
  )


def main(argv):
  del argv
  if FLAGS.gguf is not None and not os.path.isfile(FLAGS.gguf):
    common.fail(f"GGUF file not found: {FLAGS.gguf}")
  from jaxllm.config import get_config  # pylint: disable=import-outside-toplevel
  from jaxllm.gguf_loader import default_gguf_path  # pylint: disable=import-outside-toplevel
  from jaxllm.pipeline import load_pipeline  # pylint: disable=import-outside-toplevel

  try:
    cfg = get_config(FLAGS.model)
  except ValueError as e:
    common.fail(str(e))
  reps, new_tokens, seed = _REPS.value, _NEW_TOKENS.value, FLAGS.seed
  # A prompt must leave room for the decode steps (tiny holds only 512 slots).
  prompt_len = min(_PROMPT_LEN.value, cfg.max_seq_len - new_tokens - 64)
  decode_prompt_len = min(_DECODE_PROMPT_LEN.value, cfg.max_seq_len - new_tokens - 64)
  if min(prompt_len, decode_prompt_len) < 1:
    common.fail(
      f"--new_tokens={new_tokens} leaves no room for a prompt in {cfg.name}'s "
      f"{cfg.max_seq_len} slots"
    )

  def log(msg):
    print(f"[bench_decode] {msg}", file=sys.stderr, flush=True)

  s = {}
  log(f"jaxllm {cfg.name} {FLAGS.dtype}")
  pipe = load_pipeline(FLAGS.model, FLAGS.gguf, FLAGS.dtype, seed)
  bench = JaxllmBench(pipe, reps, seed)
  try:
    s["jaxllm_prefill_tok_s"] = bench.prefill_tok_s(prompt_len, new_tokens)
    log(f"prefill {s['jaxllm_prefill_tok_s']:.1f} tok/s")
    s["jaxllm_decode_bs1_tok_s"] = bench.decode_tok_s(1, decode_prompt_len, new_tokens)
    log(f"decode bs1 {s['jaxllm_decode_bs1_tok_s']:.1f} tok/s")
    s["jaxllm_decode_bs16_tok_s"] = bench.decode_tok_s(LARGE_BATCH, decode_prompt_len, new_tokens)
    log(f"decode bs{LARGE_BATCH} {s['jaxllm_decode_bs16_tok_s']:.1f} tok/s")
  except ValueError as e:
    common.fail(str(e))
  w_bytes = weight_bytes(pipe.model)
  del bench
  if FLAGS.dtype == "bfloat16":
    bf16_pipe = pipe
  else:
    del pipe
    bf16_pipe = load_pipeline(FLAGS.model, FLAGS.gguf, "bfloat16", seed)
  # bfloat16 weights and activations: XLA:CPU's bf16 GEMM (AVX512-BF16 where the
  # CPU has it) is what the batched and prefill figures can reach.
  bf16_bench = JaxllmBench(bf16_pipe, reps, seed)
  s["jaxllm_decode_bs1_bf16_tok_s"] = bf16_bench.decode_tok_s(1, decode_prompt_len, new_tokens)
  s["jaxllm_decode_bs16_bf16_tok_s"] = bf16_bench.decode_tok_s(
    LARGE_BATCH, decode_prompt_len, new_tokens
  )
  s["jaxllm_prefill_bf16_tok_s"] = bf16_bench.prefill_tok_s(prompt_len, new_tokens)
  del bf16_bench
  log(
    f"bfloat16: decode bs1 {s['jaxllm_decode_bs1_bf16_tok_s']:.1f}, bs{LARGE_BATCH} "
    f"{s['jaxllm_decode_bs16_bf16_tok_s']:.1f}, prefill {s['jaxllm_prefill_bf16_tok_s']:.1f} tok/s"
  )
  bf16_bytes = weight_bytes(bf16_pipe.model)
  del bf16_pipe

  s["read_bandwidth_GBps"] = read_bandwidth_gbps(_BANDWIDTH_MIB.value, reps)
  bw_limit = s["read_bandwidth_GBps"] * 1e9 / w_bytes
  s["decode_bs1_vs_bw_limit"] = s["jaxllm_decode_bs1_tok_s"] / bw_limit
  log(f"read bandwidth {s['read_bandwidth_GBps']:.2f} GB/s")

  if _PEERS.value and FLAGS.model != "tiny":
    gguf = FLAGS.gguf or default_gguf_path()
    log("peers")
    peer_figs, notes = measure_peers(gguf, prompt_len, decode_prompt_len, new_tokens, reps)
  else:
    peer_figs = dict.fromkeys(
      (
        "llamacpp_prefill_tok_s",
        "llamacpp_decode_bs1_tok_s",
        "hf_prefill_tok_s",
        "hf_decode_bs1_tok_s",
      )
    )
    notes = dict.fromkeys(
      ("llamacpp", "hf"), "skipped: --model=tiny" if _PEERS.value else "skipped: --nopeers"
    )
  s.update(peer_figs)

  method = "skipped: --nofirst_call"
  s["first_call_s"] = s["first_call_in_process_s"] = None
  if _FIRST_CALL.value:
    log("first call (fresh process)")
    s["first_call_s"], s["first_call_in_process_s"], method = first_call_s()

  for peer in ("llamacpp", "hf"):
    for suffix in ("", "_bf16"):
      s[f"x_vs_{peer}_prefill{suffix}"] = _ratio(
        s[f"jaxllm_prefill{suffix}_tok_s"], s[f"{peer}_prefill_tok_s"]
      )
      s[f"x_vs_{peer}_decode_bs1{suffix}"] = _ratio(
        s[f"jaxllm_decode_bs1{suffix}_tok_s"], s[f"{peer}_decode_bs1_tok_s"]
      )
    # the batch-16 aggregate against the peer's single stream
    for suffix in ("", "_bf16"):
      s[f"x_vs_{peer}_decode_bs16{suffix}"] = _ratio(
        s[f"jaxllm_decode_bs16{suffix}_tok_s"], s[f"{peer}_decode_bs1_tok_s"]
      )
  s.update(
    model=cfg.name,
    dtype=FLAGS.dtype,
    prompt_len=prompt_len,
    decode_prompt_len=decode_prompt_len,
    new_tokens=new_tokens,
    reps=reps,
    weight_bytes=w_bytes,
    bw_limit_bs1_tok_s=bw_limit,
    decode_bs1_bf16_vs_bw_limit=s["jaxllm_decode_bs1_bf16_tok_s"]
    / (s["read_bandwidth_GBps"] * 1e9 / bf16_bytes),
  )

  print_table(s)
  print("(batch-16 ratios compare the aggregate with the peer's single stream)")
  record = {
    "config": {
      "model": FLAGS.model,
      "gguf": FLAGS.gguf,
      "dtype": FLAGS.dtype,
      "reps": reps,
      "prompt_len": prompt_len,
      "decode_prompt_len": decode_prompt_len,
      "new_tokens": new_tokens,
      "large_batch": LARGE_BATCH,
      "bandwidth_mib": _BANDWIDTH_MIB.value,
      "seed": seed,
    },
    "method": {
      "prefill": "Generator._prefill (jitted), one prompt, block_until_ready",
      "decode": "Generator._step (jitted) x new_tokens after an untimed prefill, greedy, "
      "ids fetched to host each step; tok/s = batch * new_tokens / seconds",
      "first_call": method,
      "bandwidth": "jax.jit(jnp.sum) over a float32 array",
      "bw_limit": "read_bandwidth / weight_bytes (all parameters, tied embedding once)",
      "peers": notes,
      "statistic": f"median of {reps} after 1 warm-up",
    },
    "weight_bytes": {"main": w_bytes, "bfloat16": bf16_bytes},
    "run": common.run_info(),
    "summary": s,
  }
  common.finish(FLAGS.out_dir, NAME, record, s)


if __name__ == "__main__":
  app.run(main)
