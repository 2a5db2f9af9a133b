"""Sparse attention methods over KV caches (`jaxllm.sparse_attention`): SparQ against a
float64 numpy loop, the cache seam (every cache format, prefill and decode), MoBA
through the model, KIVI's block means from group statistics, the one-pass / streaming
equality the runner relies on, the bytes-read accounting, and bad input.

Tolerances: float32 outputs within 1e-5 of float64 loops (values O(1), sums of < 100
terms); logits of two float32 paths computing the same attention within 1e-5 relative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from op_test_base import fast_jit, pallas_call_names

import jaxllm
from jaxllm import kv_cache, ops
from jaxllm.params import init_model
from jaxllm.perplexity import make_nll_fn
from jaxllm.sparse_attention import MoBA, SparQ, attend, kv_read_fraction, sparq_attention
from jaxllm.streaming import StreamingConfig, StreamingScorer
from pallas_kernels.block_sparse_attention import pool_keys, route

CFG = jaxllm.TINY  # 6 query / 2 KV heads of 64, 2 layers


def _inputs(b=2, s=5, t=24, hq=6, hkv=2, d=16, seed=0, starts=(0, 3)):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((b, s, hq, d)).astype(np.float32)
  k = rng.standard_normal((b, hkv, t, d)).astype(np.float32)
  v = rng.standard_normal((b, hkv, t, d)).astype(np.float32)
  q_slots = np.broadcast_to(t - s + np.arange(s, dtype=np.int32), (b, s)).copy()
  return q, k, v, q_slots, np.asarray(starts, np.int32)


def _softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def _numpy_sparq(q, k, v, q_slots, start, r, top, correction):
  """SparQ per query, float64, as the paper states it (group-shared channels and slots)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, s, hq, d = q.shape
  hkv = k.shape[1]
  g = hq // hkv
  out = np.zeros((b, s, hq, d))
  for bi in range(b):
    for si in range(s):
      vis = np.arange(start[bi], q_slots[bi, si] + 1)
      for h in range(hkv):
        qs = q[bi, si, h * g : (h + 1) * g]  # [G, D]
        channels = np.argsort(-np.abs(qs).sum(0), kind="stable")[:r]
        keys, values = k[bi, h, vis], v[bi, h, vis]
        approx = []
        for j in range(g):
          share = np.abs(qs[j, channels]).sum() / np.abs(qs[j]).sum()
          approx.append(keys[:, channels] @ qs[j, channels] / np.sqrt(d * share))
        probs = [_softmax(a) for a in approx]
        chosen = np.argsort(-np.sum(probs, 0), kind="stable")[:top]
        for j in range(g):
          exact = keys[chosen] @ qs[j] / np.sqrt(d)
          w = np.exp(exact - exact.max())
          sparse = w @ values[chosen] / w.sum()
          if correction == "mean_v":
            alpha = probs[j][chosen].sum()
            res = alpha * sparse + (1 - alpha) * values.mean(0)
          elif correction == "rescale":
            res = probs[j][chosen].sum() * sparse
          else:
            res = sparse
          out[bi, si, h * g + j] = res
  return out


@pytest.mark.parametrize("correction", ["mean_v", "rescale", "none"])
def test_sparq_matches_a_float64_loop(correction):
  q, k, v, q_slots, start = _inputs()
  method = SparQ(r=4, k=6, correction=correction)
  got = np.asarray(jax.jit(sparq_attention, static_argnums=5)(q, k, v, q_slots, start, method))
  want = _numpy_sparq(q, k, v, q_slots, start, 4, 6, correction)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_sparq_per_head_is_the_loop_with_one_query_head_per_kv_head():
  """per_head: each query head chooses its own channels and slots (the float64 loop over
  K/V repeated per query head, so every group holds one head)."""
  q, k, v, q_slots, start = _inputs(seed=3)
  got = sparq_attention(q, k, v, q_slots, start, SparQ(r=4, k=6, correction="none", per_head=True))
  rep = [np.repeat(x, 3, axis=1) for x in (k, v)]
  want = _numpy_sparq(q, *rep, q_slots, start, 4, 6, "none")
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_route_keeps_sink_blocks():
  """sink_blocks=1: every tile past the first keeps the row's first valid block even when
  it scores lowest (keys of block kv_start // block very negative along the queries)."""
  rng = np.random.default_rng(8)
  q = np.abs(rng.standard_normal((1, 128, 2, 8))).astype(np.float32)
  keys = np.abs(rng.standard_normal((1, 1, 8, 8))).astype(np.float32)
  keys[:, :, 1] = -10.0  # the first valid block (kv_start = 20)
  slots, start = np.arange(128, dtype=np.int32)[None] + 0, np.array([20], np.int32)
  args = (q, keys, slots, start)
  plain = np.asarray(route(*args, block_q=16, block_k=16, top_k=3))
  sinks = np.asarray(route(*args, block_q=16, block_k=16, top_k=3, sink_blocks=1))
  assert not (plain[0, 0, 4:] == 1).any()  # tiles 4.. have better blocks than 1
  assert (sinks[0, 0, 4:] == 1).any(-1).all()
  np.testing.assert_array_equal(sinks[0, 0, :4], plain[0, 0, :4])  # block 1 chosen anyway
  with pytest.raises(ValueError, match="MoBA: sink_blocks 2 must be >= 0 and below top_k 2"):
    MoBA(top_k=2, sink_blocks=2)


@pytest.mark.parametrize("correction", ["mean_v", "rescale", "none"])
def test_sparq_with_k_covering_every_slot_is_dense_attention(correction):
  """k >= the visible slots: every slot is read exactly, whatever r and the correction."""
  q, k, v, q_slots, start = _inputs(seed=1)
  got = sparq_attention(q, k, v, q_slots, start, SparQ(r=2, k=24, correction=correction))
  want = ops.attention(*(jnp.asarray(x) for x in (q, k, v, q_slots, start)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def _forward(model):
  """The model as a jitted ``(tokens, cache) -> (logits, cache)``."""
  graphdef, state = nnx.split(model)
  run = fast_jit(lambda st, tokens, cache: nnx.merge(graphdef, st)(tokens, cache=cache))
  return lambda tokens, cache: run(state, tokens, cache)


def _decode_logits(cache, forward, tokens, steps):
  """Prefill all but the last `steps` tokens, then decode those one at a time: logits [B, steps, V]."""
  _, cache = forward(tokens[:, :-steps], cache)
  out = []
  for i in range(steps):
    col = tokens.shape[1] - steps + i
    step_logits, cache = forward(tokens[:, col : col + 1], cache)
    out.append(step_logits)
  return np.asarray(jnp.concatenate(out, axis=1))


COVER_SPARQ, COVER_MOBA = SparQ(r=8, k=192), MoBA(block_size=32, top_k=6, query_tile=32)
SPARSE_SPARQ, SPARSE_MOBA = SparQ(r=8, k=16), MoBA(block_size=32, top_k=2, query_tile=32)


@pytest.mark.parametrize(
  "cache_name, covering, sparse",
  [
    ("dense", (COVER_SPARQ, COVER_MOBA), (SPARSE_SPARQ, SPARSE_MOBA)),
    ("kivi4", (COVER_SPARQ, COVER_MOBA), (SPARSE_SPARQ, SPARSE_MOBA)),
    ("int8", (COVER_MOBA,), (SPARSE_SPARQ,)),
    ("kivi2", (COVER_SPARQ,), (SPARSE_MOBA,)),
  ],
)
def test_every_cache_runs_each_method_and_covering_methods_equal_full_attention(
  cache_name, covering, sparse
):
  """Over each cache format, prefill then decode: SparQ with k over every slot and MoBA
  with every block selected give full attention's logits over that same cache; a real
  sparse point runs and moves the logits."""
  forward = _forward(init_model(CFG, seed=0))
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 160)), jnp.int32)
  spec = kv_cache.spec_for(cache_name)

  def run(method):
    cache = kv_cache.create_cache(spec, CFG, 2, 192, attention=method)
    return _decode_logits(cache, forward, tokens, 3)

  full = run(None)
  scale = np.abs(full).max()
  for method in covering:
    err = np.abs(run(method) - full).max() / scale
    assert err <= 1e-5, (method, err)
  for method in sparse:
    moved = np.abs(run(method) - full).max() / scale
    assert 1e-4 < moved < 1.0, (method, moved)


def test_moba_changes_only_queries_that_see_more_than_top_k_blocks():
  """Dense cache, one chunk of 96 tokens, blocks of 16, top 2: query tiles in the first
  two blocks see every block anyway (logits equal full attention's); later ones do not."""
  forward = _forward(init_model(CFG, seed=0))
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (1, 96)), jnp.int32)

  def logits(method):
    cache = kv_cache.create_cache(kv_cache.spec_for("dense"), CFG, 1, 96, attention=method)
    return np.asarray(forward(tokens, cache)[0])

  full, moba = logits(None), logits(MoBA(block_size=16, top_k=2, query_tile=16))
  scale = np.abs(full).max()
  assert np.abs(moba[:, :32] - full[:, :32]).max() / scale <= 1e-5
  assert np.abs(moba[:, 48:] - full[:, 48:]).max() / scale > 1e-4


def test_moba_over_kivi_routes_by_group_statistics():
  """KIVI-4 after 192 tokens (some groups quantized, the rest in the window): the block
  means it derives from scale, zero point and mean code equal the pooled means of the
  keys as attention reads them, and route to the same blocks."""
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 192)), jnp.int32)
  cache = kv_cache.create_cache(kv_cache.spec_for("kivi4"), CFG, 2, 256)
  _, cache = _forward(init_model(CFG, seed=0))(tokens, cache)
  assert int(cache.quantized_length[0]) > 0
  stored = cache.layers[0]
  k_chunk = jnp.asarray(np.random.default_rng(5).standard_normal((2, 1, 2, 64)), jnp.float32)
  k_view, _ = cache.stored_view(stored)
  k_view = kv_cache.base.insert_chunk(k_view, k_chunk, cache.length)
  from_stats = jax.jit(cache.block_key_means, static_argnums=(2, 3))(
    stored, k_chunk, k_view.shape[2], 64
  )
  pooled = pool_keys(k_view, cache.start, 64)
  full_blocks = 192 // 64  # blocks wholly before the new token
  np.testing.assert_allclose(
    np.asarray(from_stats)[:, :, :full_blocks], np.asarray(pooled)[:, :, :full_blocks], atol=1e-5
  )
  q = jnp.asarray(np.random.default_rng(6).standard_normal((2, 1, 6, 64)), jnp.float32)
  slots = cache.length[:, None]
  pick = lambda keys: route(q, keys, slots, cache.start, block_q=1, block_k=64, top_k=2)  # noqa: E731
  np.testing.assert_array_equal(np.asarray(pick(from_stats)), np.asarray(pick(pooled)))


def test_sparq_one_pass_scores_as_streaming_decode():
  """The runner's dense SparQ points run each window as one chunk: with per-query top-k
  that equals prefill + one token per decode step over a dense cache (NLL sums)."""
  model = init_model(CFG, seed=0)
  windows = np.random.default_rng(7).integers(0, CFG.vocab_size, (2, 48)).astype(np.int32)
  method = SparQ(r=8, k=8)
  factory = kv_cache.cache_factory("dense", CFG, attention=method)
  one_pass = np.asarray(make_nll_fn(model, factory)(windows))
  scorer = StreamingScorer(
    model, factory, StreamingConfig(prefill=6, block=8, batch_size=2, capacity_multiple=8)
  )
  nll, _ = scorer.score_batch(windows)
  np.testing.assert_allclose(nll.sum(1), one_pass, rtol=1e-5)
  dense = np.asarray(make_nll_fn(model, kv_cache.cache_factory("dense", CFG))(windows))
  assert np.abs(dense - one_pass).max() > 1e-3  # the sparse point is not dense attention


def test_kv_read_fraction_counts_what_each_method_touches():
  """Hand-computed bytes for one window: 130 tokens, D=64, bf16 K/V (128 bytes each)."""
  kb = vb = 128.0
  t = np.arange(1, 130, dtype=np.float64)
  dense = t * 256
  sparq = kv_read_fraction(SparQ(r=16, k=64), 130, 64, kb, vb)
  # a step that would read more than dense reads dense
  read = np.minimum(np.where(t <= 64, t * 256, t * 128 * 16 / 64 + 64 * 256 + 128), t * 256)
  row = np.minimum(np.where(t <= 64, t * 256, t * 128 + 64 * 256 + 128), t * 256)
  assert sparq["kv_read_fraction"] == pytest.approx(read.sum() / dense.sum())
  assert sparq["kv_read_fraction_row_major"] == pytest.approx(row.sum() / dense.sum())
  assert sparq["kv_read_fraction_at_context"] == pytest.approx(read[-1] / dense[-1])
  moba = kv_read_fraction(MoBA(block_size=32, top_k=2), 130, 64, kb, vb)
  j = t - 1
  tokens = j % 32 + 1 + np.minimum(1, j // 32) * 32
  assert moba["kv_read_fraction"] == pytest.approx(
    (tokens * 256 + (j // 32) * 128).sum() / dense.sum()
  )
  assert kv_read_fraction(MoBA(block_size=32, top_k=5), 130, 64, kb, vb)["kv_read_fraction"] > 1
  assert kv_read_fraction(None, 130, 64, kb, vb)["kv_read_fraction"] == 1.0
  # per_head, 3 query heads per KV head: 3 * 16 channels and 3 * 64 rows, at most dense.
  heads = kv_read_fraction(SparQ(r=16, k=64, per_head=True), 130, 64, kb, vb, group=3)
  per_head = np.where(t <= 64, t * 256, np.minimum(t * 128 * 48 / 64 + t * 256 + 128, t * 256))
  assert heads["kv_read_fraction"] == pytest.approx(per_head.sum() / dense.sum())


@pytest.mark.parametrize(
  "make, match",
  [
    (lambda: SparQ(r=0, k=4), "SparQ: r must be an int >= 1"),
    (lambda: SparQ(r=4, k=4, correction="mean"), "SparQ: correction 'mean'"),
    (lambda: MoBA(block_size=0), "MoBA: block_size must be an int >= 1"),
    (lambda: MoBA(key_conv=((1.0,), (1.0, 2.0))), "MoBA: key_conv must be W >= 1 rows"),
  ],
)
def test_bad_method_parameters(make, match):
  with pytest.raises(ValueError, match=match):
    make()


@pytest.mark.parametrize(
  "method, match",
  [
    (SparQ(r=65, k=8), "SparQ: r 65 is larger than the head dimension 64"),
    (SparQ(r=8, k=200), "SparQ: k 200 is larger than the visible tokens: the call has 128"),
    (MoBA(block_size=64, top_k=3), "MoBA: top_k 3 is larger than the number of key blocks 2"),
  ],
)
def test_methods_that_cannot_fit_the_cache_are_refused_before_work(method, match):
  with pytest.raises(ValueError, match=match):
    kv_cache.create_cache(kv_cache.spec_for("kivi4"), CFG, 1, 128, attention=method)
  q, k, v, q_slots, start = _inputs(t=128, d=64, s=1)
  with pytest.raises(ValueError, match=match):
    attend(method, q, k, v, q_slots, start)


def test_other_bad_inputs():
  with pytest.raises(TypeError, match="attention method must be MoBA, SparQ or None, got str"):
    kv_cache.create_cache(kv_cache.spec_for("dense"), CFG, 1, 64, attention="sparq")
  int8 = kv_cache.create_cache(kv_cache.spec_for("int8"), CFG, 1, 64, attention=SparQ(4, 8))
  with pytest.raises(ValueError, match=r"int8\): decoding 4 tokens per step .* use chunk=1"):
    int8.for_chunked_decode(8, 4)
  q, k, v, q_slots, start = _inputs(hq=6, hkv=4)
  for method, owner in ((MoBA(block_size=8, top_k=2), "MoBA"), (SparQ(4, 8), "SparQ")):
    with pytest.raises(
      ValueError, match=f"{owner}: k .* the KV heads 4 must divide the query heads 6"
    ):
      attend(method, q, k, v, q_slots, start)


def test_model_with_moba_runs_the_chosen_block_sparse_kernel():
  """A MoBA cache under "pallas" (interpreted) routes the model's attention to the
  block-sparse kernel (a jaxpr check), under "xla" to no kernel, with equal logits."""
  model = init_model(CFG, seed=0)
  tokens = jnp.asarray(np.random.default_rng(9).integers(0, CFG.vocab_size, (1, 64)), jnp.int32)
  logits = {}
  for setting in ("xla", "pallas"):
    model.kernels = ops.KernelConfig(setting, interpret=True)
    cache = kv_cache.create_cache(
      kv_cache.spec_for("dense"), CFG, 1, 64, attention=MoBA(16, 2, query_tile=16)
    )
    call = lambda t, c: model(t, cache=c)[0]  # noqa: E731
    called = pallas_call_names(jax.make_jaxpr(call)(tokens, cache).jaxpr)
    assert ("block_sparse_attention" in called) == (setting == "pallas"), (setting, called)
    logits[setting] = np.asarray(fast_jit(call)(tokens, cache))
  err = np.abs(logits["pallas"] - logits["xla"]).max() / np.abs(logits["xla"]).max()
  assert err <= 1e-5, err
