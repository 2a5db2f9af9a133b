"""L2 compile checks (no accelerator needed): real Mosaic TPU and Triton->cubin builds.

Run in an environment that also has ``libtpu`` (TPU) and/or the upstream
``triton`` wheel (GPU)::

  TPU_SKIP_MDS_QUERY=1 python -m pallas_kernels.quantized_kv_attention.compile_check

Each case prints one line; the last stdout line is a JSON summary. Exit code 1
if any case fails.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
from jax import export

from pallas_kernels import shapes

from .block_sizes import BlockSizes
from .packing import QuantizedKV
from .portable_kernel import quantized_kv_decode_attention_portable
from .tpu_kernel import quantized_kv_decode_attention

# (num_heads, num_kv_heads, head_dim) of the models checked, by their registry names.
HEADS = {name: shapes.get(name).kv_heads for name in ("smollm2", "llama3_8b")}
TPU_TOPOLOGIES = (
  ("v4:1x1x1", "megacore"),
  ("v5e:1x1", None),
  ("v6e:1x1", None),
  ("tpu7x:1x1x1", None),
)
TRITON_CCS = (80, 89, 90)
_TRITON_CALL = "__gpu$xla.gpu.triton"


def abstract_inputs(b, heads, t, r, bits, group_size, dtype=jnp.bfloat16, sharding=None):
  """ShapeDtypeStructs for ``(q, kv, start, quantized_length, length, k_res, v_res)``."""
  hq, hkv, d = heads
  pf = 8 // bits

  def sds(shape, dt):
    return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

  kv = QuantizedKV(
    sds((b, hkv, t // pf, d), jnp.uint8),
    sds((b, hkv, t // group_size, d), jnp.float32),
    sds((b, hkv, t // group_size, d), jnp.float32),
    sds((b, hkv, t, d // pf), jnp.uint8),
    sds((b, hkv, t), jnp.float32),
    sds((b, hkv, t), jnp.float32),
  )
  rows = sds((b,), jnp.int32)
  return [
    sds((b, hq, d), dtype),
    kv,
    rows,
    rows,
    rows,
    sds((b, hkv, r, d), dtype),
    sds((b, hkv, r, d), dtype),
  ]


def tpu_checks(t=4096, r=128, group_size=128, block_t=512):
  """Compiles the TPU kernel for each topology x model x bits; yields (name, ok, detail)."""
  from jax.experimental import topologies

  for topo_name, chip_config in TPU_TOPOLOGIES:
    kw = {"chips_per_host_bounds": (1, 1, 1)}
    if chip_config:
      kw["chip_config_name"] = chip_config
    topo = topologies.get_topology_desc(platform="tpu", topology_name=topo_name, **kw)
    sharding = jax.sharding.SingleDeviceSharding(topo.devices[0])
    for model, heads in HEADS.items():
      for bits in (2, 4, 8):
        f = functools.partial(
          quantized_kv_decode_attention,
          bits=bits,
          group_size=group_size,
          block_sizes=BlockSizes(block_t),
        )
        args = abstract_inputs(2, heads, t, r, bits, group_size, sharding=sharding)
        name = f"tpu {topo_name} {model} {bits}-bit"
        try:
          jax.jit(f).trace(*args).lower().compile()
          yield name, True, ""
        except Exception as e:
          yield name, False, f"{type(e).__name__}: {str(e)[:300]}"


def triton_ttir(heads, bits, group_size, t=1024, r=64) -> str:
  """The TTIR Pallas emits for the portable kernel (hooked at lowering)."""
  from jax._src.pallas.triton import lowering as triton_lowering
  from jax.experimental.pallas import triton as pltr

  captured = []
  orig = triton_lowering.lower_jaxpr_to_triton_module

  def hook(*a, **k):
    res = orig(*a, **k)
    captured.append(res.module.operation.get_asm(enable_debug_info=False))
    return res

  f = functools.partial(
    quantized_kv_decode_attention_portable,
    bits=bits,
    group_size=group_size,
    compiler_params=pltr.CompilerParams(num_warps=4, num_stages=2),
  )
  triton_lowering.lower_jaxpr_to_triton_module = hook
  try:
    export.export(
      jax.jit(f),
      platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(_TRITON_CALL)],
    )(*abstract_inputs(2, heads, t, r, bits, group_size))
  finally:
    triton_lowering.lower_jaxpr_to_triton_module = orig
  return captured[-1]


def triton_checks():
  """Compiles the portable kernel's TTIR to cubin for sm80/89/90; yields (name, ok, detail)."""
  import triton
  from triton.backends.compiler import GPUTarget

  with tempfile.TemporaryDirectory() as tmp:
    for model, heads in HEADS.items():
      for bits, group_size in ((2, 128), (4, 64), (8, 32)):
        path = os.path.join(tmp, f"{model}_{bits}.ttir")
        with open(path, "w") as fh:
          fh.write(triton_ttir(heads, bits, group_size))
        for cc in TRITON_CCS:
          name = f"triton sm{cc} {model} {bits}-bit g{group_size}"
          try:
            kern = triton.compile(path, target=GPUTarget("cuda", cc, 32), options={"num_warps": 4})
            yield name, True, f"smem={kern.metadata.shared}"
          except Exception as e:
            yield name, False, f"{type(e).__name__}: {str(e)[:300]}"


def main(argv=None) -> int:
  """CLI entry point; returns the exit code."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tpu", action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument("--triton", action=argparse.BooleanOptionalAction, default=True)
  args = parser.parse_args(argv)
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  results = []
  checks = []
  if args.tpu:
    checks.append(tpu_checks)
  if args.triton:
    checks.append(triton_checks)
  for check in checks:
    try:
      for name, ok, detail in check():
        print(f"{'OK  ' if ok else 'FAIL'} {name} {detail}", flush=True)
        results.append((name, ok))
    except ImportError as e:
      print(f"SKIP {check.__name__}: {e}", flush=True)
  failed = [n for n, ok in results if not ok]
  print(json.dumps({"cases": len(results), "failed": failed}))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
