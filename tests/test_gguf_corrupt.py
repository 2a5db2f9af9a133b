"""GGUF files with damaged data or impossible metadata: one-line errors naming the
file and the tensor or metadata key, before any model is built."""

from __future__ import annotations

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from in_process import run_perplexity_main
from tiny_gguf import META as _META
from tiny_gguf import tensors as _tensors

from jaxllm import gguf_loader


def _write_llama(path, meta=None, tensors=None) -> Path:
  w = gguf.GGUFWriter(str(path), "llama")
  for key, value in {**_META, **(meta or {})}.items():
    (w.add_int32 if value < 0 else w.add_uint32)(key, value)
  for name, data in (tensors or _tensors()).items():
    w.add_tensor(name, data)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return Path(path)


def test_small_llama_loads(tmp_path):
  """The control for the cases below: the file they alter loads."""
  tensors = _tensors()
  loaded = gguf_loader.load_gguf(_write_llama(tmp_path / "ok.gguf", tensors=tensors))
  cfg = loaded.config
  assert (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.vocab_size) == (
    1,
    8,
    2,
    4,
    16,
  )
  v = loaded.params["layers"][0]["attn"]["v"]
  np.testing.assert_array_equal(v, tensors["blk.0.attn_v.weight"].T.reshape(8, 2, 4))


@pytest.mark.parametrize(
  "meta, key",
  [
    ({"llama.attention.head_count": 0}, "'llama.attention.head_count' must be a positive integer"),
    ({"llama.block_count": 0}, "'llama.block_count' must be a positive integer, got 0"),
    ({"llama.block_count": -1}, "'llama.block_count' must be a positive integer, got -1"),
    ({"llama.embedding_length": 0}, "'llama.embedding_length' must be a positive integer"),
    (
      {"llama.attention.head_count_kv": 0},
      "'llama.attention.head_count_kv' must be a positive integer",
    ),
    (
      {"llama.attention.head_count": 3},
      "llama.attention.head_count=3 is not a multiple of llama.attention.head_count_kv=2",
    ),
    ({"llama.feed_forward_length": 0}, "'llama.feed_forward_length' must be a positive integer"),
  ],
)
def test_bad_metadata_names_key_and_file(tmp_path, meta, key):
  path = _write_llama(tmp_path / "bad.gguf", meta=meta)
  with pytest.raises(ValueError) as excinfo:
    gguf_loader.load_gguf(path)
  msg = str(excinfo.value)
  assert key in msg and str(path) in msg and "\n" not in msg, msg


def test_tensor_of_wrong_shape_names_tensor_and_shapes(tmp_path):
  path = _write_llama(tmp_path / "rows.gguf", tensors=_tensors(rows_q=10))  # 80 values, not 64
  with pytest.raises(ValueError) as excinfo:
    gguf_loader.load_gguf(path)
  msg = str(excinfo.value)
  assert msg == (
    f"{path}: tensor 'blk.0.attn_q.weight' has shape (10, 8) (80 values), "
    "expected (8, 8) from the GGUF metadata"
  )


def test_non_finite_tensor_in_a_small_file_is_named(tmp_path):
  tensors = _tensors()
  tensors["blk.0.ffn_up.weight"][3, 5] = np.inf
  tensors["blk.0.ffn_up.weight"][7, 1] = np.nan
  path = _write_llama(tmp_path / "inf.gguf", tensors=tensors)
  with pytest.raises(ValueError) as excinfo:
    gguf_loader.load_gguf(path)
  assert str(excinfo.value) == (
    f"{path}: tensor 'blk.0.ffn_up.weight' has 2 non-finite values (NaN or inf) of 128 "
    "after dequantization; the file is corrupt"
  )


@pytest.fixture(scope="module")
def real_tensors(smollm_path):
  return {t.name: t for t in gguf_loader.open_gguf(smollm_path).tensors}


def _corrupt_copy(src, dst, tensor, skip: int = 8192, nbytes: int = 4096) -> int:
  """Copies the GGUF `src` to `dst` with `nbytes` of `tensor`'s data (from byte
  `skip` of it) overwritten by 0xff; returns the damaged tensor's non-finite count
  as the gguf package dequantizes it."""
  assert skip + nbytes <= tensor.n_bytes
  shutil.copy(src, dst)
  with open(dst, "r+b") as f:
    f.seek(tensor.data_offset + skip)
    f.write(b"\xff" * nbytes)
  raw = np.array(tensor.data)
  raw.view(np.uint8).reshape(-1)[skip : skip + nbytes] = 0xFF
  values = gguf.quants.dequantize(raw, tensor.tensor_type)
  return int(np.count_nonzero(~np.isfinite(values)))


def test_real_gguf_with_nan_weights_is_refused(tmp_path, smollm_path, real_tensors):
  """The issue's case: 4 KB of 0xff in layer 27's value projection."""
  path = tmp_path / "nan.gguf"
  bad = _corrupt_copy(smollm_path, path, real_tensors["blk.27.attn_v.weight"])
  assert bad > 0
  with pytest.raises(ValueError) as excinfo:
    gguf_loader.load_gguf(path)
  assert str(excinfo.value) == (
    f"{path}: tensor 'blk.27.attn_v.weight' has {bad} non-finite values (NaN or inf) of "
    f"{576 * 192} after dequantization; the file is corrupt"
  )


def test_perplexity_cli_refuses_nan_weights(tmp_path, smollm_path, real_tensors, capsys):
  path = tmp_path / "nan.gguf"
  bad = _corrupt_copy(smollm_path, path, real_tensors["blk.0.attn_q.weight"])
  text = tmp_path / "text.txt"
  text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
  code = run_perplexity_main(
    f"--gguf={path}",
    f"--text_file={text}",
    "--context=32",
    "--max_windows=1",
    f"--out_dir={tmp_path / 'out'}",
  )
  out, err = capsys.readouterr()
  assert code not in (0, None)
  lines = [line for line in err.splitlines() if line.strip()]
  assert lines[-1].startswith(f"error: {path}: tensor 'blk.0.attn_q.weight' has {bad} non-finite")
  assert out == "" and not (tmp_path / "out").exists()
