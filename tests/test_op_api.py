"""Implementation tables: selection, refusals with reasons, per-op settings, no fallback."""

from __future__ import annotations

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import ops
from pallas_kernels import registry
from pallas_kernels.op_api import Implementation, Op, OpError, Platform, UnsupportedError
from pallas_kernels.quantized_kv_attention import quantize_kv

CPU = Platform("cpu", "cpu")
TPU = Platform("tpu", "TPU v5 lite")
GPU = Platform("gpu", "NVIDIA H100")


def _toy_op(calls):
  def impl(name):
    def fn(x, interpret=None, platform=None):
      calls.append((name, interpret) if platform is None else (name, interpret, platform.backend))
      return x

    return fn

  def even_only(platform, x):
    return None if x.shape[0] % 2 == 0 else f"needs an even row count, got {x.shape[0]}"

  return Op(
    "toy",
    (
      Implementation("reference", "reference", impl("reference")),
      Implementation("xla", "xla", impl("xla")),
      Implementation("mosaic_tpu", "pallas", impl("mosaic_tpu"), "tpu", even_only),
      Implementation("triton", "pallas", impl("triton"), "gpu"),
    ),
  )


def test_default_takes_the_best_supported_implementation_per_backend():
  op = _toy_op([])
  even, odd = jnp.zeros((2,)), jnp.zeros((3,))
  assert op.select(None, CPU, even).name == "xla"
  assert op.select(None, Platform("cpu", "cpu", interpret=True), even).name == "xla"
  assert op.select(None, TPU, even).name == "mosaic_tpu"
  assert op.select(None, TPU, odd).name == "xla"  # by design: the kernel refuses odd rows
  assert op.select(None, GPU, odd).name == "triton"


def test_pallas_request_means_this_backends_kernel():
  op = _toy_op([])
  x = jnp.zeros((2,))
  assert op.select("pallas", TPU, x).name == "mosaic_tpu"
  assert op.select("pallas", GPU, x).name == "triton"
  assert op.select("pallas", Platform("cpu", "cpu", interpret=True), x).name == "mosaic_tpu"
  with pytest.raises(UnsupportedError, match="no Pallas implementation for cpu"):
    op.select("pallas", CPU, x)


def test_an_explicit_choice_that_cannot_run_raises_and_never_falls_back():
  calls = []
  op = _toy_op(calls)
  with pytest.raises(
    UnsupportedError,
    match=r"op 'toy': implementation 'mosaic_tpu' cannot run on TPU v5 lite: needs an even",
  ):
    op.select("mosaic_tpu", TPU, jnp.zeros((3,)))
  with pytest.raises(UnsupportedError, match="compiles for gpu only.*interpret=True"):
    op.select("triton", CPU, jnp.zeros((2,)))
  with pytest.raises(UnsupportedError, match="cannot run on TPU v5 lite"):
    op(jnp.zeros((3,)), implementation="pallas", platform=TPU)
  assert calls == []  # nothing ran in place of the refused choice


def test_interpret_is_passed_to_pallas_implementations_only():
  calls = []
  op = _toy_op(calls)
  x = jnp.zeros((2,))
  op(x, implementation="triton", interpret=True, platform=CPU)
  op(x, implementation="xla", interpret=True, platform=CPU)
  assert calls == [("triton", True, "cpu"), ("xla", None)]


def _variant_op(calls):
  def fn(x, interpret=None, platform=None, variant=None):
    calls.append(variant)
    return x

  def no_wide_on_tpu_v4(platform, x, variant):
    return "tpu v4 has no wide dots" if variant == "wide" and platform.device_kind == "v4" else None

  def pick(platform):
    return "narrow" if platform.device_kind == "v4" else "wide"

  kernel = Implementation(
    "mosaic_tpu", "pallas", fn, "tpu", no_wide_on_tpu_v4, ("wide", "narrow"), pick
  )
  return Op("toy", (Implementation("xla", "xla", lambda x: x), kernel))


def test_variants_are_picked_by_chip_and_refused_by_name():
  calls = []
  op = _variant_op(calls)
  x = jnp.zeros((2,))
  v4, v5 = Platform("tpu", "v4"), Platform("tpu", "v5")
  op(x, platform=v4)
  op(x, platform=v5)
  op(x, implementation="pallas", platform=v5, variant="narrow")
  assert calls == ["narrow", "wide", "narrow"]
  with pytest.raises(UnsupportedError, match=r"'mosaic_tpu' \(variant 'wide'\) cannot run on v4: "):
    op(x, implementation="mosaic_tpu", platform=v4, variant="wide")
  with pytest.raises(OpError, match="has no variant 'huge'; it has \\['wide', 'narrow'\\]"):
    op(x, implementation="mosaic_tpu", platform=v5, variant="huge")
  with pytest.raises(OpError, match="variant='wide' needs an explicit implementation"):
    op(x, platform=v5, variant="wide")
  with pytest.raises(OpError, match="implementation 'xla' has no variants"):
    op(x, implementation="xla", platform=v5, variant="wide")


def test_unknown_names_are_one_line_errors():
  with pytest.raises(OpError, match=r"no op named 'conv'; ops: \["):
    registry.get("conv")
  with pytest.raises(OpError, match="op 'attention' has no implementation 'flash'"):
    ops.KernelConfig(overrides=(("attention", "flash"),))
  with pytest.raises(OpError, match="no op named 'conv'"):
    ops.KernelConfig.parse("conv=xla")
  with pytest.raises(OpError, match="kernel setting 'triton'"):
    ops.KernelConfig("triton")
  with pytest.raises(OpError, match="op 'linear' has no Pallas implementation"):
    ops.KernelConfig(overrides=(("linear", "pallas"),))
  with pytest.raises(OpError, match="name an op twice"):
    ops.KernelConfig.parse("linear=xla,linear=reference")
  with pytest.raises(OpError, match="names one implementation twice|must be unique"):
    Op("dup", (Implementation("xla", "xla", abs), Implementation("xla", "xla", abs)))


def test_kernel_setting_is_per_op():
  cfg = ops.KernelConfig.parse("pallas,w8a8_matmul=xla", interpret=True)
  assert cfg.request("w4a16_matmul") == "pallas"
  assert cfg.request("quantized_kv_attention") == "pallas"
  assert cfg.request("w8a8_matmul") == "xla"
  assert cfg.request("attention") == "pallas"  # the flash attention kernels
  assert cfg.request("linear") is None  # no Pallas implementation: the default
  assert ops.KernelConfig.parse("") == ops.KernelConfig()
  assert ops.KernelConfig.parse("xla").request("attention") == "xla"


def test_every_registered_op_has_reference_and_xla():
  for name, op in registry.OPS.items():
    assert {"reference", "xla"} <= set(op.names), name
    for impl in op.implementations:
      assert (impl.kind == "pallas") == (impl.backend is not None), (name, impl.name)


def _kv_inputs(bits=2, group=32, t=64, d=64):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((1, 4, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 2, t, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((1, 2, t, d)), jnp.float32)
  return (q, quantize_kv(k, v, bits, group), 0, t), dict(bits=bits, group_size=group)


def test_kv_kernel_refusal_names_the_chip_and_the_constraint():
  args, kw = _kv_inputs(bits=2, group=32)  # 8 packed rows per group: below Triton's 16
  op = registry.get("quantized_kv_attention")
  assert op.select(None, GPU, *args, **kw).name == "xla"  # the table's choice, by design
  with pytest.raises(UnsupportedError, match=r"'triton' cannot run on NVIDIA H100: .*>= 16"):
    op.select("triton", GPU, *args, **kw)
  assert op.select("triton", GPU, *_kv_inputs(bits=4, group=64)[0], bits=4, group_size=64)


def test_bad_shapes_are_caught_before_any_implementation():
  q = jnp.zeros((1, 4, 3, 8))
  k = jnp.zeros((1, 2, 4, 8))  # 2 KV heads do not divide 3 query heads
  slots, start = jnp.zeros((1, 4), jnp.int32), jnp.zeros((1,), jnp.int32)
  with pytest.raises(ValueError, match=r"attention: k \(1, 2, 4, 8\) does not fit q"):
    ops.attention(q, k, k, slots, start)
  with pytest.raises(ValueError, match="w8a8_matmul: x has dtype int32"):
    ops.call(
      "w8a8_matmul",
      ops.KernelConfig(),
      jnp.zeros((2, 8), jnp.int32),
      jnp.zeros((8, 4), jnp.int8),
      jnp.ones((1, 4)),
    )


def _pallas_kernels_called(fn, *args) -> list[str]:
  """Names of the pallas_calls in fn's jaxpr, nested jaxprs included."""
  names = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        names.append(str(eqn.params["name"]).split()[0])
      for value in eqn.params.values():
        for sub in value if isinstance(value, (tuple, list)) else (value,):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return names


def test_model_wide_pallas_setting_calls_the_kernels_it_names():
  """A jaxpr check: under "pallas" (interpret) the quantized model's matmuls are the
  Pallas kernels; under the default they are not."""
  import jaxllm
  from jaxllm import quant
  from jaxllm.params import init_model

  model = quant.quantize_model(init_model(jaxllm.TINY, seed=0), "w8a8")
  tokens = jnp.arange(8, dtype=jnp.int32)[None]

  def kernels_called(cfg):
    model.kernels = cfg
    return _pallas_kernels_called(lambda t: model(t)[0], tokens)

  pallas = kernels_called(ops.KernelConfig("pallas", interpret=True))
  assert pallas and set(pallas) == {"w8a8_matmul", "flash_attention"}, pallas
  assert kernels_called(ops.KernelConfig()) == []
