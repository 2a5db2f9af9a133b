"""Process set-up shared by the CLI and the runners: the persistent compilation
cache and a quiet backend probe.

JAX's persistent compilation cache keeps compiled executables on disk, so a
second run of the same command skips XLA compilation. `setup` turns it on in a
directory under the user's cache dir (``$XDG_CACHE_HOME/jaxllm/xla``, else
``~/.cache/jaxllm/xla``); ``JAXLLM_COMPILATION_CACHE_DIR`` overrides the
directory, and ``--nocompilation_cache`` turns the cache off. The weight cache
(`jaxllm.weight_cache`, ``--weight_cache``) lives beside it, in ``.../jaxllm/weights``.
"""

from __future__ import annotations

import logging
import os

from absl import flags

CACHE_DIR_ENV = "JAXLLM_COMPILATION_CACHE_DIR"
WEIGHT_CACHE_DIR_ENV = "JAXLLM_WEIGHT_CACHE_DIR"
# jax logs each backend it fails to initialize at INFO ("Unable to initialize
# backend 'tpu' ... libtpu.so") on every machine without that chip; users read it
# as an error. Only this logger is quieted; its warnings still show.
_BACKEND_PROBE_LOGGER = "jax._src.xla_bridge"


def define_flags(weight_cache: bool = False) -> None:
  """Defines ``--compilation_cache``, and with `weight_cache` ``--weight_cache``
  (each kept if already defined). Only a command that passes
  `weight_cache_dir()` to `load_pipeline` should define the second."""
  if "compilation_cache" not in flags.FLAGS:
    flags.DEFINE_bool(
      "compilation_cache",
      True,
      "Keep compiled XLA programs on disk (JAX's persistent compilation cache) so later "
      f"runs start faster; directory: ${CACHE_DIR_ENV}, else the user's cache dir "
      "(XDG_CACHE_HOME or ~/.cache)/jaxllm/xla.",
    )
  if weight_cache and "weight_cache" not in flags.FLAGS:
    flags.DEFINE_bool(
      "weight_cache",
      True,
      "Keep the GGUF's dequantized float32 weights, config and tokenizer on disk "
      "(jaxllm.weight_cache; 4 bytes per weight) so later runs skip the dequantization; "
      f"directory: ${WEIGHT_CACHE_DIR_ENV}, else the user's cache dir "
      "(XDG_CACHE_HOME or ~/.cache)/jaxllm/weights.",
    )


def user_cache_root() -> str:
  """``$XDG_CACHE_HOME/jaxllm``, else ``~/.cache/jaxllm``."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxllm")


def default_cache_dir() -> str:
  """Where compiled programs are kept: $JAXLLM_COMPILATION_CACHE_DIR, else the user cache."""
  if os.environ.get(CACHE_DIR_ENV):
    return os.path.abspath(os.environ[CACHE_DIR_ENV])
  return os.path.join(user_cache_root(), "xla")


def default_weight_cache_dir() -> str:
  """Where `jaxllm.weight_cache` keeps dequantized weights: $JAXLLM_WEIGHT_CACHE_DIR,
  else ``weights`` beside the compilation cache in the user cache."""
  if os.environ.get(WEIGHT_CACHE_DIR_ENV):
    return os.path.abspath(os.environ[WEIGHT_CACHE_DIR_ENV])
  return os.path.join(user_cache_root(), "weights")


def weight_cache_dir(enabled: bool | None = None) -> str | None:
  """`default_weight_cache_dir()` for `load_pipeline(weight_cache_dir=...)`, or
  None when off; `enabled` None reads the ``--weight_cache`` flag."""
  if enabled is None:
    enabled = flags.FLAGS["weight_cache"].value
  return default_weight_cache_dir() if enabled else None


def quiet_backend_probe() -> None:
  """Hides jax's INFO line about backends (TPU, GPU) this machine does not have."""
  logging.getLogger(_BACKEND_PROBE_LOGGER).setLevel(logging.WARNING)


def enable_compilation_cache(directory: str | None = None) -> str:
  """Turns on JAX's persistent compilation cache in `directory` (default:
  `default_cache_dir()`); returns the directory. Every program is cached, however
  fast it compiled, so a second process skips all of its compiles."""
  import jax  # pylint: disable=import-outside-toplevel

  directory = os.path.abspath(directory or default_cache_dir())
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise ValueError(f"compilation cache directory {directory} cannot be created: {e}") from e
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory


def setup(compilation_cache: bool | None = None) -> str | None:
  """Start-up for a command-line run: quiet backend probe, and the persistent
  compilation cache unless turned off. `compilation_cache` None reads the
  ``--compilation_cache`` flag. Returns the cache directory, or None when off."""
  quiet_backend_probe()
  if compilation_cache is None:
    compilation_cache = flags.FLAGS["compilation_cache"].value
  return enable_compilation_cache() if compilation_cache else None


def define_kernel_flags() -> None:
  """Defines ``--kernels`` and ``--interpret`` (each kept if already defined): which
  implementation each op runs (`jaxllm.ops.KernelConfig.parse`)."""
  if "kernels" not in flags.FLAGS:
    flags.DEFINE_string(
      "kernels",
      "",
      "Op implementations: empty for each backend's default (XLA on CPU, Pallas kernels on "
      "TPU/GPU), 'pallas' for every op's Pallas kernel where it has one, 'xla', 'reference', "
      "and/or op=implementation pairs, e.g. 'pallas,w8a8_matmul=xla' or "
      "'quantized_kv_attention=triton' (ops and implementations: pallas_kernels.registry).",
    )
  if "interpret" not in flags.FLAGS:
    flags.DEFINE_bool("interpret", False, "Run Pallas kernels in interpret mode (CPU).")


def kernel_config():
  """The `KernelConfig` of ``--kernels`` and ``--interpret``; a ValueError naming the
  flag for an unknown op or implementation."""
  from jaxllm import ops  # pylint: disable=import-outside-toplevel

  text = flags.FLAGS["kernels"].value
  try:
    return ops.KernelConfig.parse(text, interpret=flags.FLAGS["interpret"].value)
  except ValueError as e:
    raise ValueError(f"--kernels={text}: {e}") from None
