"""Post-training quantization: weight formats, quantized weight containers, calibration,
smoothing, GPTQ, block reconstruction and recipes.

The names below load on first use (PEP 562): importing one module of this package
(`jaxllm.quant.numerics`, which the KV caches build on) does not import the others,
several of which import the model.
"""

import importlib

# public name -> module that defines it
_EXPORTS = {
  "apply_recipe": "jaxllm.quant.apply",
  "quantize_model": "jaxllm.quant.apply",
  "weight_bytes": "jaxllm.quant.apply",
  "activation_absmax": "jaxllm.quant.calibrate",
  "FORMATS": "jaxllm.quant.formats",
  "WeightFormat": "jaxllm.quant.formats",
  "get_format": "jaxllm.quant.formats",
  "register_format": "jaxllm.quant.formats",
  "QTensor": "jaxllm.quant.qtensor",
  "quantize": "jaxllm.quant.qtensor",
  "RECIPES": "jaxllm.quant.recipes",
  "QuantRule": "jaxllm.quant.recipes",
  "QuantSpec": "jaxllm.quant.recipes",
  "Recipe": "jaxllm.quant.recipes",
  "Reconstruction": "jaxllm.quant.recipes",
  "get_recipe": "jaxllm.quant.recipes",
  "LayerChoice": "jaxllm.quant.reconstruct",
  "smooth_model": "jaxllm.quant.smoothing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'jaxllm.quant' has no attribute {name!r}")


def __dir__():
  return sorted((*globals(), *__all__))
