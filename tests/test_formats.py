"""jaxllm.quant.formats: weight formats are objects; a new one is a class plus its registration.

A toy format registered in a test-local table (so nothing leaks into `FORMATS`) runs
through `quantize`, `ops.linear` (every implementation of the matmul op it names),
jit and the error paths, against a numpy reference of its own arithmetic.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm import checkpoint, ops
from jaxllm.params import init_model
from jaxllm.quant import (
  FORMATS,
  QTensor,
  QuantSpec,
  WeightFormat,
  get_format,
  quantize,
  quantize_model,
  register_format,
)
from jaxllm.quant.gptq import gptq_quantize
from jaxllm.quant.recipes import QuantRule, Recipe, Reconstruction
from pallas_kernels import registry


@dataclasses.dataclass(frozen=True)
class ToyInt8PerTensor(WeightFormat):
  """int8 weights with ONE f32 scale for the whole tensor, multiplied by the existing
  ``w8a8_matmul`` op (its per-channel scale operand is the tensor scale repeated)."""

  name = "toy_int8_tensor"
  description = "int8 weights, one f32 scale per tensor"
  matmul_op = "w8a8_matmul"

  def quantize(self, w2, **options):
    scale = jnp.maximum(jnp.abs(w2).max() / 127.0, 1e-12).reshape(1, 1)
    return {"values": jnp.round(w2 / scale).astype(jnp.int8), "scales": scale}, 0

  def dequantize(self, parts):
    return parts["values"].astype(jnp.float32) * parts["scales"]

  def matmul_operands(self, parts, x):
    n = parts["values"].shape[1]
    return (x, parts["values"], jnp.broadcast_to(parts["scales"], (1, n)))


@dataclasses.dataclass(frozen=True)
class ToyStoredBF16(WeightFormat):
  """A storage-only format: no matmul op."""

  name = "toy_bf16"
  description = "bf16 weights, storage only"
  scale_dtypes = ("float32",)

  def quantize(self, w2, **options):
    return {"values": w2.astype(jnp.bfloat16), "scales": jnp.ones((1, 1), jnp.float32)}, 0

  def dequantize(self, parts):
    return parts["values"].astype(jnp.float32)


@pytest.fixture
def formats():
  """A test-local copy of `FORMATS` with the toy formats registered."""
  table = dict(FORMATS)
  register_format(ToyInt8PerTensor(), table)
  register_format(ToyStoredBF16(), table)
  return table


@pytest.fixture(scope="module")
def weight_and_input():
  rng = np.random.default_rng(0)
  w = (rng.standard_normal((256, 128)) * 0.05).astype(np.float32)
  x = rng.standard_normal((2, 3, 256)).astype(np.float32)
  return w, x


def _w8a8_numpy(x2, w_q, w_scale):
  """Per-token symmetric int8 activations, int32 accumulation, both scales after."""
  x_scale = np.maximum(np.abs(x2).max(axis=1, keepdims=True) / 127.0, 1e-8)
  x_q = np.clip(np.round(x2 / x_scale), -127, 127).astype(np.int64)
  return (x_q @ w_q.astype(np.int64)).astype(np.float64) * x_scale * w_scale


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
def test_toy_format_runs_through_linear(formats, weight_and_input, impl):
  w, x = weight_and_input
  fmt = get_format("toy_int8_tensor", formats)
  q = quantize(jnp.asarray(w), fmt)
  assert isinstance(q, QTensor) and q.method == "toy_int8_tensor" and q.format == fmt
  assert q.matmul_op == "w8a8_matmul"
  scale = float(np.abs(w).max() / 127.0)
  np.testing.assert_allclose(float(q.scales[0, 0]), scale, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(q.values), np.round(w / np.float32(scale)))
  assert q.num_bytes == w.size + 4  # int8 values + one f32 scale
  config = ops.KernelConfig(impl, interpret=True)
  got = np.asarray(ops.linear(jnp.asarray(x), q, config))
  want = _w8a8_numpy(x.reshape(6, 256), np.asarray(q.values), scale).reshape(2, 3, 128)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  rel = np.abs(got - x @ w).max() / np.abs(x @ w).max()
  assert 1e-4 < rel < 0.05  # quantized, not a float passthrough, yet close
  # the format is a static (hashable) field: jit traces a QTensor of it as any other
  jitted = jax.jit(lambda x, q: ops.linear(x, q, config))(jnp.asarray(x), q)
  np.testing.assert_allclose(np.asarray(jitted), got, rtol=1e-6, atol=1e-6)
  assert "toy_int8_tensor" not in FORMATS  # registered only in the local table


def test_builtin_formats_name_registered_ops():
  assert list(FORMATS) == ["w8a8", "w4a16", "fireq_w4a8"]
  for name, fmt in FORMATS.items():
    assert fmt.name == name and get_format(name) is fmt
    assert registry.get(fmt.matmul_op).name == fmt.matmul_op
    assert hash(fmt) == hash(type(fmt)()) and fmt == type(fmt)()


def test_quantize_model_stores_the_format_object():
  model = quantize_model(init_model(jaxllm.TINY, seed=0), "w4a16", 32)
  q = model.layers[0].mlp.up.get_value()
  assert q.format is FORMATS["w4a16"] and q.method == "w4a16"


# ------------------------------------------------------------------ bad input


def test_unknown_format_name_names_the_known_ones(formats):
  known = r"\['fireq_w4a8', 'w4a16', 'w8a8'\]"
  with pytest.raises(ValueError, match=rf"unknown quantization method 'w3a3'; .*{known}"):
    quantize(jnp.ones((8, 4)), "w3a3")
  with pytest.raises(ValueError, match=rf"unknown quantization method 'int2'; .*{known}"):
    QuantSpec("int2")
  with pytest.raises(ValueError, match="unknown quantization method 'toy_int8_tensor'"):
    get_format("toy_int8_tensor")  # the global table does not have it
  with pytest.raises(ValueError, match=r"'toy_bf16', 'toy_int8_tensor', 'w4a16'"):
    get_format("w3a3", formats)
  with pytest.raises(ValueError, match="weight format 'w8a8' is already registered"):
    register_format(type(FORMATS["w8a8"])(), formats)
  with pytest.raises(TypeError, match="QTensor format must be a .*WeightFormat, got 'w8a8'"):
    QTensor(jnp.ones((4, 2), jnp.int8), jnp.ones((1, 2)), format="w8a8", shape=(4, 2))


def test_storage_only_format_has_no_matmul(formats, weight_and_input):
  w, x = weight_and_input
  q = quantize(jnp.asarray(w), get_format("toy_bf16", formats))
  np.testing.assert_allclose(np.asarray(q.dequantize()), w, rtol=2**-8)
  with pytest.raises(ValueError, match="weight format 'toy_bf16' has no matmul op") as e:
    ops.linear(jnp.asarray(x), q)
  assert "\n" not in str(e.value)


def test_wrong_scale_dtype():
  w = jnp.ones((64, 8))
  with pytest.raises(ValueError, match=r"w8a8: scale dtype 'bfloat16' is not supported"):
    quantize(w, "w8a8", scale_dtype="bfloat16")
  with pytest.raises(ValueError, match=r"fireq_w4a8: scale dtype 'float16' .*'float8_e4m3fn'"):
    quantize(w, "fireq_w4a8", 32, scale_dtype="float16")


def test_capabilities_gate_gptq_and_reconstruction(formats):
  toy = QuantSpec(get_format("toy_int8_tensor", formats))
  w = jnp.ones((16, 8))
  with pytest.raises(ValueError, match=r"GPTQ handles the weight formats .* not 'toy_int8"):
    gptq_quantize(w, np.eye(16), toy)
  rules = (QuantRule(".*", toy),)
  with pytest.raises(ValueError, match=r"learns \('w4a16', 'fireq_w4a8'\) weights, not \['toy"):
    Recipe("toy", "", rules, reconstruct=Reconstruction())
  with pytest.raises(ValueError, match="GPTQ handles the w8a8, w4a16, fireq_w4a8 weights"):
    Recipe("toy", "", rules, gptq=True)


def test_checkpoint_with_an_unknown_format_fails_cleanly(tmp_path):
  model = quantize_model(init_model(jaxllm.TINY, seed=0), "w8a8")
  path = os.fspath(tmp_path / "ckpt")
  checkpoint.save(model, path)
  with open(os.path.join(path, "quant.json")) as f:
    meta = json.load(f)
  assert {entry["method"] for entry in meta.values()} == {"w8a8"}
  for entry in meta.values():
    entry["method"] = "w3a3"
  with open(os.path.join(path, "quant.json"), "w") as f:
    json.dump(meta, f)
  with pytest.raises(checkpoint.CheckpointError, match="unknown quantization method 'w3a3'"):
    checkpoint.restore(path)
