"""QTensor: dispatch through ops.linear, agreement of implementations, sharding names."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import sharding
from jaxllm import ops
from jaxllm.quant import QTensor, quantize

# (method, bound on max error relative to max |x @ w|) for Gaussian weights.
BOUNDS = {"w8a8": 0.03, "w4a16": 0.2}


@pytest.fixture(scope="module")
def weight_and_input():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((512, 3, 64)).astype(np.float32)) * 0.05
  x = jnp.asarray(rng.standard_normal((2, 3, 512)).astype(np.float32))
  return w, x, np.einsum("bsk,khd->bshd", np.asarray(x, np.float64), np.asarray(w, np.float64))


@pytest.mark.parametrize("method", sorted(BOUNDS))
def test_implementations_agree_and_approximate_float(weight_and_input, method):
  w, x, want = weight_and_input
  q = quantize(w, method)
  outs = {
    impl: np.asarray(ops.linear(x, q, ops.KernelConfig(impl, interpret=True)))
    for impl in ("xla", "pallas", "reference")
  }
  for impl, out in outs.items():
    assert out.shape == want.shape, impl
    np.testing.assert_allclose(out, outs["reference"], rtol=1e-5, atol=1e-4, err_msg=impl)
  err = np.abs(outs["xla"] - want).max() / np.abs(want).max()
  assert 1e-4 < err < BOUNDS[method]  # quantized (not a float passthrough) yet close


def test_dequantize_round_trip_and_bytes(weight_and_input):
  w = weight_and_input[0]
  q8, q4 = quantize(w, "w8a8"), quantize(w, "w4a16", group_size=128)
  assert q8.dequantize().shape == w.shape
  np.testing.assert_allclose(q8.dequantize(), w, atol=float(jnp.abs(w).max()) / 127)
  bf16_bytes = w.size * 2
  assert q8.num_bytes == w.size + 4 * 192  # int8 values + one f32 scale per column
  assert q4.num_bytes == w.size // 2 + 2 * 4 * (512 // 128) * 192
  assert q4.num_bytes / bf16_bytes < 0.30


def test_parts_shard_like_the_weight(weight_and_input):
  q = quantize(weight_and_input[0], "w4a16")
  axes = q.logical_axes(("embed", "kv_heads", "head_dim"))
  assert isinstance(axes, QTensor)
  for names in (axes.values, axes.scales, axes.zeros):
    assert sharding.logical_to_spec(names) == sharding.logical_to_spec(("embed", "kv_heads"))


def test_unknown_method():
  with pytest.raises(ValueError, match="unknown quantization method 'w3a3'"):
    quantize(jnp.ones((256, 8)), "w3a3")


@pytest.mark.parametrize("method, group_size, bound", [("w8a8", 128, 0.05), ("w4a16", 32, 0.5)])
def test_quantized_model_generates_close_to_float(method, group_size, bound):
  import jaxllm
  from jaxllm.params import init_model
  from jaxllm.quant import quantize_model

  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 512, size=(2, 9)))
  want = np.asarray(init_model(jaxllm.TINY, seed=0)(tokens)[0])
  model = quantize_model(init_model(jaxllm.TINY, seed=0), method, group_size)
  assert isinstance(model.layers[1].attn.o.get_value(), QTensor)
  got = np.asarray(model(tokens)[0])
  err = np.abs(got - want).max() / np.abs(want).max()
  assert 1e-5 < err < bound
  out = jaxllm.Generator(model, prompt_bucket=8).generate([[1, 2, 3]], 4, stop_at_eos=False)
  assert len(out.tokens[0]) == 4
