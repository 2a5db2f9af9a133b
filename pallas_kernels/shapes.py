"""Named model shapes, one spelling each, and the kernel shapes derived from them.

The tests, `experiments.bench_kernels` and the compile checks take their shapes from
here. A model is named ``smollm2`` (SmolLM2-135M), ``llama3_8b`` (Llama-3-8B) or
``tiny`` (`jaxllm.TINY`, the test model); `MODELS` maps each name to its `ModelShape`.

Derived shapes:
  * `ModelShape.linears`: the distinct ``(K, N)`` of the model's linear layers
    (``x [M, K] @ w [K, N]``), each with a name; projections of the same shape share
    one entry (SmolLM2's q and o are both 576 x 576: ``attn_q_o``).
  * `ModelShape.kv_heads`: ``(num_heads, num_kv_heads, head_dim)`` of its attention.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Linear:
  """One linear layer shape: ``x [M, K] @ w [K, N]``."""

  name: str
  k: int
  n: int

  @property
  def kn(self) -> tuple[int, int]:
    return self.k, self.n


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """The sizes of a decoder-only transformer that its kernels see."""

  name: str
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  vocab_size: int

  @property
  def kv_heads(self) -> tuple[int, int, int]:
    """``(num_heads, num_kv_heads, head_dim)``."""
    return self.num_heads, self.num_kv_heads, self.head_dim

  @property
  def linears(self) -> tuple[Linear, ...]:
    """The distinct linear shapes in layer order (q, k/v, o, gate/up, down, lm_head).

    Layers with the same ``(K, N)`` share the first one's entry, named after all of
    them: ``attn_q_o`` when q and o are square, ``attn_k_v`` always.
    """
    d, q_dim, kv_dim = (
      self.embed_dim,
      self.num_heads * self.head_dim,
      self.num_kv_heads * self.head_dim,
    )
    layers = (
      ("attn_q", d, q_dim),
      ("attn_k_v", d, kv_dim),
      ("attn_o", q_dim, d),
      ("mlp_gate_up", d, self.mlp_dim),
      ("mlp_down", self.mlp_dim, d),
      ("lm_head", d, self.vocab_size),
    )
    names: dict[tuple[int, int], list[str]] = {}
    for name, k, n in layers:
      names.setdefault((k, n), []).append(name)
    out = []
    for (k, n), group in names.items():
      if group == ["attn_q", "attn_o"]:
        group = ["attn_q_o"]
      elif len(group) > 1:
        group = ["_".join(group)]
      out.append(Linear(group[0], k, n))
    return tuple(out)

  def linear(self, name: str) -> Linear:
    """The linear called `name` (one of `linears`' names); ValueError naming them otherwise."""
    for lin in self.linears:
      if lin.name == name:
        return lin
    raise ValueError(
      f"model {self.name!r} has no linear {name!r}; it has {[x.name for x in self.linears]}"
    )

  def select(self, names: tuple[str, ...] | None = None) -> tuple[Linear, ...]:
    """The linears called `names` (default: all of them), in that order."""
    return self.linears if names is None else tuple(self.linear(n) for n in names)

  def matmul_shapes(self, names: tuple[str, ...] | None = None) -> tuple[tuple[int, int], ...]:
    """``(K, N)`` of the linears called `names` (default: all of them), in that order."""
    return tuple(lin.kn for lin in self.select(names))


SMOLLM2 = ModelShape(
  "smollm2",
  embed_dim=576,
  num_heads=9,
  num_kv_heads=3,
  head_dim=64,
  mlp_dim=1536,
  vocab_size=49152,
)
LLAMA3_8B = ModelShape(
  "llama3_8b",
  embed_dim=4096,
  num_heads=32,
  num_kv_heads=8,
  head_dim=128,
  mlp_dim=14336,
  vocab_size=128256,
)
# jaxllm.TINY's sizes (a test checks they agree; pallas_kernels cannot import jaxllm).
TINY = ModelShape(
  "tiny",
  embed_dim=128,
  num_heads=6,
  num_kv_heads=2,
  head_dim=64,
  mlp_dim=256,
  vocab_size=512,
)

MODELS: dict[str, ModelShape] = {m.name: m for m in (SMOLLM2, LLAMA3_8B, TINY)}


def get(name: str) -> ModelShape:
  """The model shape called `name`; ValueError naming the known ones otherwise."""
  if name not in MODELS:
    raise ValueError(f"unknown model shape {name!r}; choose from {sorted(MODELS)}")
  return MODELS[name]
