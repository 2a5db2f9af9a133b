"""Quantizing a model's linear layers in place."""

from __future__ import annotations

from jaxllm.model import Llama
from jaxllm.quant.qtensor import QTensor, quantize

# param name -> number of leading dims contracted by its matmul
LINEAR_PARAMS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


def quantize_model(model: Llama, method: str, group_size: int = 128) -> Llama:
  """Replaces every decoder linear weight by a `QTensor` (embedding and norms stay float).

  The model is modified in place and returned; its forward then runs through
  the ``quantized_linear`` op.
  """
  for layer in model.layers:
    for module in (layer.attn, layer.mlp):
      for name, contract in LINEAR_PARAMS.items():
        param = getattr(module, name, None)
        if param is None or isinstance(param.get_value(), QTensor):
          continue
        param.set_value(quantize(param.get_value(), method, group_size, contract))
  return model
