"""Smoke test of `experiments.sparse_attention` on the tiny model, in a subprocess.

`--model=tiny` tokenizes with the SmolLM2 GGUF tokenizer, ids modulo the tiny vocabulary;
its perplexities mean nothing, the plumbing (every point over both caches, the JSON
summary, the PNG, the bytes accounting) does. The context-2048 sweeps are runner work.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "experiments.sparse_attention", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )


@pytest.fixture
def text_file(tmp_path):
  path = tmp_path / "text.txt"
  path.write_text("The quick brown fox jumps over the lazy dog, twice or 3 times. " * 60)
  return path


def test_sparse_attention_runner_tiny(tmp_path, text_file):
  out = tmp_path / "out"
  proc = run(
    "--model=tiny",
    f"--text_file={text_file}",
    "--context=128",
    "--max_windows=2",
    "--batch_size=2",
    "--moba_blocks=32",
    "--moba_topk=2,4",
    "--sparq=8:16:none,8:16:mean_v:head",
    "--cache_points=moba:32:2",
    f"--out_dir={out}",
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  rows = summary["results"]
  labels = [(r["cache"], r["method"], r["params"].get("top_k"), r["params"].get("r")) for r in rows]
  assert labels == [
    ("dense", "full", None, None),
    ("dense", "moba", 2, None),
    ("dense", "moba", 4, None),
    ("dense", "sparq", None, 8),
    ("dense", "sparq", None, 8),
    ("kivi4", "full", None, None),
    ("kivi4", "moba", 2, None),
  ]
  for r in rows:
    assert set(r) == {"method", "params", "cache", "ppl", "delta_pct", "kv_read_fraction"}
  full, moba2, moba4 = rows[0], rows[1], rows[2]
  assert full["delta_pct"] == 0 and full["kv_read_fraction"] == 1
  # 4 blocks of 32 cover the 128-token window: MoBA is full attention (and reads a bit more:
  # the routing's block means).
  assert moba4["ppl"] == pytest.approx(full["ppl"], rel=1e-4) and moba4["kv_read_fraction"] > 1
  assert 0.3 < moba2["kv_read_fraction"] < 0.8
  assert rows[4]["params"]["per_head"] and rows[4]["params"]["correction"] == "mean_v"
  assert summary["first_call_s"] > 0
  record = json.loads((out / "sparse_attention.json").read_text())
  assert record["text"]["scored_tokens_per_point"] == 2 * 127
  assert (out / "sparse_attention.png").stat().st_size > 1000


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--sparq=8", "SparQ point '8' must be r:k[:correction[:head]]"),
    ("--caches=dense,kivi9", "--caches: unknown ['kivi9']"),
    ("--moba_topk=0", "--moba_topk must list integers >= 1"),
    ("--sparq=65:8 --moba_topk=2", "SparQ: r 65 is larger than the head dimension 64"),
    ("--moba_topk=64", "MoBA: top_k 64 is larger than the number of key blocks 8"),
  ],
)
def test_bad_flags_are_one_line_errors(text_file, flag, message):
  proc = run("--model=tiny", f"--text_file={text_file}", "--context=512", *flag.split())
  assert proc.returncode != 0 and proc.stdout == ""
  last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
  assert last.startswith("error: ") and message in last, last
