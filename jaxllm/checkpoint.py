"""Save and restore model params with Orbax.

A checkpoint directory holds the params (an Orbax PyTree checkpoint of the
model's pure-dict state) and ``config.json``, the `ModelConfig` that shapes them.
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
from jaxllm.params import model_from_params

_CONFIG = "config.json"
_PARAMS = "params"


def save(model: Llama, directory: str) -> int:
  """Writes `model`'s params and config under `directory`; returns bytes on disk."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, _CONFIG), "w") as f:
    json.dump(dataclasses.asdict(model.config), f, indent=1)
  params = nnx.state(model, nnx.Param).to_pure_dict()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, _PARAMS), params, force=True)
  return disk_bytes(directory)


def restore(directory: str, dtype=None, kernels: ops.KernelConfig = ops.KernelConfig()) -> Llama:
  """Rebuilds the model saved by `save` (params cast to `dtype` if given)."""
  directory = os.path.abspath(directory)
  config_path = os.path.join(directory, _CONFIG)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{directory} is not a jaxllm checkpoint: {_CONFIG} is missing")
  with open(config_path) as f:
    cfg = ModelConfig(**json.load(f))
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(directory, _PARAMS))
  dtype = dtype or jax.tree.leaves(params)[0].dtype
  return model_from_params(cfg, params, jnp.dtype(dtype), kernels)


def disk_bytes(directory: str) -> int:
  """Total size of the files under `directory`."""
  return sum(
    os.path.getsize(os.path.join(root, name))
    for root, _, names in os.walk(directory)
    for name in names
  )
