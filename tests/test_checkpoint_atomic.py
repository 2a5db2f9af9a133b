"""Atomic checkpoint saves: an overwrite killed partway through leaves the previous
checkpoint intact, a completed one leaves exactly the new one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import jaxllm
from jaxllm import atomic_dir, checkpoint
from jaxllm.params import init_model

ROOT = Path(__file__).resolve().parents[1]

# Overwrites argv[1] with another model and stalls once Orbax has started writing
# the new params (its handler's async_save has returned, the array writes are
# under way), after writing the file argv[2], so the parent's SIGKILL lands inside
# the write. The hook patches Orbax, not jaxllm, so the same test runs on any
# implementation of `checkpoint.save`.
_CHILD = r"""
import os, sys, time
import orbax.checkpoint as ocp
import jaxllm
from jaxllm import checkpoint
from jaxllm.params import init_model

target, marker = sys.argv[1], sys.argv[2]
model = init_model(jaxllm.TINY.replace(num_layers=1), seed=1)
real = ocp.StandardCheckpointHandler.async_save

async def stalled(self, directory, *args, **kwargs):
  commit = await real(self, directory, *args, **kwargs)
  with open(marker + ".part", "w") as f:
    f.write(str(directory))
  os.rename(marker + ".part", marker)
  time.sleep(600)
  return commit

ocp.StandardCheckpointHandler.async_save = stalled
checkpoint.save(model, target)
"""


def _assert_same_params(want, got):
  assert got.config == want.config
  want_leaves = jax.tree_util.tree_leaves_with_path(nnx.state(want))
  got_leaves = jax.tree_util.tree_leaves_with_path(nnx.state(got))
  assert [p for p, _ in want_leaves] == [p for p, _ in got_leaves]
  for (path, a), (_, b) in zip(want_leaves, got_leaves):
    assert np.asarray(a).dtype == np.asarray(b).dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), jax.tree_util.keystr(path))


def _siblings(target: Path) -> list[str]:
  return sorted(n for n in os.listdir(target.parent) if n.startswith(f".{target.name}."))


def test_killed_overwrite_keeps_previous_checkpoint(tiny_model, tmp_path):
  target = tmp_path / "ckpt"
  checkpoint.save(tiny_model, target)
  marker = tmp_path / "writing"
  env = {**os.environ, "JAXLLM_COMPILATION_CACHE_DIR": str(tmp_path / "xla")}
  proc = subprocess.Popen(
    [sys.executable, "-c", _CHILD, str(target), str(marker)],
    cwd=ROOT,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )
  try:
    deadline = time.monotonic() + 240
    while not marker.exists():
      if proc.poll() is not None:
        pytest.fail(f"the save ended before the kill (rc {proc.returncode}): {proc.stderr.read()}")
      if time.monotonic() > deadline:
        pytest.fail("the child never started writing params")
      time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    proc.stderr.close()

  # The previous checkpoint restores bit-identically; the half-written one is not read.
  assert checkpoint.load_config(target) == tiny_model.config
  _assert_same_params(tiny_model, checkpoint.restore(target))
  assert _siblings(target), "the kill should have left the interrupted save's temporary"

  # The next save of the same target completes and removes the stale temporary.
  new = init_model(jaxllm.TINY.replace(num_layers=1), seed=1)
  checkpoint.save(new, target)
  assert _siblings(target) == []
  _assert_same_params(new, checkpoint.restore(target))


def test_completed_overwrite_restores_new_params(tiny_model, tmp_path):
  target = tmp_path / "ckpt"
  checkpoint.save(tiny_model, target)
  new = init_model(jaxllm.TINY.replace(num_layers=1), seed=1)
  checkpoint.save(new, target)
  _assert_same_params(new, checkpoint.restore(target))
  assert sorted(os.listdir(target)) == ["config.json", "params"]
  assert _siblings(target) == []


def test_two_rename_fallback_survives_a_kill_between_renames(tiny_model, tmp_path, monkeypatch):
  """Where RENAME_EXCHANGE is unavailable, the old copy is renamed aside before the
  new one is renamed in; a death between the two leaves the aside copy, which
  restore reads and the next save puts back before replacing it."""
  target = tmp_path / "ckpt"
  checkpoint.save(tiny_model, target)
  monkeypatch.setattr(atomic_dir, "_exchange", lambda a, b: False)
  new = init_model(jaxllm.TINY.replace(num_layers=1), seed=1)
  real_rename = os.rename

  def dies_before_moving_in(src, dst):
    if os.path.basename(src).startswith(".ckpt.tmp-") and Path(dst) == target:
      raise OSError("simulated death between the two renames")
    return real_rename(src, dst)

  monkeypatch.setattr(os, "rename", dies_before_moving_in)
  with pytest.raises(OSError, match="simulated"):
    checkpoint.save(new, target)
  monkeypatch.setattr(os, "rename", real_rename)
  assert not target.exists() and [n.startswith(".ckpt.old-") for n in _siblings(target)] == [True]
  assert checkpoint.load_config(target) == tiny_model.config
  _assert_same_params(tiny_model, checkpoint.restore(target))

  checkpoint.save(new, target)
  assert _siblings(target) == []
  _assert_same_params(new, checkpoint.restore(target))


def test_save_replaces_only_a_checkpoint_or_an_empty_directory(tiny_model, tmp_path):
  (tmp_path / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError, match=f"checkpoint {tmp_path}: .*'notes.txt'.*refusing"):
    checkpoint.save(tiny_model, tmp_path)
  assert (tmp_path / "notes.txt").read_text() == "keep me"
  empty = tmp_path / "empty"
  empty.mkdir()
  checkpoint.save(tiny_model, empty)
  _assert_same_params(tiny_model, checkpoint.restore(empty))
