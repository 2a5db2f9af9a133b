"""Speed and error of the quantized hot paths, Pallas beside fused XLA and bf16 peers.

  python -m experiments.bench_kernels [--ops=matmul,kv_attention,attention] [--reps=5]

Three ops, each through the public dispatch (`jaxllm.ops`), on random data of
named real-model shapes:
  * matmul: rows [M, K] @ a `jaxllm.quant` QTensor [K, N] for each --methods
    recipe (w8a8, w4a16_g128, fireq_w4a8); peer: the bf16 weight through the
    ``linear`` op. Shapes: SmolLM2-135M's and Llama-3-8B's linears, M in --m.
  * kv_attention: one decode step of the ``quantized_kv_attention`` op over a
    --kv_context-token KIVI cache (store + full-precision window) per
    --kv_methods; peer: the ``attention`` op over a dense bf16 cache.
  * attention (not by default): a causal prefill of --attention_len tokens (S = T,
    batch 1) at each --kv_models head shape, every implementation (the flash
    kernels with ``pallas``) beside XLA's attention in bf16.

Timing (CONTRACT): one untimed call (its wall time, compile included, is
``first_call_s``), then the median of --reps calls. Each call runs the op on
--copies distinct weight sets or caches (like successive layers, so a small
operand is not re-read from cache) inside one jitted function; figures are per
op. Ratios: ``x_vs_bf16`` (peer time / this time; > 1 is faster) and
``x_vs_xla``. Error: ``rel_err_vs_reference`` against the ``reference``
implementation, and for matmul ``rel_err_vs_f32`` against the unquantized f32
product (the quantization error itself), both as ||out - ref|| / ||ref||.
Pallas runs compiled on GPU/TPU; on CPU only with --interpret (slow, for tests).
"""

from __future__ import annotations

import functools

from absl import app, flags

from experiments import bench_lib, common
from jaxllm import runtime

NAME = "bench_kernels"
common.define_common_flags(NAME, ("out_dir", "seed", "dtype"))
OPS = ("matmul", "kv_attention", "attention")
_OPS = flags.DEFINE_list("ops", ["matmul", "kv_attention"], f"Ops to measure: {', '.join(OPS)}.")
_METHODS = flags.DEFINE_list(
  "methods", ["w8a8", "w4a16_g128", "fireq_w4a8"], "Weight recipes (jaxllm.quant.RECIPES)."
)
_SHAPES = flags.DEFINE_list(
  "shapes",
  ["smollm2", "llama3_8b"],
  "Matmul shape sets (pallas_kernels.shapes): smollm2, llama3_8b, tiny.",
)
_M = flags.DEFINE_list("m", ["1", "8", "128"], "Activation rows M.")
_KV_MODELS = flags.DEFINE_list("kv_models", ["smollm2", "llama3_8b"], "Attention head shapes.")
_KV_METHODS = flags.DEFINE_list("kv_methods", ["kivi4", "kivi2"], "KIVI cache specs.")
_KV_CONTEXT = flags.DEFINE_list("kv_context", ["1024", "8192"], "Cached tokens per row.")
_KV_BATCH = flags.DEFINE_integer("kv_batch", 8, "Decode rows.", lower_bound=1)
_ATTN_LEN = flags.DEFINE_list(
  "attention_len", ["2048"], "--ops=attention: causal prefill lengths (S = T, batch 1)."
)
_IMPLS = flags.DEFINE_list(
  "implementations",
  None,
  "Implementations to time, each op's own names (pallas_kernels.registry: reference, xla, "
  "mosaic_tpu, triton) or pallas (this backend's kernel); default: pallas and xla on an "
  "accelerator, xla on CPU.",
)
runtime.define_kernel_flags()  # --interpret (and --kernels, which this bench does not read)
_REPS = flags.DEFINE_integer("reps", 5, "Timed calls per figure (median).", lower_bound=3)
_COPIES = flags.DEFINE_integer(
  "copies", None, "Weight sets / caches per call; default: enough for 256 MiB of bf16, 2..16."
)
FLAGS = flags.FLAGS

# The linears measured per --shapes set and the heads per --kv_models name: bench_lib's.
MATMUL_SHAPES, KV_HEADS = bench_lib.MATMUL_SHAPES, bench_lib.KV_HEADS


def _copies(bf16_bytes: int) -> int:
  return bench_lib.copies_for(bf16_bytes, _COPIES.value)


def _implementations(backend: str) -> tuple[str, ...]:
  impls = _IMPLS.value or (("pallas", "xla") if backend != "cpu" or FLAGS.interpret else ("xla",))
  from pallas_kernels import registry  # pylint: disable=import-outside-toplevel

  known = {"pallas"} | {name for op in registry.OPS.values() for name in op.names}
  bad = sorted(set(impls) - known)
  if bad:
    common.fail(f"--implementations: unknown {bad}; choose from {sorted(known)}")
  return tuple(impls)


def _selected(op: str, impl: str, *args, **kwargs) -> tuple[str | None, str | None]:
  """(the implementation `impl` selects for these inputs, None) or (None, why it cannot run)."""
  from pallas_kernels import registry  # pylint: disable=import-outside-toplevel
  from pallas_kernels.op_api import Platform, UnsupportedError  # pylint: disable=C0415

  table = registry.get(op)
  if impl != "pallas" and impl not in table.names:
    return None, f"op {op!r} has no implementation {impl!r}"
  try:
    chosen = table.select(impl, Platform.current(FLAGS.interpret), *args, **kwargs)
  except UnsupportedError as e:
    return None, str(e)
  return chosen.name, None


def _refused(row: dict, reason: str) -> dict:
  print(f"  {row['method']}/{row['implementation']}: refused: {reason}", flush=True)
  return dict(row, refused=reason)


def _rel_err(out, ref) -> float:
  import numpy as np  # pylint: disable=import-outside-toplevel

  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def _measure(name: str, run, args, copies: int, row: dict) -> dict:
  """Times `run(*args)` (one call = `copies` ops) into `row`; errors become row["error"]."""
  return bench_lib.measure(name, run, args, copies, row, _REPS.value)


# ----------------------------------------------------------------------------- matmul


def _matmul_rows(backend: str, dtype, impls) -> list[dict]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from jaxllm import ops  # pylint: disable=import-outside-toplevel
  from jaxllm.quant import get_recipe  # pylint: disable=import-outside-toplevel

  specs = {}
  for method in _METHODS.value:
    try:
      specs[method] = get_recipe(method).spec_for("layers.0.attn.q")
    except ValueError as e:
      common.fail(f"--methods: {e}")
    if specs[method] is None:
      common.fail(f"--methods: recipe {method!r} quantizes no linear")
  key = jax.random.key(FLAGS.seed)
  rows = []
  for shape_set in _SHAPES.value:
    if shape_set not in MATMUL_SHAPES:
      common.fail(f"--shapes: unknown {shape_set!r}; choose from {sorted(MATMUL_SHAPES)}")
    for shape_name, k, n in MATMUL_SHAPES[shape_set]:
      copies = _copies(2 * k * n)
      kw, kx = jax.random.split(jax.random.fold_in(key, k * 100003 + n))
      ws = [0.02 * jax.random.normal(jax.random.fold_in(kw, i), (k, n)) for i in range(copies)]
      for m in (int(v) for v in _M.value):
        xs = jax.random.normal(kx, (copies, m, k), jnp.float32).astype(dtype)
        exact = jnp.dot(xs[0].astype(jnp.float32), ws[0], precision=jax.lax.Precision.HIGHEST)

        def chain(xs, ws, cfg):
          return [ops.linear(xs[i], w, cfg) for i, w in enumerate(ws)]

        peer_ws = [w.astype(jnp.bfloat16) for w in ws]
        base = dict(op="matmul", shape=shape_name, m=m, k=k, n=n, copies=copies)
        peer = _measure(
          "bf16",
          jax.jit(lambda xs, ws: chain(xs, ws, ops.KernelConfig("xla"))),
          (xs.astype(jnp.bfloat16), peer_ws),
          copies,
          dict(base, method="bf16", implementation="xla", weight_bytes=2 * k * n),
        )
        peer["rel_err_vs_f32"] = _rel_err(ops.linear(xs[0].astype(jnp.bfloat16), peer_ws[0]), exact)
        rows.append(peer)
        _print_row(peer)
        for method, spec in specs.items():
          qws = [spec.quantize(w, 1) for w in ws]
          ref = ops.linear(xs[0], qws[0], ops.KernelConfig("reference"))
          by_impl = {}
          op = qws[0].matmul_op
          for impl in impls:
            row = dict(base, method=method, implementation=impl, weight_bytes=qws[0].num_bytes)
            ran, reason = _selected(op, impl, *qws[0].matmul_operands(xs[0].reshape(m, k)))
            if reason:
              by_impl[impl] = _refused(row, reason)
              continue
            row["ran"] = ran
            cfg = ops.KernelConfig(interpret=FLAGS.interpret, overrides=((op, ran),))
            row = _measure(
              f"{method}/{impl}",
              jax.jit(lambda xs, ws, cfg=cfg: chain(xs, ws, cfg)),
              (xs, qws),
              copies,
              row,
            )
            if "error" not in row:
              out = ops.linear(xs[0], qws[0], cfg)
              row["rel_err_vs_reference"] = _rel_err(out, ref)
              row["rel_err_vs_f32"] = _rel_err(out, exact)
            by_impl[impl] = row
          rows += _finish_rows(by_impl, peer)
  del backend
  return rows


def _finish_rows(by_impl: dict, peer: dict) -> list[dict]:
  """The rows of one case with their ratios, printed."""
  _add_ratios(by_impl, peer)
  for row in by_impl.values():
    _print_row(row)
  return list(by_impl.values())


def _add_ratios(by_impl: dict, peer: dict) -> None:
  xla = by_impl.get("xla", {})
  for row in by_impl.values():
    if "us" not in row:
      continue
    if "us" in peer:
      row["x_vs_bf16"] = peer["us"] / row["us"]
    if "us" in xla:
      row["x_vs_xla"] = xla["us"] / row["us"]


# ------------------------------------------------------------------------ kv attention


def _kv_rows(backend: str, dtype, impls) -> list[dict]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from jaxllm import kv_cache, ops  # pylint: disable=import-outside-toplevel

  b = _KV_BATCH.value
  key = jax.random.key(FLAGS.seed)
  rows = []
  for model in _KV_MODELS.value:
    if model not in KV_HEADS:
      common.fail(f"--kv_models: unknown {model!r}; choose from {sorted(KV_HEADS)}")
    hq, hkv, d = KV_HEADS[model]
    for context in (int(v) for v in _KV_CONTEXT.value):
      bf16_cache_bytes = 2 * 2 * b * hkv * context * d
      copies = _copies(bf16_cache_bytes)
      kq, kd = jax.random.split(jax.random.fold_in(key, context * 131 + hq))
      q = jax.random.normal(kq, (copies, b, hq, d), jnp.float32).astype(dtype)
      dense = jax.random.normal(kd, (copies, 2, b, hkv, context, d), jnp.bfloat16)
      q_slots = jnp.full((b, 1), context - 1, jnp.int32)
      starts = jnp.zeros((b,), jnp.int32)

      def dense_chain(q, dense, q_slots=q_slots, starts=starts):
        cfg_x = ops.KernelConfig("xla")
        return [
          ops.attention(q[i][:, None].astype(jnp.bfloat16), kv[0], kv[1], q_slots, starts, cfg_x)
          for i, kv in enumerate(dense)
        ]

      base = dict(op="kv_attention", shape=f"{model}.b{b}.t{context}", m=b, copies=copies)
      peer = _measure(
        "dense bf16",
        jax.jit(dense_chain),
        (q, list(dense)),
        copies,
        dict(base, method="dense_bf16", implementation="xla", cache_bytes=bf16_cache_bytes),
      )
      rows.append(peer)
      _print_row(peer)
      for method in _KV_METHODS.value:
        spec = kv_cache.spec_for(method)
        if spec.kind != "kivi" or not spec.per_channel_keys:
          common.fail(f"--kv_methods: {method!r} does not decode through quantized_kv_attention")
        layers, qlen = bench_lib.kivi_layers(
          FLAGS.seed, spec, (hq, hkv, d), b, context, dtype, copies
        )
        kw = dict(bits=spec.bits, group_size=spec.group_size)
        cache_bytes = sum(x.nbytes for x in jax.tree.leaves(layers[0]))

        def chain(q, layers, impl, starts=starts, qlen=qlen, context=context, kw=kw):
          cfg = ops.KernelConfig(
            interpret=FLAGS.interpret, overrides=(("quantized_kv_attention", impl),)
          )
          return [
            ops.quantized_kv_attention(q[i], st, starts, qlen, context, kr, vr, **kw, config=cfg)
            for i, (st, kr, vr) in enumerate(layers)
          ]

        ref = chain(q[:1], layers[:1], "reference")[0]
        by_impl = {}
        for impl in impls:
          row = dict(base, method=method, implementation=impl, cache_bytes=cache_bytes)
          st, kr, vr = layers[0]
          ran, reason = _selected(
            "quantized_kv_attention", impl, q[0], st, starts, qlen, context, kr, vr, **kw
          )
          if reason:
            by_impl[impl] = _refused(row, reason)
            continue
          row["ran"] = ran
          row = _measure(
            f"{method}/{impl}",
            jax.jit(functools.partial(chain, impl=ran)),
            (q, layers),
            copies,
            row,
          )
          if "error" not in row:
            row["rel_err_vs_reference"] = _rel_err(chain(q[:1], layers[:1], ran)[0], ref)
          by_impl[impl] = row
        rows += _finish_rows(by_impl, peer)
  return rows


# --------------------------------------------------------------------------- attention


def _attention_rows(dtype, impls) -> list[dict]:
  """A causal prefill (S = T, batch 1) through the ``attention`` op for each
  implementation, beside XLA's in bf16, at each --kv_models head shape."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from jaxllm import ops  # pylint: disable=import-outside-toplevel

  rows = []
  key = jax.random.key(FLAGS.seed)
  for model in _KV_MODELS.value:
    hq, hkv, d = KV_HEADS[model]
    for t in (int(v) for v in _ATTN_LEN.value):
      kq, kk, kv = jax.random.split(jax.random.fold_in(key, t * 7 + hq), 3)
      q = jax.random.normal(kq, (1, t, hq, d), jnp.float32)
      k = jax.random.normal(kk, (1, hkv, t, d), jnp.float32)
      v = jax.random.normal(kv, (1, hkv, t, d), jnp.float32)
      slots, start = jnp.arange(t, dtype=jnp.int32)[None], jnp.zeros((1,), jnp.int32)
      base = dict(op="attention", shape=f"{model}.s{t}", m=t, copies=1, method="prefill")
      base["cache_bytes"] = 2 * 2 * hkv * t * d  # K and V in bf16

      def call(q, k, v, impl, slots=slots, start=start):
        cfg = ops.KernelConfig(interpret=FLAGS.interpret, overrides=(("attention", impl),))
        return [ops.attention(q, k, v, slots, start, cfg)]

      bf16 = tuple(a.astype(jnp.bfloat16) for a in (q, k, v))
      peer = _measure(
        "prefill bf16/xla",
        jax.jit(functools.partial(call, impl="xla")),
        bf16,
        1,
        dict(base, method="prefill_bf16", implementation="xla"),
      )
      rows.append(peer)
      _print_row(peer)
      args = tuple(a.astype(dtype) for a in (q, k, v))
      ref = call(*args, impl="reference")[0]
      by_impl = {}
      for impl in impls:
        row = dict(base, implementation=impl)
        ran, reason = _selected("attention", impl, *args, slots, start)
        if reason:
          by_impl[impl] = _refused(row, reason)
          continue
        row["ran"] = ran
        run = jax.jit(functools.partial(call, impl=ran))
        row = _measure(f"prefill/{impl}", run, args, 1, row)
        if "error" not in row:
          row["rel_err_vs_reference"] = _rel_err(run(*args)[0], ref)
        by_impl[impl] = row
      rows += _finish_rows(by_impl, peer)
  return rows


# ------------------------------------------------------------------------------ output


def _labelled(label: str, key: str, spec: str):
  """A cell of `key`'s value after `label` ("x_vs_xla   1.37"; "-" when absent)."""
  return lambda row: f"{label} {'-' if row.get(key) is None else format(row[key], spec)}"


# One line per measured row, printed as it is measured; no heading (each figure is named).
ROW = common.Table(
  (
    common.Column("", "op", width=12, left=True),
    common.Column("", "shape", width=24, left=True),
    common.Column("", "m", lambda m: f"m={m:<5d}"),
    common.Column("", "method", width=12, left=True),
    common.Column("", lambda r: r.get("ran", r["implementation"]), width=13, left=True),
    common.Column("", "us", lambda us: f"{us:10.1f} us"),
    common.Column(
      "",
      lambda r: r.get("weight_bytes", r.get("cache_bytes", 0)) / (r["us"] * 1e-6) / 1e9,
      lambda gbs: f"{gbs:8.1f} GB/s",
      sep="  ",
    ),
    common.Column("", _labelled("x_vs_bf16", "x_vs_bf16", "6.2f"), sep="  "),
    common.Column("", _labelled("x_vs_xla", "x_vs_xla", "6.2f"), sep="  "),
    common.Column("", _labelled("err_ref", "rel_err_vs_reference", ".1e"), sep="  "),
    common.Column("", _labelled("err_f32", "rel_err_vs_f32", ".1e"), sep="  "),
  )
)


def _print_row(row: dict) -> None:
  if "error" not in row and "refused" not in row:  # those are printed where they arise
    print(ROW.line(row), flush=True)


def main(argv):
  del argv
  common.start()
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  bad = sorted(set(_OPS.value) - set(OPS))
  if bad:
    common.fail(f"--ops: unknown {bad}; choose from {', '.join(OPS)}")
  backend = jax.default_backend()
  impls = _implementations(backend)
  if "pallas" in impls and backend == "cpu" and not FLAGS.interpret:
    common.fail("Pallas kernels need --interpret on CPU")
  dtype = jnp.dtype(FLAGS.dtype)
  info = common.run_info()
  print(f"# {NAME}: backend {backend} ({info['device_kind']}), jax {jax.__version__}", flush=True)
  rows = []
  if "matmul" in _OPS.value:
    rows += _matmul_rows(backend, dtype, impls)
  if "kv_attention" in _OPS.value:
    rows += _kv_rows(backend, dtype, impls)
  if "attention" in _OPS.value:
    rows += _attention_rows(dtype, impls)
  errors = [r for r in rows if "error" in r]
  record = dict(info=info, flags={f: FLAGS[f].value for f in ("ops", "methods", "m")}, rows=rows)
  keep = ("op", "shape", "m", "method", "implementation", "us", "x_vs_bf16", "x_vs_xla")
  summary = {
    "results": [{k: r.get(k) for k in keep + ("rel_err_vs_reference", "error")} for r in rows],
    "errors": len(errors),
    "device_kind": info["device_kind"],
  }
  common.report(FLAGS.out_dir, NAME, record, summary)


if __name__ == "__main__":
  app.run(main)
