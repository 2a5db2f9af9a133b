"""This machine's figures for `experiments.roofline --check_cpu` (run in a subprocess).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.roofline_cpu \
      --batch=8 --seq=128 --repeats=5

`experiments.roofline` starts this module with that environment (jax reads XLA_FLAGS when
it is first imported, so the fake devices must be asked for before any jax import).
It measures, each the least of `--repeats` timed calls after a warm-up call (the least,
because other processes may share this machine's cores: it estimates what the machine can do):

  * matmul FLOP/s: an f32 [N, N] @ [N, N] on device 0 alone, and one such matmul per
    device on all 8 fake devices at once (their sum: the 8 devices share this machine's
    cores);
  * memory bandwidth: ``x * a + b`` over an f32 array (bytes read + written / time), on
    device 0 alone and sharded over the 8 devices;
  * collectives on the data x tensor mesh: a chain of 16 dependent psums over ``tensor``,
    its time minus that of the same chain without the psums, per psum, for a tiny array
    (the start-up latency) and a 1 MiB one (ring bandwidth 2(n-1)/n * extra bytes / extra
    time), at least 5 timed calls each;
  * the forward pass of `jaxllm.TINY` (random init, f32, logits of every position) on a
    ``[batch, seq]`` token array, on one device and on the data x tensor mesh with its
    params placed by `sharding.shard_params` under `jax.set_mesh` (least, median and
    greatest time).

The last stdout line is one JSON object with every figure (seconds, FLOP/s, bytes/s).
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app, flags

from experiments import common

common.define_common_flags("roofline", ())
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences of the tiny model's forward.", lower_bound=1)
_SEQ = flags.DEFINE_integer("seq", 128, "Tokens per sequence.", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per figure (median).", lower_bound=1)
_DATA = flags.DEFINE_integer("data", 4, "Data-parallel degree of the mesh.", lower_bound=1)
_TENSOR = flags.DEFINE_integer("tensor", 2, "Tensor-parallel degree of the mesh.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random init and the tokens.")

MATMUL_N = 512
BANDWIDTH_ELEMENTS = 1 << 23  # 32 MiB of f32 per array
PSUM_SMALL = 8  # f32 elements per device
PSUM_LARGE = 1 << 18  # f32 elements per device (1 MiB)
PSUM_CHAIN = 16  # dependent psums per timed program
PSUM_REPEATS = 5  # at least this many timed calls per collective figure (they are cheap)


def _times(fn, *args, repeats: int) -> list[float]:
  """Wall times of `repeats` calls of `fn(*args)` (outputs waited for), after an untimed one."""
  import jax  # pylint: disable=import-outside-toplevel

  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return times


def _best_time(fn, *args, repeats: int) -> float:
  """The least of `_times`: the machine's capability when other processes share its cores."""
  return min(_times(fn, *args, repeats=repeats))


def measure(batch: int, seq: int, repeats: int, data: int, tensor: int, seed: int) -> dict:
  """Every figure listed in the module docstring, as a dict."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import jaxllm
  import sharding
  from jaxllm.params import init_model, logical_axes

  devices = jax.devices()
  count = data * tensor
  if len(devices) < count:
    raise ValueError(
      f"mesh data={data} x tensor={tensor} needs {count} devices, jax sees {len(devices)}; "
      f"set XLA_FLAGS=--xla_force_host_platform_device_count={count} before jax is imported"
    )
  mesh = sharding.make_mesh({"data": data, "tensor": tensor}, devices=devices[:count])
  rng = np.random.default_rng(seed)
  out = {"device_count": count, "data": data, "tensor": tensor, "batch": batch, "seq": seq}

  # Matmul rate: one device; then every device at once.
  n = MATMUL_N
  a = jax.device_put(rng.standard_normal((n, n), np.float32), devices[0])
  mm = jax.jit(lambda x, y: x @ y)
  out["matmul_flops_one"] = 2 * n**3 / _best_time(mm, a, a, repeats=repeats)
  flat = sharding.make_mesh({"data": count}, devices=devices[:count])
  spread = NamedSharding(flat, P("data"))
  ab = jax.device_put(rng.standard_normal((count, n, n), np.float32), spread)
  bmm = jax.jit(lambda x, y: jnp.einsum("bij,bjk->bik", x, y), out_shardings=spread)
  out["matmul_flops_all"] = count * 2 * n**3 / _best_time(bmm, ab, ab, repeats=repeats)

  # Memory bandwidth: read + write of an f32 array.
  axpb = jax.jit(lambda x: x * 1.5 + 0.5)
  m = BANDWIDTH_ELEMENTS
  x1 = jax.device_put(np.ones(m, np.float32), devices[0])
  out["bandwidth_one"] = 2 * 4 * m / _best_time(axpb, x1, repeats=repeats)
  xs = jax.device_put(np.ones((count, m // count), np.float32), spread)
  out["bandwidth_all"] = 2 * 4 * m / _best_time(axpb, xs, repeats=repeats)

  # Collectives over the tensor axis of the mesh.
  spec = P(("data", "tensor"))

  def sm(body):
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec))

  def chain(reduce):
    def body(v):
      for _ in range(PSUM_CHAIN):
        v = reduce(v) * 0.5
      return v

    return sm(body)

  psum = chain(lambda v: jax.lax.psum(v, "tensor"))
  noop = chain(lambda v: v + 1.0)

  def per_psum(elements: int) -> float:
    x = jax.device_put(np.ones((count, elements), np.float32), NamedSharding(mesh, spec))
    reps = max(repeats, PSUM_REPEATS)
    with_psum = _best_time(psum, x, repeats=reps)
    without = _best_time(noop, x, repeats=reps)
    return (with_psum - without) / PSUM_CHAIN

  t_small, t_large = per_psum(PSUM_SMALL), per_psum(PSUM_LARGE)
  if tensor > 1 and not 0 < t_small < t_large:
    raise ValueError(
      f"CPU check: psum timings over the tensor axis are not resolvable ({t_small:.2e} s for "
      f"{PSUM_SMALL} and {t_large:.2e} s for {PSUM_LARGE} elements per device; the machine is "
      "busy?); rerun"
    )
  ring = 2 * (tensor - 1) / tensor if tensor > 1 else 1.0
  out["collective_latency_s"] = t_small
  out["link_bytes_per_s"] = ring * 4 * (PSUM_LARGE - PSUM_SMALL) / (t_large - t_small)

  # The tiny model's forward pass: one device, then the data x tensor mesh.
  model = init_model(jaxllm.TINY, seed=seed)
  tokens = rng.integers(0, jaxllm.TINY.vocab_size, size=(batch, seq)).astype(np.int32)
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
  one = _times(fwd, state, tokens, repeats=repeats)
  want = np.asarray(fwd(state, tokens))
  state.replace_by_pure_dict(sharding.shard_params(state.to_pure_dict(), logical_axes(model), mesh))
  placed = jax.device_put(tokens, NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    many = _times(fwd, state, placed, repeats=repeats)
    got = np.asarray(fwd(state, placed))
  for key, times in (("one", one), ("mesh", many)):
    out[f"forward_{key}_s"] = min(times)
    out[f"forward_{key}_median_s"] = statistics.median(times)
    out[f"forward_{key}_max_s"] = max(times)
  out["mesh_max_abs_diff"] = float(np.max(np.abs(got - want)))
  cfg = jaxllm.TINY
  out["model"] = {
    "name": cfg.name,
    "layers": cfg.num_layers,
    "d_model": cfg.embed_dim,
    "heads": cfg.num_heads,
    "kv_heads": cfg.num_kv_heads,
    "head_dim": cfg.head_dim,
    "d_ff": cfg.mlp_dim,
    "vocab": cfg.vocab_size,
  }
  out["repeats"] = repeats
  return out


def main(argv):
  del argv
  common.start()
  try:
    figures = measure(
      _BATCH.value, _SEQ.value, _REPEATS.value, _DATA.value, _TENSOR.value, _SEED.value
    )
  except ValueError as e:
    common.fail(str(e))
  print(json.dumps(figures), flush=True)


if __name__ == "__main__":
  app.run(main)
