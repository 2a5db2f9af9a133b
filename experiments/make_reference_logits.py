"""Writes tests/fixtures/reference_logits.json: transformers' float32 logits on the GGUF.

For each prompt in PROMPTS it stores the HF tokenizer's ids (with and without
special tokens) and, at every position, the top-k token ids and logits plus the
full-vocabulary max |logit|. Tests compare jaxllm against it without torch.

  python -m experiments.make_reference_logits [--gguf PATH] [--out PATH]
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import sys

import numpy as np
from absl import app, flags

from experiments import common, peers

PROMPTS = {
  "english": "The quick brown fox jumps over the lazy dog. Then it ran into the forest",
  "code": "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) +",
  "digits": "In 1969, 3 astronauts flew 384400 km to the Moon; 12 + 30 = 42 and pi = 3.14159",
  "chat": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
}

common.define_common_flags("make_reference_logits", only=("gguf",))
flags.adopt_module_key_flags(common)
_OUT = flags.DEFINE_string("out", "tests/fixtures/reference_logits.json", "Fixture to write.")
_TOP_K = flags.DEFINE_integer("top_k", 8, "Token ids/logits kept per position.")
_DTYPE = flags.DEFINE_enum("torch_dtype", "float32", ["float32", "bfloat16"], "torch dtype.")


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def tokenizer_facts(tok) -> dict:
  """The quirks a jaxllm tokenizer has to match (see the report in the fixture)."""
  plain = tok.encode("hello", add_special_tokens=False)
  default = tok.encode("hello")
  digits = tok.encode("12345", add_special_tokens=False)
  return {
    "bos_token": tok.bos_token,
    "bos_id": tok.bos_token_id,
    "eos_token": tok.eos_token,
    "eos_id": tok.eos_token_id,
    "adds_bos_by_default": len(default) > len(plain) and default[0] == tok.bos_token_id,
    "adds_eos_by_default": len(default) > len(plain) and default[-1] == tok.eos_token_id,
    "digits_12345": digits,
    "splits_digits_individually": len(digits) == 5,
  }


def main(argv):
  del argv
  gguf = flags.FLAGS.gguf or peers.installed_gguf_path()
  if not os.path.isfile(gguf):
    common.fail(f"GGUF file not found: {gguf}")
  common.start()
  model, tok = peers.load_hf(gguf, _DTYPE.value)
  k = _TOP_K.value
  prompts = []
  for name, text in PROMPTS.items():
    ids = tok.encode(text, add_special_tokens=False)
    logits = peers.hf_logits(model, ids)  # (S, V)
    bad = ~np.isfinite(logits)
    if bad.any():  # a fixture of NaN would pass for a reference: keep the old file instead
      pos, tok_id = np.argwhere(bad)[0]
      common.fail(
        f"transformers' logits for prompt {name!r} are not finite ({int(bad.sum())} of "
        f"{logits.size} NaN or inf, first at position {pos}, token id {tok_id}); "
        f"{_OUT.value} not written"
      )
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
    prompts.append(
      {
        "name": name,
        "text": text,
        "ids": ids,
        "ids_with_special_tokens": tok.encode(text),
        "top_ids": top.tolist(),
        "top_logits": np.round(np.take_along_axis(logits, top, -1), 4).tolist(),
        "max_abs_logit": np.round(np.abs(logits).max(-1), 4).tolist(),
      }
    )
    print(f"{name:8s} {len(ids):3d} tokens  top-1 of last: {tok.decode(top[-1, :1])!r}")
  fixture = {
    "provenance": {
      "made_by": " ".join(["python -m experiments.make_reference_logits", *sys.argv[1:]]),
      "how": "transformers AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) "
      "(weights dequantised from the GGUF by transformers), one forward pass "
      "per prompt, no KV cache, ids from AutoTokenizer with "
      "add_special_tokens=False; logits rounded to 4 decimals",
      "dtype": _DTYPE.value,
      "versions": {
        p: md.version(p) for p in ("torch", "transformers", "gguf", "tokenizers", "numpy")
      },
      "python": sys.version.split()[0],
    },
    "gguf": {
      "file": os.path.basename(gguf),
      "sha256": sha256(gguf),
      "vocab_size": int(model.config.vocab_size),
    },
    "top_k": k,
    "tokenizer": tokenizer_facts(tok),
    "prompts": prompts,
  }
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(fixture, f, separators=(",", ":"))
    f.write("\n")
  summary = {
    "out": _OUT.value,
    "bytes": os.path.getsize(_OUT.value),
    "tokens": sum(len(p["ids"]) for p in prompts),
    **fixture["tokenizer"],
  }
  common.print_summary(summary)


if __name__ == "__main__":
  app.run(main)
