"""jaxllm: fast, memory-lean LLM inference in JAX/XLA with Pallas kernels.

The names below load on first use (PEP 562), so ``import jaxllm.runtime`` or a
runner's flag parsing does not pay for importing jax.
"""

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
  "SMOLLM2_135M": "jaxllm.config",
  "TINY": "jaxllm.config",
  "ModelConfig": "jaxllm.config",
  "get_config": "jaxllm.config",
  "GenerationResult": "jaxllm.decoding",
  "Generator": "jaxllm.decoding",
  "default_gguf_path": "jaxllm.gguf_loader",
  "load_gguf": "jaxllm.gguf_loader",
  "DenseKVCache": "jaxllm.kv_cache",
  "KVCache": "jaxllm.kv_cache",  # deprecated alias of DenseKVCache
  "Llama": "jaxllm.model",
  "KernelConfig": "jaxllm.ops",
  "Pipeline": "jaxllm.pipeline",
  "load_pipeline": "jaxllm.pipeline",
  "SamplingConfig": "jaxllm.sampling",
  "SpeculativeConfig": "jaxllm.speculative",
  "SpeculativeGenerator": "jaxllm.speculative",
}
_SUBMODULES = ("drafts", "kv_cache", "quant", "streaming")

__all__ = sorted((*_EXPORTS, *_SUBMODULES))


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  if name in _SUBMODULES:
    return importlib.import_module(f"jaxllm.{name}")
  raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")


def __dir__():
  return sorted((*globals(), *__all__))
