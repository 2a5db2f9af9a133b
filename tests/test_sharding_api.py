"""The sharding API on 8 fake CPU devices (tests/conftest.py): `--mesh` parsing and
meshes, the pad-or-replicate report and strict mode, every cache type's arrays sharded
by logical names, orbax restore straight into a sharded layout (QTensors, FP8 bits
included), the Generator under a mesh, and the runners' `--mesh` flag."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jaxllm
import sharding
from jaxllm import checkpoint, kv_cache, sharded
from jaxllm.params import init_model, logical_axes
from jaxllm.quant import quantize_model

ROOT = Path(__file__).resolve().parents[1]
BATCH = ("data", "fsdp")  # cache_batch / batch on a mesh with every axis
# Heads divisible by tensor=4, so attention and caches really split over it; untied
# head, so greedy tokens differ from the prompt's last token (tied, they repeat it).
MESH_CFG = jaxllm.TINY.replace(
  name="tiny-mesh", num_layers=1, num_heads=8, num_kv_heads=4, tie_embeddings=False
)


def one_line(e) -> str:
  text = str(e.value if hasattr(e, "value") else e)
  assert len(text.splitlines()) == 1, text
  return text


@pytest.fixture(scope="module")
def mesh24():
  return sharding.make_mesh("data:2,tensor:4")


@pytest.fixture(scope="module")
def mesh_model():
  return init_model(MESH_CFG, seed=1)


# ------------------------------------------------------------------ meshes


def test_parse_mesh_and_make_mesh():
  assert sharding.parse_mesh("data:2,tensor:4") == {"data": 2, "tensor": 4}
  assert sharding.parse_mesh(" fsdp : 8 ") == {"fsdp": 8}
  mesh = sharding.make_mesh("data:2,tensor:4")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4, "expert": 1}
  assert mesh.devices.size == 8
  three = sharding.make_mesh({"tensor": 3}, devices=3)  # SmolLM2's 9 / 3 heads
  assert dict(three.shape)["tensor"] == 3
  assert list(three.devices.flat) == jax.devices()[:3]


@pytest.mark.parametrize(
  "text, words",
  [
    ("", "empty"),
    ("data2", "malformed entry 'data2'"),
    ("data:2,", "malformed entry ''"),
    ("data:two", "malformed"),
    ("model:2", "unknown mesh axis 'model'"),
    ("data:2,data:4", "'data' is given twice"),
    ("tensor:0", "size 0"),
    ("tensor:-2", "size -2"),
  ],
)
def test_bad_mesh_strings(text, words):
  with pytest.raises(ValueError) as e:
    sharding.parse_mesh(text)
  assert words in one_line(e)


def test_mesh_size_must_match_the_devices():
  with pytest.raises(ValueError) as e:
    sharding.make_mesh("data:2,tensor:2")
  msg = one_line(e)
  assert "needs 4 devices" in msg and "8 cpu device(s) exist" in msg
  assert "xla_force_host_platform_device_count" in msg
  with pytest.raises(ValueError) as e:
    sharding.make_mesh("tensor:16")
  assert "needs 16 devices" in one_line(e)
  with pytest.raises(ValueError) as e:
    sharding.make_mesh("tensor:9", devices=9)
  assert "first 9 devices" in one_line(e)


def test_unknown_logical_axis_is_one_line():
  with pytest.raises(ValueError) as e:
    sharding.logical_to_spec(("embed", "no_such_axis"))
  assert "'no_such_axis' has no sharding rule" in one_line(e)


# ------------------------------------------------------------------ pad-or-replicate report


def test_replicated_dims_are_reported_once_per_kind(tiny_model, mesh24):
  params = nnx.state(tiny_model).to_pure_dict()
  logged = []
  placed, report = sharding.shard_params_with_report(
    params, logical_axes(tiny_model), mesh24, log=logged.append
  )
  # TINY: 6 query heads and 2 KV heads on tensor=4; 128 embed, 256 mlp, 512 vocab divide.
  assert report.lines() == [
    "kv_heads: 2 not divisible by tensor=4, replicated on layers.*.attn.k, layers.*.attn.v",
    "heads: 6 not divisible by tensor=4, replicated on layers.*.attn.o, layers.*.attn.q",
  ]
  assert logged == report.lines()  # one log line per kind, not per layer
  layer = placed["layers"][1]
  assert layer["attn"]["q"].sharding.spec == P("fsdp", None, None)
  assert layer["attn"]["o"].sharding.spec == P(None, None, "fsdp")
  assert layer["mlp"]["up"].sharding.spec == P("fsdp", "tensor")
  assert layer["mlp"]["down"].sharding.spec == P("tensor", "fsdp")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(placed)):
    np.testing.assert_array_equal(a, b)
  # a mesh its dims all divide reports nothing
  _, clean = sharding.shard_params_with_report(
    params, logical_axes(tiny_model), sharding.make_mesh("tensor:2,data:4")
  )
  assert not clean and clean.lines() == []


def test_strict_refuses_a_dim_the_mesh_does_not_divide(tiny_model, mesh24):
  params = nnx.state(tiny_model).to_pure_dict()
  with pytest.raises(ValueError) as e:
    sharding.shard_params(params, logical_axes(tiny_model), mesh24, strict=True)
  assert one_line(e) == (
    "param layers.0.attn.k dim 1 (kv_heads) has size 2, not divisible by mesh axes "
    "tensor=4 (strict sharding)"
  )


def test_partial_sharding_keeps_the_axes_that_divide():
  """A dense cache of batch 2 on data=2 x fsdp=4: its batch (named for both axes) splits
  on data only; its 2 KV heads on tensor=1 stay whole."""
  mesh = sharding.make_mesh("data:2,fsdp:4")
  cache = kv_cache.DenseKVCache.create(jaxllm.TINY, 2, 16)
  logged = []
  placed = sharded.shard_cache(cache, mesh, log=logged.append)
  assert logged == [
    "cache_batch: 2 not divisible by data=2 x fsdp=4, sharded on data=2 only on keys.*, "
    "values.*, length, start, refused_rollback",
  ]
  assert placed.keys[0].sharding.spec == P("data", "tensor", None, None)  # tensor=1
  assert placed.length.sharding.spec == P("data")
  with pytest.raises(ValueError) as e:
    sharded.shard_cache(cache, mesh, strict=True)
  assert "DenseKVCache array keys.0 dim 0 (cache_batch) has size 2" in one_line(e)


def test_batch_one_dense_cache_splits_its_kv_heads(mesh24):
  """A batch-1 dense cache stores [Hkv, T, D] (no unit batch dim, see DenseKVCache): its
  KV heads still split over tensor, and it reads back as [1, Hkv, T, D]."""
  cache = kv_cache.DenseKVCache.create(MESH_CFG, 1, 16)
  placed = sharded.shard_cache(cache, mesh24)
  assert placed.keys[0].shape == (4, 16, MESH_CFG.head_dim)
  assert placed.keys[0].sharding.spec == P("tensor", None, None)
  assert placed.view(placed.keys[0]).shape == (1, 4, 16, MESH_CFG.head_dim)


# ------------------------------------------------------------------ caches


def _calibration(cfg, spec):
  if spec.kind != "fireq":
    return None
  calib = {"key_scale": jnp.full((cfg.num_layers, cfg.num_kv_heads, cfg.head_dim), 0.5)}
  if spec.key_rounding == "gptq":
    eye = jnp.eye(cfg.head_dim)
    calib["key_rounding"] = jnp.broadcast_to(eye, (*calib["key_scale"].shape, cfg.head_dim))
  return calib


def _expected_spec(cfg, batch, field, x):
  """Where an array of a cache must go on data=2 x tensor=4, from its shape alone."""
  if field in ("key_scale", "key_rounding"):  # [L, Hkv, D(, D)]
    return P(None, "tensor", *(None,) * (x.ndim - 2))
  if x.ndim == 0:
    return P()
  assert x.shape[0] == batch, (field, x.shape)
  if x.ndim >= 2 and x.shape[1] == cfg.num_kv_heads and field != "recent_pos":
    return P(BATCH, "tensor", *(None,) * (x.ndim - 2))
  return P(BATCH, *(None,) * (x.ndim - 1))


@pytest.mark.parametrize(
  "preset",
  [
    "dense",
    "int8",
    "fireq_int4_r128_s4_gptq",  # codes, scales, zero points, ring, sinks, key scale, GPTQ
    "kivi4",
    "kivi2_s4_g64_v2",  # sinks, value channel groups
    "kivi2_per_token_keys",  # 3-D key scales
    "rotatekv2",
  ],
)
def test_every_cache_array_is_sharded(preset, mesh24):
  cfg, batch = MESH_CFG, 2
  spec = kv_cache.spec_for(preset)
  cache = kv_cache.create_cache(spec, cfg, batch, 160, calibration=_calibration(cfg, spec))
  cache = cache.replace(length=jnp.array([3, 5], jnp.int32))
  placed = sharded.shard_cache(cache, mesh24)
  flat = jax.tree_util.tree_flatten_with_path(placed)[0]
  assert len(flat) == len(jax.tree.leaves(cache)) >= 6
  for (path, x), original in zip(flat, jax.tree.leaves(cache)):
    field = next(
      k.name if hasattr(k, "name") else k.key for k in reversed(path) if not hasattr(k, "idx")
    )
    assert x.sharding.spec == _expected_spec(cfg, batch, field, x), (preset, path)
    np.testing.assert_array_equal(x, original)
  # inside jit under the mesh, constrain_cache pins the same layout on the outputs
  with jax.set_mesh(mesh24):
    out = jax.jit(lambda c: sharded.constrain_cache(jax.tree.map(lambda a: a + 0, c)))(cache)
  for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(placed)):
    if x.size:  # XLA leaves empty arrays (no ring, no sinks) unsharded: nothing to place
      assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (x.sharding, y.sharding)


def test_cache_without_axes_is_refused(mesh24):
  with pytest.raises(ValueError) as e:
    sharded.cache_logical_axes({"k": jnp.zeros((2, 2))})
  assert "has no ARRAY_AXES" in one_line(e)


# ------------------------------------------------------------------ checkpoint restore


@pytest.mark.parametrize("method", [None, "w8a8", "fireq_w4a8"])
def test_restore_straight_into_the_sharded_layout(method, tiny_model, mesh_model, mesh24, tmp_path):
  # quantize_model works in place: quantize a copy (of the one-layer model: quicker),
  # never a shared fixture
  model = tiny_model if method is None else quantize_model(nnx.clone(mesh_model), method, 32)
  checkpoint.save(model, tmp_path / "ckpt")
  logged = []
  restored = checkpoint.restore(tmp_path / "ckpt", mesh=mesh24, log=logged.append)
  assert (
    logged
    == [  # TINY's 6 / 2 heads; MESH_CFG's 8 / 4 divide tensor=4
      "kv_heads: 2 not divisible by tensor=4, replicated on layers.*.attn.k, layers.*.attn.v",
      "heads: 6 not divisible by tensor=4, replicated on layers.*.attn.o, layers.*.attn.q",
    ][: 2 if method is None else 0]
  )
  want = nnx.state(model).to_pure_dict()
  got = nnx.state(restored).to_pure_dict()
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    assert len(b.sharding.device_set) == 8
  up = got["layers"][0]["mlp"]["up"]
  assert got["embed"].sharding.spec == P("fsdp", "tensor")  # [embed, vocab]
  if method is None:
    assert got["layers"][0]["attn"]["q"].sharding.spec == P("fsdp", None, None)
    assert up.sharding.spec == P("fsdp", "tensor")
  else:  # every part shards like the float weight [embed, mlp]
    assert up.values.sharding.spec == P("fsdp", "tensor")
    grouped = up.scales.shape[0] > 1  # scales per group of rows, or one row per channel
    assert up.scales.sharding.spec == (P("fsdp", "tensor") if grouped else P(None, "tensor"))
  if method == "fireq_w4a8":  # FP8 scales, stored as uint8 bits, come back as float8 sharded
    assert up.scales.dtype == jnp.float8_e4m3fn
    assert up.tensor_scale.sharding.spec == P(None, None)
  # the same placement shard_params gives the model in memory
  placed = sharding.shard_params(nnx.state(model).to_pure_dict(), logical_axes(model), mesh24)
  for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(got)):
    assert a.sharding.spec == b.sharding.spec


def test_restore_onto_a_mesh_that_cannot_hold_it(tiny_model, mesh24, tmp_path):
  checkpoint.save(tiny_model, tmp_path / "ckpt")
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.restore(tmp_path / "ckpt", mesh=mesh24, strict=True)
  msg = one_line(e)
  assert str(tmp_path / "ckpt") in msg and "layers.0.attn.k dim 1 (kv_heads) has size 2" in msg
  foreign = jax.make_mesh((8,), ("x",))
  with pytest.raises(checkpoint.CheckpointError) as e:
    checkpoint.restore(tmp_path / "ckpt", mesh=foreign)
  assert "mesh axes ['x'] are not sharding axes" in one_line(e)


# ------------------------------------------------------------------ Generator under a mesh


PROMPTS = [[5, 6, 7, 8, 9], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
NEW = 6


@pytest.fixture(scope="module")
def single_device_tokens(mesh_model):
  out = {}
  for preset in ("dense", "kivi4"):
    make = None if preset == "dense" else kv_cache.cache_factory(preset, MESH_CFG)
    gen = jaxllm.Generator(mesh_model, prompt_bucket=16, make_cache=make)
    out[preset] = gen.generate(PROMPTS, NEW, stop_at_eos=False).tokens
  return out


@pytest.mark.parametrize(
  "mesh_text, preset",
  [
    ("data:2,tensor:4", "dense"),
    ("data:2,tensor:4", "kivi4"),
    # fsdp 8 greedy (float, KIVI-4) is also in tests/test_mesh_matrix.py: slow tier here
    pytest.param("fsdp:8", "dense", marks=pytest.mark.slow),
    pytest.param("fsdp:8", "kivi4", marks=pytest.mark.slow),
  ],
)
def test_generator_greedy_on_a_mesh_equals_one_device(
  preset, mesh_text, mesh_model, single_device_tokens
):
  mesh = sharding.make_mesh(mesh_text)
  make = None if preset == "dense" else kv_cache.cache_factory(preset, MESH_CFG)
  gen = jaxllm.Generator(mesh_model, prompt_bucket=16, make_cache=make, mesh=mesh)
  assert not gen.sharding_report  # every MESH_CFG param dim divides both meshes
  got = gen.generate(PROMPTS, NEW, stop_at_eos=False).tokens
  assert got == single_device_tokens[preset]
  assert len(set(got[0])) > 1  # not a degenerate repeat
  # the compiled prefill and step hand back the cache in its sharded layout
  tokens, start = jaxllm.decoding.left_pad(PROMPTS, 16, 0)
  key = jax.random.key(0)
  greedy = jaxllm.SamplingConfig()
  with gen._mesh_context():
    ids, _, cache = gen._prefill(gen.params, tokens, start, key, capacity=32, sampling=greedy)
    want, _ = sharded.cache_shardings(cache, mesh)
    placed = [(x.size, x.sharding, x.ndim) for x in jax.tree.leaves(cache)]
    stepped = gen._step(gen.params, cache, ids, key, sampling=greedy)[2]  # donates `cache`
  placed += [(x.size, x.sharding, x.ndim) for x in jax.tree.leaves(stepped)]
  for (size, got_sharding, ndim), s in zip(placed, 2 * jax.tree.leaves(want)):
    assert size == 0 or got_sharding.is_equivalent_to(s, ndim), (got_sharding, s)
  # How many pieces the largest array (a layer's keys) is cut into: batch 2 x 4 KV heads on
  # data=2 x tensor=4 -> 8; on fsdp=8 the dense rows (2 x 4 = 8) -> 8, while KIVI's batch
  # of 2 does not divide fsdp=8 and is replicated (as the report says).
  biggest = max(jax.tree.leaves(stepped), key=lambda x: x.size)
  pieces = len({str(sh.index) for sh in biggest.addressable_shards})
  assert pieces == (1 if (mesh_text, preset) == ("fsdp:8", "kivi4") else 8)


@pytest.mark.parametrize(
  "mesh_text",
  # the logits themselves are also checked on both meshes in tests/test_mesh_matrix.py
  [pytest.param(m, marks=pytest.mark.slow) for m in ("data:2,tensor:4", "fsdp:8")],
)
def test_sharded_logits_match_one_device(mesh_text, mesh_model):
  """Prefill through a KIVI-4 cache: logits within 1e-4 relative of one device."""
  mesh = sharding.make_mesh(mesh_text)
  tokens = np.random.default_rng(0).integers(0, MESH_CFG.vocab_size, (2, 24)).astype(np.int32)
  make = kv_cache.cache_factory("kivi4", MESH_CFG)
  graphdef, state = nnx.split(mesh_model)

  @jax.jit
  def prefill(state, cache):
    logits, cache = nnx.merge(graphdef, state)(tokens, cache=cache)
    return logits, sharded.constrain_cache(cache)

  cache = make(2, 64, jnp.zeros((2,), jnp.int32))
  want, _ = prefill(state, cache)
  params = sharding.shard_params(state.to_pure_dict(), logical_axes(mesh_model), mesh)
  placed = nnx.State(state)
  placed.replace_by_pure_dict(params)
  with jax.set_mesh(mesh):
    got, got_cache = prefill(placed, sharded.shard_cache(cache, mesh))
  rel = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
  assert rel < 1e-4, rel
  print(f"{mesh_text}: max |logit diff| / max |logit| = {rel:.2e}")
  k = got_cache.layers[0].store.k_packed  # [B=2, Hkv=4, ...]; batch 2 does not divide fsdp=8
  where = P(BATCH, "tensor", None, None) if "tensor" in mesh_text else P()
  assert k.sharding.is_equivalent_to(jax.NamedSharding(mesh, where), k.ndim), k.sharding


def test_generator_mesh_errors(mesh_model):
  with pytest.raises(TypeError) as e:
    jaxllm.Generator(mesh_model, mesh="data:2")
  assert "mesh must be a jax.sharding.Mesh" in one_line(e)
  with pytest.raises(ValueError) as e:
    jaxllm.Generator(
      init_model(jaxllm.TINY), mesh=sharding.make_mesh("data:2,tensor:4"), strict=True
    )
  assert "(strict sharding)" in one_line(e)


# ------------------------------------------------------------------ --mesh on the runners


def _run(*args):
  return subprocess.run(
    [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
  )


def test_runner_mesh_flag_shards_the_model(tmp_path):
  out = _run(
    "experiments.perplexity",
    "--model=tiny",
    "--context=32",
    "--max_windows=1",
    "--mesh=data:2,tensor:4",
    f"--out_dir={tmp_path}",
    "--nocompilation_cache",
  )
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert np.isfinite(summary["nll"]) and summary["tokens"] == 31
  kv = "kv_heads: 2 not divisible by tensor=4, replicated on layers.*.attn.k, layers.*.attn.v"
  assert out.stderr.count(kv) == 1


@pytest.mark.parametrize(
  "flags, words",
  [
    (["--mesh=data2"], "--mesh: mesh 'data2': malformed entry"),
    (["--mesh=data:2,model:4"], "unknown mesh axis 'model'"),
    (["--mesh=data:3"], "needs 3 devices, but 8 are given"),
    (["--mesh_strict"], "--mesh_strict needs --mesh"),
    (["--mesh=data:2,tensor:4", "--mesh_strict"], "--mesh_strict: param layers.0.attn.k dim 1"),
  ],
)
def test_runner_mesh_flag_errors(flags, words, capsys):
  from in_process import run_perplexity_main

  code = run_perplexity_main("--model=tiny", "--context=32", "--max_windows=1", *flags)
  err = capsys.readouterr().err.strip().splitlines()
  assert code != 0 and err[-1].startswith("error: ") and words in err[-1], err


@pytest.mark.slow
def test_generate_cli_on_a_mesh(tmp_path):
  """SmolLM2 (9 query / 3 KV heads) on data=2 x tensor=4: the answer of one device, with
  the heads that tensor=4 cannot split reported once each."""
  out = _run(
    "jaxllm.generate",
    "--chat",
    "--prompt=What is the capital of France?",
    "--max_new_tokens=12",
    "--mesh=data:2,tensor:4",
    "--nocompilation_cache",
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Paris" in out.stdout
  kv = "kv_heads: 3 not divisible by tensor=4, replicated on layers.*.attn.k, layers.*.attn.v"
  assert out.stderr.count(kv) == 1
