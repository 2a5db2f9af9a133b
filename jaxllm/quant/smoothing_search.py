"""Activation-aware choice of the smoothing strength, per layer and linear input (as AWQ).

One alpha for the whole model is a compromise: the best migration differs between
layers and inputs. For each linear input of each layer, every candidate alpha of a
grid (and no smoothing at all) gives channel scales s (`smoothing.smoothing_scales`);
the candidate kept is the one whose smoothed consumer weights ``W' = diag(s) W``
round (round-to-nearest, in the recipe's format) with the least output error

    sum over consumers of  tr(E^T H' E),   E = Q(W') - W',   H' = H / (s s^T),

where H is the input's Hessian ``2 X^T X / n`` on calibration data (of the
unsmoothed model: the smoothed input X / s has Hessian H'). This is exactly
``||X/s (Q(W') - W')||^2``, the layer's output error, so no extra forward pass is
needed. The op that produces the input (a norm, or the v / up columns) is scaled
by 1/s per output channel, which leaves its own relative rounding error unchanged:
the error counted is that of the consumers only.

Round-to-nearest stands in for the recipe's quantizer even when that is GPTQ:
scored by GPTQ's own (in-sample) error, no smoothing won almost everywhere, which
is far worse end to end (README).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.model import Llama
from jaxllm.quant.calibrate import LINEAR_INPUTS
from jaxllm.quant.recipes import QuantSpec
from jaxllm.quant.smoothing import consumer_row_scales, input_ranges, smoothing_scales

# linear input -> (module, weight) of its consumers, with the dims their matmul contracts
CONSUMERS = {
  "attn_in": (("attn", "q", 1), ("attn", "k", 1), ("attn", "v", 1)),
  "o_in": (("attn", "o", 2),),
  "mlp_in": (("mlp", "gate", 1), ("mlp", "up", 1)),
  "down_in": (("mlp", "down", 1),),
}


@functools.partial(jax.jit, static_argnames="spec")
def _rounding_error(w2: jax.Array, rows: jax.Array, hessian: jax.Array, spec: QuantSpec):
  w_s = w2 * rows[:, None]
  err = spec.quantize(w_s, 1).dequantize() - w_s
  h_s = hessian / (rows[:, None] * rows[None, :])
  return jnp.sum(jnp.dot(h_s, err, precision=jax.lax.Precision.HIGHEST) * err)


def rounding_error(w2: jax.Array, rows: jax.Array, hessian: jax.Array, spec: QuantSpec) -> float:
  """Output error ``tr(E^T H' E)`` of weight [K, N] with its rows scaled by `rows` [K]
  and rounded to nearest in `spec`'s format, for an input of Hessian `hessian`
  [K, K] before scaling (``H' = H / (rows rows^T)``)."""
  return float(_rounding_error(w2, rows, hessian, spec))


def _candidates(x_amax, w_amax, grid) -> list[tuple[float | None, np.ndarray]]:
  ones = np.ones_like(np.asarray(w_amax, np.float32))
  return [(None, ones)] + [(a, smoothing_scales(x_amax, w_amax, a)) for a in grid]


def search_smoothing(
  model: Llama,
  act_absmax: Mapping[str, np.ndarray],
  hessians: Mapping[str, np.ndarray],
  spec_for: Callable[[str], QuantSpec | None],
  grid: tuple[float, ...],
) -> tuple[dict[str, np.ndarray], dict[str, float | None]]:
  """Per layer and linear input, the scales of least consumer output error.

  Args:
    model: the float, unsmoothed `Llama`.
    act_absmax: its per-channel activation absmax (`calibrate.activation_absmax`).
    hessians: its input Hessians (`calibrate.input_hessians`).
    spec_for: weight path (``layers.3.attn.q``) -> its `QuantSpec`, None if kept float.
    grid: candidate alphas in [0, 1]; no smoothing is always a candidate.

  Returns:
    (scales keyed ``{i}.{input}``, for `smoothing.apply_smoothing`: inputs for which
    no smoothing won, or whose consumers all stay float, are absent;
    the alpha chosen per key, None for no smoothing).
  """
  if not grid or any(not 0.0 <= a <= 1.0 for a in grid):
    raise ValueError(f"the alpha grid must be non-empty, in [0, 1]; got {grid}")
  scales, chosen = {}, {}
  for i, layer in enumerate(model.layers):
    for name in LINEAR_INPUTS:
      key = f"{i}.{name}"
      consumers = []
      for module, weight, contract in CONSUMERS[name]:
        spec = spec_for(f"layers.{i}.{module}.{weight}")
        if spec is not None:
          w = getattr(getattr(layer, module), weight).get_value()
          k = int(np.prod(w.shape[:contract]))
          consumers.append((jnp.asarray(w, jnp.float32).reshape(k, -1), spec))
      if not consumers:
        continue
      if key not in hessians:
        raise ValueError(f"calibration Hessians lack {key!r} (have {len(hessians)} entries)")
      hessian = jnp.asarray(hessians[key], jnp.float32)
      best = None
      for alpha, s in _candidates(*input_ranges(model, act_absmax, i, name), grid):
        rows = jnp.asarray(consumer_row_scales(model, key, s))
        error = sum(rounding_error(w2, rows, hessian, spec) for w2, spec in consumers)
        if best is None or error < best[0]:
          best = (error, alpha, s)
      chosen[key] = best[1]
      if best[1] is not None:
        scales[key] = best[2]
  return scales, chosen
