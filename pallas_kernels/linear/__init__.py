"""Float linear layer: x @ w with float32 accumulation."""

from .api import LINEAR, linear_reference, linear_xla

__all__ = ["LINEAR", "linear_reference", "linear_xla"]
