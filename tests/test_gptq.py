"""jaxllm.quant.gptq: GPTQ beats round-to-nearest, reduces to it at H = I, stays on the grid
(int4 formats and W8A8)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm.params import init_model
from jaxllm.quant import (
  QuantRule,
  QuantSpec,
  Recipe,
  activation_absmax,
  apply_recipe,
  get_recipe,
  quantize,
)
from jaxllm.quant.apply import input_key, linear_params
from jaxllm.quant.calibrate import input_hessians, layerwise_hessians
from jaxllm.quant.formats import fireq_codes, w4a16_codes
from jaxllm.quant.gptq import gptq_quantize

SPECS = {
  "w4a16_g32": QuantSpec("w4a16", group_size=32, scale_dtype="bfloat16"),
  "w4a16_g64_padded": QuantSpec("w4a16", group_size=64, pad_k=True),
  "fireq_g32": QuantSpec("fireq_w4a8", group_size=32, scale_dtype="float8_e4m3fn"),
  "fireq_channel": QuantSpec("fireq_w4a8"),
  "w8a8": QuantSpec("w8a8"),
}
K, N = 96, 48


@pytest.fixture(scope="module")
def layer():
  """A weight [K, N] and correlated inputs X [M, K] (a few strong shared directions)."""
  rng = np.random.default_rng(0)
  w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
  x = rng.standard_normal((512, 8)) @ rng.standard_normal((8, K)) + 0.3 * rng.standard_normal(
    (512, K)
  )
  return jnp.asarray(w), x


def _rtn(w, spec):
  return quantize(w, spec.method, spec.group_size, pad_k=spec.pad_k, scale_dtype=spec.scale_dtype)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_gptq_lowers_output_error(layer, name, act_order):
  w, x = layer
  spec = SPECS[name]
  out_err = {}
  gptq = gptq_quantize(w, x.T @ x, spec, act_order=act_order)
  for label, q in (("rtn", _rtn(w, spec)), ("gptq", gptq)):
    out_err[label] = np.linalg.norm(x @ (np.asarray(w) - np.asarray(q.dequantize())))
  assert out_err["gptq"] < 0.85 * out_err["rtn"], out_err


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_identity_hessian_is_round_to_nearest(layer, name, act_order):
  w, _ = layer
  spec = SPECS[name]
  got, want = gptq_quantize(w, np.eye(K), spec, act_order=act_order), _rtn(w, spec)
  for part, value in want.parts.items():
    np.testing.assert_array_equal(np.asarray(got.parts[part]), np.asarray(value), err_msg=part)
  assert (got.k_pad, got.method, got.shape) == (want.k_pad, want.method, want.shape)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_gptq_weights_lie_on_the_stored_grid(layer, name, act_order):
  """Re-coding the dequantized weight against the stored scales gives it back exactly."""
  w, x = layer
  q = gptq_quantize(w, x.T @ x, SPECS[name], act_order=act_order)
  dq = q.dequantize_padded()
  g = dq.shape[0] // q.scales.shape[0]
  groups = dq.reshape(q.scales.shape[0], g, -1)
  if q.method == "w8a8":
    again = jnp.clip(jnp.round(groups / q.scales[:, None]), -127, 127) * q.scales[:, None]
  elif q.method == "w4a16":
    codes = w4a16_codes(groups, q.scales, q.offsets)
    again = codes * q.scales.astype(jnp.float32)[:, None] + q.offsets.astype(jnp.float32)[:, None]
  else:
    codes = fireq_codes(groups, q.scales, q.tensor_scale)
    again = codes * q.scales.astype(jnp.float32)[:, None] * q.tensor_scale[0, 0]
  np.testing.assert_allclose(np.asarray(again.reshape(dq.shape)), np.asarray(dq), rtol=1e-6, atol=0)


def test_gptq_bad_input(layer, tiny_model):
  w, _ = layer
  spec = SPECS["w4a16_g32"]
  with pytest.raises(ValueError, match=r"Hessian shape \(95, 95\) does not match.*\(96, 96\)"):
    gptq_quantize(w, np.eye(K - 1), spec)
  with pytest.raises(ValueError, match="non-finite"):
    gptq_quantize(w, np.full((K, K), np.nan), spec)
  with pytest.raises(ValueError, match="calibration set is empty"):
    input_hessians(tiny_model, np.zeros((0, 32), np.int32))
  with pytest.raises(ValueError, match="act_order is a GPTQ option; set gptq=True"):
    Recipe("rtn_in_act_order", "round-to-nearest cannot take an order", act_order=True)
  with pytest.raises(ValueError, match="uses GPTQ, so it needs calibration windows"):
    apply_recipe(init_model(jaxllm.TINY, seed=0), get_recipe("fireq_w4a8_no_smoothing"))


def test_hessians_and_gptq_recipe_on_the_tiny_model(tiny_model):
  tokens = np.random.default_rng(3).integers(0, 512, size=(2, 24)).astype(np.int32)
  hessians = input_hessians(tiny_model, tokens)
  cfg = tiny_model.config
  assert hessians["0.o_in"].shape == (cfg.num_heads * cfg.head_dim,) * 2
  h = hessians["0.attn_in"]
  np.testing.assert_allclose(h, h.T, rtol=1e-5, atol=1e-6)
  assert np.linalg.eigvalsh(h.astype(np.float64)).min() > -1e-3 * np.abs(h).max()
  want = np.asarray(tiny_model(jnp.asarray(tokens))[0])
  stats = activation_absmax(tiny_model, tokens)
  errs = {}
  for name in ("w4a16_g128", "w4a16_g128_rtn"):
    model = apply_recipe(init_model(jaxllm.TINY, seed=0), get_recipe(name), stats, tokens)
    got = np.asarray(model(jnp.asarray(tokens))[0])
    errs[name] = np.abs(got - want).mean()
  assert errs["w4a16_g128"] < errs["w4a16_g128_rtn"], errs


def _numpy_gptq_static(w, h, spec, order):
  """Textbook GPTQ, one row at a time with immediate updates, on the round-to-nearest
  group grids of `w` (static groups), rows taken in `order`: int4 codes [K, N]."""
  grid = _rtn(jnp.asarray(w), spec)
  g = spec.group_size
  scales = np.repeat(np.asarray(grid.scales, np.float64), g, axis=0)
  mins = np.repeat(np.asarray(grid.offsets, np.float64), g, axis=0)
  h = h + 0.01 * np.mean(np.diag(h)) * np.eye(len(h))
  h = h[order][:, order]
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  w = np.asarray(w, np.float64)[order].copy()
  codes = np.zeros_like(w)
  for i, row in enumerate(order):
    codes[i] = np.clip(np.round((w[i] - mins[row]) / scales[row]), 0, 15)
    err = (w[i] - (codes[i] * scales[row] + mins[row])) / u[i, i]
    w[i + 1 :] -= np.outer(u[i, i + 1 :], err)
  return codes[np.argsort(order)]


@pytest.mark.parametrize("act_order", [False, True])
def test_act_order_matches_a_textbook_gptq(layer, act_order):
  """Blocked, lazily updated act-order GPTQ equals a row-at-a-time numpy GPTQ over the
  rows in decreasing Hessian-diagonal order (static grids); in K order without it."""
  w, x = layer
  x = x * np.linspace(0.2, 3.0, K)  # inputs of unequal energy: a nontrivial order
  h = x.T @ x
  spec = SPECS["w4a16_g32"]
  order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(K)
  want = _numpy_gptq_static(w, h, spec, order)
  got = gptq_quantize(w, h, spec, act_order=act_order)
  if not act_order:  # the grids then follow the updates: only the first group's is static
    want = want[: spec.group_size]
  dq = got.dequantize_padded().reshape(-1, spec.group_size, N)
  codes = np.asarray(w4a16_codes(dq, got.scales, got.offsets)).reshape(-1, N)[: len(want)]
  assert np.mean(codes == want) > 0.99, np.mean(codes == want)


def _tiny_tokens(seed=3):
  return np.random.default_rng(seed).integers(0, 512, size=(3, 24)).astype(np.int32)


def test_layerwise_hessians_follow_the_quantized_layers():
  """Untouched, they equal the one-pass Hessians; once the caller quantizes layer 0,
  layer 1's equal the one-pass Hessians of the model with layer 0 quantized."""
  tokens = _tiny_tokens()
  model = init_model(jaxllm.TINY, seed=0)
  float_h = input_hessians(model, tokens)
  spec = SPECS["w4a16_g32"]
  got = {}
  for i, hessians in layerwise_hessians(model, tokens, batch_size=2):
    got.update(hessians)
    if i == 0:
      for name in ("q", "k", "v", "o", "gate", "up", "down"):
        param = getattr(model.layers[0].attn if name in "qkvo" else model.layers[0].mlp, name)
        param.set_value(spec.quantize(param.get_value(), 2 if name == "o" else 1))
  want = input_hessians(model, tokens)  # layer 0 now quantized
  assert set(got) == set(want)
  for key, h in got.items():
    ref = float_h[key] if key.startswith("0.") else want[key]
    np.testing.assert_allclose(h, ref, rtol=0, atol=1e-5 * np.abs(ref).max(), err_msg=key)
  assert (
    np.abs(want["1.attn_in"] - float_h["1.attn_in"]).max()
    > 1e-3 * np.abs(float_h["1.attn_in"]).max()
  )  # quantizing layer 0 did move layer 1's inputs


def test_sequential_gptq_recipe_quantizes_against_the_quantized_prefix():
  tokens = _tiny_tokens()
  recipe = Recipe("seq", "", (QuantRule(".*", SPECS["w4a16_g32"]),), gptq=True, sequential=True)
  got = apply_recipe(init_model(jaxllm.TINY, seed=0), recipe, None, tokens)
  # the same by hand: each layer by GPTQ against one-pass Hessians of the partly quantized model
  want = init_model(jaxllm.TINY, seed=0)
  for i in range(jaxllm.TINY.num_layers):
    hessians = input_hessians(want, tokens)
    for path, param, contract in linear_params(want):
      if path.split(".")[1] == str(i):
        h = hessians[input_key(path)]
        param.set_value(gptq_quantize(param.get_value(), h, SPECS["w4a16_g32"], contract))
  pairs = zip(linear_params(got), linear_params(want), strict=True)
  for (path, p_got, _), (_, p_want, _) in pairs:
    for part, value in p_want.get_value().parts.items():
      match = np.mean(np.asarray(p_got.get_value().parts[part]) == np.asarray(value))
      assert match > 0.99, (path, part, match)
  with pytest.raises(ValueError, match="sequential is a GPTQ option; set gptq=True"):
    Recipe("x", "", (), sequential=True)
