"""Process set-up shared by the CLI and the runners: the persistent compilation
cache and a quiet backend probe.

JAX's persistent compilation cache keeps compiled executables on disk, so a
second run of the same command skips XLA compilation. `setup` turns it on in a
directory under the user's cache dir (``$XDG_CACHE_HOME/jaxllm/xla``, else
``~/.cache/jaxllm/xla``); ``JAXLLM_COMPILATION_CACHE_DIR`` overrides the
directory, and ``--nocompilation_cache`` turns the cache off.
"""

from __future__ import annotations

import logging
import os

from absl import flags

CACHE_DIR_ENV = "JAXLLM_COMPILATION_CACHE_DIR"
# jax logs each backend it fails to initialize at INFO ("Unable to initialize
# backend 'tpu' ... libtpu.so") on every machine without that chip; users read it
# as an error. Only this logger is quieted; its warnings still show.
_BACKEND_PROBE_LOGGER = "jax._src.xla_bridge"


def define_flags() -> None:
  """Defines ``--compilation_cache`` (kept if already defined)."""
  if "compilation_cache" not in flags.FLAGS:
    flags.DEFINE_bool(
      "compilation_cache",
      True,
      "Keep compiled XLA programs on disk (JAX's persistent compilation cache) so later "
      f"runs start faster; directory: ${CACHE_DIR_ENV}, else the user's cache dir "
      "(XDG_CACHE_HOME or ~/.cache)/jaxllm/xla.",
    )


def default_cache_dir() -> str:
  """Where compiled programs are kept: $JAXLLM_COMPILATION_CACHE_DIR, else the user cache."""
  if os.environ.get(CACHE_DIR_ENV):
    return os.path.abspath(os.environ[CACHE_DIR_ENV])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxllm", "xla")


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
