r"""MoBA and SparQ applied to SmolLM2 without training: perplexity against the KV bytes read.

  python -m experiments.sparse_attention --text_file=../shared/data/wikitext-2-raw/wiki.test.raw \
      --context=2048 --max_windows=8

For each cache (``--caches``, default dense and KIVI-4) the runner scores the windows
with full attention over that cache, then with each sparse point: over the dense cache
MoBA at ``--moba_blocks`` x ``--moba_topk`` and SparQ at ``--sparq``
(``r:k[:correction[:head]]``); over the other caches the ``--cache_points`` (each is a
streamed run, so fewer by default; ``all`` for every point). Per point: perplexity, its change against full attention over the
same cache (``delta_pct``) and against the dense cache (``delta_vs_dense_pct``), and the
fraction of KV bytes read per step (`jaxllm.sparse_attention.kv_read_fraction`:
summed over the window's queries; ``_at_context`` for the last query; SparQ also on
row-major keys).

How each cache is run:
  * dense: each window as one chunk into an empty dense cache (`jaxllm.perplexity` with
    ``make_cache``). MoBA routes tiles of ``--query_tile`` queries; SparQ handles each
    query alone, so this scores exactly as token-by-token decoding would
    (tests/test_sparse_attention.py proves it on a short window).
  * compressed caches (kivi4, kivi2, int8): streamed (`jaxllm.streaming`): a
    ``--prefill``-token prefill, then ``--chunk`` tokens per step (KIVI chunks are exact;
    int8 under a sparse method decodes one token per step), each step reading the cache as
    stored. MoBA over KIVI routes by block means from the key group statistics.

Also reported: the first call of a cacheless ``--context``-token prefill at batch 1,
compile included (``first_call_s``, the default XLA attention).

Outputs ``out_dir/sparse_attention.json`` and ``.png`` (perplexity against the fraction
read); the last stdout line is ``{"results": [{method, params, cache, ppl, delta_pct,
kv_read_fraction}...]}``.
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from experiments import common
from jaxllm import runtime

common.define_common_flags("sparse_attention")
runtime.define_kernel_flags()
flags.FLAGS.set_default("context", 2048)
flags.FLAGS.set_default("max_windows", 8)
_CACHES = flags.DEFINE_list("caches", ["dense", "kivi4"], "KV caches: dense, kivi4, kivi2, int8.")
_MOBA_BLOCKS = flags.DEFINE_list("moba_blocks", ["64", "128"], "MoBA block sizes.")
_MOBA_TOPK = flags.DEFINE_list("moba_topk", ["2", "4", "8", "16"], "MoBA blocks per query tile.")
_MOBA_SINKS = flags.DEFINE_integer(
  "moba_sink_blocks", 0, "MoBA: first blocks every tile keeps (counted in top-k).", lower_bound=0
)
_SPARQ = flags.DEFINE_list(
  "sparq",
  ["8:64:none", "8:64:mean_v", "8:64:rescale", "16:64:none", "8:64:none:head"],
  "SparQ points r:k[:correction[:head]] (correction mean_v, rescale or none; default "
  "mean_v; 'head': channels and slots chosen per query head).",
)
_CACHE_POINTS = flags.DEFINE_list(
  "cache_points",
  ["moba:64:8", "sparq:8:64:none"],
  "Points run over the caches other than dense (each costs a streamed run): moba:block:top_k "
  "or sparq:r:k[:correction[:head]]; 'all' runs every point.",
)
_QUERY_TILE = flags.DEFINE_integer("query_tile", 32, "Queries MoBA routes together.", lower_bound=1)
_PREFILL = flags.DEFINE_integer("prefill", 32, "Compressed caches: prefill tokens per window.")
_CHUNK = flags.DEFINE_integer("chunk", 32, "Compressed caches: tokens per decode step.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Windows run side by side.", lower_bound=1)
FLAGS = flags.FLAGS

CACHES = ("dense", "kivi4", "kivi2", "int8")


def _ints(name: str, values: list[str]) -> list[int]:
  try:
    out = [int(v) for v in values]
  except ValueError:
    common.fail(f"--{name} must list integers, got {','.join(values)}")
  if any(v < 1 for v in out):
    common.fail(f"--{name} must list integers >= 1, got {','.join(values)}")
  return out


def _sparq(fields: list[str], item: str):
  from jaxllm.sparse_attention import SparQ  # pylint: disable=import-outside-toplevel

  ok = 2 <= len(fields) <= 4 and all(f.isdigit() for f in fields[:2])
  if not ok or (len(fields) == 4 and fields[3] != "head"):
    common.fail(f"SparQ point {item!r} must be r:k[:correction[:head]]")
  correction = fields[2] if len(fields) > 2 else "mean_v"
  return SparQ(int(fields[0]), int(fields[1]), correction, per_head=len(fields) == 4)


def _methods():
  """(points over the dense cache, points over the others) from the flags; a method's
  ValueError exits with its message."""
  from jaxllm.sparse_attention import MoBA  # pylint: disable=import-outside-toplevel

  tile, sinks = _QUERY_TILE.value, _MOBA_SINKS.value
  dense, others = [], []
  try:
    for block in _ints("moba_blocks", _MOBA_BLOCKS.value):
      for top_k in _ints("moba_topk", _MOBA_TOPK.value):
        dense.append(MoBA(block, top_k, query_tile=tile, sink_blocks=sinks))
    dense += [_sparq(item.split(":"), item) for item in _SPARQ.value]
    if _CACHE_POINTS.value == ["all"]:
      return dense, dense
    for item in _CACHE_POINTS.value:
      kind, *fields = item.split(":")
      if kind == "moba" and len(fields) == 2 and all(f.isdigit() for f in fields):
        others.append(MoBA(int(fields[0]), int(fields[1]), query_tile=tile, sink_blocks=sinks))
      elif kind == "sparq":
        others.append(_sparq(fields, item))
      else:
        common.fail(f"--cache_points entry {item!r} must be moba:block:top_k or sparq:r:k[...]")
  except ValueError as e:
    common.fail(str(e))
  return dense, others


def _check_flags() -> None:
  bad = sorted(set(_CACHES.value) - set(CACHES))
  if bad or not _CACHES.value:
    common.fail(f"--caches: unknown {bad or 'empty'}; choose from {list(CACHES)}")
  if FLAGS.context < 2 * _QUERY_TILE.value:
    common.fail(f"--context={FLAGS.context} is shorter than two query tiles ({_QUERY_TILE.value})")


def _params(method) -> dict:
  from jaxllm.sparse_attention import MoBA  # pylint: disable=import-outside-toplevel

  if method is None:
    return {}
  if isinstance(method, MoBA):
    return {
      "block": method.block_size,
      "top_k": method.top_k,
      "query_tile": method.tile,
      "sink_blocks": method.sink_blocks,
    }
  return {
    "r": method.r,
    "k": method.k,
    "correction": method.correction,
    "per_head": method.per_head,
  }


def _first_call_seconds(model, context: int, vocab: int) -> float:
  """Seconds for the first cacheless `context`-token prefill at batch 1, compile included."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t, logits_at="last")[0])
  tokens = jnp.arange(context, dtype=jnp.int32)[None] % vocab
  t0 = time.perf_counter()
  jax.block_until_ready(fn(state, tokens))
  return time.perf_counter() - t0


def main(argv):
  del argv
  _check_flags()
  kernels = common.kernel_config()
  common.start()
  dense_points, cache_points = _methods()
  text, label, path = common.read_eval_text(FLAGS.text_file)
  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp

  from experiments.common import load_pipeline  # sharded by --mesh
  from jaxllm import kv_cache
  from jaxllm.gguf_loader import default_gguf_path
  from jaxllm.perplexity import perplexity, tokenize_windows
  from jaxllm.sparse_attention import kv_read_fraction
  from jaxllm.streaming import StreamingConfig, StreamingScorer, streaming_perplexity
  from jaxllm.tokenizer import Tokenizer

  cfg = common.model_config(FLAGS.model, FLAGS.context)
  with common.one_line_errors():
    gguf = FLAGS.gguf or default_gguf_path()
  with common.one_line_errors(f"{gguf}: "):
    tokenizer = Tokenizer.from_gguf(gguf)
  if FLAGS.model == "tiny":
    tokenizer = common.ModuloTokenizer(tokenizer, cfg.vocab_size)
  try:
    windows = tokenize_windows(tokenizer, text, FLAGS.context)
    stream_cfg = StreamingConfig(
      prefill=_PREFILL.value, block=8, batch_size=_BATCH.value, chunk=_CHUNK.value
    )
  except ValueError as e:
    common.fail(f"{label}: {e}")
  available = len(windows)
  windows = windows[: FLAGS.max_windows]
  specs = {name: kv_cache.spec_for(name) for name in _CACHES.value}
  # Every point must fit the window before anything runs (top_k vs blocks, k vs slots).
  for method in [*dense_points, *cache_points]:
    try:
      method.check_call(cfg.head_dim, FLAGS.context)
    except ValueError as e:
      common.fail(f"--context={FLAGS.context}: {e}")

  with common.one_line_errors():
    pipe = load_pipeline(FLAGS.model, FLAGS.gguf, FLAGS.dtype, FLAGS.seed)
  pipe.model.kernels = kernels
  model, dtype = pipe.model, jnp.dtype(FLAGS.dtype)
  first_call = _first_call_seconds(model, FLAGS.context, cfg.vocab_size)
  print(f"first call, {FLAGS.context}-token prefill (compile included): {first_call:.1f} s")

  def score(cache_name, method):
    spec = specs[cache_name]
    make_cache = kv_cache.cache_factory(spec, cfg, dtype, attention=method)
    if spec.kind == "dense":
      return perplexity(model, windows, _BATCH.value, progress=True, make_cache=make_cache)["ppl"]
    run_cfg = stream_cfg
    probe = make_cache(1, stream_cfg.layout(FLAGS.context)[1], jnp.zeros((1,), jnp.int32))
    try:
      probe.for_chunked_decode(stream_cfg.prefill, stream_cfg.chunk)
    except ValueError:
      run_cfg = StreamingConfig(prefill=_PREFILL.value, block=64, batch_size=_BATCH.value)
    scorer = StreamingScorer(model, make_cache, run_cfg)
    return streaming_perplexity(scorer, windows, progress=True)[0]["ppl"]

  rows, dense_ppl = [], None
  group = cfg.num_heads // cfg.num_kv_heads
  for cache_name in _CACHES.value:
    key_bytes, value_bytes = kv_cache.key_value_bytes(specs[cache_name], cfg)
    full = None
    points = dense_points if cache_name == "dense" else cache_points
    for method in [None, *points]:
      t0 = time.perf_counter()
      try:
        ppl = score(cache_name, method)
      except ValueError as e:
        common.fail(f"{cache_name}, {method.name if method else 'full attention'}: {e}")
      full = ppl if method is None else full
      dense_ppl = (
        ppl if dense_ppl is None and method is None and cache_name == "dense" else dense_ppl
      )
      row = {
        "method": "full" if method is None else type(method).__name__.lower(),
        "params": _params(method),
        "cache": cache_name,
        "label": f"{cache_name} {method.name if method else 'full'}",
        "ppl": ppl,
        "delta_pct": 100.0 * (ppl / full - 1.0),
        "delta_vs_dense_pct": None if dense_ppl is None else 100.0 * (ppl / dense_ppl - 1.0),
        **kv_read_fraction(method, FLAGS.context, cfg.head_dim, key_bytes, value_bytes, group),
        "seconds": time.perf_counter() - t0,
      }
      rows.append(row)
      print(
        f"{row['label']:34s} ppl {ppl:8.3f} {row['delta_pct']:+7.2f}%  "
        f"read {row['kv_read_fraction']:.3f}  ({row['seconds']:.0f} s)",
        flush=True,
      )

  table = common.Table(
    (
      common.Column("cache / method", "label", width=34, left=True),
      common.Column("ppl", "ppl", ".3f", width=9),
      common.Column("dppl %", "delta_pct", "+.2f", width=8),
      common.Column("vs dense %", "delta_vs_dense_pct", "+.2f", width=10),
      common.Column("KV read", "kv_read_fraction", ".3f", width=8),
      common.Column("at context", "kv_read_fraction_at_context", ".3f", width=10),
      common.Column("row-major", lambda r: r.get("kv_read_fraction_row_major"), ".3f", width=9),
    ),
    rows,
    title=f"\ntext: {label}; context {FLAGS.context}; {len(windows)} of {available} windows; "
    f"{len(windows) * (FLAGS.context - 1)} scored tokens per point",
  )
  plot = common.ScatterPlot(
    rows,
    "kv_read_fraction",
    "ppl",
    title=f"{cfg.name}, {label}, context {FLAGS.context}, {len(windows)} windows",
    xlabel="fraction of KV bytes read per step (algorithmic, over the window's queries)",
    ylabel="perplexity",
    label="label",
  )
  keys = ("method", "params", "cache", "ppl", "delta_pct", "kv_read_fraction")
  record = {
    "config": {
      "model": FLAGS.model,
      "gguf": FLAGS.gguf,
      "dtype": FLAGS.dtype,
      "context": FLAGS.context,
      "max_windows": FLAGS.max_windows,
      "caches": _CACHES.value,
      "query_tile": _QUERY_TILE.value,
      "prefill": _PREFILL.value,
      "chunk": _CHUNK.value,
      "batch_size": _BATCH.value,
      "kernels": FLAGS.kernels,
    },
    "text": {
      "label": label,
      "path": os.path.abspath(path) if path else None,
      "windows_available": available,
      "windows": len(windows),
      "scored_tokens_per_point": len(windows) * (FLAGS.context - 1),
    },
    "first_call_s": first_call,
    "rows": rows,
    **common.run_info(),
  }
  summary = {"results": [{k: row[k] for k in keys} for row in rows], "first_call_s": first_call}
  common.report(FLAGS.out_dir, "sparse_attention", record, summary, tables=[table], plot=plot)


if __name__ == "__main__":
  app.run(main)
