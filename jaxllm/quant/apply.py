"""Quantizing a model's linear layers in place, by method or by `Recipe`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np
from flax import nnx

from jaxllm.model import Llama
from jaxllm.quant import calibrate, reconstruct, smoothing
from jaxllm.quant.calibrate import input_hessians, layerwise_hessians
from jaxllm.quant.gptq import gptq_quantize
from jaxllm.quant.qtensor import QTensor
from jaxllm.quant.recipes import QuantSpec, Recipe
from jaxllm.quant.smoothing_search import search_smoothing

# param name -> number of leading dims contracted by its matmul
LINEAR_PARAMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


def linear_params(model: Llama) -> Iterator[tuple[str, nnx.Param, int]]:
  """(path like ``layers.3.attn.q``, its Param, contracted dims) for every decoder linear."""
  for i, layer in enumerate(model.layers):
    for module_name in ("attn", "mlp"):
      module = getattr(layer, module_name)
      for name, contract in LINEAR_PARAMS.items():
        param = getattr(module, name, None)
        if param is not None:
          yield f"layers.{i}.{module_name}.{name}", param, contract


def quantize_with_spec(param: nnx.Param, spec: QuantSpec, contract_dims: int) -> None:
  param.set_value(spec.quantize(param.get_value(), contract_dims))


def quantize_model(model: Llama, method: str | QuantSpec, group_size: int | None = 128) -> Llama:
  """Replaces every decoder linear weight by a `QTensor` (embedding and norms stay float).

  The model is modified in place and returned; its forward then runs through
  the ``quantized_linear`` op.
  """
  spec = method if isinstance(method, QuantSpec) else QuantSpec(method, group_size)
  for _, param, contract in linear_params(model):
    if not isinstance(param.get_value(), QTensor):
      quantize_with_spec(param, spec, contract)
  return model


# linear name -> the calibration tap that feeds it
_INPUT_OF = {
  "q": "attn_in",
  "k": "attn_in",
  "v": "attn_in",
  "o": "o_in",
  "gate": "mlp_in",
  "up": "mlp_in",
  "down": "down_in",
}


def input_key(path: str) -> str:
  """Calibration key of a linear's input: ``layers.3.attn.q`` -> ``3.attn_in``."""
  parts = path.split(".")
  return f"{parts[1]}.{_INPUT_OF[parts[-1]]}"


def apply_recipe(
  model: Llama,
  recipe: Recipe,
  act_absmax: Mapping[str, np.ndarray] | None = None,
  calib_windows=None,
  progress: bool = False,
  on_choice: Callable[[reconstruct.LayerChoice], None] | None = None,
) -> Llama:
  """Smooths (if the recipe says so) and quantizes `model` in place; returns it.

  Args:
    model: a float model.
    recipe: what to do (see `jaxllm.quant.recipes`).
    act_absmax: per-channel activation absmax from `jaxllm.quant.calibrate`,
      required when the recipe smooths.
    calib_windows: int [N, length] token ids, required when the recipe uses GPTQ
      or an alpha search: the Hessians are collected from the float model in one
      pass (and rescaled for the smoothing), so every layer sees float inputs; with
      `Recipe.sequential`, GPTQ's come layer by layer from the already-quantized
      layers before it; `Recipe.reconstruct` learns each layer's rounding on them.
    progress: for block reconstruction (minutes per model), a tqdm bar on stderr and a
      line per layer saying whether it kept learned rounding or the recipe's own.
    on_choice: for block reconstruction, called with each layer's
      `jaxllm.quant.reconstruct.LayerChoice` (what it kept, and both block errors).
  """
  if recipe.smooths and act_absmax is None:
    raise ValueError(f"recipe {recipe.name!r} smooths, so it needs calibration statistics")
  reason = _why_windows(recipe)
  if reason and calib_windows is None:
    raise ValueError(f"recipe {recipe.name!r} {reason}, so it needs calibration windows")
  hessians = None
  layer_by_layer = recipe.sequential or recipe.reconstruct is not None
  if recipe.alpha_grid or (recipe.gptq and not layer_by_layer):
    hessians = input_hessians(model, calib_windows)
  if recipe.smooths:
    if recipe.alpha_grid:
      scales, _ = search_smoothing(model, act_absmax, hessians, recipe.spec_for, recipe.alpha_grid)
    else:
      scales = smoothing.smoothing_plan(model, act_absmax, recipe.smoothing_alpha)
    smoothing.apply_smoothing(model, scales)
    if hessians is not None:
      hessians = smoothing.smoothed_hessians(model, hessians, scales)
  if recipe.reconstruct is not None:
    _reconstruct(model, recipe, calib_windows, progress, on_choice)
  elif not recipe.gptq:
    _quantize_linears(model, recipe, None)
  elif not recipe.sequential:
    _quantize_linears(model, recipe, hessians)
  else:  # each layer's Hessians from the already-quantized layers before it
    for i, layer_hessians in layerwise_hessians(model, calib_windows):
      _quantize_linears(model, recipe, layer_hessians, layer=i)
  return model


def _why_windows(recipe: Recipe) -> str | None:
  """What `recipe` needs calibration windows for (None: nothing)."""
  if recipe.reconstruct is not None:
    return "learns its rounding block by block"
  if recipe.gptq:
    return "uses GPTQ"
  if recipe.alpha_grid:
    return "searches its smoothing per layer"
  return None


def _reconstruct(model: Llama, recipe: Recipe, calib_windows, progress: bool, on_choice) -> None:
  """Block reconstruction (`jaxllm.quant.reconstruct`) of the smoothed `model`, in place."""
  windows = calibrate.check_windows(calib_windows, model.config.vocab_size)
  cfg, kernels = model.config, model.kernels
  n_tokens = windows.shape[0] * windows.shape[1]

  def specs_of_layer(i):
    specs = {}
    for path, _, contract in linear_params(model):
      spec = recipe.spec_for(path)
      if spec is not None and path.split(".")[1] == str(i):
        _, _, module, name = path.split(".")
        specs[(module, name, contract)] = spec
    return specs

  def quantize_own(i, inputs):
    hessians = None
    if recipe.gptq:
      hessians = calibrate.block_hessians(model.layers[i], inputs, cfg, kernels, n_tokens, f"{i}.")
    _quantize_linears(model, recipe, hessians, layer=i)

  reconstruct.reconstruct_layers(
    model,
    nnx.clone(model),
    calibrate.embed_windows(model, windows),
    specs_of_layer,
    quantize_own,
    recipe.reconstruct,
    progress=progress,
    on_choice=on_choice,
  )


def _quantize_linears(model: Llama, recipe: Recipe, hessians, layer: int | None = None) -> None:
  """Quantizes the float linears (of one `layer`, or all) the recipe names: by GPTQ
  against `hessians` when given, else round-to-nearest."""
  for path, param, contract in linear_params(model):
    spec = recipe.spec_for(path)
    if spec is None or isinstance(param.get_value(), QTensor):
      continue
    if layer is not None and path.split(".")[1] != str(layer):
      continue
    if hessians is None:
      quantize_with_spec(param, spec, contract)
    else:
      w, h = param.get_value(), hessians[input_key(path)]
      param.set_value(gptq_quantize(w, h, spec, contract, act_order=recipe.act_order))


def weight_bytes(model: Llama) -> dict:
  """Exact bytes of the decoder linears (as stored) and of the whole model.

  Returns:
    dict with ``linear_bytes`` (values, scales, offsets, padding included),
    ``linear_bf16_bytes`` (the same tensors in bf16), ``model_bytes`` (everything,
    embedding and norms as stored) and ``model_bf16_bytes``.
  """
  import jax  # pylint: disable=import-outside-toplevel

  linear, linear_bf16 = _stored_and_bf16_bytes(p.get_value() for _, p, _ in linear_params(model))
  state = nnx.state(model, nnx.Param).to_pure_dict()
  total, total_bf16 = _stored_and_bf16_bytes(
    jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, QTensor))
  )
  return {
    "linear_bytes": linear,
    "linear_bf16_bytes": linear_bf16,
    "model_bytes": total,
    "model_bf16_bytes": total_bf16,
  }


def _stored_and_bf16_bytes(values) -> tuple[int, int]:
  """(bytes as stored, bytes in bf16) summed over arrays and `QTensor`s."""
  stored, bf16 = 0, 0
  for value in values:
    if isinstance(value, QTensor):
      stored += value.num_bytes
      bf16 += value.bf16_bytes
    else:
      stored += value.size * value.dtype.itemsize
      bf16 += 2 * value.size
  return stored, bf16
