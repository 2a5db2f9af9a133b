"""TokenWeave block (two token halves; reduce-scatter -> add -> RMSNorm -> all-gather) ==
the unsplit tensor-parallel block (psum) == a float64 numpy reference, on 8 CPU devices."""

from __future__ import annotations

import functools
import re

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from sharding import tokenweave as tw

T, E, F = 32, 64, 128
CFG = tw.BlockConfig(num_heads=16, num_kv_heads=8, head_dim=16)


def reference_block(x, w: tw.BlockWeights, cfg: tw.BlockConfig) -> np.ndarray:
  """The block in float64 numpy, one head at a time, no mesh."""
  x = np.asarray(x, np.float64)
  an, wq, wk, wv, wo, mn, wg, wu, wd = (np.asarray(a, np.float64) for a in w)
  t = x.shape[0]

  def norm(a, scale):
    return a / np.sqrt((a * a).mean(-1, keepdims=True) + cfg.rms_eps) * scale

  def rope(a):  # [t, heads, d]
    if cfg.rope_theta is None:
      return a
    half = a.shape[-1] // 2
    ang = np.arange(t)[:, None] * cfg.rope_theta ** (-np.arange(half) / half)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    a1, a2 = a[..., :half], a[..., half:]
    return np.concatenate([a1 * cos - a2 * sin, a2 * cos + a1 * sin], -1)

  n1 = norm(x, an)
  q = rope(np.einsum("te,ehd->thd", n1, wq))
  k = rope(np.einsum("te,ehd->thd", n1, wk))
  v = np.einsum("te,ehd->thd", n1, wv)
  group = cfg.num_heads // cfg.num_kv_heads
  heads = np.zeros_like(q)
  causal = np.tril(np.ones((t, t), bool))
  for h in range(cfg.num_heads):
    s = np.where(causal, q[:, h] @ k[:, h // group].T / np.sqrt(cfg.head_dim), -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    heads[:, h] = (p / p.sum(-1, keepdims=True)) @ v[:, h // group]
  hid = x + np.einsum("thd,hde->te", heads, wo)
  n2 = norm(hid, mn)
  gate = n2 @ wg
  return hid + (gate / (1 + np.exp(-gate)) * (n2 @ wu)) @ wd


def _rel(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def _mesh(n: int) -> Mesh:
  return Mesh(np.array(jax.devices()[:n]), ("tensor",))


def _counts(hlo: str) -> dict[str, list[str]]:
  """Result shapes of each collective instruction in compiled HLO text."""
  out = {}
  for op in ("all-reduce", "reduce-scatter", "all-gather", "collective-permute"):
    out[op] = re.findall(rf"= (\S+) {op}(?:-start)?\(", hlo)
  return out


# (tensor axis size, rope_theta): RoPE on for tensor 4 and 8, omitted for tensor 2.
CASES = [(4, 10000.0), (8, 10000.0), (2, None)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"tensor{c[0]}-rope{c[1]}")
def case(request):
  n, theta = request.param
  cfg = tw.BlockConfig(CFG.num_heads, CFG.num_kv_heads, CFG.head_dim, rope_theta=theta)
  w = tw.init_block_weights(0, cfg, E, F)
  x = np.random.default_rng(1).standard_normal((T, E)).astype(np.float32)
  mesh = _mesh(n)
  xw = tw.weave_tokens(x, n)
  base = jax.jit(lambda x, w: tw.baseline_block(x, w, cfg, mesh)).lower(x, w).compile()
  weave = jax.jit(lambda x, w: tw.tokenweave_block(x, w, cfg, mesh)).lower(xw, w).compile()
  return dict(n=n, cfg=cfg, w=w, x=x, xw=xw, base=base, weave=weave)


def test_tokenweave_equals_baseline_and_reference(case):
  n, w, x = case["n"], case["w"], case["x"]
  want = reference_block(x, w, case["cfg"])
  base = np.asarray(case["base"](x, w))
  woven = np.asarray(case["weave"](case["xw"], w))
  weave = tw.unweave_tokens(woven, n)
  assert _rel(base, want) < 1e-5, _rel(base, want)
  assert _rel(weave, want) < 1e-5, _rel(weave, want)
  assert _rel(weave, base.astype(np.float64)) < 1e-5
  # Blocks chain in the woven, token-sharded layout: a second block needs no re-layout.
  twice = tw.unweave_tokens(np.asarray(case["weave"](woven, w)), n)
  want2 = reference_block(want, w, case["cfg"])
  assert _rel(twice, want2) < 1e-5, _rel(twice, want2)


def test_tokenweave_hlo_has_reduce_scatter_and_all_gather_not_all_reduce(case):
  n = case["n"]
  weave = _counts(case["weave"].as_text())
  base = _counts(case["base"].as_text())
  # Per half: reduce-scatter after o and after down, each to this device's token shard.
  assert weave["reduce-scatter"] == [f"f32[{T // 2 // n},{E}]{{1,0}}"] * 4, weave
  # Per half: all-gather of the normed tokens before q/k/v and before gate/up.
  assert weave["all-gather"] == [f"f32[{T // 2},{E}]{{1,0}}"] * 4, weave
  assert weave["all-reduce"] == [] and weave["collective-permute"] == [], weave
  # The unsplit block all-reduces the full [T, E] partial sums, twice.
  assert base["all-reduce"] == [f"f32[{T},{E}]{{1,0}}"] * 2, base
  assert base["reduce-scatter"] == [] and base["all-gather"] == [], base


def test_weave_round_trip():
  x = np.arange(24)[:, None] * np.ones((1, 3))
  woven = tw.weave_tokens(x, 3)
  # Device 0 holds tokens 0..3 of half A, then 12..15 of half B.
  np.testing.assert_array_equal(woven[:8, 0], [0, 1, 2, 3, 12, 13, 14, 15])
  np.testing.assert_array_equal(tw.unweave_tokens(woven, 3), x)


@functools.cache
def _weights(mlp: int = F) -> tw.BlockWeights:
  return tw.init_block_weights(0, CFG, E, mlp)


def _bad(**over):
  w = _weights()
  x = np.zeros((T, E), np.float32)
  args = dict(x=x, weights=w, cfg=CFG, mesh=_mesh(4))
  args.update(over)
  return args


@pytest.mark.parametrize(
  "fn", [tw.tokenweave_block, tw.baseline_block], ids=["tokenweave", "baseline"]
)
@pytest.mark.parametrize(
  "over, match",
  [
    (dict(cfg=tw.BlockConfig(12, 6, 16)), "num_kv_heads 6 .* not divisible by mesh axis 'tensor'"),
    (dict(cfg=tw.BlockConfig(16, 3, 16)), "num_heads 16 not divisible by num_kv_heads 3"),
    (dict(mesh=Mesh(np.array(jax.devices()[:4]), ("data",))), "mesh axis 'tensor' not in"),
    (dict(x=np.zeros((2, T, E), np.float32)), r"x must be \[T, E\]"),
    (dict(x=np.zeros((T, E + 1), np.float32)), "weight attn_norm has shape"),
    (dict(x=np.zeros((T, E), np.float16)), "dtype float32 differs from x float16"),
  ],
)
def test_bad_input_one_line(fn, over, match):
  with pytest.raises(ValueError, match=match) as e:
    fn(**_bad(**over))
  assert "\n" not in str(e.value)


def test_token_count_must_split_over_halves_and_axis():
  # 36 tokens: divisible by 4 (the axis) but not by 2 x 4; the baseline takes it.
  with pytest.raises(ValueError, match="token count 36 not divisible by 2 x mesh axis") as e:
    tw.tokenweave_block(**_bad(x=np.zeros((36, E), np.float32)))
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="token count 36 not divisible by 2 x axis size = 8"):
    tw.weave_tokens(np.zeros((36, E)), 4)
  mlp = _weights(130)
  with pytest.raises(ValueError, match="mlp width 130 not divisible by mesh axis 'tensor'"):
    tw.tokenweave_block(**_bad(weights=mlp))
