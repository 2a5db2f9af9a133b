"""One of the processes that tests/test_distributed.py launches.

Joins the others with `sharding.distributed.initialize`, builds the tiny jaxllm model
from the weights and tokens the test wrote (``OUT_DIR/inputs.npz``, `save_inputs`),
shards it over a global mesh (each of `MESHES`), runs its forward pass under jit and
writes the logits shards this process holds to ``OUT_DIR/process_<id>.npz``
(``<mesh>_data_<k>`` arrays with ``<mesh>_index_<k>``: [start, stop) per dimension).

Usage: python tests/distributed_worker.py PORT PROCESS_ID NUM_PROCESSES LOCAL_DEVICES OUT_DIR
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

_START = time.perf_counter()


def _log(msg: str) -> None:
  print(f"[{time.perf_counter() - _START:6.1f}s] {msg}", file=sys.stderr, flush=True)


MESHES = {
  # fsdp crosses the processes: the embed-sharded weights are all-gathered between them.
  "fsdp": {"fsdp": 4, "tensor": 2},
  # tensor crosses the processes: the row-parallel all-reduces run between them.
  "tensor": {"data": 4, "tensor": 2},
}


def save_inputs(path, params, tokens) -> None:
  """What the test hands the workers: the params pytree's leaves (in tree order) and tokens."""
  import jax
  import numpy as np

  leaves = {f"leaf_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))}
  np.savez(path, tokens=np.asarray(tokens), **leaves)


def main(port: int, process_id: int, num_processes: int, local_devices: int, out_dir: str):
  from sharding import distributed

  _log(f"process {process_id}: joining localhost:{port}")
  distributed.initialize(f"localhost:{port}", num_processes, process_id, local_devices)
  _log(f"process {process_id}: joined")

  import jax
  import numpy as np
  from flax import nnx
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import jaxllm
  import sharding
  from jaxllm.params import init_model, logical_axes

  # The model's structure without running its initializers; weights from the test.
  model = nnx.eval_shape(lambda: init_model(jaxllm.TINY, seed=0))
  graph, state = nnx.split(model)
  axes = logical_axes(model)
  abstract = nnx.to_pure_dict(state)
  inputs = np.load(Path(out_dir) / "inputs.npz")
  leaves, treedef = jax.tree.flatten(abstract)
  got = [inputs[f"leaf_{i}"] for i in range(len(leaves))]
  for want, have in zip(leaves, got):
    if want.shape != have.shape or want.dtype != have.dtype:
      raise ValueError(
        f"inputs.npz leaf {have.shape} {have.dtype} != model {want.shape} {want.dtype}"
      )
  pure = jax.tree.unflatten(treedef, got)
  ids = inputs["tokens"]
  forward = jax.jit(lambda s, t: nnx.merge(graph, s)(t)[0])
  _log("model built")
  saved = {}
  for name, shape in MESHES.items():
    mesh = distributed.global_mesh(shape)
    if name == "tensor":
      # Same shape, devices reordered so that each tensor pair spans both processes.
      devs = np.asarray(mesh.devices).reshape(num_processes, -1).T.reshape(-1)
      mesh = sharding.make_mesh(shape, devices=list(devs))
    params = sharding.shard_params(pure, axes, mesh)
    _log(f"{name}: params sharded")
    nnx.replace_by_pure_dict(state, params)
    batch_spec = sharding.logical_to_spec(("batch", None), mesh_axes=mesh.axis_names)
    sh = NamedSharding(mesh, P(*batch_spec))
    tok = jax.make_array_from_callback(ids.shape, sh, lambda idx: ids[idx])
    with jax.set_mesh(mesh):
      logits = forward(state, tok)
    logits.block_until_ready()
    _log(f"{name}: forward done")
    for k, shard in enumerate(logits.addressable_shards):
      rows = [
        (s.start or 0, s.stop if s.stop is not None else dim)
        for s, dim in zip(shard.index, logits.shape)
      ]
      saved[f"{name}_data_{k}"] = np.asarray(shard.data)
      saved[f"{name}_index_{k}"] = np.asarray(rows, np.int64)
  np.savez(Path(out_dir) / f"process_{process_id}.npz", **saved)
  distributed.shutdown()
  print(f"process {process_id}: {len(jax.devices())} global devices, wrote {len(saved) // 2}")


if __name__ == "__main__":
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  port, pid, nproc, ndev = (int(a) for a in sys.argv[1:5])
  main(port, pid, nproc, ndev, sys.argv[5])
