"""Several processes, one program: a checked `jax.distributed.initialize` and a global mesh.

Every process runs the same script: `initialize` (before any other JAX call), then
`global_mesh` over the devices of all processes, then jit / shard_map as in one process.
Each process only holds the shards on its own devices (``array.addressable_shards``).

On the CPU platform, cross-process collectives go through gloo over TCP, which is
jaxlib's default ``jax_cpu_collectives_implementation`` in the pinned jax; `initialize`
sets it explicitly so a changed default cannot turn the run into a silent failure.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh

from sharding.rules import make_mesh

_ADDRESS = re.compile(r"^(?P<host>[A-Za-z0-9.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>[0-9]+)$")


def _check_int(name: str, value, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"distributed: {name} must be an integer >= {low}, got {value!r}")
  return int(value)


def check_args(
  coordinator_address: str,
  num_processes: int,
  process_id: int,
  local_device_count: int | None = None,
) -> None:
  """One-line ValueError for a malformed address or an out-of-range count or id."""
  if not isinstance(coordinator_address, str) or not _ADDRESS.match(coordinator_address):
    raise ValueError(
      f"distributed: coordinator_address must be 'host:port', got {coordinator_address!r}"
    )
  port = int(_ADDRESS.match(coordinator_address)["port"])
  if not 1 <= port <= 65535:
    raise ValueError(f"distributed: coordinator port {port} is outside 1..65535")
  n = _check_int("num_processes", num_processes, 1)
  pid = _check_int("process_id", process_id, 0)
  if pid >= n:
    raise ValueError(f"distributed: process_id {pid} is not in 0..{n - 1} (num_processes={n})")
  if local_device_count is not None:
    _check_int("local_device_count", local_device_count, 1)


def initialize(
  coordinator_address: str,
  num_processes: int,
  process_id: int,
  local_device_count: int | None = None,
  timeout_s: int = 60,
) -> None:
  """Joins this process to the others; call it before any other JAX computation.

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator service.
    num_processes: how many processes join.
    process_id: this process's id, in ``0..num_processes-1``.
    local_device_count: the devices this process contributes. On the CPU platform
      (``JAX_PLATFORMS=cpu``) it sets ``jax_num_cpu_devices``; on every platform the
      number of local devices is checked against it after joining.
    timeout_s: how long to wait for the other processes.

  Raises ValueError (one line) for bad arguments or a device count that differs, and
  RuntimeError when JAX already ran a computation or is already initialized.
  """
  check_args(coordinator_address, num_processes, process_id, local_device_count)
  _check_int("timeout_s", timeout_s, 1)
  if jax.distributed.is_initialized():
    raise RuntimeError("distributed: jax.distributed is already initialized in this process")
  platforms = jax.config.jax_platforms or ""
  if platforms.split(",")[0] == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if local_device_count is not None:
      jax.config.update("jax_num_cpu_devices", int(local_device_count))
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=int(num_processes),
    process_id=int(process_id),
    initialization_timeout=int(timeout_s),
  )
  have = jax.local_device_count()
  if local_device_count is not None and have != local_device_count:
    raise ValueError(
      f"distributed: process {process_id} has {have} local devices, "
      f"local_device_count={local_device_count} was asked for"
    )


def shutdown() -> None:
  """Leaves the process group (a no-op when not initialized)."""
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


def global_mesh(shape: dict[str, int] | str) -> Mesh:
  """A mesh over the devices of every process, axes ``data, fsdp, tensor, expert``.

  Devices are ordered by (process, device id), so the outer mesh axes span processes
  and the inner ones (``tensor``, ``expert``) stay inside one process whenever their
  product divides the local device count: tensor-parallel collectives then use the
  fast local links and only the outer axes cross hosts.

  Raises ValueError (one line) if processes contribute different numbers of devices or
  the mesh size is not the global device count.
  """
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  per_process: dict[int, int] = {}
  for d in devices:
    per_process[d.process_index] = per_process.get(d.process_index, 0) + 1
  if len(set(per_process.values())) > 1:
    raise ValueError(f"distributed: processes hold unequal device counts {per_process}")
  return make_mesh(shape, devices=devices)
