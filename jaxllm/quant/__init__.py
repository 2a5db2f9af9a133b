"""Post-training quantization: quantized weight containers, their matmuls, calibration,
smoothing, GPTQ, block reconstruction and recipes."""

from jaxllm.quant.apply import apply_recipe, quantize_model, weight_bytes
from jaxllm.quant.calibrate import activation_absmax
from jaxllm.quant.qtensor import METHODS, QTensor, quantize
from jaxllm.quant.recipes import (
  RECIPES,
  QuantRule,
  QuantSpec,
  Recipe,
  Reconstruction,
  get_recipe,
)
from jaxllm.quant.reconstruct import LayerChoice
from jaxllm.quant.smoothing import smooth_model

__all__ = [
  "METHODS",
  "LayerChoice",
  "RECIPES",
  "QTensor",
  "QuantRule",
  "QuantSpec",
  "Recipe",
  "Reconstruction",
  "activation_absmax",
  "apply_recipe",
  "get_recipe",
  "quantize",
  "quantize_model",
  "smooth_model",
  "weight_bytes",
]
