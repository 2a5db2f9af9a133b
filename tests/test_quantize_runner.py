"""Smoke test of `experiments.quantize` on the tiny model, in a subprocess (as tests/test_runners.py).

`--model=tiny` tokenizes with the SmolLM2 GGUF tokenizer, ids modulo the tiny vocabulary;
its perplexities mean nothing, the plumbing and the byte accounting do.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The ablation recipes (fireq_w4a8_no_smoothing, ...) go through the same runner code; they
# are checked in test_quant and test_gptq.
METHODS = "fp32,w8a8,w4a16_g128,fireq_w4a8"


def run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "experiments.quantize", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )


@pytest.fixture
def text_file(tmp_path):
  path = tmp_path / "text.txt"
  path.write_text("The quick brown fox jumps over the lazy dog, twice or 3 times. " * 40)
  return path


def test_quantize_runner_tiny(tmp_path, text_file):
  out = tmp_path / "out"
  proc = run(
    "--model=tiny",
    f"--text_file={text_file}",
    "--context=64",
    "--max_windows=1",
    "--calib_windows=1",
    f"--methods={METHODS}",
    "--decode_tokens=4",
    "--kernels=pallas",  # the quantized matmuls run their Pallas kernels, interpreted
    "--interpret",
    f"--out_dir={out}",
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  rows = {r["method"]: r for r in summary["results"]}
  assert list(rows) == METHODS.split(",")
  for r in rows.values():
    assert set(r) == {"method", "ppl", "delta_pct", "weight_bytes_vs_bf16", "decode_tok_s"}
    assert r["ppl"] > 1 and r["decode_tok_s"] > 0
  assert rows["fp32"]["delta_pct"] == 0 and rows["fp32"]["weight_bytes_vs_bf16"] == 2.0
  assert 0.5 < rows["w8a8"]["weight_bytes_vs_bf16"] < 0.52  # int8 + f32 scale per column
  for m in ("w4a16_g128", "fireq_w4a8"):
    assert 0.25 < rows[m]["weight_bytes_vs_bf16"] < 0.30
  record = json.loads((out / "quantize.json").read_text())
  assert record["config"]["kernels"] == "pallas" and record["config"]["interpret"]
  assert record["text"]["calibration_windows"] == 1
  assert record["methods"]["w8a8"]["perplexity"]["tokens"] == 63
  disk = {m: d["orbax_checkpoint_bytes_on_disk"] for m, d in record["methods"].items()}
  assert disk["fireq_w4a8"] < disk["w8a8"] < disk["fp32"]
  assert (out / "quantize.png").stat().st_size > 1000


def test_unknown_method_is_a_one_line_error(text_file):
  proc = run(f"--text_file={text_file}", "--methods=fp32,int3")
  assert proc.returncode != 0 and proc.stdout == ""
  last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
  assert last.startswith("error: ") and "int3" in last


def test_text_too_short_for_calibration(tmp_path, text_file):
  proc = run(
    "--model=tiny",
    f"--text_file={text_file}",
    "--context=512",
    "--calib_windows=4",
    f"--out_dir={tmp_path}",
  )
  assert proc.returncode != 0
  assert "too few for 4 calibration windows" in proc.stderr.splitlines()[-1]


def test_saved_learned_checkpoint_scores_as_in_the_run(tmp_path, text_file):
  """--save_dir keeps the quantized model; `experiments.perplexity --checkpoint` restores it
  and scores the same window to the same perplexity; the JSON lists each layer's choice."""
  out, saved = tmp_path / "out", tmp_path / "saved"
  method = "w4a16_g128_learned"
  common = (f"--text_file={text_file}", "--context=64", "--max_windows=1")
  proc = run(
    "--model=tiny",
    *common,
    "--calib_windows=1",
    f"--methods={method}",
    "--skip_decode",
    f"--save_dir={saved}",
    f"--out_dir={out}",
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  record = json.loads((out / "quantize.json").read_text())
  quantized = record["methods"][method]
  choices = quantized["layer_choices"]
  assert [c["layer"] for c in choices] == [0, 1]  # the tiny model's layers
  for c in choices:
    assert c["own_error"] > 0 and c["learned_error"] > 0
    assert c["kept"] == ("learned" if c["learned_error"] < c["own_error"] else "own")
  assert "layer_choices" not in record["methods"]["fp32"]
  assert quantized["orbax_checkpoint_bytes_on_disk"] > 0

  scored = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.perplexity",
      f"--checkpoint={saved / method}",
      f"--out_dir={tmp_path / 'ppl'}",
      *common,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert scored.returncode == 0, scored.stderr[-2000:]
  summary = json.loads(scored.stdout.strip().splitlines()[-1])
  assert summary["dtype"] == "as saved" and summary["tokens"] == 63
  assert summary["ppl"] == pytest.approx(quantized["perplexity"]["ppl"], rel=1e-6)
  assert summary["ppl"] != pytest.approx(record["methods"]["fp32"]["perplexity"]["ppl"], rel=1e-3)

  again = run(*common, f"--methods={method}", f"--save_dir={saved}", f"--out_dir={out}")
  assert again.returncode != 0 and again.stdout == ""
  assert f"already holds checkpoints for ['fp32', '{method}']" in again.stderr.splitlines()[-1]
