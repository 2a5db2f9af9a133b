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
  alphas = alphas_per_input(alpha)
  cfg = model.config
  group = cfg.num_heads // cfg.num_kv_heads
  applied = {}
  for i, layer in enumerate(model.layers):
    attn, mlp = layer.attn, layer.mlp
    if alphas["attn_in"] is not None:  # q/k/v <- attn_norm
      w_amax = _rows_absmax(attn.q.get_value(), attn.k.get_value(), attn.v.get_value())
      s = smoothing_scales(_stat(act_absmax, f"{i}.attn_in"), w_amax, alphas["attn_in"])
      _scale_param(layer.attn_norm.scale, 1.0 / s)
      for p in (attn.q, attn.k, attn.v):
        _scale_param(p, s[:, None, None])
      applied[f"{i}.attn_in"] = s
    if alphas["mlp_in"] is not None:  # gate/up <- mlp_norm
      w_amax = _rows_absmax(mlp.gate.get_value(), mlp.up.get_value())
      s = smoothing_scales(_stat(act_absmax, f"{i}.mlp_in"), w_amax, alphas["mlp_in"])
      _scale_param(layer.mlp_norm.scale, 1.0 / s)
      for p in (mlp.gate, mlp.up):
        _scale_param(p, s[:, None])
      applied[f"{i}.mlp_in"] = s
    if alphas["o_in"] is not None:  # o <- v, one scale per (kv head, d) shared by its group
      x_amax = _stat(act_absmax, f"{i}.o_in")  # [H, D]
      x_amax = x_amax.reshape(cfg.num_kv_heads, group, -1).max(axis=1)
      w_amax = _rows_absmax(attn.o.get_value(), contract_dims=2)  # [H, D]
      w_amax = w_amax.reshape(cfg.num_kv_heads, group, -1).max(axis=1)
      s = smoothing_scales(x_amax, w_amax, alphas["o_in"])  # [H_kv, D]
      _scale_param(attn.v, 1.0 / s[None])
      _scale_param(attn.o, np.repeat(s, group, axis=0)[:, :, None])
      applied[f"{i}.o_in"] = s
    if alphas["down_in"] is not None:  # down <- up
      w_amax = _rows_absmax(mlp.down.get_value())
      s = smoothing_scales(_stat(act_absmax, f"{i}.down_in"), w_amax, alphas["down_in"])
      _scale_param(mlp.up, 1.0 / s[None])
      _scale_param(mlp.down, s[:, None])
      applied[f"{i}.down_in"] = s
  return applied
