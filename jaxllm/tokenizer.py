"""SmolLM2 tokenizer rebuilt from GGUF metadata with the `tokenizers` library.

The GGUF stores a byte-level BPE vocabulary ("gpt2" model) plus the name of
llama.cpp's pre-tokenizer ("smollm"). llama.cpp implements "smollm" as two
regex passes: first every Unicode number character (``\\p{N}``) is isolated,
then the GPT-2 regex splits the rest. The `tokenizers` equivalent is
``Digits(individual_digits=True)`` followed by ``ByteLevel(add_prefix_space=False)``
(llama.cpp uses the same two regexes for its "starcoder" and "refact" types).

SmolLM2's vocabulary lacks 21 of the 256 byte tokens: six ASCII control characters
(U+0004, U+0006, U+0013, U+0014, U+0016, U+001D), the UTF-8 lead bytes F1/F2 (code points
U+40000..U+BFFFF, all unassigned) and bytes that never occur in UTF-8. Like llama.cpp and
the original tokenizer (BPE without an unknown token), encoding silently drops them
(for U+40000..U+BFFFF only the lead byte, so decoding shows U+FFFD).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types registered as added tokens
_REPLACEMENT = "\ufffd"  # what a split UTF-8 sequence decodes to


def _read(reader, key: str, default: Any = ...):
  """Return the value of GGUF field `key`; ValueError if absent and no default."""
  field = reader.fields.get(key)
  if field is None:
    if default is ...:
      raise ValueError(f"GGUF has no tokenizer metadata key {key!r}")
    return default
  return field.contents()


def _as_int(i) -> int:
  if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
    raise TypeError(f"token id {i!r} is not an integer")
  return int(i)


class Tokenizer:
  """Byte-level BPE tokenizer with SmolLM2's pre-tokenizer, special tokens and chat template."""

  def __init__(
    self,
    tokens: Sequence[str],
    merges: Sequence[str],
    token_types: Sequence[int],
    *,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    unk_id: int | None = None,
    add_bos: bool = False,
    chat_template: str | None = None,
  ):
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
      raise ValueError(f"malformed BPE merge {bad!r}: expected 'left right'")
    self._tok = _HFTokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    self._tok.pre_tokenizer = pre_tokenizers.Sequence(
      [
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
      ]
    )
    self._tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|> ...) must match as whole units, never be BPE-split.
    added = [
      AddedToken(tokens[i], special=(t == _CONTROL), normalized=False)
      for i, t in enumerate(token_types)
      if t in (_CONTROL, _USER_DEFINED)
    ]
    self._tok.add_tokens(added)
    self.special_ids = frozenset(i for i, t in enumerate(token_types) if t == _CONTROL)
    self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
    self.vocab_size = len(tokens)
    self.add_bos_default = add_bos
    self.chat_template = chat_template

  @classmethod
  def from_gguf(cls, reader_or_path) -> Tokenizer:
    """Build from a `gguf.GGUFReader` or a path to a .gguf file."""
    import gguf

    from jaxllm.gguf_loader import open_gguf  # its reader parses metadata faster

    if isinstance(reader_or_path, (str, os.PathLike)):
      reader = open_gguf(os.fspath(reader_or_path))
    elif isinstance(reader_or_path, gguf.GGUFReader):
      reader = reader_or_path
    else:
      raise TypeError(f"expected a GGUFReader or a path, got {type(reader_or_path).__name__}")
    return cls(**cls.gguf_args(reader))

  @staticmethod
  def gguf_args(reader) -> dict[str, Any]:
    """The constructor's arguments read from a GGUF reader's metadata (plain
    lists, strings and ints: `jaxllm.weight_cache` stores them as JSON)."""
    model = _read(reader, "tokenizer.ggml.model")
    if model != "gpt2":
      raise ValueError(f"unsupported tokenizer model {model!r}: only 'gpt2' (byte-level BPE)")
    pre = _read(reader, "tokenizer.ggml.pre", "default")
    if pre not in ("smollm", "starcoder", "refact", "codeshell"):  # same regexes in llama.cpp
      raise ValueError(f"unsupported pre-tokenizer {pre!r}: expected 'smollm'")
    tokens = _read(reader, "tokenizer.ggml.tokens")
    return dict(
      tokens=tokens,
      merges=_read(reader, "tokenizer.ggml.merges"),
      token_types=_read(reader, "tokenizer.ggml.token_type", [1] * len(tokens)),
      bos_id=_read(reader, "tokenizer.ggml.bos_token_id", None),
      eos_id=_read(reader, "tokenizer.ggml.eos_token_id", None),
      pad_id=_read(reader, "tokenizer.ggml.padding_token_id", None),
      unk_id=_read(reader, "tokenizer.ggml.unknown_token_id", None),
      add_bos=bool(_read(reader, "tokenizer.ggml.add_bos_token", False)),
      chat_template=_read(reader, "tokenizer.chat_template", None),
    )

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    """Token ids of `text`; special-token strings in it map to their single ids.

    Empty text gives []. `add_bos` prepends the BOS id (SmolLM2 itself never adds one).
    """
    if not isinstance(text, str):
      raise TypeError(f"encode expects str, got {type(text).__name__}")
    try:
      ids = self._tok.encode(text, add_special_tokens=False).ids
    except TypeError:  # `tokenizers` refuses lone surrogates
      text.encode("utf-8")  # raises UnicodeEncodeError (a ValueError) naming the spot
      raise
    if add_bos:
      if self.bos_id is None:
        raise ValueError("add_bos=True but the GGUF defines no BOS token")
      ids = [self.bos_id, *ids]
    return ids

  def _check_ids(self, ids) -> list[int]:
    """`ids` (list, tuple, NumPy/JAX 1-D integer array) as a validated list of ints."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
      raise TypeError(f"expected a sequence of token ids, got {type(ids).__name__}")
    if hasattr(ids, "__array__"):  # one device->host copy instead of per-element reads
      arr = np.asarray(ids)
      if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise TypeError(f"expected a 1-D integer array, got {arr.dtype}{list(arr.shape)}")
      ids = arr.tolist()
    out = [i if type(i) is int else _as_int(i) for i in ids]
    bad = next((i for i in out if not 0 <= i < self.vocab_size), None)
    if bad is not None:
      raise ValueError(f"token id {bad} outside vocabulary [0, {self.vocab_size})")
    return out

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    """Text of `ids`; bytes that do not form valid UTF-8 decode to U+FFFD."""
    return self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

  def decode_incremental(
    self, ids, n_done: int, *, final: bool = False, skip_special_tokens: bool = False
  ) -> tuple[str, int]:
    """Streaming helper: text of the tokens after the first `n_done` and the new `n_done`.

    Start with n_done=0 and feed back the returned count each step::

        piece, n_done = tok.decode_incremental(ids, n_done)

    A token can end in the middle of a multi-byte UTF-8 character; such text ends in
    U+FFFD and is withheld ("", n_done unchanged) until later tokens complete it. Pass
    final=True at the end of generation to flush whatever is left. Joining all pieces
    equals `decode(ids)`. Cost is proportional to the withheld tokens, not to len(ids).
    """
    if not 0 <= n_done <= len(ids):
      raise ValueError(f"n_done={n_done} outside [0, {len(ids)}]")
    text = self.decode(ids[n_done:], skip_special_tokens=skip_special_tokens)
    if text.endswith(_REPLACEMENT) and not final:
      return "", n_done
    return text, len(ids)

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render `messages` ({"role", "content"} dicts) as the GGUF's ChatML template does.

    If the first message is not a system one, the template's default system prompt is
    inserted (for SmolLM2-Instruct: "You are a helpful AI assistant named SmolLM, ...").
    """
    if not isinstance(messages, (list, tuple)):
      raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for m in messages:
      if not isinstance(m, dict) or not {"role", "content"} <= m.keys():
        raise ValueError(f"each message needs 'role' and 'content' keys, got {m!r}")
      if not isinstance(m["role"], str) or not isinstance(m["content"], str):
        raise TypeError(f"message role and content must be str, got {m!r}")
    parts = []
    default_system = self._default_system_prompt()
    if messages and messages[0]["role"] != "system" and default_system is not None:
      parts.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    parts += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    if add_generation_prompt:
      parts.append("<|im_start|>assistant\n")
    return "".join(parts)

  def _default_system_prompt(self) -> str | None:
    """The system prompt the template inserts by default, read from the template text."""
    if not self.chat_template or "<|im_start|>" not in self.chat_template:
      raise ValueError("the GGUF's chat_template is missing or not ChatML")
    found = re.search(
      r"<\|im_start\|>system(?:\n|\\n)(.*?)<\|im_end\|>", self.chat_template, re.DOTALL
    )
    return found.group(1) if found else None
