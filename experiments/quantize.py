"""Post-training quantization of SmolLM2: perplexity, weight bytes and decode speed per method.

  python -m experiments.quantize --methods=fp32,w8a8,w4a16_g128,fireq_w4a8 \
      --text_file=F [--max_windows=N] [--calib_windows=N] [--calib_file=F]

Methods are the recipes of `jaxllm.quant.recipes.RECIPES` (FireQ's ablations
`fireq_w4a8_no_smoothing` and `fireq_w4a8_no_per_tensor` among them). For each:

  * ppl: perplexity over non-overlapping --context windows (jaxllm.perplexity),
    and delta_pct against fp32 (fp32 is always run as the baseline);
  * weight_bytes_vs_bf16: bytes of all decoder linear weights as stored (codes,
    scales, offsets, tensor scales and any K padding) over the same tensors in
    bf16; the embedding is not included there. model_bytes_vs_bf16 adds the
    embedding (kept float, as stored) and norms;
  * decode_tok_s: batch-1 greedy decoding with `jaxllm.decoding.Generator` on CPU:
    (N-1) / (t(N new tokens) - t(1 new token)), medians of 3 after a warm-up;
  * orbax_checkpoint_bytes_on_disk (JSON file): the model saved with
    `jaxllm.checkpoint.save` (quantized linears as stored, embedding float), kept
    under --save_dir/METHOD when --save_dir is given;
  * layer_choices (JSON file, block-reconstruction recipes): per layer, whether
    learned rounding or the recipe's own method was kept, and both block errors.

Calibration (for smoothing) never overlaps evaluation: the calibration windows
are the last --calib_windows windows of --calib_file if given, else of the
evaluation text, and then the evaluation windows are taken from the windows
before them. Without --text_file the text is WikiText-2's test split when
../shared/data holds it, else the standard library's docstrings
(`experiments.common.default_text`), labelled as such.
"""

from __future__ import annotations

import hashlib
import math
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

from experiments import common
from jaxllm import runtime

NAME = "quantize"
common.define_common_flags(NAME)
_METHODS = flags.DEFINE_list(
  "methods", ["fp32", "w8a8", "w4a16_g128", "fireq_w4a8"], "Recipes to run (fp32 always runs)."
)
_CALIB_WINDOWS = flags.DEFINE_integer(
  "calib_windows", 4, "Calibration windows (for smoothing).", lower_bound=1
)
_CALIB_FILE = flags.DEFINE_string(
  "calib_file", None, "Calibration text; default: the end of the evaluation text."
)
_ALPHA = flags.DEFINE_float(
  "alpha", None, "Override the smoothing strength of smoothing recipes (default: the recipe's)."
)
_DECODE_TOKENS = flags.DEFINE_integer(
  "decode_tokens", 32, "New tokens for the decode-speed measurement.", lower_bound=2
)
_SKIP_DECODE = flags.DEFINE_bool("skip_decode", False, "Do not measure decode speed.")
_SAVE_DIR = flags.DEFINE_string(
  "save_dir",
  None,
  "Keep each method's orbax checkpoint in SAVE_DIR/METHOD (restore with "
  "`jaxllm.checkpoint.restore`, score with `experiments.perplexity --checkpoint`); "
  "default: measured in a temporary directory and deleted.",
)
runtime.define_kernel_flags()
FLAGS = flags.FLAGS

_DECODE_PROMPT = "The history of the city begins in"


def _check_flags(recipes) -> list[str]:
  methods = [m.strip() for m in _METHODS.value if m.strip()]
  if not methods:
    common.fail("--methods is empty")
  unknown = [m for m in methods if m not in recipes]
  if unknown:
    common.fail(f"unknown method(s) {unknown} in --methods; choose from {list(recipes)}")
  if FLAGS.context < 16:
    common.fail(f"--context must be >= 16, got {FLAGS.context}")
  if FLAGS.max_windows is not None and FLAGS.max_windows < 1:
    common.fail(f"--max_windows must be >= 1, got {FLAGS.max_windows}")
  if FLAGS.gguf is not None and not os.path.isfile(FLAGS.gguf):
    common.fail(f"GGUF file not found: {FLAGS.gguf}")
  if _ALPHA.value is not None and not 0.0 <= _ALPHA.value <= 1.0:
    common.fail(f"--alpha must lie in [0, 1], got {_ALPHA.value}")
  methods = ["fp32"] + [m for m in dict.fromkeys(methods) if m != "fp32"]
  if _SAVE_DIR.value is not None:
    if os.path.isfile(_SAVE_DIR.value):
      common.fail(f"--save_dir {_SAVE_DIR.value} is a file, not a directory")
    taken = [m for m in methods if os.path.exists(os.path.join(_SAVE_DIR.value, m))]
    if taken:  # refused before any work, rather than overwritten after it
      common.fail(f"--save_dir {_SAVE_DIR.value} already holds checkpoints for {taken}")
  return methods


def _windows(tokenizer, tokenize_windows):
  """(eval windows, calibration windows, text record)."""
  text, label, path = common.read_eval_text(FLAGS.text_file)
  try:
    windows = tokenize_windows(tokenizer, text, FLAGS.context)
  except ValueError as e:
    common.fail(f"{label}: {e}")
  n_calib = _CALIB_WINDOWS.value
  if _CALIB_FILE.value is not None:
    try:
      calib_all = tokenize_windows(
        tokenizer, common.read_eval_text(_CALIB_FILE.value)[0], FLAGS.context
      )
    except ValueError as e:
      common.fail(f"calibration file {_CALIB_FILE.value}: {e}")
    calib, available = calib_all[-n_calib:], len(windows)
    calib_source = f"last {len(calib)} windows of {_CALIB_FILE.value}"
  else:
    available = len(windows) - n_calib
    if available < 1:
      common.fail(
        f"{label} has {len(windows)} windows of {FLAGS.context} tokens: too few for "
        f"{n_calib} calibration windows plus at least one evaluation window"
      )
    calib = windows[available:]
    calib_source = f"last {n_calib} windows of the evaluation text (held out of evaluation)"
  evaluation = windows[:available]
  if FLAGS.max_windows is not None:
    evaluation = evaluation[: FLAGS.max_windows]
  record = {
    "label": label,
    "path": os.path.abspath(path) if path else None,
    "sha256_utf8": hashlib.sha256(text.encode("utf-8")).hexdigest(),
    "windows_total": len(windows),
    "windows_available_for_eval": available,
    "calibration": calib_source,
    "calibration_windows": len(calib),
  }
  return evaluation, calib, record


def _decode_tok_s(model, tokenizer, vocab: int, new_tokens: int) -> float:
  """Batch-1 greedy decode tokens/s: (N-1) / (t(N) - t(1)), medians of 3 after warm-up."""
  from jaxllm.decoding import Generator  # pylint: disable=import-outside-toplevel

  gen = Generator(model, max_cache_len=256, prompt_bucket=16)
  prompt = tokenizer.encode(_DECODE_PROMPT) if tokenizer else list(range(1, 9))
  prompt = [t % vocab for t in prompt]

  def median_s(n):
    times = []
    for _ in range(3):
      t0 = time.perf_counter()
      gen.generate([prompt], n, stop_at_eos=False)
      times.append(time.perf_counter() - t0)
    return statistics.median(times)

  gen.generate([prompt], new_tokens, stop_at_eos=False)  # warm-up: compiles both steps
  return (new_tokens - 1) / max(median_s(new_tokens) - median_s(1), 1e-9)


def _config_record() -> dict:
  return {
    "model": FLAGS.model,
    "gguf": FLAGS.gguf,
    "dtype": FLAGS.dtype,
    "context": FLAGS.context,
    "max_windows": FLAGS.max_windows,
    "calib_windows": _CALIB_WINDOWS.value,
    "calib_file": _CALIB_FILE.value,
    "alpha": _ALPHA.value,
    "save_dir": None if _SAVE_DIR.value is None else os.path.abspath(_SAVE_DIR.value),
    "decode_tokens": _DECODE_TOKENS.value,
    "decode_prompt": _DECODE_PROMPT,
    "seed": FLAGS.seed,
    "kernels": FLAGS.kernels,
    "interpret": FLAGS.interpret,
  }


def _fail_keeping_rows(method: str, error, rows: list[dict], details: dict):
  """Ends the run on a method that could not be quantized or scored (e.g. GPTQ
  refusing a non-finite Hessian): writes the methods measured before it (and the
  error) to the results file, then a one-line error."""
  msg = f"{method}: {' '.join(str(error).split())}"
  record = {"error": msg, "config": _config_record(), "results": rows, "methods": details}
  path = common.write_results(FLAGS.out_dir, NAME, {**record, "run": common.run_info()})
  common.fail(f"{msg}; the {len(rows)} method(s) measured before it are in {path}")


def _decode_figure(model, tokenizer, vocab: int) -> tuple[float | None, str | None]:
  """(decode tokens/s or None with --skip_decode, error or None). A decode that
  raises ValueError (`Generator` refuses non-finite logits) is a failed figure:
  NaN, so the run still writes every figure and then fails (`common.finish`)."""
  if _SKIP_DECODE.value:
    return None, None
  try:
    return _decode_tok_s(model, tokenizer, vocab, _DECODE_TOKENS.value), None
  except ValueError as e:
    return math.nan, " ".join(str(e).split())


def _choice_record(choice) -> dict:
  """A `LayerChoice` as JSON (no learned error where the layer had nothing to learn).

  +inf is `LayerChoice`'s mark for a layer with nothing to learn: an absent
  figure, written null. A NaN learned error (the learned rounding diverged) is
  a figure and stays NaN, so the run fails on it (`common.finish`).
  """
  learned = None if choice.learned_error == math.inf else choice.learned_error
  return {
    "layer": choice.layer,
    "kept": choice.kept,
    "learned_error": learned,
    "own_error": choice.own_error,
  }


def _fmt(x: float) -> str:
  return f"{x:.3f}" if abs(x) < 1e5 else f"{x:.3e}"


def main(argv):
  del argv
  common.start()
  # Heavy imports (jax) only once the flags look sane.
  # pylint: disable=import-outside-toplevel
  from jaxllm.quant import recipes as recipes_lib

  methods = _check_flags(recipes_lib.RECIPES)
  kernels = common.kernel_config()
  t_start = time.perf_counter()
  import dataclasses

  from flax import nnx

  from experiments.common import load_pipeline  # sharded by --mesh
  from jaxllm import checkpoint
  from jaxllm.gguf_loader import default_gguf_path
  from jaxllm.perplexity import perplexity, tokenize_windows
  from jaxllm.quant import activation_absmax, apply_recipe, weight_bytes
  from jaxllm.tokenizer import Tokenizer

  cfg = common.model_config(FLAGS.model, FLAGS.context)
  with common.one_line_errors():
    gguf = FLAGS.gguf or default_gguf_path()
  with common.one_line_errors(f"{gguf}: "):
    tokenizer = Tokenizer.from_gguf(gguf)
  if FLAGS.model == "tiny":
    tokenizer = common.ModuloTokenizer(tokenizer, cfg.vocab_size)
  evaluation, calib, text_record = _windows(tokenizer, tokenize_windows)

  with common.one_line_errors():  # the loader's messages name the file and tensor
    pipe = load_pipeline(FLAGS.model, FLAGS.gguf, FLAGS.dtype, FLAGS.seed, kernels)
  t_loaded = time.perf_counter()
  recipes = {m: recipes_lib.RECIPES[m] for m in methods}
  if _ALPHA.value is not None:
    recipes = {
      m: dataclasses.replace(r, smoothing_alpha=_ALPHA.value)
      if r.smoothing_alpha is not None
      else r
      for m, r in recipes.items()
    }
  stats = None
  if any(r.smooths for r in recipes.values()):
    stats = activation_absmax(pipe.model, calib, progress=True)

  rows, details = [], {}
  for method, recipe in recipes.items():
    t0 = time.perf_counter()
    choices = []
    try:
      model = apply_recipe(
        nnx.clone(pipe.model), recipe, stats, calib, progress=True, on_choice=choices.append
      )
      t_quant = time.perf_counter() - t0
      result = perplexity(model, evaluation, progress=True)
    except ValueError as e:
      _fail_keeping_rows(method, e, rows, details)
    t_ppl = time.perf_counter() - t0 - t_quant
    nbytes = weight_bytes(model)
    tok_s, decode_error = _decode_figure(model, pipe.tokenizer, cfg.vocab_size)
    rows.append(
      {
        "method": method,
        "ppl": result["ppl"],
        "delta_pct": None,
        "weight_bytes_vs_bf16": nbytes["linear_bytes"] / nbytes["linear_bf16_bytes"],
        "decode_tok_s": tok_s,
      }
    )
    if _SAVE_DIR.value is None:
      with tempfile.TemporaryDirectory() as ckpt_dir:
        disk = checkpoint.save(model, ckpt_dir)
    else:
      disk = checkpoint.save(model, os.path.join(_SAVE_DIR.value, method))
    print(
      f"{method}: ppl {result['ppl']:.4f}, bytes/bf16 {rows[-1]['weight_bytes_vs_bf16']:.3f}, "
      f"decode {tok_s} tok/s",
      file=sys.stderr,
      flush=True,
    )
    details[method] = {
      "description": recipe.description,
      "recipe": dataclasses.asdict(recipe),
      "perplexity": result,
      "bytes": nbytes,
      "model_bytes_vs_bf16": nbytes["model_bytes"] / nbytes["model_bf16_bytes"],
      "orbax_checkpoint_bytes_on_disk": disk,
      "seconds": {"quantize": t_quant, "perplexity": t_ppl},
    }
    if decode_error:
      details[method]["decode_error"] = decode_error
    if choices:
      details[method]["layer_choices"] = [_choice_record(c) for c in choices]
    del model
  base = rows[0]["ppl"]
  for r in rows:
    r["delta_pct"] = 100.0 * (r["ppl"] / base - 1.0)

  n_tokens = details["fp32"]["perplexity"]["tokens"]
  table = common.Table(
    (
      common.Column("method", "method", width=26, left=True),
      common.Column("ppl", "ppl", _fmt, width=9),
      common.Column("Δppl %", "delta_pct", "+.2f", width=8),
      common.Column("bytes/bf16", "weight_bytes_vs_bf16", ".3f", width=10),
      common.Column(
        "w/ embed", lambda r: details[r["method"]]["model_bytes_vs_bf16"], ".3f", width=9
      ),
      common.Column("decode tok/s", "decode_tok_s", ".1f", width=12),
    ),
    rows,
    title=f"text: {text_record['label']}  context {FLAGS.context}  windows {len(evaluation)}"
    f"  scored tokens {n_tokens}  calibration: {text_record['calibration']}",
  )
  plot = common.ScatterPlot(
    rows,
    "weight_bytes_vs_bf16",
    "ppl",
    title=f"{pipe.config.name}, {text_record['label']}, context {FLAGS.context}, "
    f"{len(evaluation)} windows",
    xlabel="decoder linear weight bytes / bf16 (scales, offsets, padding included)",
    ylabel="perplexity",
  )
  summary = {
    "results": rows,
    "weight_bytes": "decoder linears only (embedding excluded); model_bytes_vs_bf16 in the "
    "JSON file includes the embedding",
    "context": FLAGS.context,
    "windows": len(evaluation),
    "tokens": n_tokens,
    "text": text_record["label"],
  }
  record = {
    "config": _config_record(),
    "text": text_record,
    "methods": details,
    "timing_s": {"load": t_loaded - t_start, "total": time.perf_counter() - t_start},
    "run": common.run_info(),
    "summary": summary,
  }
  common.report(FLAGS.out_dir, NAME, record, summary, tables=[table], plot=plot)


if __name__ == "__main__":
  app.run(main)
