"""Compressed KV caches measured by streaming perplexity (issue 4).

  python -m experiments.kv_compression \\
    --methods=dense,int8,fireq_int4,fireq_int4_r128_s4_a09,kivi4,kivi2,kivi2_r128_s4,rotatekv2 \\
    --text_file=F \\
    [--context=1024] [--max_windows=N] [--ablations] [--dense_reference=FILE.npz]

Each window is prefilled for `--prefill` tokens and then decoded token by token
through the method's cache, every step attending to the cache as stored
(`jaxllm.streaming`). With `--chunk=C`, methods whose cache can decode C
tokens per step with the same scores do so, C times fewer steps: dense and
the per-token caches always, KIVI / RotateKV when C divides the group size and
the prefill is aligned to their window (e.g. `--chunk=32 --prefill=32`); the
others stay at one token per step (each row reports its `decode_chunk`). The
per-token 4-bit caches score a chunk as one-token steps would only up to float
rounding, which their codes amplify (see `jaxllm.streaming`): on a few hundred
tokens FireQ's figure moves by a few % between chunk sizes, over 16 windows of
1024 tokens by 0.005 points (chunks of 16 and 32). Per method: bytes per token against a bf16 dense cache
(residual window and sink tokens excluded, reported apart), perplexity, its
change against the dense cache, and top-1 agreement with the dense cache.

`--dense_reference=FILE.npz` keeps the dense row (perplexity and per-token
argmaxes) in FILE: the first run writes it, later runs over the same text, model,
GGUF file, dtype, context, prefill, chunk, window count and kernel implementation
read it instead of decoding the dense cache again (on the full WikiText-2 split that
saves about 17 min per run); a file written under other settings is refused, naming
the setting that differs.

FireQ's scales are calibrated on `--calib_windows` windows of `--calib_file`
(default: the standard library's docstrings, which never overlap the
evaluation text).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

import numpy as np
from absl import app, flags

from experiments import common
from jaxllm import runtime

NAME = "kv_compression"
MAIN_METHODS = (
  "dense",
  "int8",
  "fireq_int4",
  "fireq_int4_r128_s4",
  "fireq_int4_r128_s4_a09",
  "kivi4",
  "kivi2",
  "kivi2_r128_s4",
  "kivi2_r128_s4_ksearch",
  "rotatekv2",
)
ABLATIONS = (
  "kivi2_per_token_keys",
  "kivi2_no_residual",
  "fireq_int4_pre_rope_only",
  "fireq_int4_post_rope_only",
)

common.define_common_flags(NAME)
_METHODS = flags.DEFINE_list("methods", list(MAIN_METHODS), "Cache methods to compare.")
_ABLATIONS = flags.DEFINE_boolean(
  "ablations", True, f"Also run the ablations: {', '.join(ABLATIONS)}."
)
_PREFILL = flags.DEFINE_integer("prefill", 31, "Tokens per window run as one prefill chunk.")
_BLOCK = flags.DEFINE_integer("block", 32, "Decode steps per jitted scan.", lower_bound=1)
_CHUNK = flags.DEFINE_integer(
  "chunk",
  1,
  "Tokens per decode step where the cache scores them exactly as one per step.",
  lower_bound=1,
)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Windows decoded side by side.", lower_bound=1)
_CALIB_FILE = flags.DEFINE_string(
  "calib_file", None, "Calibration text; default: the standard library's docstrings."
)
_CALIB_WINDOWS = flags.DEFINE_integer(
  "calib_windows", 4, "Calibration windows (of --context tokens).", lower_bound=1
)
_DENSE_REFERENCE = flags.DEFINE_string(
  "dense_reference",
  None,
  "An .npz holding the dense row: read when it exists (same settings), else written.",
)
runtime.define_kernel_flags()
FLAGS = flags.FLAGS


def _methods() -> list[str]:
  methods = list(dict.fromkeys(_METHODS.value + (list(ABLATIONS) if _ABLATIONS.value else [])))
  if "dense" in methods:
    methods.remove("dense")
  return ["dense"] + methods  # dense first: every other method is compared with it


def _check_flags() -> None:
  if FLAGS.max_windows is not None and FLAGS.max_windows < 1:
    common.fail(f"--max_windows must be >= 1, got {FLAGS.max_windows}")
  if _PREFILL.value < 1 or _PREFILL.value >= FLAGS.context - 1:
    common.fail(
      f"--prefill must be in [1, context - 1) so that some tokens are decoded; "
      f"got --prefill={_PREFILL.value} with --context={FLAGS.context}"
    )
  if FLAGS.gguf is not None and not os.path.isfile(FLAGS.gguf):
    common.fail(f"GGUF file not found: {FLAGS.gguf}")


def _reference_key(model_cfg_name: str, gguf: str, text: str, n_windows: int) -> dict:
  """The settings a dense reference row depends on (not the batch or block size)."""
  return {
    "model": model_cfg_name,
    "gguf": os.path.abspath(gguf),
    "dtype": FLAGS.dtype,
    "context": FLAGS.context,
    "prefill": _PREFILL.value,
    "chunk": _CHUNK.value,
    "windows": n_windows,
    "kernels": FLAGS.kernels,
    "text_sha256_utf8": hashlib.sha256(text.encode("utf-8")).hexdigest(),
  }


def _load_dense_reference(path: str, key: dict) -> tuple[dict, np.ndarray] | None:
  """(result, top1) from `path` when it exists and was written under `key`, else None."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as f:
      stored, result, top1 = json.loads(str(f["key"])), json.loads(str(f["result"])), f["top1"]
  except (OSError, ValueError, KeyError) as e:
    common.fail(f"--dense_reference {path}: not a dense reference file ({e})")
  for name, value in key.items():
    if stored.get(name) != value:
      common.fail(
        f"--dense_reference {path} was computed with {name}={stored.get(name)!r}, this run "
        f"has {name}={value!r}: pass another file, or delete this one to recompute it"
      )
  return result, top1


def _save_dense_reference(path: str, key: dict, result: dict, top1: np.ndarray) -> bool:
  """Writes the dense row to `path`; returns whether it did. A row with a NaN or
  infinite figure is not kept (the run fails on it; a later run recomputes it)."""
  bad = common.nonfinite_figures(result)
  if bad:
    print(f"dense: not written to --dense_reference {path}: {', '.join(bad)} not finite")
    return False
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez_compressed(
    tmp, key=json.dumps(key), result=json.dumps(result), top1=top1.astype(np.int32)
  )
  os.replace(tmp, path)  # a killed run leaves no half-written reference
  return True


def _fail_keeping_rows(method: str, error, config: dict, rows: list[dict]):
  """Ends the run on a method that could not be scored: writes the rows measured
  before it (and the error) to the results file, then a one-line error."""
  msg = f"{method}: {' '.join(str(error).split())}"
  path = common.write_results(
    FLAGS.out_dir, NAME, {"error": msg, "config": config, "rows": rows, "run": common.run_info()}
  )
  common.fail(f"{msg}; the {len(rows)} row(s) measured before it are in {path}")


def main(argv):
  del argv
  _check_flags()
  kernels = common.kernel_config()
  methods = _methods()
  common.start()
  text, label, path = common.read_eval_text(FLAGS.text_file)
  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp

  from experiments.common import load_pipeline  # sharded by --mesh
  from jaxllm import kv_cache
  from jaxllm.gguf_loader import default_gguf_path
  from jaxllm.perplexity import tokenize_windows
  from jaxllm.quant import kv_calibration
  from jaxllm.streaming import StreamingConfig, StreamingScorer, streaming_perplexity
  from jaxllm.tokenizer import Tokenizer

  cfg = common.model_config(FLAGS.model, FLAGS.context)
  try:
    specs = {m: kv_cache.spec_for(m) for m in methods}
    stream_cfg = StreamingConfig(
      prefill=_PREFILL.value, block=_BLOCK.value, batch_size=_BATCH.value, chunk=_CHUNK.value
    )
  except ValueError as e:
    common.fail(str(e))

  with common.one_line_errors():
    gguf = FLAGS.gguf or default_gguf_path()
  with common.one_line_errors(f"{gguf}: "):
    tokenizer = Tokenizer.from_gguf(gguf)
  if FLAGS.model == "tiny":
    tokenizer = common.ModuloTokenizer(tokenizer, cfg.vocab_size)
  if _CALIB_FILE.value is None:
    calib_text, calib_label = common.default_text()
  else:
    calib_text, calib_label, _ = common.read_eval_text(_CALIB_FILE.value)
  try:
    windows = tokenize_windows(tokenizer, text, FLAGS.context)
    calib = tokenize_windows(tokenizer, calib_text, FLAGS.context)[: _CALIB_WINDOWS.value]
  except ValueError as e:
    common.fail(f"{label}: {e}")
  available = len(windows)
  if FLAGS.max_windows is not None:
    windows = windows[: FLAGS.max_windows]

  with common.one_line_errors():  # the loader's messages name the file and tensor
    pipe = load_pipeline(FLAGS.model, FLAGS.gguf, FLAGS.dtype, FLAGS.seed)
  pipe.model.kernels = kernels
  dtype = jnp.dtype(FLAGS.dtype)

  config = {
    "model": FLAGS.model,
    "gguf": FLAGS.gguf,
    "dtype": FLAGS.dtype,
    "context": FLAGS.context,
    "max_windows": FLAGS.max_windows,
    "prefill": _PREFILL.value,
    "block": _BLOCK.value,
    "chunk": _CHUNK.value,
    "batch_size": _BATCH.value,
    "kernels": FLAGS.kernels,
    "interpret": FLAGS.interpret,
    "dense_reference": _DENSE_REFERENCE.value,
    "methods": methods,
    "specs": {m: repr(s) for m, s in specs.items()},
  }
  rows, reference_top1 = [], None
  ref_key = _reference_key(cfg.name, gguf, text, len(windows))
  for method in methods:
    spec = specs[method]
    t0 = time.perf_counter()
    stored = None
    if method == "dense" and _DENSE_REFERENCE.value:
      stored = _load_dense_reference(_DENSE_REFERENCE.value, ref_key)
    try:
      model, calibration = kv_calibration.prepare_model(pipe.model, spec, jnp.asarray(calib))
      make_cache = kv_cache.cache_factory(spec, cfg, dtype, calibration)
      probe = make_cache(1, stream_cfg.layout(FLAGS.context)[1], jnp.zeros((1,), jnp.int32))
    except ValueError as e:
      common.fail(f"{method}: {e}")
    memory = probe.memory()
    method_cfg = stream_cfg
    try:
      probe.for_chunked_decode(stream_cfg.prefill, stream_cfg.chunk)
    except ValueError as e:
      print(f"{method}: one token per decode step ({e})", flush=True)
      method_cfg = dataclasses.replace(stream_cfg, chunk=1)
    if stored is not None:
      result, top1 = stored
      print(f"dense: read from --dense_reference {_DENSE_REFERENCE.value}", flush=True)
    else:
      scorer = StreamingScorer(model, make_cache, method_cfg)
      try:
        result, top1 = streaming_perplexity(scorer, windows, reference_top1, progress=True)
      except ValueError as e:  # non-finite scores (jaxllm.streaming), named by window
        _fail_keeping_rows(method, e, config, rows)
      if method == "dense" and _DENSE_REFERENCE.value:
        _save_dense_reference(_DENSE_REFERENCE.value, ref_key, result, top1)
    if reference_top1 is None:
      reference_top1, dense_ppl = top1, result["ppl"]
      result["top1_agree"] = 1.0
    ratio = memory["bytes_per_token"] / memory["bf16_bytes_per_token"]
    row = {
      "method": method,
      "ppl": result["ppl"],
      "delta_pct": 100.0 * (result["ppl"] / dense_ppl - 1.0),
      "bytes_per_token_vs_bf16": ratio,
      "top1_agree": result["top1_agree"],
      "decode_chunk": method_cfg.chunk,
      "bits_per_value": 16.0 * ratio,
      "bytes_per_token": memory["bytes_per_token"],
      "residual_bytes": memory["residual_bytes"],
      "seconds": time.perf_counter() - t0,
    }
    rows.append(row)
    print(
      f"{method:28s} ppl {row['ppl']:8.3f}  {row['delta_pct']:+7.2f}%  "
      f"bytes/token x{ratio:.3f}  top-1 {row['top1_agree']:.4f}  ({row['seconds']:.0f} s)",
      flush=True,
    )

  table = common.Table(
    (
      common.Column("method", "method", width=28, left=True),
      common.Column("ppl", "ppl", ".3f", width=9),
      common.Column("dppl %", "delta_pct", "+.2f", width=8),
      common.Column("bytes/tok vs bf16", "bytes_per_token_vs_bf16", ".3f", width=18),
      common.Column("top-1", "top1_agree", ".4f", width=7),
    ),
    rows,
    title=f"\ntext: {label}; context {FLAGS.context}; {len(windows)} of {available} windows; "
    f"{result['tokens']} scored tokens per method; prefill {_PREFILL.value}",
  )
  plot = common.ScatterPlot(
    rows,
    "bits_per_value",
    "ppl",
    title=f"{cfg.name}, {label}, context {FLAGS.context}, {len(windows)} windows, streaming",
    xlabel="cache bits per K/V value (scales and zero points included, residual excluded)",
    ylabel="streaming perplexity",
  )
  keys = ("method", "ppl", "delta_pct", "bytes_per_token_vs_bf16", "top1_agree")
  summary = {"results": [{k: row[k] for k in keys} for row in rows]}
  record = {
    "config": config,
    "text": {
      "label": label,
      "path": os.path.abspath(path) if path else None,
      "sha256_utf8": ref_key["text_sha256_utf8"],
      "windows_available": available,
      "windows": len(windows),
      "scored_tokens_per_method": result["tokens"],
    },
    "calibration": {"text": calib_label, "windows": len(calib)},
    "rows": rows,
    "run": common.run_info(),
    "summary": summary,
  }
  common.report(FLAGS.out_dir, NAME, record, summary, tables=[table], plot=plot)


if __name__ == "__main__":
  app.run(main)
