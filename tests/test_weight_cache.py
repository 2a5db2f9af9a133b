"""jaxllm.weight_cache: a second load reads the GGUF's dequantized weights, config and
tokenizer back bit-identically without parsing the GGUF; a damaged entry is
rebuilt (with a warning), never read; a stale one is rebuilt silently."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
import zlib

import gguf
import numpy as np
import pytest
from tiny_gguf import META as _META
from tiny_gguf import tensors as _tensors

import jaxllm
from jaxllm import gguf_loader, runtime, weight_cache
from jaxllm.tokenizer import Tokenizer

# The tiny_gguf block with a 16-token BPE vocabulary.
_TOKENS = ["a", "b", "c", "d", "ab", "cd", "abcd", "Ġ", "e", "f", "g", "h"]
_TOKENS += ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "i"]
_TYPES = [1] * 12 + [3, 3, 3, 1]
_MERGES = ["a b", "c d", "ab cd"]


def _write_gguf(path, seed: int = 0):
  w = gguf.GGUFWriter(str(path), "llama")
  for key, value in _META.items():
    w.add_uint32(key, value)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(_TOKENS)
  w.add_token_merges(_MERGES)
  w.add_token_types(_TYPES)
  w.add_bos_token_id(12)
  w.add_eos_token_id(12)
  for name, data in _tensors(seed=seed).items():
    w.add_tensor(name, data)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


def _leaves(tree, prefix=()):
  for k, v in tree.items():
    yield from _leaves(v, (*prefix, k)) if isinstance(v, dict) else [((*prefix, k), v)]


def _assert_same_params(got: dict, want: dict):
  got, want = dict(_leaves(got)), dict(_leaves(want))
  assert got.keys() == want.keys()
  for k, w in want.items():
    assert got[k].dtype == w.dtype == np.float32 and got[k].shape == w.shape, k
    assert got[k].tobytes() == w.tobytes(), k  # bit-identical


@pytest.fixture
def model_file(tmp_path):
  return _write_gguf(tmp_path / "tiny.gguf")


@pytest.fixture
def reference(model_file):
  loaded = gguf_loader.load_gguf(model_file)
  return loaded, Tokenizer.gguf_args(loaded.reader)


def _load(model_file, cache):
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # any warning fails the test
    return weight_cache.load_or_build(str(model_file), str(cache))


def _entry(model_file, cache):
  return weight_cache.entry_dir(str(model_file), str(cache))


def _no_gguf_reads(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("the GGUF was read although the cache holds it")

  monkeypatch.setattr(gguf_loader, "load_gguf", refuse)
  monkeypatch.setattr(gguf_loader, "open_gguf", refuse)


def test_second_load_reads_the_cache_bit_identically(model_file, reference, tmp_path, monkeypatch):
  loaded, tokenizer_args = reference
  cache = tmp_path / "cache"
  first = _load(model_file, cache)
  assert not first.from_cache and os.path.isfile(
    os.path.join(_entry(model_file, cache), "params.bin")
  )
  _no_gguf_reads(monkeypatch)
  second = _load(model_file, cache)
  assert second.from_cache
  assert second.config == loaded.config
  _assert_same_params(second.params, loaded.params)
  assert second.tokenizer_args == tokenizer_args
  leaf = second.params["layers"][0]["attn"]["q"]
  assert not leaf.flags.writeable  # mapped read-only from the cache file
  tok = Tokenizer(**second.tokenizer_args)
  assert tok.encode("abcd<|im_end|>") == [6, 14] and tok.eos_id == 12


def test_load_pipeline_with_and_without_the_cache_agree(model_file, tmp_path, monkeypatch):
  monkeypatch.setenv(weight_cache.CACHE_DIR_ENV, str(tmp_path / "env_dir"))
  plain = jaxllm.load_pipeline(gguf_path=str(model_file))
  assert not (tmp_path / "env_dir").exists()  # off unless asked: nothing written
  cache = tmp_path / "cache"
  jaxllm.load_pipeline(gguf_path=str(model_file), weight_cache_dir=str(cache))
  _no_gguf_reads(monkeypatch)
  cached = jaxllm.load_pipeline(gguf_path=str(model_file), weight_cache_dir=str(cache))
  assert cached.config == plain.config
  tokens = np.array([[1, 2, 3, 4, 5]])
  np.testing.assert_array_equal(np.asarray(cached.logits(tokens)), np.asarray(plain.logits(tokens)))
  assert cached.tokenizer.encode("abcd") == plain.tokenizer.encode("abcd") == [6]


def _rewrite_manifest(entry: str, edit) -> None:
  """Applies `edit` to the manifest's JSON and writes it back with a valid checksum."""
  path = os.path.join(entry, "manifest.json")
  m = json.loads(open(path, "rb").read().partition(b"\n")[2])
  edit(m)
  body = json.dumps(m).encode()
  with open(path, "wb") as f:
    f.write(f"jaxllm-weight-cache {zlib.crc32(body):08x}\n".encode() + body)


def _nan_with_valid_checksums(entry):
  blob = os.path.join(entry, "params.bin")
  with open(blob, "r+b") as f:
    f.seek(4 * 3)  # the fourth value of the first tensor
    f.write(np.float32(np.nan).tobytes())
  words = np.fromfile(blob, np.uint64)
  _rewrite_manifest(entry, lambda m: m.update(blob_sum=weight_cache._blob_sum(words)))


def _flip_bit(entry):
  blob = os.path.join(entry, "params.bin")
  data = bytearray(open(blob, "rb").read())
  data[len(data) // 2] ^= 0x10
  open(blob, "wb").write(bytes(data))


def _past_the_end(entry):
  _rewrite_manifest(entry, lambda m: m["arrays"][-1].update(offset=m["blob_bytes"]))


def _overlapping(entry):
  _rewrite_manifest(entry, lambda m: m["arrays"][1].update(offset=m["arrays"][0]["offset"]))


def _edit_manifest_byte(entry):
  path = os.path.join(entry, "manifest.json")
  data = open(path, "rb").read().replace(b'"shape":[16,8]', b'"shape":[16,4]', 1)
  open(path, "wb").write(data)


DAMAGE = {
  "blob cut short": (
    lambda e: os.truncate(
      os.path.join(e, "params.bin"), os.path.getsize(os.path.join(e, "params.bin")) - 64
    ),
    "params.bin has",
  ),
  "one bit flipped in the blob": (_flip_bit, "params.bin fails its checksum"),
  "NaN with valid checksums": (_nan_with_valid_checksums, "non-finite"),
  "manifest edited": (_edit_manifest_byte, "manifest.json fails its checksum"),
  "manifest missing": (lambda e: os.remove(os.path.join(e, "manifest.json")), "is missing"),
  "manifest not JSON": (
    lambda e: open(os.path.join(e, "manifest.json"), "wb").write(b"garbage"),
    "manifest.json fails its checksum",
  ),
  "tensor past the blob's end": (_past_the_end, "does not fit"),
  "tensors overlapping": (_overlapping, "does not fit"),
  "another dtype": (lambda e: _rewrite_manifest(e, lambda m: m.update(dtype="float16")), "dtype"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_entry_is_rebuilt_never_read(model_file, reference, tmp_path, damage):
  loaded, _ = reference
  cache = tmp_path / "cache"
  _load(model_file, cache)
  entry = _entry(model_file, cache)
  spoil, reason = DAMAGE[damage]
  spoil(entry)
  with pytest.warns(weight_cache.WeightCacheWarning, match="damaged") as record:
    rebuilt = weight_cache.load_or_build(str(model_file), str(cache))
  assert reason in str(record[0].message) and entry in str(record[0].message)
  assert not rebuilt.from_cache
  _assert_same_params(rebuilt.params, loaded.params)
  again = _load(model_file, cache)  # the entry was rewritten whole
  assert again.from_cache
  _assert_same_params(again.params, loaded.params)


def test_stale_entries_are_rebuilt_silently(model_file, tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  _load(model_file, cache)
  # the file changes (new weights, a later mtime): the old entry is not read
  _write_gguf(model_file, seed=1)
  st = os.stat(model_file)
  os.utime(model_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  fresh = _load(model_file, cache)
  assert not fresh.from_cache
  _assert_same_params(fresh.params, gguf_loader.load_gguf(model_file).params)
  assert _load(model_file, cache).from_cache
  # the code that reads GGUFs changes: every entry is stale
  monkeypatch.setattr(weight_cache, "_code_fingerprint", lambda: "edited")
  assert not _load(model_file, cache).from_cache
  assert _load(model_file, cache).from_cache
  assert os.listdir(cache) == [os.path.basename(_entry(model_file, cache))]  # one entry per file


def test_a_killed_writers_leftovers_are_not_read_and_are_removed(model_file, reference, tmp_path):
  loaded, _ = reference
  cache = tmp_path / "cache"
  entry = _entry(model_file, cache)
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
  )
  leftover = os.path.join(cache, f".{os.path.basename(entry)}.tmp-{int(dead.stdout)}-0badf00d")
  os.makedirs(leftover)
  open(os.path.join(leftover, "params.bin"), "wb").write(b"\xff" * 100)  # a partial write
  built = _load(model_file, cache)
  assert not built.from_cache
  _assert_same_params(built.params, loaded.params)
  assert not os.path.exists(leftover) and _load(model_file, cache).from_cache


def test_an_unwritable_cache_warns_and_loads(model_file, reference, tmp_path):
  loaded, _ = reference
  blocker = tmp_path / "a_file"
  blocker.write_bytes(b"")
  with pytest.warns(weight_cache.WeightCacheWarning) as record:
    got = weight_cache.load_or_build(str(model_file), str(blocker / "cache"))
  assert len(record) == 1 and "not written: NotADirectoryError" in str(record[0].message)
  _assert_same_params(got.params, loaded.params)


def test_a_missing_gguf_is_the_loaders_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="GGUF file not found"):
    weight_cache.load_or_build(str(tmp_path / "nope.gguf"), str(tmp_path / "cache"))
  assert not (tmp_path / "cache").exists()


def test_cache_directories(monkeypatch, tmp_path):
  monkeypatch.delenv(weight_cache.CACHE_DIR_ENV, raising=False)
  monkeypatch.delenv(runtime.CACHE_DIR_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert weight_cache.default_dir() == str(tmp_path / "xdg" / "jaxllm" / "weights")
  assert runtime.default_cache_dir() == str(tmp_path / "xdg" / "jaxllm" / "xla")  # beside it
  monkeypatch.setenv(weight_cache.CACHE_DIR_ENV, "rel/dir")
  assert weight_cache.default_dir() == os.path.abspath("rel/dir")
  assert runtime.weight_cache_dir(True) == os.path.abspath("rel/dir")
  assert runtime.weight_cache_dir(False) is None
