"""Model configuration: one frozen dataclass, two named presets."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a Llama-family decoder.

  Attributes:
    name: preset name, used in results and checkpoints.
    vocab_size: number of token ids.
    num_layers: decoder blocks.
    embed_dim: residual stream width (d_model).
    num_heads: query heads.
    num_kv_heads: key/value heads (GQA when < num_heads, MQA when 1).
    head_dim: width of one attention head.
    mlp_dim: SwiGLU hidden width.
    rope_theta: RoPE base frequency.
    norm_eps: RMSNorm epsilon.
    tie_embeddings: the LM head reuses the token embedding.
    max_seq_len: longest context the model was trained for.
    bos_id, eos_id, pad_id: special token ids.
  """

  name: str
  vocab_size: int
  num_layers: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = True
  max_seq_len: int = 2048
  bos_id: int = 1
  eos_id: int = 2
  pad_id: int = 2

  def __post_init__(self):
    for field in (
      "vocab_size",
      "num_layers",
      "embed_dim",
      "num_heads",
      "num_kv_heads",
      "head_dim",
      "mlp_dim",
      "max_seq_len",
    ):
      value = getattr(self, field)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{field} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

  @property
  def queries_per_kv_head(self) -> int:
    """Query heads per key/value head (the grouped-query attention ratio)."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


SMOLLM2_135M = ModelConfig(
  name="smollm2-135m",
  vocab_size=49152,
  num_layers=30,
  embed_dim=576,
  num_heads=9,
  num_kv_heads=3,
  head_dim=64,
  mlp_dim=1536,
  rope_theta=100000.0,
  norm_eps=1e-5,
  tie_embeddings=True,
  max_seq_len=8192,
  bos_id=1,
  eos_id=2,
  pad_id=2,
)

# Random-init config with SmolLM2's head layout (GQA 3:1, head_dim 64) at toy size.
TINY = ModelConfig(
  name="tiny",
  vocab_size=512,
  num_layers=2,
  embed_dim=128,
  num_heads=6,
  num_kv_heads=2,
  head_dim=64,
  mlp_dim=256,
  rope_theta=10000.0,
  norm_eps=1e-5,
  tie_embeddings=True,
  max_seq_len=512,
)

PRESETS = {c.name: c for c in (SMOLLM2_135M, TINY)}


def get_config(name: str) -> ModelConfig:
  """Returns the preset called `name`."""
  if name not in PRESETS:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name]
