"""EasySpec (issue 27, item 2d): layer-parallel groups against sequential layers and an
independent jnp reference, the KV calibration pass against a fresh prefill, greedy identity
of `SpeculativeGenerator` with the EasySpec draft, and its bad inputs.

The model is the tiny config with 4 layers (TINY has 2: a draft shallower than the target
could not form a group of two), its embeddings scaled by 0.05 as in test_speculative.py so
that greedy output varies and drafts are accepted in part.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from speculative_helpers import greedy_tokens, random_prompts, steered

import jaxllm
from jaxllm import layer_parallel
from jaxllm.drafts import EasySpecDraft
from jaxllm.kv_cache import DenseKVCache
from jaxllm.params import init_model
from jaxllm.sampling import SamplingConfig
from jaxllm.speculative import SpeculativeConfig, SpeculativeGenerator

CACHE, BUCKET, NEW = 96, 16, 24
DEPTH, DRAFT_LAYERS = 4, 3


@pytest.fixture(scope="module")
def model():
  return steered(init_model(jaxllm.TINY.replace(num_layers=DEPTH), seed=1))


@pytest.fixture(scope="module")
def draft_model(model):
  """The target's first DRAFT_LAYERS layers as a model (the draft's layers)."""
  draft = EasySpecDraft(model, DRAFT_LAYERS, 1, fuse=False)
  return draft._build(draft.params["model"])


@pytest.fixture(scope="module")
def chunk():
  """Two rows of 6 tokens, row 1 left-padded by 2 (start = [0, 2])."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 512, (2, 6)), jnp.int32)
  return tokens, jnp.asarray([0, 2], jnp.int32)


def _empty(draft_model, start, capacity=8):
  return DenseKVCache.create(draft_model.config, 2, capacity, jnp.float32, start)


def _forward(draft_model, tokens, start, group_size, fuse):
  """Hidden states [B, S, E] and cache after `tokens` from an empty cache (jitted)."""
  groups = layer_parallel.layer_groups(DRAFT_LAYERS, group_size)
  fused = None
  if fuse:
    fused = [layer_parallel.fuse_group([draft_model.layers[i] for i in g], g[0]) for g in groups]
  graphdef, state = nnx.split(draft_model)

  @jax.jit
  def run(state, fused, tokens, start):
    cache = _empty(draft_model, start)
    return layer_parallel.forward(nnx.merge(graphdef, state), tokens, cache, groups, fused)

  return run(state, fused, tokens, start)


# -- an independent jnp decoder layer --------------------------------------------------


def _ref_delta(p, x, positions, start, cfg):
  """layer(x) - x for one decoder layer with parameters `p` (pure dict), x [B, S, E],
  causal attention within the chunk from each row's `start`."""

  def norm(y, scale):
    return y * jax.lax.rsqrt(jnp.mean(y * y, -1, keepdims=True) + cfg.norm_eps) * scale

  def rope(t):  # [B, S, H, D], half-split pairs (i, i + D/2)
    half = t.shape[-1] // 2
    freq = cfg.rope_theta ** (-np.arange(half, dtype=np.float32) * 2 / t.shape[-1])
    ang = positions[:, :, None, None].astype(jnp.float32) * freq
    a, b = t[..., :half], t[..., half:]
    return jnp.concatenate(
      [a * jnp.cos(ang) - b * jnp.sin(ang), b * jnp.cos(ang) + a * jnp.sin(ang)], -1
    )

  hp = jax.lax.Precision.HIGHEST
  h = norm(x, p["attn_norm"]["scale"])
  q = rope(jnp.einsum("bse,ehd->bshd", h, p["attn"]["q"], precision=hp))
  k = rope(jnp.einsum("bse,ehd->bshd", h, p["attn"]["k"], precision=hp))
  v = jnp.einsum("bse,ehd->bshd", h, p["attn"]["v"], precision=hp)
  rep = cfg.num_heads // cfg.num_kv_heads
  k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  s = x.shape[1]
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=hp) / np.sqrt(cfg.head_dim)
  slot = jnp.arange(s)
  causal = slot[None, :] <= slot[:, None]
  # padding queries see only themselves (finite values; no valid query reads them)
  visible = (causal[None] & (slot[None, None, :] >= start[:, None, None])) | jnp.eye(s, dtype=bool)
  scores = jnp.where(visible[:, None], scores, -jnp.inf)
  att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), v, precision=hp)
  attn = jnp.einsum("bshd,hde->bse", att, p["attn"]["o"], precision=hp)
  mid = x + attn
  m = norm(mid, p["mlp_norm"]["scale"])
  g = jnp.einsum("bse,ef->bsf", m, p["mlp"]["gate"], precision=hp)
  u = jnp.einsum("bse,ef->bsf", m, p["mlp"]["up"], precision=hp)
  return attn + jnp.einsum("bsf,fe->bse", jax.nn.silu(g) * u, p["mlp"]["down"], precision=hp)


def _ref_forward(draft_model, tokens, start, group_size):
  params = nnx.split(draft_model)[1].to_pure_dict()
  return _ref_jit(params, tokens, start, draft_model.config, group_size)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _ref_jit(params, tokens, start, cfg, group_size):
  x = jnp.take(params["embed"], tokens, axis=1).transpose(1, 2, 0)
  positions = jnp.maximum(jnp.arange(tokens.shape[1])[None] - start[:, None], 0)
  for group in layer_parallel.layer_groups(DRAFT_LAYERS, group_size):
    x = x + sum(_ref_delta(params["layers"][i], x, positions, start, cfg) for i in group)
  return x


def _rel(a, b, valid):
  a, b = np.asarray(a)[valid], np.asarray(b)[valid]
  return float(np.abs(a - b).max() / np.abs(b).max())


def _valid(start, s):
  return np.arange(s)[None, :] >= np.asarray(start)[:, None]  # [B, S] non-padding


@pytest.mark.parametrize("fuse", [False, True])
def test_group_size_one_is_the_sequential_model(draft_model, chunk, fuse):
  tokens, start = chunk
  hidden, cache = _forward(draft_model, tokens, start, 1, fuse)
  graphdef, state = nnx.split(draft_model)
  want, want_cache = jax.jit(lambda t, s: nnx.merge(graphdef, state)(t, start=s))(tokens, start)
  valid = _valid(start, tokens.shape[1])
  assert _rel(layer_parallel.logits(draft_model, hidden), want, valid) < 1e-5
  for layer in range(DRAFT_LAYERS):
    got_k = cache.view(cache.keys[layer])[:, :, : tokens.shape[1]].transpose(0, 2, 1, 3)
    want_k = want_cache.view(want_cache.keys[layer]).transpose(0, 2, 1, 3)
    assert _rel(got_k, want_k, valid) < 1e-5
  # the reference, run sequentially, is the model too (so it checks the groups below)
  ref = _ref_forward(draft_model, tokens, start, 1)
  assert _rel(ref, hidden, valid) < 1e-5


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("group_size", [2, 3])
def test_groups_sum_the_deltas_of_one_input(draft_model, chunk, group_size, fuse):
  """Groups (0, 1), (2) and (0, 1, 2): each layer of a group reads the group's input;
  equal to the jnp reference, and far from the sequential layers."""
  tokens, start = chunk
  hidden, cache = _forward(draft_model, tokens, start, group_size, fuse)
  valid = _valid(start, tokens.shape[1])
  ref = _ref_forward(draft_model, tokens, start, group_size)
  assert _rel(hidden, ref, valid) < 1e-5
  sequential = _ref_forward(draft_model, tokens, start, 1)
  assert _rel(hidden, sequential, valid) > 1e-2
  assert np.asarray(cache.length).tolist() == [tokens.shape[1]] * 2


# -- calibration and greedy identity ----------------------------------------------------


@pytest.fixture(scope="module")
def prompts():
  return random_prompts()


@pytest.fixture(scope="module")
def reference(model, prompts):
  return greedy_tokens(model, prompts, NEW, CACHE, BUCKET)


@pytest.fixture(scope="module")
def generators(model):
  made = {}

  def get(gamma):
    if gamma not in made:
      draft = EasySpecDraft(model, DRAFT_LAYERS, 2, fuse=True)
      made[gamma] = SpeculativeGenerator(
        model, draft, SpeculativeConfig(gamma), max_cache_len=CACHE, prompt_bucket=BUCKET
      )
    return made[gamma]

  return get


def test_calibration_leaves_the_cache_of_a_fresh_prefill(generators, draft_model, prompts):
  """After each verify step (rows accepting different numbers of drafts), the calibration
  pass leaves in the draft's cache exactly the keys and values of a fresh prefill of each
  row's tokens through the draft's layers, where the drafting steps had left approximate
  ones (checked too, so the test can fail)."""
  gen = generators(4)
  draft, greedy = gen.draft, SamplingConfig()
  calibrate = jax.jit(draft.calibrate, static_argnames="width")
  prefill = jax.jit(lambda t, s: draft_model(t, start=s, logits_at="last")[1])
  loop, _, _ = gen._begin(prompts, NEW, greedy, jax.random.key(0), False)
  start = np.asarray(loop.cache.start)

  def errors(cache, fresh, layer, count):
    """Per row, relative error of `cache`'s keys and values against `fresh` in the slots
    the row holds (left padding excluded)."""
    out = []
    for got, want in ((cache.keys, fresh.keys), (cache.values, fresh.values)):
      g, w = np.asarray(cache.view(got[layer])), np.asarray(fresh.view(want[layer]))
      for row in range(3):
        s, c = start[row], count[row]
        out.append(np.abs(g[row, :, s:c] - w[row, :, s:c]).max() / np.abs(w[row, :, s:c]).max())
    return np.array(out)

  before = []
  for _ in range(3):
    loop, _, _, _, _ = gen._iterate(loop, jax.random.key(1), greedy, False)
    history, count = loop.history, np.asarray(loop.count)
    fresh = prefill(history, jnp.asarray(start))  # causal: the slots below count are exact
    before.append(errors(loop.draft_state, fresh, DRAFT_LAYERS - 1, count).max())
    state, _ = calibrate(draft.params, loop.draft_state, history, loop.count, width=5)
    np.testing.assert_array_equal(np.asarray(state.length), count)
    for layer in range(DRAFT_LAYERS):
      err = errors(state, fresh, layer, count)
      assert err.max() < 1e-5, (layer, err)
  assert min(before) > 1e-2, before  # layer-parallel keys and values before calibration


@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_output_is_the_targets_own(generators, prompts, reference, gamma):
  """Batch 3 (prompts of 5, 17 and 9 tokens) and, at gamma 4, batch 1: the target's greedy
  tokens, streamed alike; rows accept different numbers of drafts."""
  gen = generators(gamma)
  for rows in (3, 1) if gamma == 4 else (3,):
    streamed = []
    out = gen.generate(prompts[:rows], NEW, stop_at_eos=False, on_tokens=streamed.append)
    assert out.tokens == reference[:rows]
    stats = out.stats
    assert 0 < sum(stats.accepted) < sum(stats.drafted)
    streamed = np.stack(streamed, 1)
    assert [row[row >= 0].tolist() for row in streamed] == reference[:rows]
    if rows > 1:
      assert len(set(stats.accepted)) > 1


def test_bad_inputs(model):
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match="EasySpecDraft: group_size must be an int >= 1"):
      EasySpecDraft(model, 2, bad)
  with pytest.raises(ValueError, match="EasySpecDraft: num_layers=4 is as deep as the target"):
    EasySpecDraft(model, 4, 2)
  with pytest.raises(ValueError, match="EasySpecDraft: num_layers must be an int >= 1"):
    EasySpecDraft(model, 0, 2)
  assert EasySpecDraft(model, 3, 2).groups == ((0, 1), (2,))  # the last group ragged
  assert EasySpecDraft(model, 3, 5).groups == ((0, 1, 2),)
  with pytest.raises(ValueError, match="do not cover the model's 3 layers"):
    layer_parallel.forward(
      EasySpecDraft(model, 3, 1)._build(EasySpecDraft(model, 3, 1).params["model"]),
      jnp.zeros((1, 1), jnp.int32),
      None,
      ((0, 1),),
    )
