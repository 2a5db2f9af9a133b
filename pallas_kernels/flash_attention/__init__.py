"""Causal grouped-query flash attention forward (Pallas): the ``attention`` op's kernels.

Public API:
  * ``flash_attention_tpu``: Mosaic TPU kernel (grid (B, Hkv, q blocks, k blocks),
    online softmax in VMEM scratch, causal block skipping, scalar-prefetched bounds).
  * ``flash_attention_triton``: portable kernel (grid (B, Hkv, q blocks), ``fori_loop``
    over key blocks up to the diagonal, GQA group padded to a power of 2).
  * ``BlockSizes`` (and the per-kernel defaults ``tpu_default``, ``triton_default``).
Both take ``return_lse=True`` to also return the logsumexp ``[B, Hq, S]`` (float32).
The op's table (`pallas_kernels.attention.api`) registers them as ``mosaic_tpu`` and
``triton``.
"""

from .block_sizes import BlockSizes, tpu_default, triton_default
from .common import HEAD_DIMS, MASKED
from .tpu_kernel import flash_attention_tpu
from .triton_kernel import flash_attention_triton

__all__ = [
  "HEAD_DIMS",
  "MASKED",
  "BlockSizes",
  "flash_attention_tpu",
  "flash_attention_triton",
  "tpu_default",
  "triton_default",
]
