"""experiments.device_check on CPU: the accelerator check's smoke test (interpret mode,
tiny shapes), in subprocesses.

One run checks every Pallas kernel against its reference and times it (figures checked
against byte counts computed here from the shapes); one run with an impossible tolerance
must fail (exit 1, the summary still stdout's last line) while its decode section still
measures; one run with no time left records every case as skipped.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import bench_lib

ROOT = Path(__file__).resolve().parents[1]
PALLAS_OPS = {
  "w8a8_matmul",
  "w4a16_matmul",
  "w4a8_fireq_matmul",
  "quantized_kv_attention",
  "attention",
  "block_sparse_attention",
}
SUMMARY_KEYS = {"chip", "cases", "passed", "failed", "refused", "skipped", "max_rel_err", "json"}
TINY_HEADS = bench_lib.KV_HEADS["tiny"]  # (num_heads, num_kv_heads, head_dim)


def _run(*args: str) -> tuple[subprocess.CompletedProcess, dict]:
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.device_check", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  lines = proc.stdout.strip().splitlines()
  assert lines, proc.stderr[-2000:]
  summary = json.loads(lines[-1])
  assert SUMMARY_KEYS <= summary.keys(), summary
  return proc, summary


def _record(summary: dict) -> dict:
  record = json.loads(Path(summary["json"]).read_text())
  assert record["finished"] is True
  assert record["summary"]["cases"] == summary["cases"] == len(record["cases"])
  return record


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp("device_check")
  proc, summary = _run(f"--out_dir={out}", "--m=1", "--reps=3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return summary, _record(summary)


def test_every_kernel_matches_its_reference(smoke):
  summary, record = smoke
  assert summary["chip"] is None and summary["device_kind"] == "cpu"
  assert summary["failed"] == summary["refused"] == summary["skipped"] == 0
  assert record["settings"]["interpret"] is True and record["unchecked_ops"] == []
  kernels = [r for r in record["cases"] if r["section"] == "kernels"]
  # 2 tiny linears x 3 formats at M=1, 3 KIVI caches, one attention prefill and one MoBA
  assert len(kernels) == 2 * 3 + 3 + 1 + 1
  assert {r["op"] for r in kernels} == PALLAS_OPS
  for r in kernels:
    assert r["status"] == "passed" and r["ran"] == "mosaic_tpu", r
    assert isinstance(r["rel_err"], float) and 0.0 <= r["rel_err"] <= 1e-2, r
  kv_errs = [r["rel_err"] for r in kernels if r["op"] == "quantized_kv_attention"]
  assert min(kv_errs) > 0.0  # bf16 outputs of two different computations: not identical
  assert summary["max_rel_err"] == max(r["rel_err"] for r in kernels)


def test_speed_figures_follow_from_the_shapes(smoke):
  _, record = smoke
  speed = [r for r in record["cases"] if r["section"] == "speed"]
  assert all(r["status"] == "passed" for r in speed)
  assert record["hbm_note"] and all(r["hbm_fraction"] is None for r in speed)
  peers = {r["shape"]: r for r in speed if r["method"] in ("bf16", "dense_bf16")}
  peers |= {r["shape"]: r for r in speed if r["op"] == "attention" and r["implementation"] == "xla"}
  assert len(peers) == 4  # two linears, one KV head shape, one attention prefill
  for r in speed:
    assert r["us_min"] <= r["us"] <= r["us_max"] and r["first_call_s"] > 0, r
    assert math.isclose(r["gb_s"], r["bytes"] / r["us"] / 1e3, rel_tol=1e-9), r
    if r is not peers[r["shape"]]:
      assert math.isclose(r["x_vs_bf16"], peers[r["shape"]]["us"] / r["us"], rel_tol=1e-9)
    if r["implementation"] == "pallas":  # attention's XLA peer is its bf16 peer
      assert r["ran"] == "mosaic_tpu" and (r["op"] == "attention" or r["x_vs_xla"] > 0), r
  for r in speed:
    m, k, n = r["m"], r.get("k"), r.get("n")
    if r["method"] == "bf16":  # x, w and out in bf16
      assert r["bytes"] == 2 * (m * k + k * n + m * n), r
    elif r["method"] == "w8a8":  # x bf16, int8 w, f32 scale per column, out bf16
      assert r["bytes"] == 2 * m * k + k * n + 4 * n + 2 * m * n, r
  _, hkv, d = TINY_HEADS
  dense = peers["tiny.b2.t256"]
  assert dense["bytes"] == 2 * 2 * hkv * 256 * d * 2  # K and V, 2 rows, bf16
  kv = {r["method"]: r["bytes"] for r in speed if r["op"] == "quantized_kv_attention"}
  assert kv["kivi2"] < kv["kivi4"] < kv["kivi8"] < dense["bytes"], kv


def test_a_tolerance_no_kernel_meets_fails_the_run_and_decode_still_measures(tmp_path):
  proc, summary = _run(
    f"--out_dir={tmp_path}",
    "--sections=kernels,decode",
    "--ops=quantized_kv_attention",
    "--kv_methods=kivi4",
    "--formats=w8a8",
    "--tolerance=1e-9",
    "--reps=3",
  )
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "error: 1 case(s) failed" in proc.stderr
  assert (summary["failed"], summary["passed"]) == (1, 2), summary
  record = _record(summary)
  (kernel,) = [r for r in record["cases"] if r["section"] == "kernels"]
  assert kernel["status"] == "failed" and 1e-9 < kernel["rel_err"] <= 1e-2, kernel
  decode = {r["method"]: r for r in record["cases"] if r["section"] == "decode"}
  assert set(decode) == {"bf16", "w8a8"} and all(r["tok_s"] > 0 for r in decode.values())
  assert math.isclose(
    decode["w8a8"]["x_vs_bf16"], decode["w8a8"]["tok_s"] / decode["bf16"]["tok_s"]
  )
  w8, bf16 = decode["w8a8"]["weight_bytes"], decode["bf16"]["weight_bytes"]
  assert w8["linear_bytes"] < 0.6 * bf16["linear_bytes"], (w8, bf16)


def test_no_time_left_skips_every_case_and_still_writes_the_json(tmp_path):
  proc, summary = _run(f"--out_dir={tmp_path}", "--budget_s=0")
  assert proc.returncode == 1 and "error: no case ran" in proc.stderr
  assert summary["skipped"] == summary["cases"] > 0 and summary["passed"] == 0
  record = _record(summary)
  assert {r["reason"] for r in record["cases"]} == {"time budget"}


def test_bad_input_is_one_line_error():
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.device_check", "--ops=linear"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --ops: unknown ['linear']")
