r"""On-paper roofline of tensor-parallel Llama-3 inference (issue 26, item 7).

  python -m experiments.roofline [--models=llama3-8b,llama3-70b] [--devices=h100,v5e] \
      [--configs=bf16,w4a8,w4a8_kv4,bf16_tokenweave,w4a8_kv4_tokenweave] \
      [--prefill_batch=1 --prompt_len=2048] [--decode_batch=32 --context=2048] \
      [--check_cpu] [--cpu_batch=8 --cpu_seq=128]

Models (`roofline_model.MODELS`): Llama-3-8B and -70B. Devices (`roofline_model.DEVICES`):
8 x H100 SXM over NVLink and a TPU v5e-8 slice over ICI, tensor parallel over all 8; every
device figure is a named constant with its source in `experiments/roofline_model.py`.

Per layer and device, for prefill (``--prefill_batch`` prompts of ``--prompt_len`` tokens)
and one decode step (``--decode_batch`` sequences with ``--context`` cached tokens): FLOPs,
bytes moved (weights, KV cache read and write, activations) and the all-reduced bytes; then
the projected time: each sublayer (attention, MLP) takes max(compute, memory), plus the
ring all-reduce that follows it. Configurations (`roofline_model.CONFIGS`):

  * ``bf16``: bf16 weights, activations and KV cache;
  * ``w4a8``: int4 weights (a bf16 scale per 128) and 8-bit activations, the layers'
    matmuls at the int8/fp8 rate (FireQ-style), bf16 KV cache;
  * ``w4a8_kv4``: as w4a8, with an int4 KV cache (bf16 scale and zero per 128 channels);
  * ``bf16_tokenweave`` / ``w4a8_kv4_tokenweave``: TokenWeave: each sublayer's tokens in two
    halves, one half's fused reduce-scatter + RMSNorm + all-gather overlapping the other
    half's compute: 2*max(c, m) per sublayer, with c the half's roofline time (weights read
    again per half; on H100 8 of 132 SMs left to the collective) and m its collective.

Every formula is printed (and stored in the JSON as strings: ``formulas``).

``--check_cpu`` (on by default; about 20-40 s) checks the model against this machine: a
subprocess with 8 fake CPU devices (`experiments.roofline_cpu`) measures matmul FLOP/s,
memory bandwidth and psum latency and bandwidth, then times the forward pass of
`jaxllm.TINY` (f32) on one device and on a data x tensor mesh; the same formulas, fed with
those measured figures, project both, and the run prints projected, measured and their ratio.
Every CPU figure is the least of ``--cpu_repeats`` timed calls (other processes may share the
cores: the least estimates what the machine can do); the forward's median and max are shown.

Outputs ``out_dir/roofline.json`` (flags, constants, formulas, per-row figures, CPU check),
``roofline.md`` (the same as markdown tables) and ``roofline.png`` (projected time per
configuration, device and phase; the exposed communication hatched; "no fit" where weights and
KV cache overflow a device's memory). A second table sweeps the prompt length of a bf16 prefill
with and without TokenWeave. The last stdout line is one JSON object: per ``model/device/config`` the prefill time (ms per batch of prompts),
the decode time (ms per step, one token for every sequence), their communication fractions,
and for TokenWeave configurations the share of the baseline's communication time recovered;
then the CPU check's projected and measured times.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

from absl import app, flags

from experiments import common
from experiments import roofline_model as rm

NAME = "roofline"
DEFAULT_CONFIGS = tuple(rm.CONFIGS)

common.define_common_flags(NAME, ("out_dir", "seed"))
_MODELS = flags.DEFINE_list("models", list(rm.MODELS), f"Models: {', '.join(rm.MODELS)}.")
_DEVICES = flags.DEFINE_list("devices", list(rm.DEVICES), f"Devices: {', '.join(rm.DEVICES)}.")
_CONFIGS = flags.DEFINE_list(
  "configs", list(DEFAULT_CONFIGS), f"Configurations: {', '.join(DEFAULT_CONFIGS)}."
)
_PREFILL_BATCH = flags.DEFINE_integer("prefill_batch", 1, "Prompts per prefill.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 2048, "Tokens per prompt.")
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 32, "Sequences per decode step.")
_CONTEXT = flags.DEFINE_integer("context", 2048, "Cached tokens per sequence at decode.")
_CHECK_CPU = flags.DEFINE_boolean(
  "check_cpu", True, "Project and measure the tiny model on 8 fake CPU devices."
)
_CPU_BATCH = flags.DEFINE_integer("cpu_batch", 8, "CPU check: sequences (a multiple of 4).")
_CPU_SEQ = flags.DEFINE_integer("cpu_seq", 128, "CPU check: tokens per sequence.")
_CPU_REPEATS = flags.DEFINE_integer(
  "cpu_repeats", 7, "CPU check: timed calls per figure (the least is used)."
)
FLAGS = flags.FLAGS

CPU_DATA, CPU_TENSOR = 4, 2  # the CPU check's mesh: data 4 x tensor 2 (TINY has 2 KV heads)
CPU_DEVICES = CPU_DATA * CPU_TENSOR
CPU_TIMEOUT_S = 600

LIMITATIONS = (
  "peak rates: real matmuls reach a fraction of peak FLOP/s and HBM bandwidth (shape, tiling, "
  "wave quantization), so compute is underestimated and the communication fraction overstated",
  "kernel launch, host dispatch and synchronisation between kernels are not modelled (a decode "
  "step of 32 or 80 layers launches hundreds of kernels; CUDA graphs or one XLA program hide "
  "some of it); on the CPU check each op of the tiny model is small enough for per-op costs to "
  "matter",
  "each sublayer is one roofline (its memory and compute overlap perfectly), while its ops "
  "really run one after another; elementwise FLOPs (norms, RoPE, softmax, SiLU) are ignored",
  "all-reduce is the ring formula at one link bandwidth and a fixed, assumed start-up latency; "
  "NVLink SHARP (NVLS) in-switch reduction, one-shot/two-shot algorithms, link contention "
  "and the collective's own HBM traffic are not modelled",
  "TokenWeave's overlap is ideal (2*max per sublayer, one fill per forward): imperfect overlap, "
  "wave-aware split sizes, the uneven causal work of the two halves of one prompt and the "
  "SMs/bandwidth a collective steals beyond the fixed SM share are not modelled",
  "quantized matmuls run at the int8 rate with no dequantization cost; int4 unpacking, scale "
  "application and KV4 dequantization inside attention are free in the model",
  "the CPU check's 8 fake devices share this machine's cores and memory: their 'links' are "
  "memory copies, and they run concurrently only as far as XLA's CPU runtime schedules them",
  "the CPU check's rates come from one small matmul and one elementwise op, which vary "
  "between runs (up to 1.7x when quiet); its mesh projection assumes the 8 programs run "
  "side by side at the all-devices rates, while on two cores they take turns",
  "memory capacity ('fits') counts weights and the KV cache only, not activations, "
  "workspace or fragmentation",
)


# --------------------------------------------------------------------------------- flags


def _choose(values: list[str], known: dict, what: str) -> list[str]:
  if not values:
    common.fail(f"--{what} is empty; choose from {', '.join(known)}")
  for v in values:
    if v not in known:
      common.fail(f"--{what}: unknown {what[:-1]} {v!r}; choose from {', '.join(known)}")
  return list(dict.fromkeys(values))


def _positive(name: str, value: int, minimum: int = 1) -> int:
  if value < minimum:
    common.fail(f"--{name}={value} must be >= {minimum}")
  return value


def check_flags() -> dict:
  """Validated flags (one-line errors before any work)."""
  args = {
    "models": _choose(_MODELS.value, rm.MODELS, "models"),
    "devices": _choose(_DEVICES.value, rm.DEVICES, "devices"),
    "configs": _choose(_CONFIGS.value, rm.CONFIGS, "configs"),
    "prefill_batch": _positive("prefill_batch", _PREFILL_BATCH.value),
    "prompt_len": _positive("prompt_len", _PROMPT_LEN.value),
    "decode_batch": _positive("decode_batch", _DECODE_BATCH.value),
    "context": _positive("context", _CONTEXT.value, 0),
    "check_cpu": _CHECK_CPU.value,
    "cpu_batch": _positive("cpu_batch", _CPU_BATCH.value),
    "cpu_seq": _positive("cpu_seq", _CPU_SEQ.value),
    "cpu_repeats": _positive("cpu_repeats", _CPU_REPEATS.value),
  }
  from jaxllm.config import TINY  # pylint: disable=import-outside-toplevel (no jax import)

  if args["cpu_seq"] > TINY.max_seq_len:
    common.fail(
      f"--cpu_seq={args['cpu_seq']} exceeds the tiny model's max_seq_len={TINY.max_seq_len}"
    )
  if args["cpu_batch"] % CPU_DATA:
    common.fail(f"--cpu_batch={args['cpu_batch']} must be a multiple of the data degree {CPU_DATA}")
  tokenweave = [c for c in args["configs"] if rm.CONFIGS[c].tokenweave]
  for name, phase_tokens in (
    ("prefill", args["prefill_batch"] * args["prompt_len"]),
    ("decode", args["decode_batch"]),
  ):
    if tokenweave and phase_tokens < 2:
      common.fail(
        f"{name} has {phase_tokens} token(s): TokenWeave ({tokenweave[0]}) needs at least 2 to "
        f"split in halves; raise --{'prompt_len' if name == 'prefill' else 'decode_batch'}"
      )
  return args


# --------------------------------------------------------------------------------- paper


def workloads(args: dict) -> dict[str, rm.Workload]:
  return {
    "prefill": rm.prefill(args["prefill_batch"], args["prompt_len"]),
    "decode": rm.decode(args["decode_batch"], args["context"]),
  }


def paper_rows(args: dict) -> list[dict]:
  """One row per model, device, phase and configuration (see `FORMULAS`)."""
  rows = []
  for model_name in args["models"]:
    model = rm.MODELS[model_name]
    for device_name in args["devices"]:
      dev = rm.DEVICES[device_name]
      for phase, work in workloads(args).items():
        for config in args["configs"]:
          prec = rm.CONFIGS[config]
          proj = rm.project(model, work, prec, dev)
          base = rm.project(model, work, prec.base(), dev) if prec.tokenweave else None
          subs = proj.layer["sublayers"]
          flops = sum(s["flops"] for s in subs)
          nbytes = sum(s["bytes"] for s in subs)
          split = 2 if prec.tokenweave else 1  # TokenWeave: two halves, weights read twice
          attn, mlp = rm.sublayers(model, work, prec, dev.count, split=split)
          mem = rm.memory_per_device(model, work, prec, dev.count)
          rows.append(
            {
              "model": model_name,
              "device": device_name,
              "phase": phase,
              "config": config,
              "tokens": work.tokens,
              "layer_flops": flops,
              "layer_bytes": nbytes,
              "layer_weight_bytes": split * (attn.weight_bytes + mlp.weight_bytes),
              "layer_kv_bytes": split * attn.kv_bytes,
              "layer_act_bytes": split * (attn.act_bytes + mlp.act_bytes),
              "layer_comm_bytes": split * (attn.comm_bytes + mlp.comm_bytes),
              "layer_compute_s": sum(s["compute_s"] for s in subs),
              "layer_memory_s": sum(s["memory_s"] for s in subs),
              "layer_comm_s": proj.layer["comm_s"],
              "layer_s": proj.layer["time_s"],
              "bound": "/".join(
                "compute" if s["compute_s"] >= s["memory_s"] else "memory" for s in subs
              ),
              "head_s": proj.head["time_s"],
              "fill_s": proj.fill_s,
              "total_s": proj.total_s,
              "total_ms": proj.total_s * 1e3,
              "comm_ms": proj.comm_s * 1e3,
              "comm_fraction": proj.comm_fraction,
              "tokenweave_recovered": rm.recovered_fraction(base, proj) if base else None,
              "base_ms": base.total_s * 1e3 if base else None,
              "memory_per_device_bytes": mem,
              "fits": mem <= dev.hbm_bytes,
              "sublayers": subs,
            }
          )
  return rows


SWEEP_PROMPTS = (256, 512, 1024, 2048, 4096, 8192, 16384)


def tokenweave_sweep(args: dict) -> list[dict]:
  """bf16 prefill of one prompt of each length in `SWEEP_PROMPTS`, with and without
  TokenWeave: how the recovered share of communication grows with the token count."""
  rows = []
  for model_name in args["models"]:
    for device_name in args["devices"]:
      model, dev = rm.MODELS[model_name], rm.DEVICES[device_name]
      for prompt in SWEEP_PROMPTS:
        work = rm.prefill(1, prompt)
        base = rm.project(model, work, rm.BF16, dev)
        tw = rm.project(model, work, rm.TOKENWEAVE, dev)
        rows.append(
          {
            "model": model_name,
            "device": device_name,
            "prompt_len": prompt,
            "bf16_ms": base.total_s * 1e3,
            "tokenweave_ms": tw.total_s * 1e3,
            "bf16_comm_fraction": base.comm_fraction,
            "tokenweave_recovered": rm.recovered_fraction(base, tw),
            "speedup": base.total_s / tw.total_s,
          }
        )
  return rows


SWEEP_COLUMNS = (
  ("model", lambda r: r["model"]),
  ("device", lambda r: r["device"]),
  ("prompt", lambda r: str(r["prompt_len"])),
  ("bf16 ms", lambda r: f"{r['bf16_ms']:.3f}"),
  ("TokenWeave ms", lambda r: f"{r['tokenweave_ms']:.3f}"),
  ("bf16 comm %", lambda r: f"{100 * r['bf16_comm_fraction']:.1f}"),
  ("recovered", lambda r: _frac(r["tokenweave_recovered"])),
  ("speedup", lambda r: f"{r['speedup']:.3f}"),
)


def sweep_table(rows: list[dict], markdown: bool = False) -> str:
  header = [c for c, _ in SWEEP_COLUMNS]
  body = [[f(r) for _, f in SWEEP_COLUMNS] for r in rows]
  return _md_table(header, body) if markdown else _text_table(header, body)


# --------------------------------------------------------------------------------- CPU check


def _cpu_env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  want = f"--xla_force_host_platform_device_count={CPU_DEVICES}"
  flags_now = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags_now.strip()} {want}".strip()
  return env


def measure_cpu(args: dict) -> dict:
  """Runs `experiments.roofline_cpu` in a subprocess with 8 fake devices; its figures."""
  cmd = [
    sys.executable,
    "-m",
    "experiments.roofline_cpu",
    f"--batch={args['cpu_batch']}",
    f"--seq={args['cpu_seq']}",
    f"--repeats={args['cpu_repeats']}",
    f"--data={CPU_DATA}",
    f"--tensor={CPU_TENSOR}",
    f"--seed={FLAGS.seed}",
  ]
  if not FLAGS.compilation_cache:
    cmd.append("--nocompilation_cache")
  try:
    proc = subprocess.run(
      cmd,
      cwd=common.REPO_ROOT,
      env=_cpu_env(),
      capture_output=True,
      text=True,
      timeout=CPU_TIMEOUT_S,
      check=False,
    )
  except subprocess.TimeoutExpired:
    common.fail(f"CPU check (experiments.roofline_cpu) ran over {CPU_TIMEOUT_S} s")
  if proc.returncode != 0:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    last = lines[-1].removeprefix("error: ") if lines else f"exit code {proc.returncode}"
    common.fail(f"CPU check failed: {last}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_projection(fig: dict) -> dict:
  """Projects the tiny model's measured forwards with the measured machine figures.

  One device: its own matmul rate and bandwidth. The mesh: the 8 devices' summed rate and
  bandwidth shared evenly (they run at once on the same cores), the measured psum latency
  and bandwidth. XLA's reference attention: the full masked square, scores through memory.
  """
  model = rm.ModelShape(**fig["model"])
  tokens = fig["batch"] * fig["seq"]
  work = rm.Workload("forward", fig["batch"], fig["seq"], 0, tokens, flash=False)
  n = fig["device_count"]
  one = rm.Device(
    "cpu x1",
    1,
    fig["matmul_flops_one"],
    fig["matmul_flops_one"],
    fig["bandwidth_one"],
    float("inf"),
    fig["bandwidth_one"],
    0.0,
  )
  mesh = rm.Device(
    f"cpu x{n} (fake)",
    n,
    fig["matmul_flops_all"] / n,
    fig["matmul_flops_all"] / n,
    fig["bandwidth_all"] / n,
    float("inf"),
    fig["link_bytes_per_s"],
    fig["collective_latency_s"],
  )
  out = {}
  for key, dev, n_data, run in (
    ("one_device", one, 1, "one"),
    (f"mesh_data{fig['data']}_tensor{fig['tensor']}", mesh, fig["data"], "mesh"),
  ):
    proj = rm.project(model, work, rm.F32, dev, n_data)
    measured = fig[f"forward_{run}_s"]
    out[key] = {
      "device": dataclasses.asdict(dev) | {"hbm_bytes": None},
      "projected_ms": proj.total_s * 1e3,
      "measured_ms": measured * 1e3,
      "measured_median_ms": fig[f"forward_{run}_median_s"] * 1e3,
      "measured_max_ms": fig[f"forward_{run}_max_s"] * 1e3,
      "measured_over_projected": measured / proj.total_s,
      "projected_comm_fraction": proj.comm_fraction,
      "layer": proj.layer,
      "head": proj.head,
    }
  return out


# --------------------------------------------------------------------------------- output


def _us(x: float) -> str:
  return f"{x * 1e6:.1f}"


def _frac(x) -> str:
  return "-" if x is None else f"{x:+.2f}"


TIME_COLUMNS = (
  ("model", lambda r: r["model"]),
  ("device", lambda r: r["device"]),
  ("phase", lambda r: r["phase"]),
  ("config", lambda r: r["config"]),
  ("GFLOP/layer", lambda r: f"{r['layer_flops'] / 1e9:.2f}"),
  (
    "MB/layer w/kv/act",
    lambda r: "/".join(
      f"{r[k] / 1e6:.1f}" for k in ("layer_weight_bytes", "layer_kv_bytes", "layer_act_bytes")
    ),
  ),
  ("comm MB/layer", lambda r: f"{r['layer_comm_bytes'] / 1e6:.2f}"),
  ("bound attn/mlp", lambda r: r["bound"]),
  ("compute us", lambda r: _us(r["layer_compute_s"])),
  ("memory us", lambda r: _us(r["layer_memory_s"])),
  ("comm us", lambda r: _us(r["layer_comm_s"])),
  ("layer us", lambda r: _us(r["layer_s"])),
  ("total ms", lambda r: f"{r['total_ms']:.3f}"),
  ("comm %", lambda r: f"{100 * r['comm_fraction']:.1f}"),
  ("TW recovered", lambda r: _frac(r["tokenweave_recovered"])),
  ("fits", lambda r: "yes" if r["fits"] else "NO"),
)


def _text_table(header: list[str], body: list[list[str]]) -> str:
  widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
  lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)).rstrip()]
  lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)).rstrip() for b in body]
  return "\n".join(lines)


def _md_table(header: list[str], body: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])


def time_table(rows: list[dict], markdown: bool = False) -> str:
  header = [c for c, _ in TIME_COLUMNS]
  body = [[f(r) for _, f in TIME_COLUMNS] for r in rows]
  return _md_table(header, body) if markdown else _text_table(header, body)


def cpu_table(cpu: dict, markdown: bool = False) -> str:
  header = [
    "run",
    "projected ms",
    "measured ms (least)",
    "median",
    "max",
    "measured/projected",
    "projected comm %",
  ]
  body = [
    [
      k,
      f"{v['projected_ms']:.2f}",
      f"{v['measured_ms']:.2f}",
      f"{v['measured_median_ms']:.2f}",
      f"{v['measured_max_ms']:.2f}",
      f"{v['measured_over_projected']:.2f}",
      f"{100 * v['projected_comm_fraction']:.1f}",
    ]
    for k, v in cpu["runs"].items()
  ]
  return _md_table(header, body) if markdown else _text_table(header, body)


def constants_table() -> list[list[str]]:
  return [
    [
      name,
      f"{d.count}",
      f"{d.dense_flops / 1e12:.1f}",
      f"{d.int8_flops / 1e12:.1f}",
      f"{d.hbm_bytes_per_s / 1e9:.0f}",
      f"{d.hbm_bytes / 1e9:.1f}",
      f"{d.link_bytes_per_s / 1e9:.0f}",
      f"{d.collective_latency_s * 1e6:.1f}",
      f"{d.overlap_compute_share:.3f}",
    ]
    for name, d in rm.DEVICES.items()
  ]


CONSTANT_HEADER = [
  "device",
  "n",
  "bf16 TFLOP/s",
  "int8 TOP/s",
  "HBM GB/s",
  "HBM GB",
  "link GB/s",
  "lat us",
  "overlap share",
]


def formulas_text() -> str:
  return "\n".join(f"  {k}: {v}" for k, v in rm.FORMULAS.items())


def plot(path: str, rows: list[dict], args: dict) -> None:
  """Bars: projected ms per configuration, grouped by device; one panel per model x phase."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  models, devices, configs = args["models"], args["devices"], args["configs"]
  phases = ("prefill", "decode")
  fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * len(models)), squeeze=False)
  width = 0.8 / len(configs)
  colors = plt.get_cmap("tab10")
  for i, model in enumerate(models):
    for j, phase in enumerate(phases):
      ax = axes[i][j]
      for k, config in enumerate(configs):
        sel = {
          r["device"]: r
          for r in rows
          if r["model"] == model and r["phase"] == phase and r["config"] == config
        }
        xs = [d + (k - (len(configs) - 1) / 2) * width for d in range(len(devices))]
        total = [sel[d]["total_ms"] for d in devices]
        comm = [sel[d]["comm_ms"] for d in devices]
        ax.bar(xs, [t - c for t, c in zip(total, comm)], width, color=colors(k), label=config)
        ax.bar(
          xs,
          comm,
          width,
          bottom=[t - c for t, c in zip(total, comm)],
          color=colors(k),
          alpha=0.45,
          hatch="//",
          edgecolor="k",
          linewidth=0.3,
        )
        for x, d in zip(xs, devices):
          if not sel[d]["fits"]:
            ax.text(x, sel[d]["total_ms"], "no fit", ha="center", va="bottom", fontsize=6)
      ax.set_xticks(range(len(devices)))
      ax.set_xticklabels([rm.DEVICES[d].name for d in devices])
      unit = "ms per prompt batch" if phase == "prefill" else "ms per decode step"
      ax.set_ylabel(unit)
      work = workloads(args)[phase]
      ax.set_title(
        f"{model}, {phase} (batch {work.batch}, "
        + (f"prompt {work.new_tokens})" if phase == "prefill" else f"context {work.context})"),
        fontsize=9,
      )
      ax.grid(axis="y", alpha=0.3)
  axes[0][0].legend(fontsize=7, title="hatched: exposed comm", title_fontsize=7)
  fig.suptitle("Projected latency, tensor parallel over 8 devices (roofline)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def markdown(args: dict, rows: list[dict], sweep: list[dict], cpu: dict | None) -> str:
  parts = [
    "# Roofline: tensor-parallel Llama-3 inference on 8 devices",
    "",
    f"Prefill: batch {args['prefill_batch']} x prompt {args['prompt_len']}; decode: batch "
    f"{args['decode_batch']}, context {args['context']}. Times per device (all 8 work in "
    "parallel); prefill ms for the whole prompt batch, decode ms per step.",
    "",
    "## Device constants (sources in experiments/roofline_model.py)",
    "",
    _md_table(CONSTANT_HEADER, constants_table()),
    "",
    "## Formulas",
    "",
    *[f"- `{k}`: `{v}`" for k, v in rm.FORMULAS.items()],
    "",
    "## Projection",
    "",
    time_table(rows, markdown=True),
    "",
    "## TokenWeave against prompt length (bf16 prefill, batch 1)",
    "",
    sweep_table(sweep, markdown=True),
    "",
  ]
  if cpu is not None:
    parts += [
      "## Check against this machine (tiny model, f32, 8 fake CPU devices)",
      "",
      f"Measured: matmul {cpu['measured']['matmul_flops_one'] / 1e9:.1f} GFLOP/s on one device, "
      f"{cpu['measured']['matmul_flops_all'] / 1e9:.1f} summed over 8; bandwidth "
      f"{cpu['measured']['bandwidth_one'] / 1e9:.2f} / {cpu['measured']['bandwidth_all'] / 1e9:.2f}"
      f" GB/s; psum latency {cpu['measured']['collective_latency_s'] * 1e6:.1f} us, ring "
      f"bandwidth {cpu['measured']['link_bytes_per_s'] / 1e9:.2f} GB/s.",
      "",
      cpu_table(cpu, markdown=True),
      "",
    ]
  parts += ["## What the model cannot capture", "", *[f"- {x}" for x in LIMITATIONS], ""]
  return "\n".join(parts)


def summary_of(rows: list[dict], cpu: dict | None) -> dict:
  results = {}
  for r in rows:
    key = f"{r['model']}/{r['device']}/{r['config']}"
    entry = results.setdefault(key, {})
    entry[f"{r['phase']}_ms"] = r["total_ms"]
    entry[f"{r['phase']}_comm_fraction"] = r["comm_fraction"]
    if r["tokenweave_recovered"] is not None:
      entry[f"{r['phase']}_tokenweave_recovered"] = r["tokenweave_recovered"]
    entry["fits"] = entry.get("fits", True) and r["fits"]
  summary = {"results": results}
  if cpu is not None:
    summary["cpu_check"] = {
      k: {x: v[x] for x in ("projected_ms", "measured_ms", "measured_over_projected")}
      for k, v in cpu["runs"].items()
    }
  return summary


def main(argv):
  if len(argv) > 1:
    common.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  args = check_flags()
  common.start()
  rows = paper_rows(args)
  sweep = tokenweave_sweep(args)
  cpu = None
  if args["check_cpu"]:
    measured = measure_cpu(args)
    cpu = {"measured": measured, "runs": cpu_projection(measured)}
  print(
    f"Roofline, tensor parallel over 8 devices. Prefill: batch {args['prefill_batch']} x prompt "
    f"{args['prompt_len']}; decode: batch {args['decode_batch']}, context {args['context']}.\n"
    "\nDevice constants (sources in experiments/roofline_model.py):\n"
    + _text_table(CONSTANT_HEADER, constants_table())
    + "\n\nFormulas (per layer, per device):\n"
    + formulas_text()
    + "\n\nProjection (per-layer figures per device; total = all layers + LM head):\n"
    + time_table(rows)
    + "\n\nTokenWeave against prompt length (bf16 prefill, batch 1):\n"
    + sweep_table(sweep),
    flush=True,
  )
  if cpu is not None:
    print(
      f"\nCheck against this machine: {cpu['measured']['model']['name']} f32, batch "
      f"{cpu['measured']['batch']} x {cpu['measured']['seq']} tokens, forward (all logits), "
      f"mesh data {CPU_DATA} x tensor {CPU_TENSOR} of fake CPU devices; max |mesh - one| logit "
      f"difference {cpu['measured']['mesh_max_abs_diff']:.2e}\n" + cpu_table(cpu),
      flush=True,
    )
  print("\nWhat the model cannot capture:\n" + "\n".join(f"  - {x}" for x in LIMITATIONS))
  out_dir = FLAGS.out_dir
  os.makedirs(out_dir, exist_ok=True)
  md_path = os.path.join(out_dir, f"{NAME}.md")
  with open(md_path, "w", encoding="utf-8") as f:
    f.write(markdown(args, rows, sweep, cpu))
  png_path = os.path.join(out_dir, f"{NAME}.png")
  plot(png_path, rows, args)
  summary = summary_of(rows, cpu)
  record = {
    "config": {**args, "seed": FLAGS.seed},
    "devices": {k: dataclasses.asdict(d) for k, d in rm.DEVICES.items()},
    "models": {k: dataclasses.asdict(m) for k, m in rm.MODELS.items()},
    "precisions": {k: dataclasses.asdict(p) for k, p in rm.CONFIGS.items()},
    "formulas": rm.FORMULAS,
    "limitations": list(LIMITATIONS),
    "rows": rows,
    "tokenweave_sweep": sweep,
    "cpu_check": cpu,
    "markdown": md_path,
    "plot": png_path,
    "summary": summary,
    **common.run_info(),
  }
  print(f"results: {md_path}, {png_path}", flush=True)
  common.finish(out_dir, NAME, record, summary)


if __name__ == "__main__":
  app.run(main)
