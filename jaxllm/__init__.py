"""jaxllm: fast, memory-lean LLM inference in JAX/XLA with Pallas kernels."""

from jaxllm import kv_cache, quant, streaming
from jaxllm.config import SMOLLM2_135M, TINY, ModelConfig, get_config
from jaxllm.decoding import GenerationResult, Generator
from jaxllm.gguf_loader import default_gguf_path, load_gguf
from jaxllm.kv_cache import KVCache
from jaxllm.model import Llama
from jaxllm.ops import KernelConfig
from jaxllm.pipeline import Pipeline, load_pipeline
from jaxllm.sampling import SamplingConfig

__version__ = "0.1.0"

__all__ = [
  "SMOLLM2_135M",
  "TINY",
  "GenerationResult",
  "Generator",
  "KVCache",
  "KernelConfig",
  "Llama",
  "ModelConfig",
  "Pipeline",
  "SamplingConfig",
  "default_gguf_path",
  "kv_cache",
  "quant",
  "streaming",
  "get_config",
  "load_gguf",
  "load_pipeline",
]
