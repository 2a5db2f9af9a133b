"""experiments.bench_decode: the prefill sweep, cold/warm first calls, a crashing
peer; and the portable llama.cpp build flags of `make peers`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# /proc/cpuinfo flag sets of real CPUs (trimmed to the instruction-set flags).
HASWELL = {"fpu", "sse", "sse2", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}
ZEN4 = HASWELL | {
  "avx512f",
  "avx512dq",
  "avx512cd",
  "avx512bw",
  "avx512vl",
  "avx512vbmi",
  "avx512_vnni",
  "avx512_bf16",
}
SAPPHIRE_RAPIDS = ZEN4 | {"avx_vnni", "amx_tile", "amx_int8", "amx_bf16"}


# experiments.peers.CRASH_ENV: a peer named here kills its own process with SIGILL.
CRASH_ENV = "JAXLLM_TEST_CRASH_PEER"


def _on(args: list[str]) -> set[str]:
  assert args[0] == "-DGGML_NATIVE=OFF"
  values = dict(a.removeprefix("-D").split("=") for a in args[1:])
  assert set(values.values()) <= {"ON", "OFF"}
  return {k for k, v in values.items() if v == "ON"}


def test_peer_build_flags_follow_the_cpu():
  from experiments import peer_build_flags

  base = {"GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2"}
  avx512 = {"GGML_AVX512", "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16"}
  amx = {"GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"}
  assert _on(peer_build_flags.cmake_args(HASWELL)) == base
  assert _on(peer_build_flags.cmake_args(ZEN4)) == base | avx512
  assert _on(peer_build_flags.cmake_args(SAPPHIRE_RAPIDS)) == base | avx512 | amx | {
    "GGML_AVX_VNNI"
  }
  # AVX-512 needs all five of F, CD, VL, DQ and BW; its extensions need it too.
  partial = (ZEN4 - {"avx512bw"}) | {"avx512vbmi"}
  assert _on(peer_build_flags.cmake_args(partial)) == base
  # AVX2 needs AVX; AMX-INT8 needs AMX tiles.
  assert _on(peer_build_flags.cmake_args({"avx2", "amx_int8"})) == set()
  # Every x86 option is spelled out, ON or OFF: nothing left to GGML_NATIVE.
  assert len(peer_build_flags.cmake_args(set())) == 1 + len(peer_build_flags.X86_OPTIONS)
  assert peer_build_flags.cmake_args(ZEN4, machine="aarch64") == ["-DGGML_NATIVE=OFF"]


def test_peer_build_flags_read_cpuinfo_and_build_from_source():
  from experiments import peer_build_flags

  text = "processor\t: 0\nflags\t\t: fpu avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse\n"
  assert peer_build_flags.cpu_flags(text) == {"fpu", "avx", "avx2", "fma"}
  assert peer_build_flags.cpu_flags("Features\t: fp asimd\n") == {"fp", "asimd"}
  cmd = peer_build_flags.pip_command("python")
  assert {"--no-cache-dir", "--force-reinstall", "--no-deps"} <= set(cmd)
  assert cmd[cmd.index("--no-binary") + 1] == "llama-cpp-python"
  # the same range as the `peers` extra
  assert f'"{peer_build_flags.REQUIREMENT}",' in (ROOT / "pyproject.toml").read_text()
  # and `make peers` builds it so before installing the extra
  recipe = (ROOT / "Makefile").read_text().split("\npeers:", 1)[1].split("\n\n", 1)[0]
  steps = [line.strip() for line in recipe.splitlines()[1:]]
  assert steps[0] == "$(BIN)/python -m experiments.peer_build_flags --install", steps
  assert "[dev,peers]" in steps[1], steps


def test_bench_decode_sweep_first_calls_and_a_crashing_peer(tmp_path):
  """A peer killed by SIGILL is recorded with its exit code; every jaxllm figure,
  the prefill sweep and the cold/warm first calls are still written."""
  env = dict(
    os.environ,
    JAXLLM_COMPILATION_CACHE_DIR=str(tmp_path / "xla"),
    **{CRASH_ENV: "llamacpp"},
  )
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.bench_decode",
      "--model=tiny",
      "--new_tokens=8",
      "--decode_prompt_len=8",
      "--prompt_len=64",
      "--prompt_lens=64,200",
      "--bandwidth_mib=16",
      f"--out_dir={tmp_path}",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  record = json.loads((tmp_path / "bench_decode.json").read_text())
  assert record["summary"]["peers"] == summary["peers"]

  crashed = summary["peers"]["llamacpp"]
  assert crashed["status"] == "failed" and crashed["exit_code"] == -signal.SIGILL
  assert "SIGILL" in crashed["error"]
  assert summary["llamacpp_prefill_tok_s"] is None and summary["x_vs_llamacpp_prefill"] is None
  assert summary["peers"]["hf"]["status"] == "skipped: --model=tiny"
  assert "failed: exit -4 (SIGILL)" in proc.stdout  # the table says so too
  assert not list(ROOT.glob("core*"))

  for key in (
    "jaxllm_prefill_tok_s",
    "jaxllm_prefill_bf16_tok_s",
    "jaxllm_decode_bs1_tok_s",
    "jaxllm_decode_bs1_bf16_tok_s",
    "jaxllm_decode_bs16_tok_s",
    "read_bandwidth_GBps",
    "decode_bs1_vs_bw_limit",
  ):
    assert summary[key] > 0, key

  sweep = summary["prefill_sweep"]
  assert [p["prompt_len"] for p in sweep] == [64, 200]
  assert [p["padded_len"] for p in sweep] == [64, 256]
  for p in sweep:
    assert 0 < p["run_min_s"] <= p["run_s"] <= p["run_max_s"]
    assert p["tok_s"] == pytest.approx(p["prompt_len"] / p["run_s"])
    assert 0 < p["lower_s"] < p["compile_s"] < p["first_token_s"]
    # a real compile (the 64-token prefill was compiled before, for --prompt_len)
    assert p["compile_s"] - p["lower_s"] > 0.05

  # Two fresh processes sharing one new cache directory: the first filled it.
  assert summary["first_call_cache_files"] > 0
  for key in (
    "first_call_s",
    "first_call_in_process_s",
    "first_call_warm_s",
    "first_call_warm_in_process_s",
  ):
    assert summary[key] > 0, key
  assert summary["first_call_in_process_s"] < summary["first_call_s"]
