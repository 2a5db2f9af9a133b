"""Logit parity of jaxllm against transformers and llama.cpp on the same GGUF file.

Every peer sees the same token ids (jaxllm's tokenizer, no special tokens added).
Per peer: top-1 agreement, max and mean |Δlogit| over all positions and the whole
vocabulary. A peer that is not installed reports null. If transformers is missing,
the HF column falls back to the stored fixture (top-k logits only).

  python -m experiments.parity [--gguf PATH] [--dtype float32] [--prompts TEXT ...]
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import app, flags

from experiments import common, peers
from jaxllm import runtime

FIXTURE = os.path.join(
  os.path.dirname(__file__), "..", "tests", "fixtures", "reference_logits.json"
)
NOT_RUN = "n/a (not installed)"  # the table's row for a peer that is not installed

common.define_common_flags("parity", only=("gguf", "dtype", "out_dir"))
flags.adopt_module_key_flags(common)
runtime.define_kernel_flags()
FLAGS = flags.FLAGS
_PROMPTS = flags.DEFINE_multi_string(
  "prompts", None, "Prompt text (repeatable; '\\n' is a newline). Default: the fixture's."
)


def _stats(ours: list[np.ndarray], theirs: list[np.ndarray]) -> dict:
  d = np.concatenate([np.abs(a - b).ravel() for a, b in zip(ours, theirs)])
  agree = np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(ours, theirs)])
  return {
    "top1_agree": float(agree.mean()),
    "max_abs_dlogit": float(d.max()),
    "mean_abs_dlogit": float(d.mean()),
  }


def _fixture_stats(ours: list[np.ndarray], fixture: dict) -> dict:
  """Against the stored top-k: Δ on those k entries only."""
  d, agree = [], []
  for a, p in zip(ours, fixture["prompts"]):
    ids, ref = np.asarray(p["top_ids"]), np.asarray(p["top_logits"], np.float32)
    d.append(np.abs(np.take_along_axis(a, ids, -1) - ref).ravel())
    agree.append(a.argmax(-1) == ids[:, 0])
  d, agree = np.concatenate(d), np.concatenate(agree)
  return {
    "top1_agree": float(agree.mean()),
    "max_abs_dlogit": float(d.max()),
    "mean_abs_dlogit": float(d.mean()),
  }


def main(argv):
  del argv
  if FLAGS.gguf and not os.path.isfile(FLAGS.gguf):
    common.fail(f"GGUF file not found: {FLAGS.gguf}")
  kernels = common.kernel_config()
  common.start()
  import jaxllm  # pylint: disable=import-outside-toplevel

  with common.one_line_errors():
    gguf = FLAGS.gguf or jaxllm.default_gguf_path()
  fixture = None
  if os.path.isfile(FIXTURE):
    with open(FIXTURE) as f:
      fixture = json.load(f)
  if _PROMPTS.value:
    texts = [t.replace("\\n", "\n") for t in _PROMPTS.value]
  elif fixture is not None:
    texts = [p["text"] for p in fixture["prompts"]]
  else:
    common.fail(f"no --prompts given and no fixture at {FIXTURE}")

  with common.one_line_errors():  # the loader's messages name the file and tensor
    pipe = common.load_pipeline(gguf_path=gguf, dtype=FLAGS.dtype, kernels=kernels)
  seqs = [pipe.tokenizer.encode(t) for t in texts]
  if not all(seqs):
    common.fail("a prompt encodes to zero tokens")
  ours = [np.asarray(pipe.logits(np.asarray([s], np.int32)), np.float32)[0] for s in seqs]

  results, hf_source, tok_match = {}, None, None
  if peers.hf_available():
    model, tok = peers.load_hf(gguf, "float32")
    tok_match = all(tok.encode(t, add_special_tokens=False) == s for t, s in zip(texts, seqs))
    results["hf"] = _stats(ours, [peers.hf_logits(model, s) for s in seqs])
    hf_source = "transformers"
    del model
  elif fixture is not None and not _PROMPTS.value:
    tok_match = all(p["ids"] == s for p, s in zip(fixture["prompts"], seqs))
    if tok_match:
      results["hf"] = _fixture_stats(ours, fixture)
      hf_source = "fixture"
  if peers.llamacpp_available():
    llm = peers.load_llamacpp(gguf, n_ctx=max(map(len, seqs)) + 16)
    results["llamacpp"] = _stats(ours, [peers.llamacpp_logits(llm, s) for s in seqs])

  table = common.Table(
    (
      common.Column("peer", "peer", width=10, left=True),
      common.Column("top1 agree", "top1_agree", lambda v: f"{100 * v:.2f}%", width=10),
      common.Column("max |dlogit|", "max_abs_dlogit", ".3g", width=13),
      common.Column("mean |dlogit|", "mean_abs_dlogit", ".3g", width=14),
    ),
    [
      {"peer": peer, **results[peer]} if peer in results else {"peer": peer, "note": NOT_RUN}
      for peer in ("hf", "llamacpp")
    ],
    span="note",
  )

  summary = {
    f"{peer}_{k}": (results[peer][k] if peer in results else None)
    for peer in ("hf", "llamacpp")
    for k in ("top1_agree", "max_abs_dlogit", "mean_abs_dlogit")
  }
  summary.update(
    tokens=sum(map(len, seqs)),
    prompts=len(seqs),
    hf_source=hf_source,
    tokenizer_matches_hf=tok_match,
    dtype=FLAGS.dtype,
  )
  info = common.run_info()
  info["versions"].update(
    {p: common.package_version(p) for p in ("torch", "transformers", "llama_cpp_python")}
  )
  record = {
    "config": {"gguf": gguf, "dtype": FLAGS.dtype, "prompts": texts},
    **info,
    "tokens_per_prompt": [len(s) for s in seqs],
    "per_peer": results,
    "summary": summary,
  }
  common.report(FLAGS.out_dir, "parity", record, summary, tables=[table])


if __name__ == "__main__":
  app.run(main)
