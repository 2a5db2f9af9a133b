"""Causal grouped-query attention (the model's prefill and chunk attention)."""

from .api import ATTENTION
from .reference import MASKED, attention_reference, visibility_mask
from .xla import attention_xla

__all__ = ["ATTENTION", "MASKED", "attention_reference", "attention_xla", "visibility_mask"]
