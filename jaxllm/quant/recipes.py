"""Quantization recipes as data: which linear weights get which format, and smoothing.

A `Recipe` is a table of `QuantRule`s (a regex over parameter paths such as
``layers.3.attn.q`` -> a `QuantSpec`), tried in order, first match wins; a path no
rule matches stays float. `RECIPES` holds the named recipes the runner and the
notebook use, FireQ's two ablations among them.
"""

from __future__ import annotations

import dataclasses
import re

from jaxllm.quant.formats import WeightFormat, format_names, get_format
from jaxllm.quant.qtensor import QTensor, quantize
from jaxllm.quant.smoothing import alphas_per_input


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one weight is quantized (the arguments of `jaxllm.quant.quantize`).

  `method` names a weight format of `jaxllm.quant.formats.FORMATS` (or is a
  `WeightFormat` object); `format` is the format itself.
  """

  method: str | WeightFormat
  group_size: int | None = None
  pad_k: bool = False
  scale_dtype: str | None = None
  per_tensor_scale: bool = True
  clip_search: bool = False

  def quantize(self, w, contract_dims: int, clip_search: bool | None = None) -> QTensor:
    """`w` quantized round-to-nearest as this spec says (`clip_search` overrides the spec's)."""
    return quantize(
      w,
      self.method,
      self.group_size,
      contract_dims,
      pad_k=self.pad_k,
      scale_dtype=self.scale_dtype,
      per_tensor_scale=self.per_tensor_scale,
      clip_search=self.clip_search if clip_search is None else clip_search,
    )

  def __post_init__(self):
    get_format(self.method)  # raises on an unknown name

  @property
  def format(self) -> WeightFormat:
    return get_format(self.method)


@dataclasses.dataclass(frozen=True)
class Reconstruction:
  """Block reconstruction (`jaxllm.quant.reconstruct`): how long and how fast each
  block's rounding is learned by signed gradient descent."""

  steps: int = 200
  learning_rate: float = 5e-3

  def __post_init__(self):
    if not isinstance(self.steps, int) or self.steps < 1:
      raise ValueError(f"reconstruction steps must be an int >= 1, got {self.steps!r}")
    if not self.learning_rate > 0:
      raise ValueError(f"reconstruction learning_rate must be > 0, got {self.learning_rate}")


@dataclasses.dataclass(frozen=True)
class QuantRule:
  """Weights whose path fully matches `pattern` are quantized with `spec` (None: kept float)."""

  pattern: str
  spec: QuantSpec | None

  def matches(self, path: str) -> bool:
    return re.fullmatch(self.pattern, path) is not None


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A named quantization: rules for the weights, and optional SmoothQuant-style smoothing.

  Attributes:
    name: the method name the runner reports.
    description: one line for tables and plots.
    rules: `QuantRule`s, first match wins.
    smoothing_alpha: migration strength alpha of the channel scales
      ``s = amax_x^alpha / amax_w^(1 - alpha)``: one float for every linear
      input, or ``((input, alpha or None), ...)`` per input of
      `jaxllm.quant.calibrate.LINEAR_INPUTS`; None: no smoothing.
    gptq: quantize the weights (int4, int8) with GPTQ (`jaxllm.quant.gptq`) against the
      Hessians of calibration inputs (of the smoothed model when smoothing),
      instead of round-to-nearest.
    act_order: GPTQ takes the rows of K by decreasing Hessian diagonal, on group
      grids fixed from the weight beforehand (`gptq_quantize(act_order=True)`).
    sequential: GPTQ quantizes layer by layer, each against the Hessians of its
      inputs as the already-quantized layers before it produce them
      (`calibrate.layerwise_hessians`), instead of the float model's.
    alpha_grid: instead of one `smoothing_alpha`, each layer's each linear input
      takes the alpha of this grid (or no smoothing) whose smoothed weights round
      with the least output error on calibration inputs
      (`jaxllm.quant.smoothing_search`, as AWQ); excludes `smoothing_alpha`.
    reconstruct: learn each block's int4 rounding against the float block's
      outputs (`jaxllm.quant.reconstruct`), layer by layer; each layer keeps the
      learned weights or the recipe's own (GPTQ, sequential, or round-to-nearest),
      whichever reproduces the block better on the calibration windows.
  """

  name: str
  description: str
  rules: tuple[QuantRule, ...] = ()
  smoothing_alpha: float | tuple[tuple[str, float | None], ...] | None = None
  gptq: bool = False
  act_order: bool = False
  sequential: bool = False
  alpha_grid: tuple[float, ...] = ()
  reconstruct: Reconstruction | None = None

  def __post_init__(self):
    if self.alpha_grid:
      if self.smoothing_alpha is not None:
        raise ValueError(
          f"recipe {self.name!r}: give smoothing_alpha or alpha_grid (searched per layer), not both"
        )
      if any(not 0.0 <= a <= 1.0 for a in self.alpha_grid):
        raise ValueError(f"recipe {self.name!r}: alpha_grid values must lie in [0, 1]")
    for option in ("act_order", "sequential"):
      if getattr(self, option) and not self.gptq:
        raise ValueError(f"recipe {self.name!r}: {option} is a GPTQ option; set gptq=True")
    if self.gptq and any(
      r.spec is not None and not r.spec.format.supports_gptq for r in self.rules
    ):
      raise ValueError(
        f"recipe {self.name!r}: GPTQ handles the {', '.join(format_names('supports_gptq'))} weights"
      )
    if self.smoothing_alpha is not None:
      alphas_per_input(self.smoothing_alpha)  # raises on a bad table
    if self.reconstruct is not None:
      if self.alpha_grid:
        raise ValueError(f"recipe {self.name!r}: reconstruct does not combine with alpha_grid")
      bad = [r.spec.format.name for r in self.rules if r.spec and not r.spec.format.learnable]
      if bad:
        raise ValueError(
          f"recipe {self.name!r}: block reconstruction learns {format_names('learnable')} "
          f"weights, not {sorted(set(bad))}"
        )

  def spec_for(self, path: str) -> QuantSpec | None:
    for rule in self.rules:
      if rule.matches(path):
        return rule.spec
    return None

  @property
  def smooths(self) -> bool:
    return self.smoothing_alpha is not None or bool(self.alpha_grid)

  @property
  def needs_calibration(self) -> bool:
    return self.smooths or self.gptq or self.reconstruct is not None


LINEARS = r"layers\.\d+\.(attn\.(q|k|v|o)|mlp\.(gate|up|down))"

# Why each recipe is built as it is; the measurements are in docs/results.md ("Weight
# quantization").
# FireQ groups: K=576 admits g=32 with the kernel's 2g | K rule (g=128 would need K padded
# to 768); per-channel scales were far worse on SmolLM2.
_FIREQ = QuantSpec("fireq_w4a8", group_size=32, scale_dtype="float8_e4m3fn")
# alpha = 0.5 was the best smoothing strength tried for FireQ g32, and smoothing beat none for
# W8A8 and W4A16 g128.
_ALPHA = 0.5
# W8A8 alone: 0.65 beat 0.5 on both WikiText tuning sets tried (the first windows, and the
# last 8, which the runner holds out with --calib_windows=8); no per-input table
# (jaxllm.quant.smoothing) beat it on both sets.
_W8A8_ALPHA = 0.65
# GPTQ's act order (rows by decreasing Hessian diagonal, static group grids) beats K order
# for W4A16 g128 and FireQ g32; weight range clipping (`clip_search`) made either order worse.
# GPTQ for W8A8: its int8 per-channel weights, not its activations, carried most of the loss,
# and GPTQ recovers it.
# AWQ-style search of the smoothing strength per layer and input (jaxllm.quant.smoothing_search)
# helps round-to-nearest W4A16 g128 only: not FireQ RTN, nor GPTQ, so those keep one alpha.
# Sequential GPTQ (Recipe.sequential) helps FireQ and not W4A16 g128, so only FireQ has a
# sequential variant.
# Block reconstruction (Recipe.reconstruct) beats GPTQ in act order for both, FireQ most;
# FireQ's trains with its FP8 activations in the loss, which helps it a little.
_ALPHA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_W4A16_G128 = QuantSpec("w4a16", group_size=128, pad_k=True, scale_dtype="bfloat16")


def _all_linears(spec: QuantSpec) -> tuple[QuantRule, ...]:
  return (QuantRule(LINEARS, spec),)


def _learned(base: str, spec: QuantSpec) -> Recipe:
  """Recipe `base` (smoothing, GPTQ in act order) with block reconstruction."""
  return Recipe(
    f"{base}_learned",
    f"{base} with block reconstruction: each layer's rounding learned against the float "
    "block's outputs, or sequential GPTQ (act order) where that reproduces the block better",
    _all_linears(spec),
    _ALPHA,
    gptq=True,
    act_order=True,
    sequential=True,
    reconstruct=Reconstruction(),
  )


RECIPES: dict[str, Recipe] = {
  r.name: r
  for r in (
    Recipe("fp32", "float32 weights (the GGUF's Q4_1/Q8_0 dequantized): the baseline"),
    Recipe(
      "w8a8",
      "SmoothQuant W8A8: int8 per-channel weights (GPTQ) x int8 per-token activations, smoothing",
      _all_linears(QuantSpec("w8a8")),
      _W8A8_ALPHA,
      gptq=True,
    ),
    Recipe(
      "w8a8_rtn",
      "W8A8 with smoothing and round-to-nearest weights (no GPTQ)",
      _all_linears(QuantSpec("w8a8")),
      _W8A8_ALPHA,
    ),
    Recipe(
      "w8a8_no_smoothing",
      "W8A8 round-to-nearest, no smoothing",
      _all_linears(QuantSpec("w8a8")),
    ),
    Recipe(
      "w4a16_g32",
      "int4 min/max g32 weights (f32 scale + offset), float activations: Q4_1's own grid",
      _all_linears(QuantSpec("w4a16", group_size=32)),
    ),
    Recipe(
      "w4a16_g128",
      "int4 min/max g128 weights (bf16 scale + offset; K=576 zero-padded to 640), "
      "GPTQ in act order on activation-aware smoothed weights",
      _all_linears(_W4A16_G128),
      _ALPHA,
      gptq=True,
      act_order=True,
    ),
    _learned('w4a16_g128', _W4A16_G128),
    Recipe(
      "w4a16_g128_k_order",
      "w4a16_g128 with GPTQ taking the rows in K order (grids from the updated weights)",
      _all_linears(_W4A16_G128),
      _ALPHA,
      gptq=True,
    ),
    Recipe(
      "w4a16_g128_rtn",
      "int4 min/max g128 weights, smoothing, round-to-nearest (no GPTQ)",
      _all_linears(_W4A16_G128),
      _ALPHA,
    ),
    Recipe(
      "w4a16_g128_awq",
      "int4 min/max g128 weights, round-to-nearest, smoothing strength searched per layer "
      "and input for the least output error (AWQ-style)",
      _all_linears(_W4A16_G128),
      alpha_grid=_ALPHA_GRID,
    ),
    Recipe(
      "w4a16_g128_no_smoothing",
      "int4 min/max g128 weights, round-to-nearest, no smoothing",
      _all_linears(_W4A16_G128),
    ),
    Recipe(
      "fireq_w4a8",
      "FireQ: int4 g32 weights (GPTQ, act order), FP8 scales under an f32 per-tensor scale, "
      "FP8 per-token activations, smoothing",
      _all_linears(_FIREQ),
      _ALPHA,
      gptq=True,
      act_order=True,
    ),
    Recipe(
      "fireq_w4a8_seq",
      "fireq_w4a8 with sequential GPTQ (each layer against the inputs of the quantized "
      "layers before it)",
      _all_linears(_FIREQ),
      _ALPHA,
      gptq=True,
      act_order=True,
      sequential=True,
    ),
    _learned('fireq_w4a8', _FIREQ),
    Recipe(
      "fireq_w4a8_k_order",
      "FireQ with GPTQ taking the rows in K order (grids from the updated weights)",
      _all_linears(_FIREQ),
      _ALPHA,
      gptq=True,
    ),
    Recipe(
      "fireq_w4a8_rtn",
      "FireQ with round-to-nearest weights (no GPTQ)",
      _all_linears(_FIREQ),
      _ALPHA,
    ),
    Recipe(
      "fireq_w4a8_no_smoothing",
      "FireQ (GPTQ, act order) without the channel smoothing",
      _all_linears(_FIREQ),
      gptq=True,
      act_order=True,
    ),
    Recipe(
      "fireq_w4a8_no_per_tensor",
      "FireQ (GPTQ, act order) without the per-tensor scale (FP8 scales stored absolute)",
      _all_linears(dataclasses.replace(_FIREQ, per_tensor_scale=False)),
      _ALPHA,
      gptq=True,
      act_order=True,
    ),
  )
}


def get_recipe(name: str) -> Recipe:
  if name not in RECIPES:
    raise ValueError(f"unknown quantization recipe {name!r}; choose from {list(RECIPES)}")
  return RECIPES[name]
