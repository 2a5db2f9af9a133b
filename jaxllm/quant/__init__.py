"""Post-training quantization: quantized weight containers and their matmuls."""

from jaxllm.quant.apply import quantize_model
from jaxllm.quant.qtensor import METHODS, QTensor, quantize

__all__ = ["METHODS", "QTensor", "quantize", "quantize_model"]
