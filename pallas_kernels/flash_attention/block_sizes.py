"""Tiling configuration of the flash attention kernels, and the defaults per kernel."""

from __future__ import annotations

import dataclasses

from pallas_kernels._util import next_pow2

# Bytes of one query block and of one key block the Triton kernel's defaults aim for,
# so that its shared memory stays under sm89's 99 KiB per block at every head_dim and
# dtype the model uses (Triton 3.8 for sm89: bf16 D=64 48 KiB, D=128 52 KiB; f32 D=64
# 56 KiB; checked by `make test-chips`). The GQA group (padded to a power of 2) is
# folded into the rows, so block_q is the rows over the padded group.
TRITON_Q_BYTES = 16 * 1024
TRITON_K_BYTES = 8 * 1024


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query and key slots per kernel step.

  Attributes:
    block_q: query slots per block (each brings its GQA group's heads as rows).
    block_k: key slots per block (one online-softmax step).
    pad: when a block does not divide the sequence (after trying halved blocks
      down to 64), pad the queries / keys to a multiple of it (padded queries see
      no key, padded keys are never visible). False: such a block is a ValueError
      naming the shape.
  Both must be positive multiples of 8; the Triton kernel also needs powers of 2.
  """

  block_q: int = 128
  block_k: int = 128
  pad: bool = True

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % 8:
        raise ValueError(f"BlockSizes: {name} must be a positive multiple of 8, got {value!r}")


def tpu_default() -> BlockSizes:
  """The Mosaic kernel's blocks: 128 query slots (x the group's heads) by 128 key slots."""
  return BlockSizes(128, 128)


def triton_default(group: int, head_dim: int, itemsize: int) -> BlockSizes:
  """The Triton kernel's blocks: a query block of `TRITON_Q_BYTES` (rows = queries x
  padded group; 128 rows for bf16 at head_dim 64) and a key block of `TRITON_K_BYTES`
  (64 keys for bf16 at head_dim 64), powers of 2, at least 8 query and 16 key slots."""
  row_bytes = head_dim * itemsize
  block_q = next_pow2(max(1, TRITON_Q_BYTES // row_bytes)) // next_pow2(group)
  block_k = next_pow2(max(1, TRITON_K_BYTES // row_bytes))
  return BlockSizes(max(8, block_q), max(16, block_k))
