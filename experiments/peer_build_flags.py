"""Portable build flags for the llama.cpp peer (llama-cpp-python), from /proc/cpuinfo.

  python -m experiments.peer_build_flags             # prints CMAKE_ARGS
  python -m experiments.peer_build_flags --command   # prints the pip command (dry run)
  python -m experiments.peer_build_flags --install   # runs it (what `make peers` does)

llama.cpp's default, ``GGML_NATIVE=ON``, compiles for whatever the build
machine's compiler reports, and pip keeps the wheel it built in its cache; that
wheel then dies with ``Illegal instruction`` on a CPU without the same
instructions (e.g. AMX or AVX-512). `make peers` instead turns GGML_NATIVE off
and switches each instruction set on only when this CPU's ``flags`` line lists
everything that set needs, and builds from source without pip's cache.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys

from absl import app, flags

_CPUINFO = flags.DEFINE_string("cpuinfo", "/proc/cpuinfo", "CPU description to read flags from.")
_COMMAND = flags.DEFINE_bool(
  "command", False, "Print the whole pip command (a dry run of --install), not only CMAKE_ARGS."
)
_INSTALL = flags.DEFINE_bool(
  "install", False, "Build and install llama-cpp-python with these flags (takes minutes)."
)

PACKAGE = "llama-cpp-python"
# Same range as the `peers` extra in pyproject.toml.
REQUIREMENT = "llama-cpp-python>=0.3.36,<0.4"

# GGML CMake option -> the /proc/cpuinfo flags the compiler options behind it need
# (ggml/src/ggml-cpu/CMakeLists.txt: GGML_AVX512 adds -mavx512f, -mavx512cd,
# -mavx512vl, -mavx512dq and -mavx512bw). An option whose set builds on another
# (AVX2 on AVX, the AVX-512 extensions on AVX512) lists the base flags too.
X86_OPTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
  ("GGML_SSE42", ("sse4_2",)),
  ("GGML_AVX", ("avx",)),
  ("GGML_AVX2", ("avx", "avx2")),
  ("GGML_AVX_VNNI", ("avx", "avx2", "avx_vnni")),
  ("GGML_BMI2", ("bmi2",)),
  ("GGML_FMA", ("fma",)),
  ("GGML_F16C", ("f16c",)),
  ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
  ("GGML_AVX512_VBMI", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512vbmi")),
  ("GGML_AVX512_VNNI", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512_vnni")),
  ("GGML_AVX512_BF16", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512_bf16")),
  ("GGML_AMX_TILE", ("amx_tile",)),
  ("GGML_AMX_INT8", ("amx_tile", "amx_int8")),
  ("GGML_AMX_BF16", ("amx_tile", "amx_bf16")),
)
_X86_MACHINES = ("x86_64", "amd64", "i386", "i686")


def cpu_flags(cpuinfo_text: str) -> frozenset[str]:
  """The instruction-set flags of the first processor in a /proc/cpuinfo text."""
  for line in cpuinfo_text.splitlines():
    key, sep, value = line.partition(":")
    if sep and key.strip() in ("flags", "Features"):  # x86 / arm
      return frozenset(value.split())
  return frozenset()


def cmake_args(cpu: frozenset[str] | set[str], machine: str = "x86_64") -> list[str]:
  """CMake definitions for a portable llama.cpp CPU build on a CPU with flags `cpu`.

  Off x86 only GGML_NATIVE=OFF is set (llama.cpp then builds its baseline for
  the architecture)."""
  args = ["-DGGML_NATIVE=OFF"]
  if machine.lower() in _X86_MACHINES:
    for option, needs in X86_OPTIONS:
      args.append(f"-D{option}={'ON' if set(needs) <= set(cpu) else 'OFF'}")
  return args


def pip_command(python: str = sys.executable) -> list[str]:
  """Builds llama-cpp-python from source (never a wheel from pip's cache or
  PyPI), replacing any installed build; its dependencies come with the `peers`
  extra, so only this package is reinstalled."""
  return [
    python,
    "-m",
    "pip",
    "install",
    "--no-cache-dir",
    "--force-reinstall",
    "--no-deps",
    "--no-binary",
    PACKAGE,
    REQUIREMENT,
  ]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    with open(_CPUINFO.value, encoding="utf-8") as f:
      text = f.read()
  except OSError as e:
    print(f"error: cannot read {_CPUINFO.value}: {e.strerror}", file=sys.stderr)
    return 1
  args = " ".join(cmake_args(cpu_flags(text), platform.machine()))
  if _INSTALL.value:
    print(f"CMAKE_ARGS={shlex.quote(args)} {shlex.join(pip_command())}", flush=True)
    return subprocess.run(
      pip_command(), env=dict(os.environ, CMAKE_ARGS=args), check=False
    ).returncode
  if _COMMAND.value:
    print(f"CMAKE_ARGS={shlex.quote(args)} {shlex.join(pip_command())}")
  else:
    print(args)
  return 0


if __name__ == "__main__":
  app.run(main)
