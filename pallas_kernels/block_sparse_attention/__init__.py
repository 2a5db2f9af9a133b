"""MoBA block-sparse attention (Pallas): route each query tile to its top-k key blocks
and attend only those.

Public API:
  * ``pool_keys``: the mean key of each key block (optionally after a short depthwise
    causal key convolution), ``[B, Hkv, T // block_k, D]`` float32.
  * ``route``: the top-k key blocks of each (row, KV head, query tile), the tile's own
    blocks always among them, int32 ``[B, Hkv, nQ, top_k]`` (-1 padding last).
  * ``blocks_read``: how many blocks each tile selects.
  * ``block_sparse_attention_reference``: dense attention with the block mask.
  * ``BLOCK_SPARSE_ATTENTION``: the op (``reference``, ``xla``, ``mosaic_tpu``,
    ``triton``), registered in `pallas_kernels.registry`.
  * ``block_sparse_attention_xla``, ``block_sparse_attention_tpu``,
    ``block_sparse_attention_triton``: the implementations, callable directly.
"""

from .api import BLOCK_SPARSE_ATTENTION
from .reference import block_sparse_attention_reference
from .routing import blocks_read, pool_keys, route
from .tpu_kernel import block_sparse_attention_tpu
from .triton_kernel import block_sparse_attention_triton
from .xla import block_sparse_attention_xla

__all__ = [
  "BLOCK_SPARSE_ATTENTION",
  "block_sparse_attention_reference",
  "block_sparse_attention_tpu",
  "block_sparse_attention_triton",
  "block_sparse_attention_xla",
  "blocks_read",
  "pool_keys",
  "route",
]
