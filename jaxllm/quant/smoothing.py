"""SmoothQuant-style channel smoothing, folded exactly into the model (FireQ's linear part).

For a linear input channel j with activation range ``amax_x[j]`` (from
`jaxllm.quant.calibrate`) and weight range ``amax_w[j]`` (max |w| over the rows
that channel multiplies), the scale ``s[j] = amax_x^alpha / amax_w^(1 - alpha)``
divides the activation and multiplies the weight row, so ``x @ w`` is unchanged
while the activation outliers move into the weights. The division is folded into
the op that produces the activation, so nothing is added at run time:

  * q/k/v: attn_norm's scale /= s; rows of q, k, v *= s (one s shared by the three).
  * gate/up: mlp_norm's scale /= s; rows of gate, up *= s.
  * o: its input is the attention output, linear in v's output channel
    (kv head, d); columns of v /= s and rows (h, d) of o *= s[kv(h), d]. With GQA
    every query head h that reads KV head kv(h) = h // (H / H_kv) shares that
    scale, so statistics are pooled over the group.
  * down: its input is silu(gate) * up, linear in up's columns; columns of up /= s
    and rows of down *= s.

alpha may differ per linear input (`LINEAR_INPUTS`): a float applies to all
four, a mapping names each input's alpha, None (or an input left out) leaves
that input unsmoothed.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from jaxllm.model import Llama
from jaxllm.quant.calibrate import LINEAR_INPUTS

_MIN_SCALE, _MAX_SCALE = 1e-4, 1e4
Alpha = float | Mapping[str, float | None] | tuple[tuple[str, float | None], ...]


def alphas_per_input(alpha: Alpha) -> dict[str, float | None]:
  """`alpha` as {input: alpha or None} over `LINEAR_INPUTS`; raises on unknown
  inputs or an alpha outside [0, 1]."""
  if isinstance(alpha, (int, float)):
    table = dict.fromkeys(LINEAR_INPUTS, float(alpha))
  else:
    table = dict(alpha)
    unknown = sorted(set(table) - set(LINEAR_INPUTS))
    if unknown:
      raise ValueError(f"smoothing alpha names unknown inputs {unknown}; use {LINEAR_INPUTS}")
    table = {name: table.get(name) for name in LINEAR_INPUTS}
  for name, a in table.items():
    if a is not None and not 0.0 <= a <= 1.0:
      raise ValueError(f"alpha for {name} must lie in [0, 1], got {a}")
  return table


def smoothing_scales(act_absmax, weight_absmax, alpha: float) -> np.ndarray:
  """``amax_x^alpha / amax_w^(1 - alpha)``, clipped to [1e-4, 1e4]; 1 where either range is 0."""
  a = np.asarray(act_absmax, np.float64)
  w = np.asarray(weight_absmax, np.float64)
  if a.shape != w.shape:
    raise ValueError(f"activation stats {a.shape} and weight stats {w.shape} differ in shape")
  ok = (a > 0) & (w > 0)
  s = np.where(ok, np.power(np.where(ok, a, 1), alpha) / np.power(np.where(ok, w, 1), 1 - alpha), 1)
  return np.clip(s, _MIN_SCALE, _MAX_SCALE).astype(np.float32)


def _rows_absmax(*weights, contract_dims: int = 1) -> np.ndarray:
  """max |w| over the output dims of each weight, then over the weights: [*K]."""
  out = None
  for w in weights:
    w = np.abs(np.asarray(w, np.float32))
    m = w.max(axis=tuple(range(contract_dims, w.ndim)))
    out = m if out is None else np.maximum(out, m)
  return out


def _scale_param(param, factor):
  value = param.get_value()
  param.set_value((value.astype(jnp.float32) * jnp.asarray(factor)).astype(value.dtype))


def _stat(act_absmax: Mapping[str, np.ndarray], key: str) -> np.ndarray:
  if key not in act_absmax:
    raise ValueError(f"calibration statistics lack {key!r} (have {len(act_absmax)} entries)")
  return np.asarray(act_absmax[key], np.float32)


def input_ranges(
  model: Llama, act_absmax: Mapping[str, np.ndarray], layer: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
  """(activation absmax, weight absmax) of one linear input, in the shape of its scale.

  The weight range is max |w| over the rows each input channel multiplies in every
  consumer of the input; o_in's ranges are pooled over each KV head's query heads
  ([H_kv, D]), since one scale per (kv head, d) is folded into v.
  """
  attn, mlp = model.layers[layer].attn, model.layers[layer].mlp
  x_amax = _stat(act_absmax, f"{layer}.{name}")
  if name == "attn_in":
    return x_amax, _rows_absmax(attn.q.get_value(), attn.k.get_value(), attn.v.get_value())
  if name == "mlp_in":
    return x_amax, _rows_absmax(mlp.gate.get_value(), mlp.up.get_value())
  if name == "down_in":
    return x_amax, _rows_absmax(mlp.down.get_value())
  if name != "o_in":
    raise ValueError(f"unknown linear input {name!r}; use {LINEAR_INPUTS}")
  cfg = model.config
  group = cfg.num_heads // cfg.num_kv_heads
  w_amax = _rows_absmax(attn.o.get_value(), contract_dims=2)  # [H, D]
  pool = lambda a: a.reshape(cfg.num_kv_heads, group, -1).max(axis=1)  # noqa: E731
  return pool(x_amax), pool(w_amax)


def smoothing_plan(
  model: Llama, act_absmax: Mapping[str, np.ndarray], alpha: Alpha = 0.5
) -> dict[str, np.ndarray]:
  """The scales `smooth_model` would apply, keyed like the statistics (``{i}.{input}``;
  inputs whose alpha is None absent)."""
  alphas = alphas_per_input(alpha)
  plan = {}
  for i in range(len(model.layers)):
    for name, a in alphas.items():
      if a is not None:
        plan[f"{i}.{name}"] = smoothing_scales(*input_ranges(model, act_absmax, i, name), a)
  return plan


def consumer_row_scales(model: Llama, key: str, s: np.ndarray) -> np.ndarray:
  """`s` as the factor on each row of K of the linears fed by input `key` (o_in's
  [H_kv, D] repeated over each KV head's query heads and flattened to H*D)."""
  if key.endswith(".o_in"):
    cfg = model.config
    return np.repeat(s, cfg.num_heads // cfg.num_kv_heads, axis=0).reshape(-1)
  return np.asarray(s)


def apply_smoothing(model: Llama, scales: Mapping[str, np.ndarray]) -> None:
  """Folds channel scales ``{i}.{input}: s`` into the model in place: the input is
  divided by s (in the op producing it) and its consumers' rows multiplied by s."""
  for key, s in scales.items():
    layer, name = key.split(".", 1)
    if name not in LINEAR_INPUTS or not layer.isdigit() or int(layer) >= len(model.layers):
      raise ValueError(f"no linear input {key!r} in a model of {len(model.layers)} layers")
    i = int(layer)
    attn, mlp = model.layers[i].attn, model.layers[i].mlp
    s = np.asarray(s, np.float32)
    if name == "attn_in":  # q/k/v <- attn_norm
      _scale_param(model.layers[i].attn_norm.scale, 1.0 / s)
      for p in (attn.q, attn.k, attn.v):
        _scale_param(p, s[:, None, None])
    elif name == "mlp_in":  # gate/up <- mlp_norm
      _scale_param(model.layers[i].mlp_norm.scale, 1.0 / s)
      for p in (mlp.gate, mlp.up):
        _scale_param(p, s[:, None])
    elif name == "o_in":  # o <- v, one scale per (kv head, d) shared by its group
      _scale_param(attn.v, 1.0 / s[None])
      rows = consumer_row_scales(model, key, s).reshape(attn.o.get_value().shape[:2])
      _scale_param(attn.o, rows[:, :, None])
    else:  # down <- up
      _scale_param(mlp.up, 1.0 / s[None])
      _scale_param(mlp.down, s[:, None])


def smoothed_hessians(
  model: Llama, hessians: Mapping[str, np.ndarray], scales: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
  """Input Hessians of the smoothed model from those of the unsmoothed one: an input
  divided by s has Hessian ``H / (s s^T)``, so no second calibration pass is needed."""
  out = dict(hessians)
  for key, s in scales.items():
    rows = consumer_row_scales(model, key, s).astype(np.float64)
    out[key] = (np.asarray(hessians[key], np.float64) / np.outer(rows, rows)).astype(np.float32)
  return out


def smooth_model(
  model: Llama, act_absmax: Mapping[str, np.ndarray], alpha: Alpha = 0.5
) -> dict[str, np.ndarray]:
  """Migrates activation ranges into the weights of every decoder layer, in place.

  The model's function is unchanged (to float rounding); only its weights and norm
  scales move. Must run on float weights, before quantization.

  Args:
    model: float `Llama`.
    act_absmax: statistics of the *unsmoothed* model from `calibrate.activation_absmax`.
    alpha: migration strength in [0, 1] (0.5 balances the two ranges), one for
      all inputs or per input (see the module docstring).

  Returns:
    the scales applied, keyed like the statistics (inputs left unsmoothed absent).
  """
  scales = smoothing_plan(model, act_absmax, alpha)
  apply_smoothing(model, scales)
  return scales
