"""Perplexity of a model on a text file (protocol: ../shared/data/README.md).

  python -m experiments.perplexity --text_file=F --context=1024 [--max_windows=N]
      [--checkpoint=DIR]

With --checkpoint: the model saved there by `jaxllm.checkpoint.save` (for example a
quantized one from `experiments.quantize --save_dir`), as stored, instead of --model.

Without --text_file: the shared WikiText-2 test split if present, else the
standard library's docstrings (`experiments.common.default_text`).

`--model=tiny` (random init, no tokenizer of its own) tokenizes with the SmolLM2
GGUF tokenizer and maps each id into its vocabulary by ``id % vocab_size``: a
plumbing check whose perplexity means nothing.
"""

from __future__ import annotations

import hashlib
import os
import time

from absl import app, flags

from experiments import common
from jaxllm import runtime

NAME = "perplexity"
common.define_common_flags(NAME)
_BATCH = flags.DEFINE_integer("batch_size", 1, "Windows per forward pass.", lower_bound=1)
_CHECKPOINT = flags.DEFINE_string(
  "checkpoint", None, "Score this saved jaxllm checkpoint (as stored) instead of --model."
)
runtime.define_kernel_flags()
FLAGS = flags.FLAGS


def _check_flags() -> None:
  if FLAGS.context < 2:
    common.fail(
      f"--context must be >= 2 (one context token plus one scored token), got {FLAGS.context}"
    )
  if FLAGS.max_windows is not None and FLAGS.max_windows < 1:
    common.fail(f"--max_windows must be >= 1, got {FLAGS.max_windows}")
  if FLAGS.gguf is not None and not os.path.isfile(FLAGS.gguf):
    common.fail(f"GGUF file not found: {FLAGS.gguf}")
  # A missing --checkpoint directory is reported by `checkpoint.load_config`, which
  # also finds the old copy an interrupted two-rename save may have left aside.
  ckpt = _CHECKPOINT.value
  if ckpt is not None and os.path.exists(ckpt) and not os.path.isdir(ckpt):
    common.fail(f"--checkpoint={ckpt} is not a directory")


def _config():
  """The model's config: the checkpoint's with --checkpoint, else --model's preset."""
  if _CHECKPOINT.value is None:
    return common.model_config(FLAGS.model, FLAGS.context)
  from jaxllm import checkpoint  # pylint: disable=import-outside-toplevel

  with common.one_line_errors():  # the messages name the directory
    cfg = checkpoint.load_config(_CHECKPOINT.value)
  if FLAGS.context > cfg.max_seq_len:
    common.fail(f"--context={FLAGS.context} exceeds the checkpoint's max_seq_len={cfg.max_seq_len}")
  return cfg


def _load(cfg, kernels):
  """(model or pipeline, dtype label); a corrupt GGUF file (a non-finite tensor, a
  tensor of the wrong shape) or a partial checkpoint ends the run with one line."""
  # pylint: disable=import-outside-toplevel
  if _CHECKPOINT.value is None:
    from experiments.common import load_pipeline  # sharded by --mesh

    with common.one_line_errors():  # the loader's messages name the file and tensor
      return load_pipeline(FLAGS.model, FLAGS.gguf, FLAGS.dtype, FLAGS.seed, kernels), FLAGS.dtype
  from jaxllm import checkpoint

  with common.one_line_errors():  # the messages name the directory
    mesh = common.mesh_from_flags()
    model = checkpoint.restore(
      _CHECKPOINT.value, kernels=kernels, mesh=mesh, strict=FLAGS.mesh_strict
    )
    return model, "as saved"


def main(argv):
  del argv
  _check_flags()
  kernels = common.kernel_config()
  common.start()
  text, label, path = common.read_eval_text(FLAGS.text_file)
  t_start = time.perf_counter()
  # Heavy imports (jax) only once the input looks sane.
  # pylint: disable=import-outside-toplevel
  from jaxllm.gguf_loader import default_gguf_path
  from jaxllm.perplexity import perplexity, tokenize_windows
  from jaxllm.tokenizer import Tokenizer

  cfg = _config()

  # Tokenize before loading the model, so a text too short fails fast.
  gguf = FLAGS.gguf or default_gguf_path()
  tokenizer, tokenizer_note = Tokenizer.from_gguf(gguf), "gguf"
  if cfg.vocab_size < tokenizer.vocab_size:  # --model=tiny, or a checkpoint of it
    tokenizer = common.ModuloTokenizer(tokenizer, cfg.vocab_size)
    tokenizer_note = f"gguf ids % {cfg.vocab_size}"
  try:
    windows = tokenize_windows(tokenizer, text, FLAGS.context)
  except ValueError as e:
    common.fail(f"{label}: {e}")
  available = len(windows)
  if FLAGS.max_windows is not None:
    windows = windows[: FLAGS.max_windows]
  t_tokenized = time.perf_counter()

  model, dtype = _load(cfg, kernels)
  t_loaded = time.perf_counter()

  result = perplexity(model, windows, batch_size=_BATCH.value, progress=True)
  seconds = time.perf_counter() - t_loaded

  table = common.Table(
    (common.Column("", 0, width=24, left=True), common.Column("", 1)),
    [
      ("text", label),
      ("model / dtype", f"{model.config.name} / {dtype}"),
      ("context", result["context"]),
      ("windows", f"{result['windows']} of {available}"),
      ("scored tokens", result["tokens"]),
      ("mean NLL (nats)", f"{result['nll']:.5f}"),
      ("perplexity", f"{result['ppl']:.4f}"),
      ("scoring time (s)", f"{seconds:.1f}"),
    ],
  )

  summary = {
    "ppl": result["ppl"],
    "nll": result["nll"],
    "tokens": result["tokens"],
    "context": result["context"],
    "windows": result["windows"],
    "text": label,
    "model": model.config.name,
    "dtype": dtype,
    "seconds": round(seconds, 3),
  }
  record = {
    "config": {
      "model": FLAGS.model,
      "checkpoint": None if _CHECKPOINT.value is None else os.path.abspath(_CHECKPOINT.value),
      "gguf": FLAGS.gguf,
      "dtype": FLAGS.dtype,
      "context": FLAGS.context,
      "max_windows": FLAGS.max_windows,
      "batch_size": _BATCH.value,
      "seed": FLAGS.seed,
    },
    "text": {
      "label": label,
      "path": os.path.abspath(path) if path else None,
      "sha256_utf8": hashlib.sha256(text.encode("utf-8")).hexdigest(),
      "chars": len(text),
      "tokenizer": tokenizer_note,
      "windows_available": available,
    },
    "result": result,
    "timing_s": {
      "tokenize": t_tokenized - t_start,
      "load": t_loaded - t_tokenized,
      "score": seconds,
      "tokens_per_s": result["tokens"] / seconds,
    },
    "run": common.run_info(),
    "summary": summary,
  }
  common.report(FLAGS.out_dir, NAME, record, summary, tables=[table])


if __name__ == "__main__":
  app.run(main)
