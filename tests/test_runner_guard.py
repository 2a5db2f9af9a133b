"""Runners never pass off a NaN or infinite figure as a result (issue 28), and set up
the runtime (quiet backend probe, persistent compilation cache) at start.

The shared output path (`experiments.common`) still writes every figure, the
non-finite ones as the strings "nan", "inf", "-inf" with a top-level "error"
naming them, then exits non-zero with a one-line `error:`. `None` is an absent
field (a peer not installed) and stays `null`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import common

ROOT = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")


def _python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-c", code, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
    env=None if env is None else {**os.environ, **env},
  )


def _error_line(stderr: str) -> str:
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert lines and lines[-1].startswith("error: "), stderr[-2000:]
  return lines[-1]


# ------------------------------------------------------------------ the guard itself


def test_nonfinite_figures_names_key_paths():
  record = {
    "ppl": 3.5,
    "peer": None,
    "rows": [{"ppl": 1.0}, {"ppl": 2.0}, {"ppl": NAN, "x": [1.0, -INF]}],
    "result": {"nll": np.float32("inf"), "per_window": np.array([[0.5, np.nan]])},
    "label": "nan",  # a string, not a figure
  }
  assert common.nonfinite_figures(record) == [
    "rows[2].ppl",
    "rows[2].x[1]",
    "result.nll",
    "result.per_window[0][1]",
  ]
  assert common.nonfinite_figures({"a": None, "b": [1, 2.5, True], "c": "inf"}) == []
  assert common.nonfinite_figures([1.0, NAN]) == ["[1]"]


def test_write_results_writes_strings_then_exits_nonzero(tmp_path, capsys):
  payload = {"a": np.float32(1.5), "b": np.arange(3), "peer": None, "r": [{"ppl": NAN}, -INF]}
  with pytest.raises(SystemExit) as e:
    common.write_results(str(tmp_path), "demo", payload)
  assert e.value.code != 0
  path = tmp_path / "demo.json"
  text = path.read_text()
  data = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
  assert data["error"] == "non-finite figure(s) (NaN or inf): r[0].ppl, r[1]"
  assert {k: v for k, v in data.items() if k != "error"} == {
    "a": 1.5,
    "b": [0, 1, 2],
    "peer": None,  # absent, not a figure: stays null
    "r": [{"ppl": "nan"}, "-inf"],
  }
  err = capsys.readouterr().err
  assert err == (
    f"error: non-finite figure(s) (NaN or inf): r[0].ppl, r[1]; results written to {path}\n"
  )


def test_finish_keeps_every_figure_and_fails(tmp_path, capsys):
  rows = [{"method": m, "ppl": p} for m, p in (("a", 2.0), ("b", 3.0), ("c", NAN))]
  summary = {"results": [dict(r) for r in rows], "llamacpp_tok_s": None}
  record = {"rows": rows, "summary": summary}
  with pytest.raises(SystemExit) as e:
    common.finish(str(tmp_path), "demo", record, summary)
  assert e.value.code != 0
  out, err = capsys.readouterr()
  path = str(tmp_path / "demo.json")
  assert err == (
    "error: non-finite figure(s) (NaN or inf): rows[2].ppl, summary.results[2].ppl; "
    f"results written to {path}\n"
  )
  data = json.loads(Path(path).read_text())
  assert data["rows"][2] == {"method": "c", "ppl": "nan"} and data["rows"][1]["ppl"] == 3.0
  assert data["summary"]["llamacpp_tok_s"] is None and "rows[2].ppl" in data["error"]
  printed = json.loads(out.splitlines()[-1])  # the summary line is still printed
  assert printed["results"][2]["ppl"] == "nan" and printed["results_file"] == path
  assert printed["error"].startswith("non-finite figure(s)")


def test_finish_names_figures_only_in_the_summary(tmp_path, capsys):
  with pytest.raises(SystemExit):
    common.finish(str(tmp_path), "demo", {"rows": [1.0]}, {"x_vs_peer": INF})
  assert "summary.x_vs_peer;" in capsys.readouterr().err
  assert json.loads((tmp_path / "demo.json").read_text())["error"].endswith("summary.x_vs_peer")


def test_finish_with_finite_figures_and_absent_fields(tmp_path, capsys):
  summary = {"ppl": 2.5, "hf_tok_s": None}
  common.finish(str(tmp_path), "demo", {"summary": summary}, summary)
  out = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert out == {"ppl": 2.5, "hf_tok_s": None, "results_file": str(tmp_path / "demo.json")}
  assert json.loads((tmp_path / "demo.json").read_text()) == {
    "summary": {"ppl": 2.5, "hf_tok_s": None}
  }


def test_print_summary_refuses_nonfinite(capsys):
  with pytest.raises(SystemExit) as e:
    common.print_summary({"tok_s": INF, "peer": None})
  assert e.value.code != 0
  out, err = capsys.readouterr()
  assert json.loads(out.splitlines()[-1])["tok_s"] == "inf"
  assert _error_line(err) == "error: non-finite figure(s) (NaN or inf): tok_s in the summary"


def test_one_line_errors_turns_load_errors_into_fail(capsys):
  """The runners load GGUF files inside it: a corrupt or non-finite file (ValueError)
  or a missing one ends the run with one line, not a traceback; others propagate."""
  with pytest.raises(SystemExit) as e:
    with common.one_line_errors("m.gguf: "):
      raise ValueError("tensor 'blk.27.attn_v.weight' holds 6560 NaN\nvalues")
  assert e.value.code != 0
  assert (
    capsys.readouterr().err
    == "error: m.gguf: tensor 'blk.27.attn_v.weight' holds 6560 NaN values\n"
  )
  with pytest.raises(SystemExit):
    with common.one_line_errors():
      raise FileNotFoundError("no.gguf is missing")
  assert capsys.readouterr().err == "error: no.gguf is missing\n"
  with pytest.raises(KeyError):
    with common.one_line_errors():
      raise KeyError("a bug stays a traceback")
  with common.one_line_errors():
    pass


# ------------------------------------------------------- runner-specific figure handling


def test_quantize_learned_error_nan_is_a_figure_inf_is_absent():
  """+inf marks a layer with nothing to learn (null); a NaN learned error fails the run."""
  code = """
import json, math, types
from experiments import common, quantize
c = lambda e: types.SimpleNamespace(layer=0, kept="own", learned_error=e, own_error=0.5)
recs = [quantize._choice_record(c(e)) for e in (math.inf, math.nan, 0.25)]
print(json.dumps([[r["learned_error"] for r in recs], common.nonfinite_figures(recs)]))
"""
  proc = _python(code)
  assert proc.returncode == 0, proc.stderr[-2000:]
  values, bad = json.loads(proc.stdout.replace("NaN", '"NaN"').splitlines()[-1])
  assert values == [None, "NaN", 0.25] and bad == ["[1].learned_error"]


def test_quantize_failed_decode_is_a_nan_figure():
  """A decode that raises (Generator refuses non-finite logits) becomes a NaN figure
  with its message, so the run writes everything and then fails, not a traceback."""
  code = """
import json
from absl import flags
from experiments import common, quantize

def refuse(*args):
  raise ValueError("logits at step 0, row 0 are not finite:\\n the weights hold NaN")

quantize._decode_tok_s = refuse
flags.FLAGS(["quantize"])
tok_s, err = quantize._decode_figure(None, None, 512)
print(json.dumps([str(tok_s), err, common.nonfinite_figures({"decode_tok_s": tok_s})]))
"""
  proc = _python(code)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.splitlines()[-1]) == [
    "nan",
    "logits at step 0, row 0 are not finite: the weights hold NaN",
    ["decode_tok_s"],
  ]


def test_quantize_method_that_fails_keeps_earlier_rows(tmp_path):
  """A recipe that raises (GPTQ refuses a non-finite Hessian) ends the run with one
  line, after writing the methods measured before it."""
  code = """
import sys
from absl import flags
from experiments import common, quantize

common.run_info = lambda: {"backend": "cpu"}  # no jax import for this check
flags.FLAGS(["quantize", "--out_dir=" + sys.argv[1], "--context=64"])
rows = [{"method": "fp32", "ppl": 20.5}]
err = ValueError("GPTQ Hessian has non-finite entries")
quantize._fail_keeping_rows("w4a16_g128_gptq", err, rows, {"fp32": {"bytes": 10}})
"""
  proc = _python(code, str(tmp_path))
  path = tmp_path / "quantize.json"
  msg = "w4a16_g128_gptq: GPTQ Hessian has non-finite entries"
  assert proc.returncode != 0
  assert (
    _error_line(proc.stderr) == f"error: {msg}; the 1 method(s) measured before it are in {path}"
  )
  data = json.loads(path.read_text())
  assert data["error"] == msg and data["results"] == [{"method": "fp32", "ppl": 20.5}]
  assert data["methods"] == {"fp32": {"bytes": 10}} and data["config"]["context"] == 64


def test_kv_compression_does_not_keep_a_nonfinite_dense_reference(tmp_path):
  code = """
import sys, numpy as np
from experiments import kv_compression as kv
ok = kv._save_dense_reference(sys.argv[1], {}, {"ppl": float("nan")}, np.zeros(3))
good = kv._save_dense_reference(sys.argv[2], {}, {"ppl": 2.0}, np.zeros(3))
print(ok, good)
"""
  bad_path, good_path = tmp_path / "bad.npz", tmp_path / "good.npz"
  proc = _python(code, str(bad_path), str(good_path))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.splitlines()[-1] == "False True"
  assert "ppl not finite" in proc.stdout
  assert not bad_path.exists() and good_path.exists()


def test_kv_compression_method_that_cannot_be_scored_keeps_earlier_rows(tmp_path):
  """`jaxllm.streaming` refusing a method's non-finite scores ends the run with one
  line, after writing the rows measured before it (no traceback, nothing lost)."""
  code = """
import sys
from absl import flags
from experiments import common, kv_compression as kv

common.run_info = lambda: {"backend": "cpu"}  # no jax import for this check
flags.FLAGS(["kv_compression", "--out_dir=" + sys.argv[1]])
err = ValueError("logits of window 3 at position 7 are not finite:\\n the weights hold NaN")
kv._fail_keeping_rows("kivi2", err, {"context": 64}, [{"method": "dense", "ppl": 3.5}])
"""
  proc = _python(code, str(tmp_path))
  path = tmp_path / "kv_compression.json"
  msg = "kivi2: logits of window 3 at position 7 are not finite: the weights hold NaN"
  assert proc.returncode != 0
  assert _error_line(proc.stderr) == f"error: {msg}; the 1 row(s) measured before it are in {path}"
  assert json.loads(path.read_text()) == {
    "error": msg,
    "config": {"context": 64},
    "rows": [{"method": "dense", "ppl": 3.5}],
    "run": {"backend": "cpu"},
  }


def test_make_reference_logits_refuses_nonfinite_logits(tmp_path):
  """transformers returning NaN logits: one-line error naming the prompt, and the
  fixture file is left as it was (a NaN fixture would pass for a reference)."""
  code = """
import types
import numpy as np
from absl import app, flags
from experiments import make_reference_logits as mrl, peers

if "compilation_cache" in flags.FLAGS:  # no cache (and no jax import) for this torch-only run
  flags.FLAGS.set_default("compilation_cache", False)

tok = types.SimpleNamespace(
  encode=lambda text, add_special_tokens=True: [1, 2, 3],
  decode=lambda ids: "x",
  bos_token="<s>", bos_token_id=1, eos_token="</s>", eos_token_id=2,
)
model = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=5))
mrl.md.version = lambda name: "0"  # torch and transformers need not be installed
peers.load_hf = lambda gguf, dtype: (model, tok)
peers.hf_logits = lambda model, ids: np.array([[0.0] * 5, [0.0, 0.0, np.nan, 0.0, 0.0], [1.0] * 5])
app.run(mrl.main)
"""
  gguf, fixture = tmp_path / "fake.gguf", tmp_path / "fixture.json"
  gguf.write_bytes(b"GGUF")
  fixture.write_text("old\n")
  proc = _python(code, f"--gguf={gguf}", f"--out={fixture}")
  assert proc.returncode != 0
  assert _error_line(proc.stderr) == (
    "error: transformers' logits for prompt 'english' are not finite (1 of 15 NaN or inf, "
    f"first at position 1, token id 2); {fixture} not written"
  )
  assert fixture.read_text() == "old\n"


# ------------------------------------------------ end to end: a runner on NaN weights

POISONED_PERPLEXITY = """
import jax.numpy as jnp
from absl import app
import jaxllm.pipeline
from experiments import perplexity

real = jaxllm.pipeline.load_pipeline

def poisoned(*args, **kwargs):  # the tiny model, one NaN in its final norm's scale
  pipe = real(*args, **kwargs)
  scale = pipe.model.final_norm.scale
  scale.set_value(scale.get_value().at[0].set(jnp.nan))
  return pipe

jaxllm.pipeline.load_pipeline = poisoned
app.run(perplexity.main)
"""


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
  """`experiments.perplexity` on the tiny model with a NaN weight, its compilation
  cache in a fresh directory: (process, out_dir, cache_dir)."""
  tmp = tmp_path_factory.mktemp("nan_run")
  text, out, cache = tmp / "text.txt", tmp / "out", tmp / "xla"
  text.write_text("The quick brown fox jumps over the lazy dog, twice or 3 times. " * 10)
  proc = _python(
    POISONED_PERPLEXITY,
    "--model=tiny",
    f"--text_file={text}",
    "--context=16",
    "--max_windows=1",
    f"--out_dir={out}",
    env={"JAXLLM_COMPILATION_CACHE_DIR": str(cache)},
  )
  return proc, out, cache


def test_perplexity_on_nan_weights_exits_nonzero_without_null(nan_run):
  proc, out, _ = nan_run
  assert proc.returncode != 0, proc.stdout[-2000:]
  results = out / "perplexity.json"
  assert _error_line(proc.stderr) == (
    "error: non-finite figure(s) (NaN or inf): result.ppl, result.nll, summary.ppl, "
    f"summary.nll; results written to {results}"
  )
  assert "Traceback" not in proc.stderr
  data = json.loads(results.read_text())
  assert None not in data["result"].values() and None not in data["summary"].values()
  assert data["result"]["ppl"] == "nan" and data["result"]["nll"] == "nan"
  assert data["summary"]["ppl"] == "nan" and "result.ppl" in data["error"]
  assert data["result"]["tokens"] == 15 and data["result"]["windows"] == 1
  assert math.isfinite(data["timing_s"]["score"])


def test_runner_start_quiets_backend_probe_and_fills_the_cache(nan_run):
  proc, _, cache = nan_run
  assert "Unable to initialize backend" not in proc.stderr, proc.stderr[-2000:]
  files = [f for _, _, fs in os.walk(cache) for f in fs]
  assert files, f"no compiled programs cached in {cache}"


@pytest.mark.parametrize(
  "runner",
  [
    "perplexity",
    "kv_compression",
    "quantize",
    "parity",
    "bench_kernels",
    "bench_decode",
    "make_reference_logits",
    "device_check",
    "support_matrix",
    "sparse_attention",
    "speculative",
  ],
)
def test_every_runner_has_the_compilation_cache_flag_without_importing_jax(runner):
  code = f"""
import sys
from absl import flags
from experiments import {runner}
print("compilation_cache" in flags.FLAGS, "jax" in sys.modules)
"""
  proc = _python(code)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["True", "False"]
