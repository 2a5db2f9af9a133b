"""Orbax save/restore round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import checkpoint


def test_round_trip_is_exact(tiny_model, tmp_path):
  size = checkpoint.save(tiny_model, tmp_path / "ckpt")
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(tiny_model)))
  assert size >= param_bytes * 0.5  # compressed or not, the weights are on disk
  restored = checkpoint.restore(tmp_path / "ckpt")
  assert restored.config == tiny_model.config
  for a, b in zip(jax.tree.leaves(nnx.state(tiny_model)), jax.tree.leaves(nnx.state(restored))):
    np.testing.assert_array_equal(a, b)
  tokens = jnp.array([[1, 2, 3, 4]])
  np.testing.assert_array_equal(tiny_model(tokens)[0], restored(tokens)[0])


def test_restore_with_dtype(tiny_model, tmp_path):
  checkpoint.save(tiny_model, tmp_path / "ckpt")
  restored = checkpoint.restore(tmp_path / "ckpt", dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(nnx.state(restored))} == {jnp.dtype(jnp.bfloat16)}


def test_restore_from_non_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a jaxllm checkpoint"):
    checkpoint.restore(tmp_path)
