"""Building a `Llama` from a params tree, and logical axes of a model's params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm import ops
from jaxllm.config import ModelConfig
from jaxllm.model import Llama


def init_model(
  cfg: ModelConfig, seed: int = 0, dtype=jnp.float32, kernels: ops.KernelConfig = ops.KernelConfig()
) -> Llama:
  """Random-init model (explicit seed)."""
  return Llama(cfg, rngs=nnx.Rngs(params=jax.random.key(seed)), dtype=dtype, kernels=kernels)


def model_from_params(
  cfg: ModelConfig, params: dict, dtype=jnp.float32, kernels: ops.KernelConfig = ops.KernelConfig()
) -> Llama:
  """A Llama whose params are `params` (nested dict of arrays), without random init."""
  params = _int_keys(params)
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=None, dtype=dtype, kernels=kernels))
  graphdef, state = nnx.split(abstract)
  expected = state.to_pure_dict()
  flat_expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  flat_given = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  if flat_expected.keys() != flat_given.keys():
    missing = sorted(map(jax.tree_util.keystr, flat_expected.keys() - flat_given.keys()))
    extra = sorted(map(jax.tree_util.keystr, flat_given.keys() - flat_expected.keys()))
    raise ValueError(
      f"params do not match {cfg.name}: missing {missing[:5]}, unexpected {extra[:5]}"
    )
  for path, spec in flat_expected.items():
    if tuple(np.shape(flat_given[path])) != spec.shape:
      raise ValueError(
        f"param {jax.tree_util.keystr(path)} has shape "
        f"{np.shape(flat_given[path])}, expected {spec.shape}"
      )
  state.replace_by_pure_dict(jax.tree.map(lambda x: jnp.asarray(x, dtype), params))
  return nnx.merge(graphdef, state)


def _int_keys(tree):
  """Nested dict with digit-string keys (as serializers write list indices) made ints."""
  if not isinstance(tree, dict):
    return tree
  return {
    int(k) if isinstance(k, str) and k.isdigit() else k: _int_keys(v) for k, v in tree.items()
  }


def logical_axes(model: Llama):
  """Pure-dict tree of logical axis-name tuples, parallel to the model's params.

  A quantized weight (`jaxllm.quant.QTensor`) gets a QTensor of names, one tuple
  per part (`QTensor.logical_axes`), so `sharding.shard_params` places its codes
  and scales exactly as it would the float weight.
  """
  from jaxllm.quant.qtensor import QTensor  # pylint: disable=import-outside-toplevel

  state = nnx.state(model)
  names = nnx.get_partition_spec(state).to_pure_dict()
  return jax.tree.map(
    lambda n, v: v.logical_axes(tuple(n)) if isinstance(v, QTensor) else n,
    names,
    state.to_pure_dict(),
    is_leaf=lambda v: isinstance(v, QTensor),
  )
