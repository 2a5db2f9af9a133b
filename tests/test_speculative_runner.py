"""Smoke test of `experiments.speculative` on the tiny model, in a subprocess.

`--model=tiny` tokenizes with the SmolLM2 GGUF tokenizer, ids modulo the tiny vocabulary;
its speedups mean nothing (sub-millisecond steps, dispatch-bound), the plumbing does: both
tasks, the lookup, layer-skip and EasySpec drafts (the tiny model's 2 layers leave EasySpec
one layer: the plumbing of its peers, not layer parallelism, which tests/test_easyspec.py
covers), a gamma sweep, greedy identity with plain
decoding, the bookkeeping of target calls against drafted and accepted tokens, the JSON,
the PNG and the one-line errors. The SmolLM2 figures are runner work.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = [
  "draft",
  "gamma",
  "task",
  "acceptance_rate",
  "tokens_per_target_call",
  "speedup",
  "predicted_speedup",
  "greedy_identical",
]
NEW = 8


def run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "experiments.speculative", "--model=tiny", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  """A WikiText-like file: a heading, then paragraphs of distinct sentences."""
  path = tmp_path_factory.mktemp("text") / "text.txt"
  lines = [" = Heading = "]
  for p in range(4):
    sentences = [
      f"Paragraph {p} sentence {s} tells of the river , the old mill and {p * 7 + s} boats ."
      for s in range(6)
    ]
    lines += ["", " " + " ".join(sentences)]
  path.write_text("\n".join(lines) + "\n")
  return path


@pytest.mark.parametrize(
  "draft, task, gammas",
  [
    ("lookup", "grounded", (1, 3)),
    ("layerskip", "continuation", (2,)),
    ("easyspec", "grounded", (2,)),
  ],
)
def test_runner_tiny(tmp_path, text_file, draft, task, gammas):
  out = tmp_path / "out"
  proc = run(
    f"--draft={draft}",
    f"--task={task}",
    f"--gamma={','.join(map(str, gammas))}",
    "--num_prompts=2",
    f"--max_new_tokens={NEW}",
    "--prompt_tokens=24",
    "--paragraph_tokens=40",
    "--repeats=1",
    f"--text_file={text_file}",
    f"--out_dir={out}",
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert list(summary) == KEYS
  assert summary["draft"] == draft and summary["task"] == task
  assert summary["greedy_identical"] is True
  record = json.loads((out / "speculative.json").read_text())
  results = record["results"]
  assert [r["gamma"] for r in results] == list(gammas)
  best = max(results, key=lambda r: r["speedup"])
  assert summary["gamma"] == best["gamma"] and summary["speedup"] == best["speedup"]
  for r in results:
    gamma, rows = r["gamma"], r["prompts"]
    assert len(rows) == 2 and all(p["greedy_identical"] for p in rows)
    for p in rows:
      steps = p["target_calls"] - 1  # the prefill gives the first token
      assert p["drafted"] == gamma * steps
      # each verify call emits between 1 and accepted + 1 tokens
      assert 1 + steps <= p["generated"] <= 1 + steps + p["accepted"]
      assert p["generated"] == NEW or p["finished_at_eos"]
    generated = sum(p["generated"] for p in rows)
    calls = sum(p["target_calls"] for p in rows)
    assert r["tokens_per_target_call"] == pytest.approx(generated / calls)
    assert r["target_calls_per_token"] == pytest.approx(calls / generated)
    accepted = sum(p["accepted"] for p in rows)
    assert r["acceptance_rate"] == pytest.approx(accepted / sum(p["drafted"] for p in rows))
    # the cost model from its measured parts
    assert r["c"] > 0 and r["v"] > 0
    assert r["predicted_speedup"] == pytest.approx(
      r["tokens_per_target_call"] / (gamma * r["c"] + r["v"])
    )
    assert r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
  assert record["summary"] == summary
  assert (out / "speculative.png").stat().st_size > 1000
  if draft == "easyspec":  # the same draft run sequentially and the layer-skip draft beside it
    for r in results:
      peers = r["easyspec"]
      drafts = peers["drafts"]
      assert list(drafts) == ["easyspec", "sequential", "layerskip"]
      assert all(d["greedy_identical"] for d in drafts.values())
      es, seq = drafts["easyspec"], drafts["sequential"]
      assert es["acceptance_rate"] == pytest.approx(r["acceptance_rate"])
      assert es["tokens_per_target_call"] == pytest.approx(r["tokens_per_target_call"])
      assert peers["draft_speedup_vs_sequential"] == pytest.approx(
        seq["draft_propose_ms"] / es["draft_propose_ms"]
      )
      assert peers["acceptance_loss"] == pytest.approx(
        seq["acceptance_rate"] - es["acceptance_rate"]
      )
      assert es["propose_calls"] >= len(r["prompts"])
    assert record["config"]["draft_config"]["group_size"] == 2


@pytest.mark.parametrize(
  "flags, message",
  [
    ("--gamma=0", "--gamma must list integers >= 1"),
    ("--draft=easyspec --easyspec_layers=2", "an EasySpec draft needs between 1 and 1"),
    ("--draft=easyspec --easyspec_group=0", "a layer-parallel group needs at least 1 layer"),
    ("--draft=medusa", "unknown --draft='medusa'"),
    ("--task=poem", "unknown --task='poem'"),
    ("--draft=layerskip --layerskip_layers=2", "a layer-skip draft needs between 1 and 1"),
    ("--max_new_tokens=500 --gamma=4", "+ gamma=4 + --max_new_tokens=500 = 524 tokens exceeds"),
  ],
)
def test_bad_flags_are_one_line_errors(text_file, flags, message):
  proc = run(f"--text_file={text_file}", "--prompt_tokens=20", "--num_prompts=2", *flags.split())
  assert proc.returncode != 0 and proc.stdout == ""
  last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
  assert last.startswith("error: ") and message in last, last
