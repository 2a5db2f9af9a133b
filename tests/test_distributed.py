"""Two processes with 4 CPU devices each, joined by jax.distributed on localhost, run the
tiny model's forward pass over the 8 global devices; the logits they hold together
equal the one-process, one-device run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from distributed_worker import MESHES, save_inputs
from flax import nnx

from sharding import distributed

WORKER = Path(__file__).with_name("distributed_worker.py")
NUM_PROCESSES, LOCAL_DEVICES = 2, 4
TIMEOUT_S = 90  # a hang fails here, with both children's stderr


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_workers(out_dir: Path) -> float:
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
  )
  port = _free_port()
  start = time.perf_counter()
  procs = [
    subprocess.Popen(
      [sys.executable, str(WORKER), str(port), str(i), str(NUM_PROCESSES), str(LOCAL_DEVICES)]
      + [str(out_dir)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
    )
    for i in range(NUM_PROCESSES)
  ]
  outputs, hung = [], False
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=max(1.0, TIMEOUT_S - (time.perf_counter() - start))))
    except subprocess.TimeoutExpired:
      hung = True
      for q in procs:
        if q.poll() is None:
          q.kill()
      outputs.append(p.communicate())
  elapsed = time.perf_counter() - start
  for p in procs[len(outputs) :]:
    outputs.append(p.communicate())

  def tails():
    return "\n".join(
      f"--- process {i} (rc {p.returncode}) stderr:\n"
      + "\n".join(line for line in err.splitlines() if "[Gloo]" not in line)[-3000:]
      for i, (p, (_, err)) in enumerate(zip(procs, outputs))
    )

  if hung:
    pytest.fail(f"workers still running after {TIMEOUT_S} s, killed\n{tails()}")
  if any(p.returncode for p in procs):
    pytest.fail(f"a worker failed\n{tails()}")
  return elapsed


def _assemble(out_dir: Path, name: str, shape) -> np.ndarray:
  full = np.full(shape, np.nan, np.float32)
  covered = np.zeros(shape, np.int32)
  for i in range(NUM_PROCESSES):
    with np.load(out_dir / f"process_{i}.npz") as f:
      k = 0
      while f"{name}_data_{k}" in f:
        idx = tuple(slice(a, b) for a, b in f[f"{name}_index_{k}"])
        full[idx] = f[f"{name}_data_{k}"]
        covered[idx] += 1
        k += 1
  assert covered.min() >= 1, f"{name}: logits not covered by the processes' shards"
  return full


def test_two_processes_match_one_process(tiny_model, tmp_path):
  graph, state = nnx.split(tiny_model)
  tokens = np.random.default_rng(0).integers(0, 512, size=(4, 16)).astype(np.int32)
  save_inputs(tmp_path / "inputs.npz", nnx.to_pure_dict(state), tokens)
  elapsed = _run_workers(tmp_path)
  want = np.asarray(jax.jit(lambda s, t: nnx.merge(graph, s)(t)[0])(state, tokens))
  for name in MESHES:
    got = _assemble(tmp_path, name, want.shape)
    rel = np.abs(got - want).max() / np.abs(want).max()
    print(f"{name} mesh {MESHES[name]}: max relative difference {rel:.2e}")
    assert rel < 1e-5, f"{name} mesh: max relative difference {rel:.2e}"
  print(f"two processes: {elapsed:.1f} s")
  assert elapsed < 60, f"two-process run took {elapsed:.1f} s (limit 60)"


@pytest.mark.parametrize(
  "args, match",
  [
    (("localhost", 2, 0), "host:port"),
    (("localhost:99999", 2, 0), "outside 1..65535"),
    (("localhost:1234", 0, 0), "num_processes must be an integer >= 1"),
    (("localhost:1234", 2, 2), r"process_id 2 is not in 0..1"),
    (("localhost:1234", 2, -1), "process_id must be an integer >= 0"),
    (("localhost:1234", 2, 0, 0), "local_device_count must be an integer >= 1"),
    (("localhost:1234", 2.0, 0), "num_processes must be an integer"),
  ],
)
def test_bad_arguments_raise_one_line(args, match):
  with pytest.raises(ValueError, match=match) as e:
    distributed.check_args(*args)
  assert "\n" not in str(e.value)


def test_initialize_checks_before_joining():
  # Raises on the arguments before touching jax.distributed (no coordinator is started).
  with pytest.raises(ValueError, match="process_id 3 is not in 0..1"):
    distributed.initialize("localhost:1234", 2, 3)
  assert not jax.distributed.is_initialized()


def test_global_mesh_single_process_matches_make_mesh():
  mesh = distributed.global_mesh({"data": 2, "tensor": 4})
  assert mesh.shape["data"] == 2 and mesh.shape["tensor"] == 4
  assert [d.id for d in mesh.devices.reshape(-1)] == sorted(d.id for d in jax.devices())
  with pytest.raises(ValueError, match="needs 4 devices"):
    distributed.global_mesh({"tensor": 4})
