"""A GGUF's dequantized weights, config and tokenizer kept on disk, so that a
second process skips parsing the GGUF's metadata and dequantizing its tensors.

`load_or_build(gguf_path, cache_dir)` returns what `load_gguf` and
`Tokenizer.gguf_args` give for the file: from the cache when it holds a valid
entry for it, else from the GGUF, storing a new entry. One entry per GGUF path,
``cache_dir/NAME.HASH/``, holds

* ``params.bin``: every float32 tensor, C order, each at a 64-byte aligned offset;
* ``manifest.json``: a header line with a CRC-32 of the rest, then JSON: the
  format version, a fingerprint of the code that reads GGUFs, the source file's
  resolved path, size, mtime and inode, the config, the tokenizer's arguments,
  each tensor's place and shape, the blob's size and a checksum of its 64-bit
  words (their sum modulo 2**64).

An entry is used only if the format, the code fingerprint and the source key
all match (else it is rebuilt silently: the GGUF or the loader changed). A
damaged entry (bad manifest checksum, a blob of the wrong size or checksum, a
tensor that does not fit, a non-finite value) is rebuilt with a
`WeightCacheWarning`; its data is never returned. Entries are written into a
temporary sibling directory (`jaxllm.atomic_dir.new_sibling`) and renamed into
place when complete, so a killed writer leaves no partial entry; without an
fsync, a power cut can leave a torn entry, which the checks above refuse.
The cache takes 4 bytes per weight; delete the directory to reclaim it.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import sys
import warnings
import zlib

import numpy as np

from jaxllm import atomic_dir, gguf_loader, runtime
from jaxllm.config import ModelConfig
from jaxllm.tokenizer import Tokenizer

CACHE_DIR_ENV = runtime.WEIGHT_CACHE_DIR_ENV
FORMAT = 1
_MAGIC = "jaxllm-weight-cache"
_MANIFEST = "manifest.json"
_BLOB = "params.bin"
_ALIGN = 64  # bytes; also makes the blob a whole number of 64-bit words
# Modules whose code decides what an entry holds; an edit to any of them
# invalidates every entry (see `_code_fingerprint`).
_CODE_MODULES = ("jaxllm.gguf_loader", "jaxllm.tokenizer", "jaxllm.config", __name__)


class WeightCacheWarning(UserWarning):
  """A cache entry was damaged (and is rebuilt) or could not be written."""


@dataclasses.dataclass(frozen=True)
class CachedModel:
  """What a GGUF holds for `load_pipeline`.

  Attributes:
    config: as `load_gguf(...).config`.
    params: as `load_gguf(...).params` (float32); read from the cache they are
      read-only arrays mapped from its file.
    tokenizer_args: `Tokenizer(**tokenizer_args)` is the GGUF's tokenizer.
    from_cache: whether they came from the cache (else from the GGUF).
  """

  config: ModelConfig
  params: dict
  tokenizer_args: dict
  from_cache: bool


def default_dir() -> str:
  """$JAXLLM_WEIGHT_CACHE_DIR, else ``weights`` beside the compilation cache in
  the user's cache dir (``$XDG_CACHE_HOME/jaxllm/weights``, else ``~/.cache/...``)."""
  return runtime.default_weight_cache_dir()


def entry_dir(gguf_path: str, cache_dir: str) -> str:
  """The entry directory of the GGUF at `gguf_path` (by its resolved path)."""
  real = os.path.realpath(gguf_path)
  digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:16]
  return os.path.join(os.path.abspath(cache_dir), f"{os.path.basename(real)}.{digest}")


def load_or_build(gguf_path: str | None, cache_dir: str) -> CachedModel:
  """The GGUF's config, float32 params and tokenizer arguments, from the cache
  in `cache_dir` when it holds a valid entry, else from the GGUF (then stored).

  Errors of the GGUF itself are `load_gguf`'s. A damaged entry, or one that
  cannot be written, gives a `WeightCacheWarning` and never an error.
  """
  path = gguf_loader.default_gguf_path() if gguf_path is None else os.fspath(gguf_path)
  target = entry_dir(path, cache_dir) if os.path.isfile(path) else None
  key = _source_key(path) if target else None
  if target:
    try:
      return _read_entry(target, key)
    except _Stale:
      pass
    except _Damaged as e:
      _warn(f"weight cache entry {target} is damaged ({e}); rebuilding it from {path}")
  built = _build(path)
  if target:
    try:
      if _source_key(path) == key:  # not if the file changed while it was read
        _write_entry(target, key, built)
    except (OSError, TypeError, ValueError) as e:
      _warn(f"weight cache entry {target} not written: {type(e).__name__}: {e}")
  return built


# ------------------------------------------------------------------------ internals


class _Stale(Exception):
  """No entry, or one for another file, format or code: rebuild silently."""


class _Damaged(Exception):
  """An entry whose contents fail a check: rebuild with a warning."""


def _warn(message: str) -> None:
  warnings.warn(message, WeightCacheWarning, stacklevel=3)


def _build(path: str) -> CachedModel:
  loaded = gguf_loader.load_gguf(path)
  args = Tokenizer.gguf_args(loaded.reader)
  return CachedModel(loaded.config, loaded.params, args, from_cache=False)


def _source_key(path: str) -> dict:
  st = os.stat(path)
  return {
    "path": os.path.realpath(path),
    "size": st.st_size,
    "mtime_ns": st.st_mtime_ns,
    "inode": st.st_ino,
  }


def _code_fingerprint() -> str:
  """SHA-256 over the source of the modules that decide what an entry holds."""
  h = hashlib.sha256(str(FORMAT).encode())
  for name in _CODE_MODULES:
    module = sys.modules.get(name) or __import__(name, fromlist=["_"])
    try:
      with open(module.__file__, "rb") as f:
        h.update(f.read())
    except (OSError, TypeError):  # no source file (frozen or zipped): the name stands in
      h.update(name.encode())
  return h.hexdigest()


def _flatten(tree, prefix=()):
  """(key path, array) of every leaf of a nested dict, in insertion order."""
  for k, v in tree.items():
    if isinstance(v, dict):
      yield from _flatten(v, (*prefix, k))
    else:
      yield (*prefix, k), v


def _blob_sum(words: np.ndarray) -> int:
  """The checksum: the sum of the blob's 64-bit words modulo 2**64."""
  return int(np.add.reduce(words, dtype=np.uint64)) if words.size else 0


def _json_default(value):
  if isinstance(value, np.integer):
    return int(value)
  raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _write_entry(target: str, key: dict, model: CachedModel) -> None:
  tmp = atomic_dir.new_sibling(target)
  try:
    arrays, offset = [], 0
    blob = os.path.join(tmp, _BLOB)
    with open(blob, "wb") as f:
      for path, value in _flatten(model.params):
        a = np.ascontiguousarray(value)
        if a.dtype != np.float32:
          raise ValueError(f"param {'/'.join(map(str, path))} is {a.dtype}, not float32")
        pad = -a.nbytes % _ALIGN
        f.write(memoryview(a.reshape(-1)).cast("B"))
        f.write(b"\0" * pad)
        arrays.append({"key": list(path), "shape": list(a.shape), "offset": offset})
        offset += a.nbytes + pad
    words = np.memmap(blob, np.uint64, "r") if offset else np.zeros(0, np.uint64)
    manifest = {
      "format": FORMAT,
      "code": _code_fingerprint(),
      "source": key,
      "config": dataclasses.asdict(model.config),
      "tokenizer": model.tokenizer_args,
      "dtype": "float32",
      "arrays": arrays,
      "blob_bytes": offset,
      "blob_sum": _blob_sum(words),
    }
    del words
    body = json.dumps(manifest, separators=(",", ":"), default=_json_default).encode()
    with open(os.path.join(tmp, _MANIFEST), "wb") as f:
      f.write(f"{_MAGIC} {zlib.crc32(body):08x}\n".encode() + body)
    # The old entry (stale or damaged) goes first: a kill in between leaves no entry.
    if os.path.isdir(target) and not os.path.islink(target):
      shutil.rmtree(target)
    elif os.path.lexists(target):
      os.remove(target)
    try:
      os.rename(tmp, target)
    except OSError as e:
      if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
        raise
      shutil.rmtree(tmp, ignore_errors=True)  # another process stored the same entry first
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _read_entry(target: str, key: dict) -> CachedModel:
  """The entry at `target`; _Stale if there is none for `key` and this code,
  _Damaged if it fails a check."""
  try:
    with open(os.path.join(target, _MANIFEST), "rb") as f:
      raw = f.read()
  except (FileNotFoundError, NotADirectoryError) as e:
    if os.path.isdir(target):
      raise _Damaged(f"{_MANIFEST} is missing") from e
    raise _Stale() from e
  except OSError as e:
    raise _Damaged(f"{_MANIFEST}: {e}") from e
  head, newline, body = raw.partition(b"\n")
  if not newline or head != f"{_MAGIC} {zlib.crc32(body):08x}".encode():
    raise _Damaged(f"{_MANIFEST} fails its checksum")
  try:
    m = json.loads(body)
  except ValueError as e:
    raise _Damaged(f"{_MANIFEST} is not JSON: {e}") from e
  if not isinstance(m, dict):
    raise _Damaged(f"{_MANIFEST} is not a JSON object")
  if m.get("format") != FORMAT or m.get("code") != _code_fingerprint() or m.get("source") != key:
    raise _Stale()
  try:
    config = ModelConfig(**m["config"])
    params = _read_params(os.path.join(target, _BLOB), m)
    tokenizer_args = dict(m["tokenizer"])
  except (KeyError, TypeError, ValueError) as e:
    raise _Damaged(f"{type(e).__name__}: {e}") from e
  return CachedModel(config, params, tokenizer_args, from_cache=True)


def _read_params(blob: str, m: dict) -> dict:
  """The params tree, as read-only views of the memory-mapped blob, after the
  blob's size and checksum and every tensor's place, shape and values are checked."""
  if m["dtype"] != "float32":
    raise _Damaged(f"dtype {m['dtype']!r}, expected 'float32'")
  expected = m["blob_bytes"]
  try:
    size = os.path.getsize(blob)
  except OSError as e:
    raise _Damaged(f"{_BLOB}: {e}") from e
  if size != expected or size % _ALIGN:
    raise _Damaged(f"{_BLOB} has {size} bytes, expected {expected}")
  data = np.memmap(blob, np.uint8, "r") if size else np.zeros(0, np.uint8)
  if _blob_sum(data.view(np.uint64)) != m["blob_sum"]:
    raise _Damaged(f"{_BLOB} fails its checksum")
  params: dict = {}
  end = 0
  for spec in m["arrays"]:
    path, shape, offset = spec["key"], tuple(spec["shape"]), spec["offset"]
    name = "/".join(map(str, path))
    count = int(np.prod(shape, dtype=np.int64))
    if (
      not path
      or not all(isinstance(n, int) and n >= 0 for n in (*shape, offset))
      or offset < end
      or offset % _ALIGN
      or offset + 4 * count > size
    ):
      raise _Damaged(f"tensor {name} (shape {shape}, offset {offset}) does not fit {_BLOB}")
    end = offset + 4 * count
    value = np.frombuffer(data, np.float32, count, offset).reshape(shape)
    if not np.isfinite(value).all():
      raise _Damaged(f"tensor {name} has non-finite values")
    node = params
    for k in path[:-1]:
      node = node.setdefault(k, {}) if isinstance(node, dict) else None
    if not isinstance(node, dict) or path[-1] in node:
      raise _Damaged(f"tensor {name} clashes with another tensor's key")
    node[path[-1]] = value
  return params
