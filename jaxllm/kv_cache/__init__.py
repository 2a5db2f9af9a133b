"""KV caches: one interface, several storage formats.

Every cache is a pytree with static shapes and the same three calls the model
makes: ``attend(layer, q, k_pre_rope, k, v, q_slots, kernels)`` (write a chunk and
attend over everything cached), ``advance(layer_states, num_tokens)`` and
``rollback(length)``.
"""

from jaxllm.kv_cache.dense import KVCache

__all__ = ["KVCache"]
