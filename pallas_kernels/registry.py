"""Every op's implementation table, by op name."""

from __future__ import annotations

from pallas_kernels.attention.api import ATTENTION
from pallas_kernels.block_sparse_attention.api import BLOCK_SPARSE_ATTENTION
from pallas_kernels.linear.api import LINEAR
from pallas_kernels.op_api import Op, OpError
from pallas_kernels.quantized_kv_attention.api import QUANTIZED_KV_ATTENTION
from pallas_kernels.quantized_matmul.api import W4A8_FIREQ_MATMUL, W4A16_MATMUL, W8A8_MATMUL

OPS: dict[str, Op] = {
  op.name: op
  for op in (
    LINEAR,
    ATTENTION,
    W8A8_MATMUL,
    W4A16_MATMUL,
    W4A8_FIREQ_MATMUL,
    QUANTIZED_KV_ATTENTION,
    BLOCK_SPARSE_ATTENTION,
  )
}


def get(name: str) -> Op:
  """The op called `name`; OpError naming the known ops otherwise."""
  if name not in OPS:
    raise OpError(f"no op named {name!r}; ops: {sorted(OPS)}")
  return OPS[name]
