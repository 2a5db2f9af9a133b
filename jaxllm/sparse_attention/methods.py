"""Sparse attention methods as data: what a cache's `attend` computes instead of dense attention.

A method is a frozen dataclass a cache carries (`cache.with_attention(method)`); `None`
is dense attention. Each method checks its own parameters here, and its fit to the
attention call (head dim, key slots) in `check_call`, before any work.
"""

from __future__ import annotations

import dataclasses

SPARQ_CORRECTIONS = ("mean_v", "rescale", "none")


def _positive_int(owner: str, name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{owner}: {name} must be an int >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MoBA:
  """Mixture of block attention: each query tile attends to `top_k` key blocks.

  Keys are mean-pooled per `block_size` slots (optionally after a short causal
  depthwise convolution, `key_conv` [W, D]); each tile of `query_tile` queries and each
  KV head (its query heads' scores summed) keeps the key blocks holding its own
  slots, causally, plus the best-scoring earlier blocks, `top_k` in all
  (`pallas_kernels.block_sparse_attention.route`). Over a KIVI cache the block means of
  quantized keys come from the group statistics (zero + scale * mean code).

  Attributes:
    block_size: key slots per block.
    top_k: blocks per query tile, its own included (>= 1).
    query_tile: queries routed together; None: `block_size`. A decode step (one
      query) is its own tile.
    key_conv: optional depthwise causal filter [W, D] applied to keys before pooling
      (tap 0 the current token), as a tuple of W tuples of D floats (hashable).
    sink_blocks: how many of each row's first blocks every tile keeps, counted in
      top_k (0: MoBA as published; a model not trained with MoBA leans on its first
      tokens, the attention sink).
  """

  block_size: int = 64
  top_k: int = 8
  query_tile: int | None = None
  key_conv: tuple[tuple[float, ...], ...] | None = None
  sink_blocks: int = 0

  def __post_init__(self):
    _positive_int("MoBA", "block_size", self.block_size)
    _positive_int("MoBA", "top_k", self.top_k)
    if self.query_tile is not None:
      _positive_int("MoBA", "query_tile", self.query_tile)
    if isinstance(self.sink_blocks, bool) or not isinstance(self.sink_blocks, int):
      raise ValueError(f"MoBA: sink_blocks must be an int >= 0, got {self.sink_blocks!r}")
    if not 0 <= self.sink_blocks < self.top_k:
      raise ValueError(
        f"MoBA: sink_blocks {self.sink_blocks} must be >= 0 and below top_k {self.top_k} "
        "(a tile's own block is always one of its top_k)"
      )
    if self.key_conv is not None:
      widths = {len(row) for row in self.key_conv}
      if not self.key_conv or len(widths) != 1:
        raise ValueError("MoBA: key_conv must be W >= 1 rows of D floats each")

  @property
  def tile(self) -> int:
    return self.block_size if self.query_tile is None else self.query_tile

  @property
  def name(self) -> str:
    sink = f" s{self.sink_blocks}" if self.sink_blocks else ""
    return f"moba b{self.block_size} k{self.top_k}{sink}"

  def check_call(self, head_dim: int, num_slots: int) -> None:
    """Raises ValueError if this method cannot attend over `num_slots` key slots."""
    blocks = -(-num_slots // self.block_size)
    if self.top_k > blocks:
      raise ValueError(
        f"MoBA: top_k {self.top_k} is larger than the number of key blocks {blocks} "
        f"({num_slots} slots / block_size {self.block_size})"
      )
    if self.key_conv is not None and len(self.key_conv[0]) != head_dim:
      raise ValueError(
        f"MoBA: key_conv has {len(self.key_conv[0])} channels, the head dim is {head_dim}"
      )


@dataclasses.dataclass(frozen=True)
class SparQ:
  """SparQ decode attention: each query reads `r` key channels of every slot, then the
  `k` best slots in full.

  Step 1 picks the `r` channels of largest |q| (summed over a KV head's query
  heads, so the group reads one set of channels) and scores every visible slot
  with them (temperature sqrt(D * |q_r|_1 / |q|_1), as the paper). Step 2 takes
  the `k` slots of largest approximate probability (summed over the group) and
  attends to them exactly. `correction` says what stands in for the slots skipped:

    * ``mean_v`` (SparQ): out = a * sparse + (1 - a) * mean(V), a the approximate
      probability mass of the chosen slots;
    * ``rescale`` (Re-ttention style): the sparse softmax is renormalized to the whole
      row's mass, the skipped slots' share estimated from the step-1 approximate scores
      (no dense pass, no state from earlier steps): out = a * sparse, the skipped mass
      contributing nothing;
    * ``none``: softmax over the chosen slots only.

  With ``per_head``, each query head picks its own channels and slots instead (better
  scores, but a KV head's G query heads then read up to G times the bytes: the
  accounting counts G reads, capped at dense).

  Attributes:
    r: key channels read per slot in step 1 (1 <= r <= head_dim).
    k: slots read in full (>= 1; a query that sees k slots or fewer attends densely).
    correction: one of `SPARQ_CORRECTIONS`.
    per_head: channels and slots chosen per query head, not per KV head.
  """

  r: int = 16
  k: int = 64
  correction: str = "mean_v"
  per_head: bool = False

  def __post_init__(self):
    _positive_int("SparQ", "r", self.r)
    _positive_int("SparQ", "k", self.k)
    if self.correction not in SPARQ_CORRECTIONS:
      raise ValueError(f"SparQ: correction {self.correction!r}; choose one of {SPARQ_CORRECTIONS}")

  @property
  def name(self) -> str:
    heads = " per-head" if self.per_head else ""
    return f"sparq r{self.r} k{self.k} {self.correction}{heads}"

  def check_call(self, head_dim: int, num_slots: int) -> None:
    """Raises ValueError if r exceeds the head dim or k the key slots of the call."""
    if self.r > head_dim:
      raise ValueError(f"SparQ: r {self.r} is larger than the head dimension {head_dim}")
    if self.k > num_slots:
      raise ValueError(
        f"SparQ: k {self.k} is larger than the visible tokens: the call has {num_slots} key slots"
      )


AttentionMethod = MoBA | SparQ
