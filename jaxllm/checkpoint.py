"""Save and restore model params with Orbax.

A checkpoint directory holds the params (an Orbax PyTree checkpoint of the
model's pure-dict state) and ``config.json``, the `ModelConfig` that shapes them.
A quantized model (decoder linears replaced by `jaxllm.quant.QTensor`) is saved
the same way: each QTensor becomes a dict of its arrays (FP8 parts as their uint8
bits) and ``quant.json`` records its static fields, so `restore` rebuilds it
exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from jaxllm import ops
from jaxllm.config import ModelConfig
from jaxllm.model import Llama
from jaxllm.params import _int_keys, model_from_params
from jaxllm.quant.qtensor import QTensor

_CONFIG = "config.json"
_PARAMS = "params"
_QUANT = "quant.json"
_BITCAST = {"float8_e4m3fn": jnp.uint8}  # stored as raw bits


def _is_qtensor(x) -> bool:
  return isinstance(x, QTensor)


def _encode_quantized(params: dict) -> tuple[dict, dict]:
  """Replaces QTensors by dicts of plain arrays; returns (tree, {path: static fields})."""
  meta = {}

  def encode(path, leaf):
    if not _is_qtensor(leaf):
      return leaf
    parts, dtypes = {}, {}
    for name, arr in leaf.parts.items():
      dtype = jnp.dtype(arr.dtype).name
      dtypes[name] = dtype
      parts[name] = jax.lax.bitcast_convert_type(arr, _BITCAST[dtype]) if dtype in _BITCAST else arr
    meta[jax.tree_util.keystr(path)] = {
      "keys": [str(getattr(k, "key", getattr(k, "idx", k))) for k in path],
      "method": leaf.method,
      "shape": list(leaf.shape),
      "contract_dims": leaf.contract_dims,
      "k_pad": leaf.k_pad,
      "dtypes": dtypes,
    }
    return parts

  tree = jax.tree_util.tree_map_with_path(encode, params, is_leaf=_is_qtensor)
  return tree, meta


def _decode_quantized(params: dict, meta: dict) -> dict:
  """Inverse of `_encode_quantized` on a restored (string-keyed) tree."""
  for entry in meta.values():
    node = params
    for key in entry["keys"][:-1]:
      node = node[key]
    parts = node[entry["keys"][-1]]
    arrays = {}
    for name, dtype in entry["dtypes"].items():
      arr = jnp.asarray(parts[name])
      arrays[name] = jax.lax.bitcast_convert_type(arr, dtype) if dtype in _BITCAST else arr
    node[entry["keys"][-1]] = QTensor(
      **arrays,
      method=entry["method"],
      shape=tuple(entry["shape"]),
      contract_dims=entry["contract_dims"],
      k_pad=entry["k_pad"],
    )
  return params


def save(model: Llama, directory: str) -> int:
  """Writes `model`'s params and config under `directory`; returns bytes on disk."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, _CONFIG), "w") as f:
    json.dump(dataclasses.asdict(model.config), f, indent=1)
  params, meta = _encode_quantized(nnx.state(model, nnx.Param).to_pure_dict())
  quant_path = os.path.join(directory, _QUANT)
  if meta:
    with open(quant_path, "w") as f:
      json.dump(meta, f, indent=1)
  elif os.path.exists(quant_path):
    os.remove(quant_path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, _PARAMS), params, force=True)
  return disk_bytes(directory)


def load_config(directory: str) -> ModelConfig:
  """The `ModelConfig` of the checkpoint saved by `save` under `directory` (cheap:
  the params are not read)."""
  config_path = os.path.join(os.path.abspath(directory), _CONFIG)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{directory} is not a jaxllm checkpoint: {_CONFIG} is missing")
  with open(config_path) as f:
    return ModelConfig(**json.load(f))


def restore(directory: str, dtype=None, kernels: ops.KernelConfig = ops.KernelConfig()) -> Llama:
  """Rebuilds the model saved by `save` (float params cast to `dtype` if given;
  quantized weights come back exactly as saved)."""
  directory = os.path.abspath(directory)
  cfg = load_config(directory)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(directory, _PARAMS))
  quant_path = os.path.join(directory, _QUANT)
  if not os.path.isfile(quant_path):
    dtype = dtype or jax.tree.leaves(params)[0].dtype
    return model_from_params(cfg, params, jnp.dtype(dtype), kernels)
  with open(quant_path) as f:
    params = _decode_quantized(params, json.load(f))
  return _quantized_model(cfg, _int_keys(params), dtype, kernels)


def _quantized_model(cfg: ModelConfig, params: dict, dtype, kernels: ops.KernelConfig) -> Llama:
  """A Llama holding `params`, some of whose leaves are QTensors."""
  floats = [x for x in jax.tree.leaves(params, is_leaf=_is_qtensor) if not _is_qtensor(x)]
  dtype = jnp.dtype(dtype or floats[0].dtype)
  params = jax.tree.map(
    lambda x: x if _is_qtensor(x) else jnp.asarray(x, dtype), params, is_leaf=_is_qtensor
  )
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=None, dtype=dtype, kernels=kernels))
  graphdef, state = nnx.split(abstract)
  state.replace_by_pure_dict(params)
  return nnx.merge(graphdef, state)


def disk_bytes(directory: str) -> int:
  """Total size of the files under `directory`."""
  return sum(
    os.path.getsize(os.path.join(root, name))
    for root, _, names in os.walk(directory)
    for name in names
  )
