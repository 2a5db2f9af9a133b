"""A one-block llama GGUF for loader tests: embed 8, 2 query and 2 key/value heads of
width 4, MLP 16, vocab 16."""

from __future__ import annotations

import numpy as np

META = {
  "llama.block_count": 1,
  "llama.context_length": 64,
  "llama.embedding_length": 8,
  "llama.feed_forward_length": 16,
  "llama.attention.head_count": 2,
  "llama.attention.head_count_kv": 2,
  "llama.rope.dimension_count": 4,
  "llama.vocab_size": 16,
}


def tensors(rows_q: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
  """Random float32 tensors of the block; `rows_q` rows for attn_q (8 is right)."""
  rng = np.random.default_rng(seed)
  shapes = {
    "token_embd.weight": (16, 8),
    "output_norm.weight": (8,),
    "blk.0.attn_norm.weight": (8,),
    "blk.0.attn_q.weight": (rows_q, 8),
    "blk.0.attn_k.weight": (8, 8),
    "blk.0.attn_v.weight": (8, 8),
    "blk.0.attn_output.weight": (8, 8),
    "blk.0.ffn_norm.weight": (8,),
    "blk.0.ffn_gate.weight": (16, 8),
    "blk.0.ffn_up.weight": (16, 8),
    "blk.0.ffn_down.weight": (8, 16),
  }
  return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
