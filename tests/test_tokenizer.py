"""Tests for jaxllm.tokenizer against the SmolLM2-135M-Instruct GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxllm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "reference_logits.json"
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="session")
def gguf_path(smollm_path) -> Path:
  return Path(smollm_path)


@pytest.fixture(scope="session")
def tok(gguf_path) -> Tokenizer:
  return Tokenizer.from_gguf(gguf_path)


ROUND_TRIP = [
  "Hello, world!",
  "The quick brown fox jumps over the lazy dog.",
  "Café déjà vu — naïve façade, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어",
  "emoji 😀👍🏽🇫🇷 and ZWJ 👩‍👩‍👧",
  "def f(x):\n\treturn {'a': [x ** 2 for x in range(10)]}  # comment\n",
  "   leading, trailing   \n\n\n\t\t  ",
  "1234567890 3.14159 -42 1e-9 ١٢٣ ½",
  "it's we're they'll I'd you've she's",
  "<|im_start|>user\nhello<|im_end|>\n",
  "\x00\x01 control \u200b zero width \ufeff",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tok, text):
  ids = tok.encode(text)
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == text


def test_metadata(tok):
  assert tok.vocab_size == 49152
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)
  assert tok.add_bos_default is False
  assert tok.special_ids == frozenset(range(17))


def test_empty_and_bos(tok):
  assert tok.encode("") == []
  assert tok.encode("", add_bos=True) == [tok.bos_id]
  assert tok.encode("Hi", add_bos=True)[0] == tok.bos_id
  assert tok.decode([]) == ""


def test_pretokenizer_splits_digits_without_prefix_space(tok):
  """llama.cpp "smollm": isolate each \\p{N} char, then the GPT-2 regex; no prefix space."""
  ids = tok.encode("Hello world! 123")
  assert ids == [19556, 905, 17, 216, 33, 34, 35]  # " " stays apart from the digits
  assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
  assert tok.decode(tok.encode("Hello")[:1]) == "Hello"  # no "Ġ" prepended


def test_special_tokens_are_single_ids(tok):
  for i in sorted(tok.special_ids):
    text = tok.decode([i])
    assert tok.encode(text) == [i]
    assert tok.decode([i], skip_special_tokens=True) == ""
  ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
  assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 1
  assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_decode_accepts_numpy_ids(tok):
  ids = tok.encode("numpy ids")
  assert tok.decode(np.asarray(ids, dtype=np.int32)) == "numpy ids"
  assert tok.decode([np.int64(i) for i in ids]) == "numpy ids"
  assert tok.decode(np.asarray([], dtype=np.float32)) == ""


def test_bad_inputs(tok):
  for bad in (None, 123, b"bytes", ["list"]):
    with pytest.raises(TypeError, match="encode expects str"):
      tok.encode(bad)
  with pytest.raises(TypeError, match="sequence of token ids"):
    tok.decode("abc")
  with pytest.raises(TypeError, match="not an integer"):
    tok.decode(["a"])
  with pytest.raises(ValueError, match="outside vocabulary"):
    tok.decode([tok.vocab_size])
  with pytest.raises(ValueError, match="outside vocabulary"):
    tok.decode([-1])
  for bad in ([1.5], [True], np.zeros(2, np.float32), np.zeros((1, 2), np.int32)):
    with pytest.raises(TypeError, match="integer"):
      tok.decode(bad)
  with pytest.raises(TypeError, match="GGUFReader or a path"):
    Tokenizer.from_gguf(42)
  with pytest.raises(TypeError, match="list of dicts"):
    tok.apply_chat_template("hi")
  with pytest.raises(ValueError, match="'role' and 'content'"):
    tok.apply_chat_template([{"content": "hi"}])
  with pytest.raises(TypeError, match="must be str"):
    tok.apply_chat_template([{"role": "user", "content": None}])


def _write_gguf(path: Path, **kv) -> Path:
  import gguf

  writer = gguf.GGUFWriter(str(path), "llama")
  for key, value in kv.items():
    key = key.replace("__", ".")
    if isinstance(value, str):
      writer.add_string(key, value)
    else:
      writer.add_array(key, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_gguf_without_tokenizer_metadata(tmp_path):
  path = _write_gguf(tmp_path / "bare.gguf")
  with pytest.raises(ValueError, match="tokenizer.ggml.model"):
    Tokenizer.from_gguf(path)
  path = _write_gguf(tmp_path / "spm.gguf", tokenizer__ggml__model="llama")
  with pytest.raises(ValueError, match="'llama'"):
    Tokenizer.from_gguf(str(path))
  path = _write_gguf(
    tmp_path / "notoks.gguf", tokenizer__ggml__model="gpt2", tokenizer__ggml__pre="smollm"
  )
  with pytest.raises(ValueError, match="tokenizer.ggml.tokens"):
    Tokenizer.from_gguf(path)


def test_decode_incremental_withholds_split_utf8(tok):
  text = "a😀b 日本語 ok 👩‍👩‍👧!"
  ids = tok.encode(text)
  n_done, pieces = 0, []
  for k in range(1, len(ids) + 1):
    piece, n_done = tok.decode_incremental(ids[:k], n_done)
    assert "\ufffd" not in piece
    pieces.append(piece)
  assert n_done == len(ids) and "".join(pieces) == text
  # A lone lead byte is withheld until the stream ends, then flushed.
  head = tok.encode("😀")[:1]
  assert tok.decode(head).endswith("\ufffd")
  assert tok.decode_incremental(head, 0) == ("", 0)
  assert tok.decode_incremental(head, 0, final=True) == (tok.decode(head), 1)
  with pytest.raises(ValueError, match="n_done"):
    tok.decode_incremental(ids, len(ids) + 1)


# Hand-written renderings of the GGUF's chat_template (ChatML + default system prompt).
CHATS = [
  (
    [{"role": "user", "content": "Hi"}],
    True,
    (
      f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ),
  ),
  (
    [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "4"},
      {"role": "user", "content": "x3?"},
    ],
    True,
    (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
      "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nx3?<|im_end|>\n"
      "<|im_start|>assistant\n"
    ),
  ),
  (
    [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c"}],
    False,
    (
      f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
      "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\nc<|im_end|>\n"
    ),
  ),
  ([], True, "<|im_start|>assistant\n"),
]


@pytest.mark.parametrize("messages,gen,expected", CHATS)
def test_chat_template(tok, messages, gen, expected):
  assert DEFAULT_SYSTEM in tok.chat_template  # the expectation matches the metadata
  out = tok.apply_chat_template(messages, add_generation_prompt=gen)
  assert out == expected
  ids = tok.encode(out)
  assert ids.count(1) == out.count("<|im_start|>") and tok.decode(ids) == out


@pytest.mark.parametrize("messages,gen,expected", CHATS)
def test_chat_template_matches_jinja(tok, messages, gen, expected):
  jinja2 = pytest.importorskip("jinja2")
  rendered = jinja2.Template(tok.chat_template).render(messages=messages, add_generation_prompt=gen)
  assert tok.apply_chat_template(messages, add_generation_prompt=gen) == rendered


# SmolLM2's vocabulary lacks the byte tokens for these control characters and for the
# UTF-8 lead bytes F1 and F2 (code points U+40000..U+BFFFF, all unassigned); such bytes
# are dropped, as in llama.cpp and in the original tokenizer (BPE without unk token).
UNENCODABLE = "\x04\x06\x13\x14\x16\x1d"


def test_bytes_missing_from_vocab_are_dropped(tok):
  assert tok.decode(tok.encode(f"a{UNENCODABLE}b\U000e0067")) == "ab\U000e0067"
  # Only the F1 lead byte is dropped; the orphaned continuation bytes decode to U+FFFD.
  assert tok.decode(tok.encode("\U00050000")) == "\ufffd" * 3


def test_lone_surrogate_is_rejected(tok):
  with pytest.raises(ValueError, match="(?i)utf-8"):
    tok.encode("a\ud800b")


ENCODABLE = st.characters(codec="utf-8", exclude_characters=UNENCODABLE).filter(
  lambda c: not 0x40000 <= ord(c) < 0xC0000
)


@settings(max_examples=300, deadline=None)
@given(st.text(ENCODABLE, max_size=200))
def test_round_trip_random_text(tok, text):
  assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(ENCODABLE, max_size=60))
def test_incremental_pieces_join_to_decode(tok, text):
  ids, n_done, out = tok.encode(text), 0, ""
  for k in range(1, len(ids) + 1):
    piece, n_done = tok.decode_incremental(ids[:k], n_done)
    out += piece
  out += tok.decode_incremental(ids, n_done, final=True)[0]
  assert out == tok.decode(ids) == text


def _fixture_prompts() -> list[tuple[str, list[int]]]:
  """(text, HF ids) pairs from the reference fixture, whatever the exact key names."""
  data = json.loads(FIXTURE.read_text())
  entries = data.get("prompts", data) if isinstance(data, dict) else data
  if isinstance(entries, dict):
    entries = list(entries.values())
  pairs = []
  for e in entries:
    text = next(e[k] for k in ("text", "prompt") if k in e)
    ids = next(e[k] for k in ("ids", "token_ids", "input_ids", "hf_ids") if k in e)
    pairs.append((text, [int(i) for i in ids]))
  return pairs


def test_ids_match_reference_fixture(tok):
  pairs = _fixture_prompts()
  assert pairs
  for text, hf_ids in pairs:
    assert tok.encode(text) == hf_ids, text


@pytest.mark.skipif(not WIKI.is_file(), reason=f"{WIKI} absent")
def test_wikitext_round_trip(tok):
  text = WIKI.read_text(encoding="utf-8")[:200_000]
  assert tok.decode(tok.encode(text)) == text


@pytest.fixture(scope="module")
def hf_tok(gguf_path):
  """Dev-only peer: transformers' tokenizer loaded from the same GGUF."""
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def _hf_corpus() -> list[str]:
  lines = WIKI.read_text(encoding="utf-8").splitlines(keepends=True)[:200]
  return lines + ROUND_TRIP + ["".join(lines[:40])]


@pytest.mark.skipif(not WIKI.is_file(), reason=f"{WIKI} absent")
def test_agrees_with_transformers(tok, hf_tok):
  """Ids and text equal transformers' on WikiText lines and the round-trip strings.

  transformers' GGUF import keeps only the ByteLevel step of the "smollm" pre-tokenizer
  and drops the digit isolation, so it differs from llama.cpp (and from us) where a
  space precedes a non-ASCII number (" ½", " ١٢٣"): those strings are left out here and
  checked below against transformers with the digit step restored.
  """
  corpus = [s for s in _hf_corpus() if not any(c.isnumeric() and not c.isascii() for c in s)]
  differ = [s for s in corpus if tok.encode(s) != hf_tok.encode(s, add_special_tokens=False)]
  assert not differ, f"{len(differ)}/{len(corpus)} differ, first: {differ[0]!r}"
  for s in corpus:
    assert tok.decode(tok.encode(s)) == hf_tok.decode(hf_tok.encode(s, add_special_tokens=False))


@pytest.mark.skipif(not WIKI.is_file(), reason=f"{WIKI} absent")
def test_agrees_with_transformers_plus_digit_split(tok, hf_tok):
  from tokenizers import Tokenizer as Backend
  from tokenizers import pre_tokenizers

  fixed = Backend.from_str(hf_tok.backend_tokenizer.to_str())
  fixed.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
  )
  corpus = _hf_corpus()
  differ = [s for s in corpus if tok.encode(s) != fixed.encode(s, add_special_tokens=False).ids]
  assert not differ, f"{len(differ)}/{len(corpus)} differ, first: {differ[0]!r}"
