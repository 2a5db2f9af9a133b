"""Smoke tests of the perplexity and decode-speed runners, in subprocesses.

`--model=tiny` runs tokenize with the SmolLM2 GGUF tokenizer, ids taken modulo
the tiny vocabulary (see experiments/perplexity.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import common

ROOT = Path(__file__).resolve().parents[1]

PPL_KEYS = {"ppl", "tokens", "context", "windows", "text", "dtype", "seconds"}


def run(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", f"experiments.{module}", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )


def last_json(proc: subprocess.CompletedProcess) -> dict:
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def text_file(tmp_path):
  path = tmp_path / "text.txt"
  path.write_text("The quick brown fox jumps over the lazy dog, twice or 3 times. " * 40)
  return path


def test_perplexity_tiny(tmp_path, text_file):
  out = tmp_path / "out"
  summary = last_json(
    run(
      "perplexity",
      "--model=tiny",
      f"--text_file={text_file}",
      "--context=64",
      "--max_windows=3",
      f"--out_dir={out}",
    )
  )
  assert PPL_KEYS <= summary.keys()
  assert (summary["windows"], summary["context"], summary["tokens"]) == (3, 64, 3 * 63)
  assert summary["ppl"] > 1 and summary["dtype"] == "float32"
  record = json.loads((out / "perplexity.json").read_text())
  assert record["run"]["versions"]["jax"] and record["result"]["tokens"] == 189


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
  assert proc.returncode != 0
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert lines and lines[-1].startswith("error: "), proc.stderr
  return lines[-1]


def test_missing_text_file(tmp_path):
  missing = tmp_path / "no_such.txt"
  proc = run("perplexity", f"--text_file={missing}")
  assert str(missing) in _one_line_error(proc)
  assert proc.stdout == ""


def test_checkpoint_that_is_not_one(tmp_path, text_file):
  missing = tmp_path / "no_such_dir"
  assert str(missing) in _one_line_error(
    run("perplexity", f"--checkpoint={missing}", f"--text_file={text_file}")
  )
  msg = _one_line_error(run("perplexity", f"--checkpoint={tmp_path}", f"--text_file={text_file}"))
  assert "not a jaxllm checkpoint: config.json is missing" in msg


def test_bad_context(text_file):
  assert "--context" in _one_line_error(
    run("perplexity", f"--text_file={text_file}", "--context=1")
  )


def test_text_shorter_than_one_window(tmp_path):
  short = tmp_path / "short.txt"
  short.write_text("Just a few words.")
  msg = _one_line_error(
    run(
      "perplexity", "--model=tiny", f"--text_file={short}", "--context=256", f"--out_dir={tmp_path}"
    )
  )
  assert "fewer than one window" in msg and "context=256" in msg


def test_default_text_is_sizeable():
  text, label = common.default_text()
  assert label.startswith("stdlib:docstrings(python")
  assert len(text) > 400_000  # ~100k+ tokens at ~4 characters per token


def test_write_results_and_summary(tmp_path, capsys):
  """numpy values unwrapped, None kept (non-finite figures: tests/test_runner_guard.py)."""
  payload = {"a": np.float32(1.5), "b": np.arange(3), "c": None, "d": (1, None)}
  path = common.write_results(str(tmp_path / "new"), "demo", payload)
  assert path == str(tmp_path / "new" / "demo.json")
  want = {"a": 1.5, "b": [0, 1, 2], "c": None, "d": [1, None]}
  assert json.loads(Path(path).read_text()) == want
  common.print_summary(payload)
  assert json.loads(capsys.readouterr().out.splitlines()[-1]) == want


def test_fail_is_one_line(capsys):
  with pytest.raises(SystemExit) as e:
    common.fail("bad\ninput  here")
  assert e.value.code != 0
  assert capsys.readouterr().err == "error: bad input here\n"


_ROWS = [
  {"method": "dense", "ppl": 12.3456, "delta_pct": 0.0, "tok_s": None},
  {"method": "kivi2", "ppl": float("nan"), "delta_pct": -1.25e-3, "tok_s": 1234.56},
]


def _table(rows, **kwargs):
  return common.Table(
    (
      common.Column("method", "method", width=10, left=True),
      common.Column("ppl", "ppl", ".3f", width=9),
      common.Column("Δppl %", "delta_pct", "+.2f", width=8),
      common.Column("tok/s", lambda r: r["tok_s"], lambda v: f"{v:.1f}!", width=8),
    ),
    rows,
    **kwargs,
  )


def test_table_lines_as_the_runners_formatted_them():
  """Cells as f-strings with the same widths give them; None is "-"; a span row
  prints its label and note; the title's newline is a blank line."""
  rows = [*_ROWS, {"method": "llamacpp", "note": "n/a (not installed)"}]
  assert _table(rows, title="\ntext: t", span="note").lines() == [
    "",
    "text: t",
    f"{'method':10s} {'ppl':>9s} {'Δppl %':>8s} {'tok/s':>8s}",
    f"{'dense':10s} {12.3456:9.3f} {0.0:+8.2f} {'-':>8s}",
    f"{'kivi2':10s} {float('nan'):9.3f} {-1.25e-3:+8.2f} {'1234.6!':>8s}",
    "llamacpp   n/a (not installed)",
  ]
  facts = common.Table(
    (common.Column("", 0, width=12, left=True), common.Column("", 1)), [("a", 1)]
  )
  assert facts.lines() == ["a            1"]  # no heading, no trailing blanks
  with pytest.raises(KeyError):
    _table([{"method": "x"}]).lines()  # a key the row lacks is a bug, not a "-"


def test_report_prints_tables_saves_plot_then_summary(tmp_path, capsys):
  rows = [dict(_ROWS[0], bits=16.0), dict(_ROWS[0], method="int8", bits=8.5, ppl=12.5)]
  plot = common.ScatterPlot(rows, "bits", "ppl", title="t", xlabel="bits", ylabel="ppl")
  summary, record = {"results": rows}, {"rows": rows}
  common.report(
    str(tmp_path), "demo", record, summary, tables=[_table(rows), "(a note)"], plot=plot
  )
  out = capsys.readouterr().out.splitlines()
  assert out[:-1] == [*_table(rows).lines(), "(a note)"]
  assert json.loads(out[-1]) == {"results": rows, "results_file": str(tmp_path / "demo.json")}
  png = tmp_path / "demo.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
  assert json.loads((tmp_path / "demo.json").read_text()) == {"rows": rows, "plot": str(png)}


def test_report_with_a_nan_figure_writes_everything_then_fails(tmp_path, capsys):
  summary = {"results": [dict(r) for r in _ROWS]}
  with pytest.raises(SystemExit) as e:
    common.report(str(tmp_path), "demo", {"rows": _ROWS}, summary, tables=[_table(_ROWS)])
  assert e.value.code != 0
  out, err = capsys.readouterr()
  assert out.splitlines()[:3] == _table(_ROWS).lines()
  assert json.loads(out.splitlines()[-1])["results"][1]["ppl"] == "nan"
  assert err.startswith("error: non-finite figure(s) (NaN or inf): rows[1].ppl, ")
  assert json.loads((tmp_path / "demo.json").read_text())["rows"][1]["ppl"] == "nan"


def test_kv_compression_tiny(tmp_path, text_file):
  """The streaming KV runner end to end: the dense cache is its own baseline, int8
  stays close to it, every row has the issue's keys, and the plot is written.
  16-token decode steps are used where they score as one-token steps."""
  out = tmp_path / "out"
  summary = last_json(
    run(
      "kv_compression",
      "--model=tiny",
      f"--text_file={text_file}",
      "--methods=dense,int8,kivi2,fireq_int4",
      "--noablations",
      "--context=160",
      "--prefill=20",
      "--chunk=16",
      "--block=4",
      "--max_windows=2",
      "--batch_size=2",
      "--calib_windows=1",
      "--kernels=pallas",  # every op's Pallas kernel where it has one, interpreted
      "--interpret",
      f"--out_dir={out}",
    )
  )
  rows = {r["method"]: r for r in summary["results"]}
  assert list(rows) == ["dense", "int8", "kivi2", "fireq_int4"]
  keys = {"method", "ppl", "delta_pct", "bytes_per_token_vs_bf16", "top1_agree"}
  assert all(r.keys() == keys for r in rows.values())
  assert rows["dense"]["delta_pct"] == 0.0 and rows["dense"]["top1_agree"] == 1.0
  assert rows["dense"]["bytes_per_token_vs_bf16"] == 2.0  # float32 cache
  # int8: 64 code bytes + one bf16 scale per head, for K and V, over 2 x 64 bf16 bytes
  assert rows["int8"]["bytes_per_token_vs_bf16"] == pytest.approx(66 / 128)
  assert abs(rows["int8"]["delta_pct"]) < 2.0 and rows["int8"]["top1_agree"] > 0.9
  assert rows["kivi2"]["bytes_per_token_vs_bf16"] < 0.18
  record = json.loads((out / "kv_compression.json").read_text())
  assert record["config"]["kernels"] == "pallas" and record["config"]["interpret"]
  assert record["text"]["scored_tokens_per_method"] == 2 * (160 - 1)
  chunks = {r["method"]: r["decode_chunk"] for r in record["rows"]}
  # KIVI's flushes (lengths 96 + 32k) fall inside 16-token steps from 20: one per step.
  assert chunks == {"dense": 16, "int8": 16, "kivi2": 1, "fireq_int4": 16}
  assert (out / "kv_compression.png").stat().st_size > 0


def test_kv_compression_dense_reference_is_written_then_read(tmp_path, text_file):
  """--dense_reference: the first run decodes the dense cache and saves its row; a
  second run reads it back (no dense decode) and reports the same figures; a run
  under another prefill refuses the file, naming the setting."""
  ref = tmp_path / "dense_ref.npz"
  args = [
    "kv_compression",
    "--model=tiny",
    f"--text_file={text_file}",
    "--methods=dense,int8",
    "--noablations",
    "--context=96",
    "--prefill=16",
    "--chunk=16",
    "--max_windows=2",
    "--batch_size=2",
    "--calib_windows=1",
    f"--dense_reference={ref}",
  ]
  first = run(*args, f"--out_dir={tmp_path / 'a'}")
  assert first.returncode == 0, first.stderr
  assert ref.exists() and "read from --dense_reference" not in first.stdout
  second = run(*args, f"--out_dir={tmp_path / 'b'}")
  assert "dense: read from --dense_reference" in second.stdout
  assert last_json(second)["results"] == last_json(first)["results"]
  other_args = [a.replace("--prefill=16", "--prefill=32") for a in args]
  other = run(*other_args, f"--out_dir={tmp_path / 'c'}")
  assert other.returncode != 0
  err = other.stderr.strip().splitlines()[-1]
  assert "was computed with prefill=16, this run has prefill=32" in err, err


def test_kv_compression_prefill_must_leave_decode_steps(text_file):
  proc = run("kv_compression", f"--text_file={text_file}", "--context=64", "--prefill=63")
  assert proc.returncode != 0
  assert "--prefill must be in [1, context - 1)" in proc.stderr.strip().splitlines()[-1]
  proc = run("kv_compression", f"--text_file={text_file}", "--kernels=pallas,attention=flash")
  assert proc.returncode != 0
  err = proc.stderr.strip().splitlines()[-1]
  assert err == (
    "error: --kernels=pallas,attention=flash: op 'attention' has no implementation 'flash'; "
    "it has ['reference', 'xla', 'mosaic_tpu', 'triton']"
  ), err


def test_bench_kernels_tiny_interpret(tmp_path):
  """The kernel benchmark on tiny shapes: Pallas (interpret) and XLA rows for each
  matmul recipe and KIVI cache, with errors against the reference small and the
  quantization error itself of the expected size."""
  summary = last_json(
    run(
      "bench_kernels",
      "--shapes=tiny",
      "--m=8",
      "--kv_models=tiny",
      "--kv_context=256",
      "--kv_batch=2",
      "--implementations=pallas,xla",
      "--interpret",
      "--reps=3",
      "--copies=2",
      f"--out_dir={tmp_path}",
    )
  )
  assert summary["errors"] == 0
  rows = summary["results"]
  matmul = [r for r in rows if r["op"] == "matmul"]
  kv = [r for r in rows if r["op"] == "kv_attention"]
  # 2 shapes x 3 recipes x 2 implementations, + the bf16 peer rows
  assert len([r for r in matmul if r["method"] != "bf16"]) == 12
  assert {r["method"] for r in kv} >= {"kivi4", "kivi2"}
  for r in rows:
    assert r["us"] > 0, r
    if r["method"] != "bf16" and r["rel_err_vs_reference"] is not None:
      assert r["rel_err_vs_reference"] < 2e-2, r
  record = json.loads((tmp_path / "bench_kernels.json").read_text())
  f32_errs = {
    r["method"]: r["rel_err_vs_f32"] for r in record["rows"] if r.get("rel_err_vs_f32") is not None
  }
  assert 1e-4 < f32_errs["w8a8"] < 0.05 and 0.02 < f32_errs["fireq_w4a8"] < 0.3, f32_errs


def test_bench_kernels_attention_puts_the_flash_kernel_beside_xla(tmp_path):
  """--ops=attention: a causal prefill through each implementation (the flash kernel
  interpreted), beside XLA's bf16 attention, each checked against the reference."""
  summary = last_json(
    run(
      "bench_kernels",
      "--ops=attention",
      "--kv_models=tiny",
      "--attention_len=128",
      "--implementations=pallas,xla",
      "--interpret",
      "--reps=3",
      f"--out_dir={tmp_path}",
    )
  )
  assert summary["errors"] == 0
  rows = {(r["method"], r["implementation"]): r for r in summary["results"]}
  assert set(rows) == {("prefill_bf16", "xla"), ("prefill", "pallas"), ("prefill", "xla")}
  for key in (("prefill", "pallas"), ("prefill", "xla")):  # float32 inputs
    assert 0 < rows[key]["rel_err_vs_reference"] < 1e-5, rows[key]
    assert rows[key]["x_vs_bf16"] > 0 and rows[key]["x_vs_xla"] > 0
  record = json.loads((tmp_path / "bench_kernels.json").read_text())
  assert {r.get("ran") for r in record["rows"] if r["implementation"] == "pallas"} == {"mosaic_tpu"}


def test_bench_kernels_rejects_unknown_op():
  assert "--ops" in _one_line_error(run("bench_kernels", "--ops=conv"))
