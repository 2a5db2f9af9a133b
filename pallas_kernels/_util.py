"""Small integer helpers shared by the kernel packages (tile-size rules)."""

from __future__ import annotations


def is_pow2(n: int) -> bool:
  """Whether `n` is a positive power of two."""
  return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
  """The smallest power of two >= `n` (1 for n <= 1)."""
  return 1 << max(n - 1, 0).bit_length()
