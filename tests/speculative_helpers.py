"""Shared pieces of the speculative-decoding tests: a tiny model whose layers steer the
output (embeddings scaled down), prompts of three lengths, and the target's own greedy
tokens for them."""

from __future__ import annotations

import numpy as np
from flax import nnx

from jaxllm.decoding import Generator
from jaxllm.params import model_from_params

PROMPT_LENGTHS = (5, 17, 9)  # batch 3: three different lengths (left padding differs)


def steered(model, vocab_size: int | None = None, max_seq_len: int = 128):
  """`model`'s weights with embeddings scaled by 0.05 (so the layers, not the embedding,
  decide the next token and drafts are accepted in part), cut to `vocab_size` tokens."""
  vocab_size = vocab_size or model.config.vocab_size
  params = nnx.split(model)[1].to_pure_dict()
  params["embed"] = params["embed"][:, :vocab_size] * 0.05
  cfg = model.config.replace(vocab_size=vocab_size, max_seq_len=max_seq_len)
  return model_from_params(cfg, params)


def random_prompts(lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(3, 512, n).tolist() for n in lengths]


def greedy_tokens(model, prompts, new_tokens: int, max_cache_len: int, bucket: int, **kw):
  """The target's own greedy tokens (`Generator`), EOS not stopping."""
  gen = Generator(model, max_cache_len=max_cache_len, prompt_bucket=bucket, **kw)
  return gen.generate(prompts, new_tokens, stop_at_eos=False).tokens
