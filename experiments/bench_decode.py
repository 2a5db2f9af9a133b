"""Prefill and decode speed of jaxllm, beside llama.cpp and transformers.

  python -m experiments.bench_decode [--model=smollm2-135m] [--peers] [--reps=3]
      [--prompt_lens=512,2048,8192]

Every figure is the median of --reps timed repetitions after one untimed
warm-up, with results synced to the host (block_until_ready / np.asarray):
  * prefill: the Generator's jitted prefill on one --prompt_len-token prompt;
  * prefill sweep, per --prompt_lens length: the prefill's compile time (trace
    and lowering, then XLA's compile, with the persistent compilation cache off
    so it is a real compile), its run time (median and min-max of --reps runs
    after the first), and the time to first token (trace, compile, first run
    and fetching the sampled id, as a first generate() call pays it);
  * decode: --new_tokens greedy steps of the Generator's jitted decode step
    after an untimed prefill of a --decode_prompt_len-token prompt, fetching
    each step's ids to the host as `Generator.generate` does; batch 1 (in
    --dtype and in bfloat16) and batch 16 (tokens/s summed over the batch);
  * first call: wall time of a fresh Python process that loads the model and
    generates one token (`python -m jaxllm.generate --max_new_tokens=1`;
    interpreter start, imports, load, compile and exit included), and the
    time to first token that process reports for itself; measured twice with
    one new, empty persistent compilation cache directory and one new, empty
    weight cache directory (`jaxllm.weight_cache`): cold (every program
    compiles, the GGUF is dequantized, and both are stored), then warm (a
    second process reads them back);
  * read bandwidth: a jitted sum over a --bandwidth_mib MiB float32 array, and
    from it the batch-1 decode bound ``bandwidth / bytes of all weights``.
Peers (when installed, never for --model=tiny) run the same GGUF file, each in
its own subprocess (`python -m experiments.peers`), so a peer that crashes (a
llama.cpp build for another CPU dies with SIGILL) is recorded as failed with
its exit code while every other figure is still written: llama.cpp on its own
(quantized) weights with os.cpu_count() threads, and transformers dequantized
to float32.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from experiments import bench_lib, common
from jaxllm import runtime as _runtime

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
_FIRST_CALL = flags.DEFINE_bool(
  "first_call",
  True,
  "Measure first-call latency in fresh processes, with cold and then warm compilation and "
  "weight caches.",
)
_PROMPT_LENS = flags.DEFINE_list(
  "prompt_lens",
  None,
  "Prompt lengths of the prefill sweep (compile time, run time, first token); default "
  f"{','.join(map(str, (512, 2048, 8192)))}, each capped at the model's max_seq_len. "
  "Empty: no sweep.",
)
_PEER_TIMEOUT_S = flags.DEFINE_integer(
  "peer_timeout_s", 1800, "Seconds each peer's subprocess may run.", lower_bound=1
)
_runtime.define_kernel_flags()
FLAGS = flags.FLAGS

DEFAULT_PROMPT_LENS = (512, 2048, 8192)

LARGE_BATCH = 16
FIRST_CALL_PROMPT = "The capital of France is"
FIRST_CALL_SNIPPET = """
import sys, time
from jaxllm import runtime
from jaxllm.pipeline import load_pipeline
t0 = time.perf_counter()
runtime.setup(compilation_cache=True)
model, gguf, dtype, prompt = sys.argv[1], sys.argv[2] or None, sys.argv[3], sys.argv[4]
pipe = load_pipeline(model, gguf, dtype, weight_cache_dir=runtime.weight_cache_dir(True))
ids = pipe.tokenizer.encode(prompt) if pipe.tokenizer else [5, 6, 7, 8, 9]
pipe.generator.generate([ids], max_new_tokens=1)
sys.stderr.write(f"first token after {time.perf_counter() - t0:.2f}s\\n")
"""
# Peers in the order they are measured; figures each peer's subprocess reports.
PEERS = ("llamacpp", "hf")
PEER_FIGURES = ("prefill_tok_s", "decode_bs1_tok_s")


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

  seconds = bench_lib.median_s(once, max(reps, 5))
  return mib * 2**20 / seconds / 1e9


def weight_bytes(model) -> int:
  """Bytes of every parameter (a tied embedding is one array, counted once)."""
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def first_call_s(cache_dir: str, weight_dir: str) -> tuple[float | None, float | None, str]:
  """Seconds until a fresh process has generated one token, with JAX's
  persistent compilation cache in `cache_dir` (``$JAXLLM_COMPILATION_CACHE_DIR``)
  and the weight cache in `weight_dir` (``$JAXLLM_WEIGHT_CACHE_DIR``).

  Returns:
    (wall seconds of the whole process: interpreter start, imports, load,
    compile, one token, exit; the process's own time to first token when it
    reports one, as `jaxllm.generate` does; how it was run).
  """
  from jaxllm import runtime  # pylint: disable=import-outside-toplevel

  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(p for p in (common.REPO_ROOT, os.environ.get("PYTHONPATH")) if p),
  )
  env[runtime.CACHE_DIR_ENV] = cache_dir
  env[runtime.WEIGHT_CACHE_DIR_ENV] = weight_dir
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
      "python -c runtime.setup+load_pipeline+generate(max_new_tokens=1)",
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


def first_calls() -> tuple[dict, str]:
  """First-call figures of two fresh processes sharing one new, empty compilation
  cache directory and one new, empty weight cache directory: cold (compiles and
  stores every program, dequantizes and stores the weights), then warm (reads
  them back). Returns (figures, how they were run)."""
  root = tempfile.mkdtemp(prefix="jaxllm_bench_first_call_")
  cache_dir, weight_dir = os.path.join(root, "xla"), os.path.join(root, "weights")
  try:
    cold_s, cold_in_process_s, method = first_call_s(cache_dir, weight_dir)
    entries = sum(len(files) for _, _, files in os.walk(cache_dir))
    warm_s, warm_in_process_s, warm_method = first_call_s(cache_dir, weight_dir)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  if warm_method != method:
    method = f"cold: {method}; warm: {warm_method}"
  return {
    "first_call_s": cold_s,
    "first_call_in_process_s": cold_in_process_s,
    "first_call_warm_s": warm_s,
    "first_call_warm_in_process_s": warm_in_process_s,
    "first_call_cache_files": entries,
  }, method


def _exit_description(code: int) -> str:
  """``exit 3``, or for a process killed by a signal ``exit -4 (SIGILL)``."""
  if code < 0:
    try:
      return f"exit {code} ({signal.Signals(-code).name})"
    except ValueError:
      pass
  return f"exit {code}"


def run_peer(
  peer: str,
  gguf: str,
  prompt_len: int,
  decode_prompt_len: int,
  new_tokens: int,
  reps: int,
  timeout_s: int,
) -> tuple[dict, dict]:
  """Measures one peer in its own process (`python -m experiments.peers`).

  Returns:
    ({figure: tokens/s} as the peer reported them, or {} when it failed; the
    peer's status: ``{"status": "ok" | "failed", "exit_code": int | None,
    "error": str | None, "note": str | None}``).
  """
  cmd = [
    sys.executable,
    "-m",
    "experiments.peers",
    peer,
    f"--gguf={gguf}",
    f"--prompt_len={prompt_len}",
    f"--decode_prompt_len={decode_prompt_len}",
    f"--new_tokens={new_tokens}",
    f"--reps={reps}",
  ]
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(p for p in (common.REPO_ROOT, os.environ.get("PYTHONPATH")) if p),
  )
  status = {"status": "failed", "exit_code": None, "error": None, "note": None}
  try:
    proc = subprocess.run(
      cmd,
      capture_output=True,
      text=True,
      env=env,
      cwd=common.REPO_ROOT,
      timeout=timeout_s,
      check=False,
    )
  except subprocess.TimeoutExpired:
    status["error"] = f"no result after --peer_timeout_s={timeout_s}s; killed"
    return {}, status
  status["exit_code"] = proc.returncode
  lines = proc.stdout.strip().splitlines()
  if proc.returncode != 0:
    tail = (proc.stderr.strip().splitlines() or ["(no output on stderr)"])[-1]
    status["error"] = f"{_exit_description(proc.returncode)}: {tail.strip()}"
    return {}, status
  try:
    reported = json.loads(lines[-1])
    figures = {f"{peer}_{name}": float(reported[name]) for name in PEER_FIGURES}
  except (IndexError, KeyError, TypeError, ValueError):
    status["error"] = f"exit 0 without a result line: {(lines or ['(no output)'])[-1][:200]}"
    return {}, status
  bad = sorted(k for k, x in figures.items() if not math.isfinite(x) or x <= 0)
  if bad:
    status["error"] = f"exit 0 with figures that are not positive and finite: {bad}"
    return {}, status
  status.update(status="ok", note=reported.get("note"))
  return figures, status


def measure_peers(
  peers_to_run: tuple[str, ...],
  gguf: str,
  prompt_len: int,
  decode_prompt_len: int,
  new_tokens: int,
  reps: int,
  timeout_s: int,
  log,
  skip_reason: str = "skipped",
) -> tuple[dict, dict]:
  """Peer figures (None unless measured) and each peer's status; each of
  `peers_to_run` runs in its own process, so a crash costs only its figures; the
  others get status `skip_reason`."""
  from experiments import peers  # pylint: disable=import-outside-toplevel

  out = {f"{peer}_{name}": None for peer in PEERS for name in PEER_FIGURES}
  status = {}
  available = {"llamacpp": peers.llamacpp_available, "hf": peers.hf_available}
  for peer in PEERS:
    if peer not in peers_to_run:
      status[peer] = {"status": skip_reason, "exit_code": None, "error": None, "note": None}
    elif not (available[peer]() or peers.crash_requested(peer)):
      status[peer] = {"status": "not installed", "exit_code": None, "error": None, "note": None}
    else:
      log(f"peer {peer} (own process)")
      figures, status[peer] = run_peer(
        peer, gguf, prompt_len, decode_prompt_len, new_tokens, reps, timeout_s
      )
      out.update(figures)
      if status[peer]["status"] != "ok":
        log(f"peer {peer} failed: {status[peer]['error']}")
  return out, status


def _peer_note(st: dict) -> str:
  if st["status"] == "ok":
    return st["note"] or "ok"
  if st["status"] == "failed":
    return f"failed: {st['error']}"
  return st["status"]


def _ratio(a, b):
  return a / b if a is not None and b else None


def _fmt(x, spec=".1f"):
  return "-" if x is None else format(x, spec)


def result_tables(s: dict) -> list[common.Table]:
  """The summary `s` as text tables: tokens/s against the peers, the other
  figures, and the prefill sweep (when one ran)."""
  col = common.Column
  speeds = common.Table(
    (
      col("tokens/s", "label", width=24, left=True),
      col("jaxllm", "jaxllm", ".1f", width=9),
      col("llama.cpp", "llamacpp", ".1f", width=10),
      col("HF", "hf", ".1f", width=9),
      col("x_vs_llamacpp", "x_vs_llamacpp", ".2f", width=14),
      col("x_vs_hf", "x_vs_hf", ".2f", width=8),
    ),
    [
      {
        "label": label,
        "jaxllm": s[f"jaxllm_{ours}{suffix}_tok_s"],
        "llamacpp": s[f"llamacpp_{peer}_tok_s"],
        "hf": s[f"hf_{peer}_tok_s"],
        "x_vs_llamacpp": s[f"x_vs_llamacpp_{ours}{suffix}"],
        "x_vs_hf": s[f"x_vs_hf_{ours}{suffix}"],
      }
      for label, ours, suffix, peer in (
        (f"prefill {s['prompt_len']} {s['dtype']}", "prefill", "", "prefill"),
        ("prefill bfloat16", "prefill", "_bf16", "prefill"),
        (f"decode bs1 {s['dtype']}", "decode_bs1", "", "decode_bs1"),
        ("decode bs1 bfloat16", "decode_bs1", "_bf16", "decode_bs1"),
        (f"decode bs{LARGE_BATCH} {s['dtype']} (sum)", "decode_bs16", "", "decode_bs1"),
        (f"decode bs{LARGE_BATCH} bf16 (sum)", "decode_bs16", "_bf16", "decode_bs1"),
      )
    ],
  )
  facts = common.Table(
    (
      col("", "label", width=24, left=True),
      col("", "value", width=9),
      col("", lambda r: r.get("text"), sep="  ", missing=""),
    ),
    [
      {"label": "read bandwidth (GB/s)", "value": _fmt(s["read_bandwidth_GBps"], ".2f")},
      {"label": "bs1 decode / bw limit", "value": _fmt(s["decode_bs1_vs_bw_limit"], ".3f")},
      *(
        {"label": f"peer {label}", "note": _peer_note(s["peers"][peer])}
        for peer, label in (("llamacpp", "llama.cpp"), ("hf", "HF"))
      ),
      {
        "label": "first call (s)",
        "value": _fmt(s["first_call_s"], ".2f"),
        "text": f"fresh process, wall, cold cache; warm: {_fmt(s['first_call_warm_s'], '.2f')}",
      },
      {
        "label": "first token (s)",
        "value": _fmt(s["first_call_in_process_s"], ".2f"),
        "text": "as the process reports it (after imports), cold cache; warm: "
        f"{_fmt(s['first_call_warm_in_process_s'], '.2f')}",
      },
    ],
    span="note",
  )
  if not s["prefill_sweep"]:
    return [speeds, facts]
  sweep = common.Table(
    (
      col("prompt", "prompt_len", "d", width=7),
      col("compile s", "compile_s", ".2f", width=10),
      col("run s", "run_s", ".3f", width=8),
      col("run min-max s", lambda p: f"{p['run_min_s']:7.3f}-{p['run_max_s']:<7.3f}", width=15),
      col("tok/s", "tok_s", ".1f", width=9),
      col("first token s", "first_token_s", ".2f", width=14),
    ),
    s["prefill_sweep"],
    title=f"\nprefill sweep ({s['dtype']}, batch 1; compile: trace+lower+XLA, no persistent cache)",
  )
  return [speeds, facts, sweep]


def _prompt_lens(cfg) -> list[int]:
  """--prompt_lens as ints (default: DEFAULT_PROMPT_LENS capped at max_seq_len)."""
  if _PROMPT_LENS.value is None:
    return sorted({min(n, cfg.max_seq_len) for n in DEFAULT_PROMPT_LENS})
  lens = []
  for item in _PROMPT_LENS.value:
    try:
      n = int(item)
    except ValueError:
      n = 0
    if n < 1:
      raise ValueError(f"--prompt_lens: {item!r} is not a positive integer")
    if n > cfg.max_seq_len:
      raise ValueError(
        f"--prompt_lens: {n} exceeds {cfg.name}'s max_seq_len of {cfg.max_seq_len} tokens"
      )
    lens.append(n)
  return lens


def main(argv):
  del argv
  if FLAGS.gguf is not None and not os.path.isfile(FLAGS.gguf):
    common.fail(f"GGUF file not found: {FLAGS.gguf}")
  kernels = common.kernel_config()
  from experiments import peers  # pylint: disable=import-outside-toplevel
  from experiments.common import load_pipeline  # sharded by --mesh
  from jaxllm.config import get_config  # pylint: disable=import-outside-toplevel
  from jaxllm.gguf_loader import default_gguf_path  # pylint: disable=import-outside-toplevel

  try:
    cfg = get_config(FLAGS.model)
    sweep_lens = _prompt_lens(cfg)
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

  common.start()
  s = {}
  log(f"jaxllm {cfg.name} {FLAGS.dtype}")
  pipe = load_pipeline(FLAGS.model, FLAGS.gguf, FLAGS.dtype, seed, kernels)
  bench = bench_lib.JaxllmBench(pipe, reps, seed)
  try:
    s["jaxllm_prefill_tok_s"] = bench.prefill_tok_s(prompt_len, new_tokens)
    log(f"prefill {s['jaxllm_prefill_tok_s']:.1f} tok/s")
    s["jaxllm_decode_bs1_tok_s"] = bench.decode_tok_s(1, decode_prompt_len, new_tokens)
    log(f"decode bs1 {s['jaxllm_decode_bs1_tok_s']:.1f} tok/s")
    s["jaxllm_decode_bs16_tok_s"] = bench.decode_tok_s(LARGE_BATCH, decode_prompt_len, new_tokens)
    log(f"decode bs{LARGE_BATCH} {s['jaxllm_decode_bs16_tok_s']:.1f} tok/s")
    s["prefill_sweep"] = []
    for n in sweep_lens:
      point = bench.prefill_sweep_point(n)
      s["prefill_sweep"].append(point)
      log(
        f"prefill {n} tokens: compile {point['compile_s']:.2f}s, run {point['run_s']:.3f}s, "
        f"first token {point['first_token_s']:.2f}s"
      )
  except ValueError as e:
    common.fail(str(e))
  w_bytes = weight_bytes(pipe.model)
  del bench
  if FLAGS.dtype == "bfloat16":
    bf16_pipe = pipe
  else:
    del pipe
    bf16_pipe = load_pipeline(FLAGS.model, FLAGS.gguf, "bfloat16", seed, kernels)
  # bfloat16 weights and activations: XLA:CPU's bf16 GEMM (AVX512-BF16 where the
  # CPU has it) is what the batched and prefill figures can reach.
  bf16_bench = bench_lib.JaxllmBench(bf16_pipe, reps, seed)
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

  # Peers run the SmolLM2 GGUF, so --model=tiny skips them, except a peer the
  # crash test hook names (experiments.peers.CRASH_ENV).
  if not _PEERS.value:
    to_run, skip_reason = (), "skipped: --nopeers"
  elif FLAGS.model == "tiny":
    to_run, skip_reason = (
      tuple(p for p in PEERS if peers.crash_requested(p)),
      "skipped: --model=tiny",
    )
  else:
    to_run, skip_reason = PEERS, "skipped"
  gguf = FLAGS.gguf or (default_gguf_path() if to_run else None)
  peer_figs, s["peers"] = measure_peers(
    to_run,
    gguf,
    prompt_len,
    decode_prompt_len,
    new_tokens,
    reps,
    _PEER_TIMEOUT_S.value,
    log,
    skip_reason,
  )
  s.update(peer_figs)
  notes = {peer: _peer_note(st) for peer, st in s["peers"].items()}

  method = "skipped: --nofirst_call"
  for key in (
    "first_call_s",
    "first_call_in_process_s",
    "first_call_warm_s",
    "first_call_warm_in_process_s",
    "first_call_cache_files",
  ):
    s[key] = None
  if _FIRST_CALL.value:
    log("first call (fresh processes: cold, then warm compilation and weight caches)")
    first, method = first_calls()
    s.update(first)

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

  tables = [
    *result_tables(s),
    "(batch-16 ratios compare the aggregate with the peer's single stream)",
  ]
  record = {
    "config": {
      "model": FLAGS.model,
      "gguf": FLAGS.gguf,
      "dtype": FLAGS.dtype,
      "reps": reps,
      "prompt_len": prompt_len,
      "prompt_lens": sweep_lens,
      "decode_prompt_len": decode_prompt_len,
      "new_tokens": new_tokens,
      "large_batch": LARGE_BATCH,
      "bandwidth_mib": _BANDWIDTH_MIB.value,
      "seed": seed,
    },
    "method": {
      "prefill": "Generator._prefill (jitted), one prompt, block_until_ready",
      "prefill_sweep": "per prompt length: compile_s = Generator._prefill.lower + compile "
      "(persistent compilation cache off), first_token_s = compile_s + first run + fetching "
      f"the sampled id, run_s = median (min-max) of {reps} runs after it",
      "decode": "Generator._step (jitted) x new_tokens after an untimed prefill, greedy, "
      "ids fetched to host each step; tok/s = batch * new_tokens / seconds",
      "first_call": f"{method}; cold, then warm: two processes sharing one new, empty "
      "$JAXLLM_COMPILATION_CACHE_DIR and $JAXLLM_WEIGHT_CACHE_DIR",
      "bandwidth": "jax.jit(jnp.sum) over a float32 array",
      "bw_limit": "read_bandwidth / weight_bytes (all parameters, tied embedding once)",
      "peers": notes,
      "peer_process": "each peer in its own process (python -m experiments.peers); a peer "
      "that crashes is recorded as failed with its exit code",
      "statistic": f"median of {reps} after 1 warm-up",
    },
    "weight_bytes": {"main": w_bytes, "bfloat16": bf16_bytes},
    "run": common.run_info(),
    "summary": s,
  }
  common.report(FLAGS.out_dir, NAME, record, s, tables=tables)


if __name__ == "__main__":
  app.run(main)
