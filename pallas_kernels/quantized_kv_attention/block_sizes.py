"""Tiling configuration for the quantized-KV decode kernels."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tokens per kernel step over the quantized cache.

  Attributes:
    block_t: tokens per KV block; a multiple of the key ``group_size`` and of
      128 (or the whole cache). The portable kernel always steps one key group.
  """

  block_t: int = 256

  def __post_init__(self):
    if self.block_t <= 0:
      raise ValueError(f"block_t must be positive, got {self.block_t}")
