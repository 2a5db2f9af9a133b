"""Save and restore model params with Orbax.

A checkpoint directory holds the params (an Orbax PyTree checkpoint of the
model's pure-dict state) and ``config.json``, the `ModelConfig` that shapes them.
A quantized model (decoder linears replaced by `jaxllm.quant.QTensor`) is saved
the same way: each QTensor becomes a dict of its arrays (FP8 parts as their uint8
bits) and ``quant.json`` records its static fields, so `restore` rebuilds it
exactly.

`save` is atomic (`jaxllm.atomic_dir`): it writes into a sibling temporary
directory and swaps it into place only when complete, so a save killed at any
moment leaves the previous checkpoint restorable.

`restore(..., mesh=...)` reads every array straight into its sharded layout on a
device mesh (shardings from the params' logical axes, `sharding.DEFAULT_RULES`; a
QTensor's parts shard like its float weight, FP8 bits like the float original).

A missing, partial or malformed checkpoint raises `CheckpointError` (a
ValueError; `CheckpointNotFoundError` is also a FileNotFoundError) with a
one-line message naming the directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

import sharding
from jaxllm import atomic_dir, ops
from jaxllm.config import ModelConfig
from jaxllm.model import Llama
from jaxllm.params import _int_keys, logical_axes, model_from_params
from jaxllm.quant.formats import get_format
from jaxllm.quant.qtensor import QTensor

_CONFIG = "config.json"
_PARAMS = "params"
_QUANT = "quant.json"
_BITCAST = {"float8_e4m3fn": jnp.uint8}  # stored as raw bits


class CheckpointError(ValueError):
  """A checkpoint that cannot be written or read; the message (one line) names its path."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """No checkpoint at the path (no directory, or no config.json in it)."""


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
      format=get_format(entry["method"]),
      shape=tuple(entry["shape"]),
      contract_dims=entry["contract_dims"],
      k_pad=entry["k_pad"],
    )
  return params


def save(model: Llama, directory: str) -> int:
  """Writes `model`'s params and config under `directory`; returns bytes on disk.

  Atomic: everything is written into a sibling temporary directory, which then
  replaces `directory` in one step, so a save killed at any moment leaves either
  the previous checkpoint or the new one, never a mix. An existing `directory`
  is replaced only if it is empty or holds a jaxllm checkpoint.
  """
  given = os.fspath(directory)
  directory = os.path.realpath(given)
  if os.path.lexists(directory) and not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint {given}: exists and is not a directory")
  if os.path.isdir(directory):
    foreign = sorted(n for n in os.listdir(directory) if not _is_checkpoint_entry(n))
    if foreign:
      raise CheckpointError(
        f"checkpoint {given}: the directory holds files that are not part of a jaxllm "
        f"checkpoint ({', '.join(map(repr, foreign[:3]))}); refusing to replace it"
      )
  params, meta = _encode_quantized(nnx.state(model, nnx.Param).to_pure_dict())
  try:
    tmp = atomic_dir.new_sibling(directory)
  except OSError as e:
    raise CheckpointError(f"checkpoint {given}: cannot write beside it: {e}") from e
  try:
    _write_json(os.path.join(tmp, _CONFIG), dataclasses.asdict(model.config))
    if meta:
      _write_json(os.path.join(tmp, _QUANT), meta)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, _PARAMS), params)
    atomic_dir.commit(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return disk_bytes(directory)


def _is_checkpoint_entry(name: str) -> bool:
  """Whether `name` belongs in a checkpoint directory (Orbax leaves `params.*` temporaries)."""
  return name in (_CONFIG, _QUANT, _PARAMS) or name.startswith(_PARAMS + ".")


def _write_json(path: str, obj) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=1)
    f.flush()
    os.fsync(f.fileno())


def _locate(directory) -> str:
  """The absolute directory to read the checkpoint `directory` from: itself, or
  the old copy an interrupted save left aside (`atomic_dir.readable`)."""
  given = os.fspath(directory)
  path = atomic_dir.readable(given)
  if path is not None:
    return path
  if os.path.lexists(given):
    raise CheckpointError(f"checkpoint {given}: not a directory")
  raise CheckpointNotFoundError(f"checkpoint {given}: no such directory")


def load_config(directory: str) -> ModelConfig:
  """The `ModelConfig` of the checkpoint saved by `save` under `directory` (cheap:
  the params are not read, only found). Raises `CheckpointError` (a ValueError)
  with a one-line message naming the directory if config.json is missing or
  invalid, or the params directory is missing."""
  return _load_config(_locate(directory), os.fspath(directory))


def _load_config(path: str, given: str) -> ModelConfig:
  config_path = os.path.join(path, _CONFIG)
  if not os.path.isfile(config_path):
    raise CheckpointNotFoundError(
      f"checkpoint {given}: not a jaxllm checkpoint: {_CONFIG} is missing"
    )
  try:
    with open(config_path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(
      f"checkpoint {given}: {_CONFIG} is not valid JSON (line {e.lineno}, column {e.colno}: "
      f"{e.msg})"
    ) from e
  except (OSError, UnicodeDecodeError) as e:
    raise CheckpointError(f"checkpoint {given}: {_CONFIG} cannot be read: {e}") from e
  cfg = _config_from_json(data, given)
  if not os.path.isdir(os.path.join(path, _PARAMS)):
    raise CheckpointError(
      f"checkpoint {given}: {_PARAMS}/ is missing (an interrupted save, or not a jaxllm checkpoint)"
    )
  return cfg


_JSON_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def _config_from_json(data, given: str) -> ModelConfig:
  """Checks config.json's keys and value types against `ModelConfig`."""
  where = f"checkpoint {given}: {_CONFIG}"
  if not isinstance(data, dict):
    raise CheckpointError(f"{where} holds a JSON {type(data).__name__}, expected an object")
  fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(data) - set(fields))
  if unknown:
    raise CheckpointError(f"{where} has unknown keys {unknown}")
  required = dataclasses.MISSING
  missing = [n for n, f in fields.items() if n not in data and f.default is required]
  if missing:
    raise CheckpointError(f"{where} is missing keys {missing}")
  values = {}
  for name, value in data.items():
    kind = str(fields[name].type)
    allowed = _JSON_TYPES.get(kind)
    bad_bool = isinstance(value, bool) and kind != "bool"
    if allowed is not None and (bad_bool or not isinstance(value, allowed)):
      raise CheckpointError(
        f"{where}: {name!r} must be a JSON {kind}, got {json.dumps(value)[:40]}"
      )
    if kind == "float":
      value = float(value)
      if not math.isfinite(value):
        raise CheckpointError(f"{where}: {name!r} must be finite, got {value}")
    values[name] = value
  try:
    return ModelConfig(**values)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{where}: {e}") from e


def restore(
  directory: str,
  dtype=None,
  kernels: ops.KernelConfig = ops.KernelConfig(),
  mesh: Mesh | None = None,
  rules: sharding.LogicalRules = sharding.DEFAULT_RULES,
  strict: bool = False,
  log=None,
) -> Llama:
  """Rebuilds the model saved by `save` (float params cast to `dtype` if given;
  quantized weights come back exactly as saved).

  With `mesh`, every array is read straight into its sharded layout on it (by the
  params' logical axes and `rules`; see `sharding.plan_shardings`): a dimension the
  mesh does not divide is replicated over it and logged once per kind (`log`, default
  the ``sharding`` logger), or with `strict` refused.

  A missing, partial or inconsistent checkpoint, or a mesh that cannot hold it (an
  axis that is not a sharding axis; with `strict`, an axis not dividing a dim),
  raises `CheckpointError` (a ValueError) with a one-line message naming the directory.
  """
  given = os.fspath(directory)
  path = _locate(directory)
  cfg = _load_config(path, given)
  params_path = os.path.join(path, _PARAMS)
  quant_path = os.path.join(path, _QUANT)
  meta = None
  if os.path.isfile(quant_path):
    try:
      with open(quant_path, encoding="utf-8") as f:
        meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"checkpoint {given}: {_QUANT} cannot be read: {e}") from e
  target = None
  if mesh is not None:
    target = _sharded_target(params_path, given, cfg, meta, mesh, rules, strict, log)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(params_path) if target is None else ckptr.restore(params_path, target)
  except Exception as e:  # Orbax and TensorStore raise many kinds on damaged files
    raise CheckpointError(
      f"checkpoint {given}: {_PARAMS}/ cannot be read (partial or corrupt): "
      f"{type(e).__name__}: {_first_line(e)}"
    ) from e
  try:
    if meta is None:
      dtype = dtype or jax.tree.leaves(params)[0].dtype
      return model_from_params(cfg, params, jnp.dtype(dtype), kernels)
    params = _decode_quantized(params, meta)
    return _quantized_model(cfg, _int_keys(params), dtype, kernels)
  except CheckpointError:
    raise
  except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
    raise CheckpointError(
      f"checkpoint {given}: the params do not match {_CONFIG}/{_QUANT}: "
      f"{type(e).__name__}: {_first_line(e)}"
    ) from e


def _str_keys(tree):
  """Nested dict with every key a string (as the checkpoint's tree has them)."""
  if not isinstance(tree, dict):
    return tree
  return {str(k): _str_keys(v) for k, v in tree.items()}


def _sharded_target(params_path, given, cfg, meta, mesh, rules, strict, log):
  """The checkpoint's tree as `jax.ShapeDtypeStruct`s carrying each array's sharding on
  `mesh` (what Orbax restores straight into); CheckpointError if the mesh cannot hold it."""
  if not isinstance(mesh, Mesh):
    raise CheckpointError(
      f"checkpoint {given}: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}"
    )
  try:
    with ocp.StandardCheckpointer() as ckptr:
      stored = ckptr.metadata(params_path).item_metadata
    stored = getattr(stored, "tree", stored)  # Orbax's TreeMetadata wraps the dict
    stored = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored)
  except Exception as e:  # Orbax and TensorStore raise many kinds on damaged files
    raise CheckpointError(
      f"checkpoint {given}: {_PARAMS}/ metadata cannot be read (partial or corrupt): "
      f"{type(e).__name__}: {_first_line(e)}"
    ) from e
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=None))
  names = _str_keys(logical_axes(abstract))
  try:
    for entry in (meta or {}).values():  # a QTensor's parts are named like its float weight
      node, parts = names, stored
      for key in entry["keys"][:-1]:
        node, parts = node[key], parts[key]
      last = entry["keys"][-1]
      q = QTensor(
        **parts[last],
        format=get_format(entry["method"]),
        shape=tuple(entry["shape"]),
        contract_dims=entry["contract_dims"],
        k_pad=entry["k_pad"],
      ).logical_axes(tuple(node[last]))
      node[last] = {name: getattr(q, name) for name in parts[last]}
    shardings, report = sharding.plan_shardings(stored, names, mesh, rules, strict)
  except (KeyError, IndexError, TypeError, ValueError) as e:
    raise CheckpointError(
      f"checkpoint {given}: cannot restore onto the mesh {dict(mesh.shape)}: "
      + " ".join(str(e).split())
    ) from e
  sharding.log_report(report, log)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), stored, shardings
  )


def _first_line(e: BaseException, limit: int = 160) -> str:
  """The gist of a library's error message, on one line."""
  lines = str(e).strip().splitlines()
  line = lines[0].split(". See full TensorStore details")[0] if lines else ""
  return line if len(line) <= limit else line[:limit] + "..."


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
