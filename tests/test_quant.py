"""jaxllm.quant: QTensor formats, K padding, calibration, smoothing, recipes, checkpoints."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxllm
import sharding
from jaxllm import checkpoint, ops
from jaxllm.params import init_model
from jaxllm.quant import (
  RECIPES,
  QTensor,
  QuantRule,
  QuantSpec,
  Recipe,
  activation_absmax,
  apply_recipe,
  get_recipe,
  quantize,
  quantize_model,
  smooth_model,
  weight_bytes,
)
from jaxllm.quant.calibrate import input_hessians
from jaxllm.quant.smoothing import (
  consumer_row_scales,
  input_ranges,
  smoothed_hessians,
  smoothing_scales,
)
from jaxllm.quant.smoothing_search import CONSUMERS, rounding_error, search_smoothing

# (method, quantize kwargs, bound on max error relative to max |x @ w|) for Gaussian weights.
CASES = {
  "w8a8": ("w8a8", {}, 0.03),
  "w4a16_g128": ("w4a16", {"group_size": 128}, 0.2),
  "fireq_channel": ("fireq_w4a8", {"group_size": None}, 0.3),
  "fireq_g32": ("fireq_w4a8", {"group_size": 32}, 0.25),
}
IMPLS = ("xla", "pallas", "reference")


@pytest.fixture(scope="module")
def weight_and_input():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((512, 3, 64)).astype(np.float32)) * 0.05
  x = jnp.asarray(rng.standard_normal((2, 3, 512)).astype(np.float32))
  return w, x, np.einsum("bsk,khd->bshd", np.asarray(x, np.float64), np.asarray(w, np.float64))


def _outputs(x, q):
  return {
    impl: np.asarray(ops.linear(x, q, ops.KernelConfig(impl, interpret=True))) for impl in IMPLS
  }


@pytest.mark.parametrize("case", sorted(CASES))
def test_implementations_agree_and_approximate_float(weight_and_input, case):
  method, kwargs, bound = CASES[case]
  w, x, want = weight_and_input
  q = quantize(w, method, **kwargs)
  outs = _outputs(x, q)
  for impl, out in outs.items():
    assert out.shape == want.shape, impl
    np.testing.assert_allclose(out, outs["reference"], rtol=1e-5, atol=1e-4, err_msg=impl)
  err = np.abs(outs["xla"] - want).max() / np.abs(want).max()
  assert 1e-4 < err < bound  # quantized (not a float passthrough) yet close


@pytest.mark.parametrize("case", ["fireq_g32", "w4a16_g128"])
def test_xla_path_passes_gradients_straight_through(weight_and_input, case):
  """d sum(x @ q) / dx is the dequantized weight's row sums: FireQ's FP8 rounding of the
  activations passes the gradient straight through (block reconstruction trains on it)."""
  method, kwargs, _ = CASES[case]
  w, x, _ = weight_and_input
  q = quantize(w, method, **kwargs)
  grad = jax.grad(lambda x: ops.linear(x, q, ops.KernelConfig("xla")).sum())(x)
  want = np.broadcast_to(np.asarray(q.dequantize()).sum(axis=(1, 2)), x.shape)
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-5)


def test_dequantize_round_trip_and_bytes(weight_and_input):
  w = weight_and_input[0]
  q8, q4 = quantize(w, "w8a8"), quantize(w, "w4a16", group_size=128)
  assert q8.dequantize().shape == w.shape
  np.testing.assert_allclose(q8.dequantize(), w, atol=float(jnp.abs(w).max()) / 127)
  bf16_bytes = w.size * 2
  assert q8.bf16_bytes == bf16_bytes
  assert q8.num_bytes == w.size + 4 * 192  # int8 values + one f32 scale per column
  assert q4.num_bytes == w.size // 2 + 2 * 4 * (512 // 128) * 192  # + f32 scale and offset
  assert q4.num_bytes / bf16_bytes < 0.30
  qf = quantize(w, "fireq_w4a8", group_size=None)
  assert qf.scales.dtype == jnp.float8_e4m3fn
  assert qf.num_bytes == w.size // 2 + 192 + 4  # codes + FP8 scale per column + tensor scale


def test_q4_1_grid_round_trips_exactly():
  """Q4_1-style weights (codes 0..15 * f16 scale + f16 min, group 32 along K) come back exact."""
  rng = np.random.default_rng(1)
  k, heads, d, g = 576, 3, 64, 32
  codes = rng.integers(0, 16, size=(k // g, g, heads * d))
  codes[:, 3], codes[:, 17] = 0, 15  # each group spans the grid, as Q4_1's min/max do
  scale = rng.uniform(1e-3, 2e-2, size=(k // g, 1, heads * d)).astype(np.float16)
  low = rng.uniform(-0.15, 0.0, size=(k // g, 1, heads * d)).astype(np.float16)
  w = (codes * scale.astype(np.float32) + low.astype(np.float32)).reshape(k, heads, d)
  q = quantize(jnp.asarray(w), "w4a16", group_size=32)
  back = np.asarray(q.dequantize())
  np.testing.assert_allclose(back, w, rtol=0, atol=4 * np.finfo(np.float32).eps)
  # the old zero-point grid (0 forced into range, integer zero point) could not do this:
  assert np.abs(back - w).max() < 1e-6 * np.abs(w).max() * 10


def test_k_padding_to_the_group_size():
  w = jax.random.normal(jax.random.key(0), (576, 192), jnp.float32) * 0.05
  x = jax.random.normal(jax.random.key(1), (4, 576), jnp.float32)
  with pytest.raises(ValueError, match="K=576 is not divisible by group_size=128"):
    quantize(w, "w4a16", group_size=128)
  q = quantize(w, "w4a16", group_size=128, pad_k=True, scale_dtype="bfloat16")
  assert q.k_pad == 64 and q.values.shape == (320, 192) and q.scales.shape == (5, 192)
  assert q.scales.dtype == jnp.bfloat16 and q.offsets.dtype == jnp.bfloat16
  assert q.num_bytes == 320 * 192 + 2 * 2 * 5 * 192  # padding rows are stored and counted
  assert q.dequantize().shape == (576, 192)
  outs = _outputs(x, q)
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  for impl, out in outs.items():
    np.testing.assert_allclose(out, outs["reference"], rtol=1e-5, atol=1e-4, err_msg=impl)
  np.testing.assert_allclose(outs["xla"], np.asarray(x) @ np.asarray(q.dequantize()), atol=1e-4)
  assert np.linalg.norm(outs["xla"] - want) / np.linalg.norm(want) < 0.12


def test_parts_shard_like_the_weight(weight_and_input):
  q = quantize(weight_and_input[0], "w4a16")
  axes = q.logical_axes(("embed", "kv_heads", "head_dim"))
  assert isinstance(axes, QTensor)
  for names in (axes.values, axes.scales, axes.offsets):
    assert sharding.logical_to_spec(names) == sharding.logical_to_spec(("embed", "kv_heads"))
  f = quantize(weight_and_input[0], "fireq_w4a8", group_size=None)
  f_axes = f.logical_axes(("embed", "kv_heads", "head_dim"))
  assert f_axes.scales == (None, "kv_heads") and f_axes.tensor_scale == (None, None)


def test_quantized_model_shards_like_the_float_one():
  """8 fake CPU devices (tests/conftest.py), data=4 x tensor=2: every QTensor part is
  placed by the float weight's rules (codes and group scales split on the same axes) and
  the logits match one device. W8A8 and FireQ round activations per token (int8, FP8),
  so a different summation order under sharding can flip one rounding: they get a looser
  bound."""
  from flax import nnx

  from jaxllm.params import logical_axes

  tokens = np.random.default_rng(0).integers(0, 512, size=(4, 16)).astype(np.int32)
  mesh = sharding.make_mesh({"data": 4, "tensor": 2})
  rows = {}
  for method, group in (("w8a8", None), ("w4a16", 32), ("fireq_w4a8", 32)):
    model = quantize_model(init_model(jaxllm.TINY, seed=0), method, group)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t, graphdef=graphdef: nnx.merge(graphdef, s)(t)[0])
    want = np.asarray(forward(state, tokens))
    state.replace_by_pure_dict(
      sharding.shard_params(state.to_pure_dict(), logical_axes(model), mesh)
    )
    up = state.to_pure_dict()["layers"][0]["mlp"]["up"]
    with jax.set_mesh(mesh):
      got = np.asarray(forward(state, tokens))
    rows[method] = (up.values.sharding.spec, up.scales.sharding.spec)
    assert up.values.sharding.spec == P("fsdp", "tensor"), method  # like up's [embed, mlp]
    rel_err = np.abs(got - want).max() / np.abs(want).max()
    top1 = (got.argmax(-1) == want.argmax(-1)).mean()
    assert rel_err < (1e-5 if method == "w4a16" else 5e-3), (method, rel_err)
    assert top1 >= (0.95 if method == "fireq_w4a8" else 1.0), (method, top1)
  assert rows["w8a8"][1] == P(None, "tensor")  # per-channel scales: split on N only


# ------------------------------------------------------------------ FireQ scales


def test_fireq_per_tensor_scale_keeps_small_scales_precise():
  """SmolLM2-sized weights (|w| ~ 1e-2): absolute FP8 scales are coarse subnormals."""
  w = jax.random.normal(jax.random.key(2), (576, 256), jnp.float32) * 0.004
  with_t = quantize(w, "fireq_w4a8", group_size=None)
  without = quantize(w, "fireq_w4a8", group_size=None, per_tensor_scale=False)
  assert float(with_t.scales.astype(jnp.float32).max()) == 448.0
  assert float(without.tensor_scale[0, 0]) == 1.0
  err = [float(jnp.linalg.norm(q.dequantize() - w) / jnp.linalg.norm(w)) for q in (with_t, without)]
  assert err[0] < 0.16 and err[1] > 1.25 * err[0]  # measured: 0.143 vs 0.197


# ------------------------------------------------------------------ bad input


def test_bad_input_raises():
  w = jnp.ones((256, 8))
  with pytest.raises(ValueError, match="unknown quantization method 'w3a3'"):
    quantize(w, "w3a3")
  with pytest.raises(ValueError, match="dtype int8"):
    quantize(w.astype(jnp.int8), "w4a16")
  with pytest.raises(ValueError, match="scale dtype 'float16'"):
    quantize(w, "w4a16", scale_dtype="float16")
  with pytest.raises(ValueError, match="K=256 is not divisible by group_size=96"):
    quantize(w, "fireq_w4a8", group_size=96)
  q = quantize(w, "w4a16", group_size=32)
  for impl in IMPLS:
    with pytest.raises(ValueError, match=r"_matmul: x has dtype int32"):
      ops.linear(jnp.ones((2, 256), jnp.int32), q, ops.KernelConfig(impl, interpret=True))
  with pytest.raises(ValueError, match="unknown quantization recipe"):
    get_recipe("int2")
  with pytest.raises(ValueError, match="unknown quantization method"):
    QuantSpec("int2")


# ------------------------------------------------------------------ calibration


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(3).integers(0, 512, size=(3, 24)).astype(np.int32)


def test_calibration_statistics(tiny_model, tokens):
  stats = activation_absmax(tiny_model, tokens, batch_size=2)
  cfg = tiny_model.config
  assert len(stats) == 4 * cfg.num_layers
  assert stats["1.o_in"].shape == (cfg.num_heads, cfg.head_dim)
  assert stats["0.down_in"].shape == (cfg.mlp_dim,)
  taps = {}
  tiny_model(jnp.asarray(tokens), taps=taps)  # independent: eager forward, numpy reduction
  for name in ("0.attn_in", "1.mlp_in", "1.down_in"):
    np.testing.assert_allclose(stats[name], np.abs(np.asarray(taps[name])).max(axis=(0, 1)), 1e-5)
  np.testing.assert_allclose(
    stats["0.o_in"], np.abs(np.asarray(taps["0.o_in"])).max(axis=(0, 1)), 1e-5
  )
  per_window = [activation_absmax(tiny_model, tokens[i : i + 1]) for i in range(3)]
  np.testing.assert_allclose(
    stats["1.attn_in"], np.max([s["1.attn_in"] for s in per_window], 0), 1e-5
  )


def test_calibration_bad_input(tiny_model):
  with pytest.raises(ValueError, match="calibration set is empty"):
    activation_absmax(tiny_model, np.zeros((0, 32), np.int32))
  with pytest.raises(ValueError, match="too short: 8 tokens each, need at least 16"):
    activation_absmax(tiny_model, np.zeros((2, 8), np.int32))
  with pytest.raises(ValueError, match=r"ids must lie in \[0, 512\)"):
    activation_absmax(tiny_model, np.full((1, 32), 600, np.int32))
  with pytest.raises(ValueError, match="needs calibration statistics"):
    apply_recipe(init_model(jaxllm.TINY, seed=0), get_recipe("fireq_w4a8"))


# ------------------------------------------------------------------ smoothing


def _model_with_outliers(seed=0):
  """Tiny model whose norm scales have a few large channels, as real LLMs do."""
  model = init_model(jaxllm.TINY, seed=seed)
  for layer in model.layers:
    for norm in (layer.attn_norm, layer.mlp_norm):
      scale = np.ones(norm.scale.get_value().shape, np.float32)
      scale[[3, 70]] = [25.0, 40.0]
      norm.scale.set_value(jnp.asarray(scale))
  return model


def test_smoothing_alone_leaves_logits_unchanged(tokens):
  model = _model_with_outliers()
  want = np.asarray(model(jnp.asarray(tokens))[0])
  stats = activation_absmax(model, tokens)
  scales = smooth_model(model, stats, alpha=0.5)
  assert min(float(np.ptp(np.log(s))) for s in scales.values()) > 0.5  # scales really vary
  assert scales["0.o_in"].shape == (jaxllm.TINY.num_kv_heads, jaxllm.TINY.head_dim)
  got = np.asarray(model(jnp.asarray(tokens))[0])
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
  # and the activation ranges moved as intended: amax_x / s (o's pooled per KV head)
  after = activation_absmax(model, tokens)
  for name in ("0.attn_in", "1.mlp_in", "1.down_in"):
    np.testing.assert_allclose(after[name], stats[name] / scales[name], rtol=1e-4)
  group = jaxllm.TINY.num_heads // jaxllm.TINY.num_kv_heads
  per_head = np.repeat(scales["1.o_in"], group, axis=0)
  np.testing.assert_allclose(after["1.o_in"], stats["1.o_in"] / per_head, rtol=1e-4)


def test_smoothing_per_input_alpha(tokens):
  """A per-input table smooths only the inputs it names, each with its own alpha."""
  model = _model_with_outliers()
  want = np.asarray(model(jnp.asarray(tokens))[0])
  stats = activation_absmax(model, tokens)
  table = (("attn_in", 0.8), ("o_in", 0.5), ("mlp_in", 0.5), ("down_in", None))
  scales = smooth_model(model, stats, alpha=table)
  assert {k.split(".", 1)[1] for k in scales} == {"attn_in", "o_in", "mlp_in"}
  at_08 = smooth_model(_model_with_outliers(), stats, alpha=0.8)
  at_05 = smooth_model(_model_with_outliers(), stats, alpha=0.5)
  np.testing.assert_array_equal(scales["0.attn_in"], at_08["0.attn_in"])
  np.testing.assert_array_equal(scales["1.mlp_in"], at_05["1.mlp_in"])
  assert not np.array_equal(at_08["1.mlp_in"], at_05["1.mlp_in"])
  # an input left out of a table is not smoothed either
  assert set(smooth_model(_model_with_outliers(), stats, (("o_in", 0.5),))) == {
    f"{i}.o_in" for i in range(jaxllm.TINY.num_layers)
  }
  got = np.asarray(model(jnp.asarray(tokens))[0])
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())
  after = activation_absmax(model, tokens)
  np.testing.assert_allclose(after["1.down_in"], stats["1.down_in"], rtol=1e-4)


def test_smoothing_alpha_table_bad_input():
  with pytest.raises(ValueError, match=r"unknown inputs \['attn'\]"):
    Recipe("x", "", (), (("attn", 0.5),))
  with pytest.raises(ValueError, match=r"alpha for down_in must lie in \[0, 1\], got 1.5"):
    Recipe("x", "", (), (("down_in", 1.5),))


def test_smoothing_helps_fireq_on_outliers(tokens):
  base = _model_with_outliers()
  want = np.asarray(base(jnp.asarray(tokens))[0])
  stats = activation_absmax(base, tokens)
  errs = {}
  for name in ("fireq_w4a8", "fireq_w4a8_no_smoothing"):
    # round-to-nearest weights: smoothing alone is compared (tests/test_gptq.py covers GPTQ)
    recipe = dataclasses.replace(get_recipe(name), gptq=False, act_order=False)
    model = apply_recipe(_model_with_outliers(), recipe, stats, tokens)
    got = np.asarray(model(jnp.asarray(tokens))[0])
    errs[name] = np.abs(got - want).max() / np.abs(want).max()
  assert errs["fireq_w4a8"] < errs["fireq_w4a8_no_smoothing"]


# ------------------------------------------------------------------ recipes, model, checkpoint


def test_recipe_rules_first_match_wins():
  recipe = Recipe(
    "mixed",
    "down stays float, the rest w8a8",
    (QuantRule(r"layers\.\d+\.mlp\.down", None), QuantRule(r"layers\..*", QuantSpec("w8a8"))),
  )
  model = apply_recipe(init_model(jaxllm.TINY, seed=0), recipe)
  assert isinstance(model.layers[0].attn.q.get_value(), QTensor)
  assert not isinstance(model.layers[0].mlp.down.get_value(), QTensor)
  assert {"fp32", "w8a8", "w4a16_g128", "fireq_w4a8"} <= RECIPES.keys()
  nbytes = weight_bytes(model)
  cfg = jaxllm.TINY
  down = cfg.num_layers * cfg.mlp_dim * cfg.embed_dim
  assert nbytes["linear_bf16_bytes"] == 2 * (
    cfg.num_layers * cfg.embed_dim * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    + cfg.num_layers * cfg.num_heads * cfg.head_dim * cfg.embed_dim
    + cfg.num_layers * 2 * cfg.embed_dim * cfg.mlp_dim
    + down
  )
  assert nbytes["model_bytes"] - nbytes["linear_bytes"] == 4 * (
    cfg.vocab_size * cfg.embed_dim + (2 * cfg.num_layers + 1) * cfg.embed_dim
  )


@pytest.mark.parametrize("method, group_size, bound", [("w8a8", 128, 0.05), ("w4a16", 32, 0.5)])
def test_quantized_model_generates_close_to_float(method, group_size, bound):
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 512, size=(2, 9)))
  want = np.asarray(init_model(jaxllm.TINY, seed=0)(tokens)[0])
  model = quantize_model(init_model(jaxllm.TINY, seed=0), method, group_size)
  assert isinstance(model.layers[1].attn.o.get_value(), QTensor)
  got = np.asarray(model(tokens)[0])
  err = np.abs(got - want).max() / np.abs(want).max()
  assert 1e-5 < err < bound
  out = jaxllm.Generator(model, prompt_bucket=8).generate([[1, 2, 3]], 4, stop_at_eos=False)
  assert len(out.tokens[0]) == 4


def test_quantized_checkpoint_round_trip(tmp_path, tokens):
  model = init_model(jaxllm.TINY, seed=0)
  apply_recipe(model, get_recipe("fireq_w4a8_no_smoothing"), calib_windows=tokens)
  layer1 = model.layers[1].attn
  layer1.q.set_value(
    quantize(init_model(jaxllm.TINY, seed=0).layers[1].attn.q.get_value(), "w4a16", 32)
  )
  size = checkpoint.save(model, tmp_path / "q")
  assert size > weight_bytes(model)["model_bytes"] * 0.5  # the quantized parts are on disk
  restored = checkpoint.restore(tmp_path / "q")
  for a, b in zip(model.layers, restored.layers):
    for name in ("q", "k", "v", "o"):
      qa, qb = getattr(a.attn, name).get_value(), getattr(b.attn, name).get_value()
      assert isinstance(qb, QTensor) and (qa.method, qa.shape, qa.k_pad) == (
        qb.method,
        qb.shape,
        qb.k_pad,
      )
      for key, arr in qa.parts.items():
        assert qb.parts[key].dtype == arr.dtype
        np.testing.assert_array_equal(
          np.asarray(qb.parts[key]).astype(np.float32), np.asarray(arr).astype(np.float32)
        )
  np.testing.assert_array_equal(model(jnp.asarray(tokens))[0], restored(jnp.asarray(tokens))[0])


@pytest.mark.parametrize("method, group_size", [("w4a16", 128), ("fireq_w4a8", 32)])
def test_clip_search_lowers_the_rounding_error(method, group_size):
  """Heavy-tailed weights: clipping the rare extremes beats covering them."""
  w = jax.random.t(jax.random.key(4), 3.0, (512, 128), jnp.float32) * 0.02
  plain = quantize(w, method, group_size)
  clipped = quantize(w, method, group_size, clip_search=True)
  err = [float(jnp.sum((q.dequantize() - w) ** 2)) for q in (plain, clipped)]
  # measured: w4a16 g128 -> well under 0.9x; fireq g32 (FP8-rounded scales) 1.857 vs 1.901
  assert err[1] < (0.9 if method == "w4a16" else 0.99) * err[0]
  if method == "fireq_w4a8":
    return  # FP8 rounding of the chosen scale can cost a group a little
  # never worse in any group: r = 1 (no clipping) is among the candidates
  g_err = [
    np.asarray(((q.dequantize() - w) ** 2).reshape(-1, group_size, 128).sum(1))
    for q in (plain, clipped)
  ]
  assert np.all(g_err[1] <= g_err[0] * (1 + 1e-5) + 1e-12)


# ------------------------------------------------------------------ smoothing search

_G32 = QuantSpec("w4a16", group_size=32)


def _linear_inputs(model, tokens) -> dict[str, np.ndarray]:
  """Each decoder linear's input over `tokens`, flattened to [tokens, K] (float64)."""
  taps = {}
  model(jnp.asarray(tokens), taps=taps)
  out = {}
  for name, x in taps.items():
    if name.split(".", 1)[1] in ("attn_in", "o_in", "mlp_in", "down_in"):
      x = np.asarray(x, np.float64)
      channels = x.shape[-2] * x.shape[-1] if name.endswith(".o_in") else x.shape[-1]
      out[name] = x.reshape(-1, channels)
  return out


def test_rounding_error_is_the_output_error_of_the_smoothed_layer():
  rng = np.random.default_rng(5)
  x = rng.standard_normal((40, 64)) * np.linspace(0.2, 6.0, 64)
  w = rng.standard_normal((64, 24)) * 0.1
  s = rng.uniform(0.5, 2.0, 64)
  hessian = 2.0 * x.T @ x / len(x)
  got = float(
    rounding_error(
      jnp.asarray(w, jnp.float32),
      jnp.asarray(s, jnp.float32),
      jnp.asarray(hessian, jnp.float32),
      _G32,
    )
  )
  w_s = (w * s[:, None]).astype(np.float32)
  err = np.asarray(_G32.quantize(jnp.asarray(w_s), 1).dequantize(), np.float64) - w_s
  want = 2.0 / len(x) * np.sum(((x / s) @ err) ** 2)
  assert want > 0
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_smoothed_hessians_equal_those_of_the_smoothed_model(tokens):
  model = _model_with_outliers()
  before = input_hessians(model, tokens)
  scales = smooth_model(model, activation_absmax(model, tokens), alpha=0.5)
  after = input_hessians(model, tokens)
  derived = smoothed_hessians(model, before, scales)
  assert set(derived) == set(after)
  for key in after:
    np.testing.assert_allclose(
      derived[key], after[key], rtol=0, atol=1e-4 * np.abs(after[key]).max(), err_msg=key
    )


def _output_error(model, key, x, s) -> float:
  """||X/s (Q(W s) - W s)||^2 summed over the consumers of input `key`, from its inputs x."""
  layer, name = model.layers[int(key.split(".")[0])], key.split(".")[1]
  rows = consumer_row_scales(model, key, s)
  total = 0.0
  for module, weight, _ in CONSUMERS[name]:
    w = np.asarray(getattr(getattr(layer, module), weight).get_value())
    w_s = (w.reshape(x.shape[1], -1) * rows[:, None]).astype(np.float32)
    err = np.asarray(_G32.quantize(jnp.asarray(w_s), 1).dequantize(), np.float64) - w_s
    total += np.sum(((x / rows) @ err) ** 2)
  return total


def test_search_keeps_the_candidate_of_least_output_error(tokens):
  """Checked against each candidate's output error recomputed from the raw inputs."""
  model = _model_with_outliers()
  stats = activation_absmax(model, tokens)
  inputs = _linear_inputs(model, tokens)
  grid = (0.3, 0.5, 0.8)
  scales, chosen = search_smoothing(
    model, stats, input_hessians(model, tokens), lambda _: _G32, grid
  )
  assert set(chosen) == {f"{i}.{n}" for i in range(2) for n in CONSUMERS}
  assert len(set(chosen.values())) > 1  # not one alpha everywhere
  for key, alpha in chosen.items():
    i, name = int(key.split(".")[0]), key.split(".")[1]
    ranges = input_ranges(model, stats, i, name)
    errors = {a: _output_error(model, key, inputs[key], smoothing_scales(*ranges, a)) for a in grid}
    errors[None] = _output_error(model, key, inputs[key], np.ones_like(ranges[1]))
    assert errors[alpha] <= min(errors.values()) * (1 + 1e-3), (key, errors)
    if alpha is None:
      assert key not in scales
    else:
      np.testing.assert_array_equal(scales[key], smoothing_scales(*ranges, alpha))


@pytest.mark.parametrize("gptq", [False, True])
def test_alpha_grid_recipe_beats_one_alpha(tokens, gptq):
  """The search (through GPTQ's error when the recipe uses GPTQ) beats alpha = 0.5,
  which is one of its candidates (end to end: 1.29 vs 1.46 RTN, 0.49 vs 0.55 GPTQ)."""
  base = _model_with_outliers()
  want = np.asarray(base(jnp.asarray(tokens))[0])
  stats = activation_absmax(base, tokens)
  rules = (QuantRule(".*", _G32),)
  fixed = Recipe("fixed", "", rules, smoothing_alpha=0.5, gptq=gptq)
  searched = Recipe("grid", "", rules, alpha_grid=(0.3, 0.5, 0.8), gptq=gptq)
  errs = {}
  for recipe in (fixed, searched):
    model = apply_recipe(_model_with_outliers(), recipe, stats, tokens)
    got = np.asarray(model(jnp.asarray(tokens))[0])
    errs[recipe.name] = np.abs(got - want).mean()
  assert errs["grid"] < errs["fixed"], errs


def test_alpha_grid_bad_input(tokens):
  with pytest.raises(ValueError, match="smoothing_alpha or alpha_grid"):
    Recipe("x", "", (), smoothing_alpha=0.5, alpha_grid=(0.5,))
  with pytest.raises(ValueError, match=r"alpha_grid values must lie in \[0, 1\]"):
    Recipe("x", "", (), alpha_grid=(0.5, 1.2))
  recipe = Recipe("x", "", (QuantRule(".*", _G32),), alpha_grid=(0.5,))
  model = _model_with_outliers()
  with pytest.raises(ValueError, match="needs calibration windows"):
    apply_recipe(model, recipe, activation_absmax(model, tokens))
