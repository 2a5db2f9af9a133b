"""An on-paper roofline of tensor-parallel Llama inference (issue 26, item 7).

Pure Python (no jax): model shapes, device figures and formulas, so that every number the
runner `experiments.roofline` prints can be recomputed by hand from `FORMULAS`.

Notation (per transformer layer, one device of a mesh with tensor degree n and data degree
n_d; quantities per device unless said otherwise):

  d model width, H query heads, Hkv KV heads, hd head dim, F MLP width, V vocabulary, L layers;
  h = H/n query heads and kvh = ceil(Hkv/n) KV heads per device (KV heads are replicated
  when n > Hkv), f = F/n MLP columns per device;
  t = batch*q/n_d tokens per device (q new tokens per sequence: the prompt length in
  prefill, 1 in decode), s = ctx + q cached positions per sequence after the step;
  p attended (query, key) pairs per device: with a flash kernel (masked blocks skipped,
  scores kept on chip) p = b*(q*ctx + q*(q+1)/2); with XLA's reference attention the full
  masked square p = b*q*s, whose scores and probabilities go through memory;
  b = batch/n_d sequences per device.

Every layer has two sublayers, each followed by a tensor-parallel all-reduce of its output
(t*d elements): attention (RMSNorm, q/k/v projections, attention, output projection) and MLP
(RMSNorm, gate/up, SiLU*up, down). A sublayer's time is the roofline
max(compute time, memory time); the all-reduce adds its time unless overlapped (TokenWeave).
The LM head (vocabulary-sharded, bf16 in every quantized configuration) runs once per
forward on `out_tokens` rows, followed by an all-gather of the logits.
"""

from __future__ import annotations

import dataclasses
import math

# ------------------------------------------------------------------------------ models


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """The shapes a roofline needs (a dense Llama-style decoder with grouped-query attention)."""

  name: str
  layers: int
  d_model: int
  heads: int
  kv_heads: int
  head_dim: int
  d_ff: int
  vocab: int


# Source: meta-llama/Meta-Llama-3-8B config.json on Hugging Face (num_hidden_layers 32,
# hidden_size 4096, num_attention_heads 32, num_key_value_heads 8, head_dim 4096/32,
# intermediate_size 14336, vocab_size 128256); the Llama 3 paper (arXiv:2407.21783), Table 3.
LLAMA3_8B = ModelShape("llama3-8b", 32, 4096, 32, 8, 128, 14336, 128256)
# Source: meta-llama/Meta-Llama-3-70B config.json on Hugging Face (num_hidden_layers 80,
# hidden_size 8192, num_attention_heads 64, num_key_value_heads 8, head_dim 8192/64,
# intermediate_size 28672, vocab_size 128256); the Llama 3 paper (arXiv:2407.21783), Table 3.
LLAMA3_70B = ModelShape("llama3-70b", 80, 8192, 64, 8, 128, 28672, 128256)

MODELS = {m.name: m for m in (LLAMA3_8B, LLAMA3_70B)}


# ------------------------------------------------------------------------------ devices


@dataclasses.dataclass(frozen=True)
class Device:
  """Peak figures of one device of a tensor-parallel group.

  Attributes:
    name: label.
    count: devices in the group (the tensor-parallel degree on paper).
    dense_flops: peak dense matmul FLOP/s at the float dtype (bf16; f32 for the CPU check).
    int8_flops: peak dense int8 (or fp8) matmul op/s, used by W4A8's matmuls.
    hbm_bytes_per_s: memory bandwidth.
    hbm_bytes: memory capacity (for the "fits" column).
    link_bytes_per_s: bandwidth one device sends (and receives) at, per direction, in a ring
      collective over the group.
    collective_latency_s: fixed cost of one collective (start-up, synchronisation).
    overlap_compute_share: fraction of the compute units left to matmuls while a collective
      runs beside them (TokenWeave's communication kernels occupy a few SMs on a GPU).
  """

  name: str
  count: int
  dense_flops: float
  int8_flops: float
  hbm_bytes_per_s: float
  hbm_bytes: float
  link_bytes_per_s: float
  collective_latency_s: float
  overlap_compute_share: float = 1.0


# NVIDIA H100 SXM5 80GB, "NVIDIA H100 Tensor Core GPU" datasheet (nvidia.com, 2023):
# BF16 Tensor Core 1,979 TFLOPS and FP8/INT8 3,958 TFLOPS/TOPS, both *with sparsity*, so
# dense peaks are half; GPU memory 80 GB at 3.35 TB/s; NVLink 900 GB/s per GPU, the sum of
# both directions (18 NVLink-4 links), i.e. 450 GB/s per direction through the NVSwitches.
H100_BF16_FLOPS = 989.5e12
H100_INT8_FLOPS = 1979e12
H100_HBM_BYTES_PER_S = 3.35e12
H100_HBM_BYTES = 80e9
H100_NVLINK_BYTES_PER_S = 450e9
# Assumption, not a datasheet figure: start-up cost of one NCCL all-reduce of a small message
# within one 8-GPU NVSwitch node, of the order of 10 us (NCCL's nccl-tests all_reduce_perf
# small-message times on DGX H100 sit in the 10-20 us range; custom one-shot kernels do less).
H100_COLLECTIVE_LATENCY_S = 10e-6
# H100 SXM5 has 132 SMs (NVIDIA Hopper architecture whitepaper); TokenWeave (arXiv:2505.11329)
# runs its fused all-reduce + RMSNorm on 2-8 SMs; 8 is taken (the pessimistic end).
H100_SMS = 132
TOKENWEAVE_COMM_SMS = 8

# Google Cloud TPU v5e, "TPU v5e" system architecture page (cloud.google.com/tpu/docs/v5e):
# per chip 197 TFLOP/s bf16 and 394 TOP/s int8, 16 GiB HBM2 at 819 GB/s, inter-chip
# interconnect (ICI) 1,600 Gbps = 200 GB/s per chip over its 4 ICI ports (50 GB/s each).
# A v5e-8 slice is a 2x4 grid; a bidirectional ring over its 8 chips sends on two ports at
# once, so a ring step moves 2 * 50 GB/s = 100 GB/s per chip per direction of the data.
V5E_BF16_FLOPS = 197e12
V5E_INT8_FLOPS = 394e12
V5E_HBM_BYTES_PER_S = 819e9
V5E_HBM_BYTES = 16 * 2**30
V5E_ICI_BYTES_PER_S = 100e9
# Assumption, not a published figure: start-up cost of one ICI collective inside a compiled
# XLA program (no host launch), a few microseconds; 5 us is taken.
V5E_COLLECTIVE_LATENCY_S = 5e-6

H100_X8 = Device(
  "8xH100-SXM",
  8,
  H100_BF16_FLOPS,
  H100_INT8_FLOPS,
  H100_HBM_BYTES_PER_S,
  H100_HBM_BYTES,
  H100_NVLINK_BYTES_PER_S,
  H100_COLLECTIVE_LATENCY_S,
  (H100_SMS - TOKENWEAVE_COMM_SMS) / H100_SMS,
)
# ICI collectives are driven by DMA engines, not the TensorCore: no compute share is lost
# (an assumption; HBM traffic of the collective is not modelled on either device).
V5E_X8 = Device(
  "tpu-v5e-8",
  8,
  V5E_BF16_FLOPS,
  V5E_INT8_FLOPS,
  V5E_HBM_BYTES_PER_S,
  V5E_HBM_BYTES,
  V5E_ICI_BYTES_PER_S,
  V5E_COLLECTIVE_LATENCY_S,
  1.0,
)

DEVICES = {"h100": H100_X8, "v5e": V5E_X8}


# ------------------------------------------------------------------------------ precisions

W4_GROUP = 128  # int4 weights: one bf16 scale per 128 input rows of a column (group-wise)
KV4_GROUP = 128  # int4 KV: one bf16 scale and one bf16 zero point per token, head, 128 channels


@dataclasses.dataclass(frozen=True)
class Precision:
  """How many bytes each kind of tensor takes, and at which rate matmuls run.

  Attributes:
    name: the configuration's name.
    weight_bytes: bytes per weight element of the layers' matmuls (scales included).
    matmul_in_bytes: bytes per element of a matmul's activation input.
    act_bytes: bytes per element of every other activation (matmul outputs, residual, norm).
    kv_bytes: bytes per cached K or V element (scales and zero points included).
    comm_bytes: bytes per element of the all-reduced activations.
    head_bytes: bytes per element of the LM head weight.
    int8_matmuls: the layers' matmuls run at the device's int8/fp8 rate.
    tokenweave: TokenWeave's split-token overlap with the fused reduce-scatter/RMSNorm/all-gather.
  """

  name: str
  weight_bytes: float = 2.0
  matmul_in_bytes: float = 2.0
  act_bytes: float = 2.0
  kv_bytes: float = 2.0
  comm_bytes: float = 2.0
  head_bytes: float = 2.0
  int8_matmuls: bool = False
  tokenweave: bool = False

  def base(self) -> Precision:
    """The same precision without TokenWeave (the baseline TokenWeave is compared with)."""
    return dataclasses.replace(self, name=self.name.removesuffix("_tokenweave"), tokenweave=False)


W4_BYTES = 0.5 + 2 / W4_GROUP
KV4_BYTES = 0.5 + 4 / KV4_GROUP
BF16 = Precision("bf16")
W4A8 = Precision("w4a8", weight_bytes=W4_BYTES, matmul_in_bytes=1.0, int8_matmuls=True)
W4A8_KV4 = dataclasses.replace(W4A8, name="w4a8_kv4", kv_bytes=KV4_BYTES)
TOKENWEAVE = dataclasses.replace(BF16, name="bf16_tokenweave", tokenweave=True)
W4A8_KV4_TOKENWEAVE = dataclasses.replace(W4A8_KV4, name="w4a8_kv4_tokenweave", tokenweave=True)
F32 = Precision("f32", 4.0, 4.0, 4.0, 4.0, 4.0, 4.0)  # the CPU check's tiny model

CONFIGS = {c.name: c for c in (BF16, W4A8, W4A8_KV4, TOKENWEAVE, W4A8_KV4_TOKENWEAVE)}


# ------------------------------------------------------------------------------ workloads


@dataclasses.dataclass(frozen=True)
class Workload:
  """One forward step.

  Attributes:
    phase: "prefill" or "decode" (a label).
    batch: sequences.
    new_tokens: q, tokens per sequence this step (prompt length, or 1 in decode).
    context: ctx, positions already cached per sequence before the step.
    out_tokens: rows the LM head scores (one per sequence on paper; every token when a
      forward returns all logits).
    flash: a flash attention kernel (masked blocks skipped, scores stay on chip); else
      XLA's reference attention (the full masked square, scores written and read back).
  """

  phase: str
  batch: int
  new_tokens: int
  context: int
  out_tokens: int
  flash: bool = True

  @property
  def tokens(self) -> int:
    return self.batch * self.new_tokens

  def pairs(self) -> float:
    """Attended (query, key) pairs over the batch."""
    q, c = self.new_tokens, self.context
    if self.flash:
      return self.batch * (q * c + q * (q + 1) / 2)
    return self.batch * q * (c + q)


def prefill(batch: int, prompt: int) -> Workload:
  return Workload("prefill", batch, prompt, 0, batch)


def decode(batch: int, context: int) -> Workload:
  return Workload("decode", batch, 1, context, batch)


# ------------------------------------------------------------------------------ formulas

FORMULAS = {
  "weights_attn": "W_attn = d*h*hd + 2*d*kvh*hd + h*hd*d   (q, k, v, o per device)",
  "weights_mlp": "W_mlp = 3*d*f   (gate, up, down per device)",
  "flops_attn_sublayer": "FLOPs = 2*t*W_attn + 4*p*h*hd   (projections; QK^T and PV)",
  "flops_mlp_sublayer": "FLOPs = 2*t*W_mlp",
  "bytes_attn_sublayer": "bytes = W_attn*wb + norm + t*d*ab_in + t*h*hd*ab + 2*t*h*hd*ab "
  "+ t*h*hd*ab_in + t*d*ab + KV_read + KV_write   (weights, norm, q/k/v in, q out, attention "
  "q in + out, o in, o out, cache)",
  "bytes_mlp_sublayer": "bytes = W_mlp*wb + norm + t*d*ab_in + 2*t*f*ab + 2*t*f*ab + t*f*ab_in "
  "+ t*f*ab_in + t*d*ab   (weights, norm, gate/up in, out, SiLU*up in, out, down in, out)",
  "norm_bytes": "norm = 4*t*d*ab   (read residual and sublayer output, write residual and "
  "normed); TokenWeave: 4*t*d*ab/n (the norm runs on the reduce-scattered token shard)",
  "kv_bytes": "KV_read = b*s*2*kvh*hd*kvb, KV_write = t*2*kvh*hd*kvb",
  "score_bytes": "without a flash kernel: + 4*p*h*ab (scores written, read by the softmax, "
  "probabilities written, read by PV)",
  "compute_time": "T_compute = FLOPs_matmul/R_mm + FLOPs_attention/R_bf16   "
  "(R_mm = int8/fp8 rate for W4A8, else the bf16 rate)",
  "memory_time": "T_memory = bytes/BW_hbm",
  "sublayer_time": "T_sub = max(T_compute, T_memory)",
  "allreduce": "T_AR(M) = 2*(n-1)/n * M/BW_link + lat   (ring; M = t*d*cb bytes; 0 when n = 1)",
  "reduce_scatter_all_gather": "T_RS+AG(M) = 2*(n-1)/n * M/BW_link + lat   (TokenWeave's fused "
  "reduce-scatter, RMSNorm, all-gather: one kernel, one start-up)",
  "layer_time": "T_layer = sum over sublayers (T_sub + T_AR)",
  "tokenweave_sublayer": "T_sub_TW = 2*max(c, m), c = T_sub(t/2 tokens, p/2 pairs, full "
  "weights, compute at share s of peak), m = T_RS+AG(t/2*d*cb); exposed comm = 2*max(0, m - c)",
  "tokenweave_fill": "+ min(c, m) of the last MLP sublayer once per forward (pipeline fill)",
  "head": "T_head = max(2*o*d*V/n/R_bf16, (d*V/n*hb + o*d*ab_in + o*V/n*ab)/BW_hbm) "
  "+ (n-1)/n * o*V*ab/BW_link + lat   (vocabulary-sharded LM head on o output rows, then "
  "all-gather of the logits)",
  "forward_time": "T = L*T_layer + T_head (+ TokenWeave fill)",
  "comm_fraction": "comm fraction = (L*sum T_AR + T_head comm) / T   (exposed comm for TokenWeave)",
  "tokenweave_recovered": "recovered = (T_base - T_TW) / comm_base   (base = same precision "
  "without overlap; 1 = all communication time recovered, < 0 = slower)",
  "fits": "fits = L*(W_attn + W_mlp)*wb + 2*d*V/n*hb + L*b*s*2*kvh*hd*kvb <= HBM   "
  "(weights incl. untied embedding, KV cache; activations not counted)",
}


def _ring_factor(n: int) -> float:
  return 2 * (n - 1) / n


def allreduce_time(msg_bytes: float, n: int, link: float, latency: float) -> float:
  """Ring all-reduce of `msg_bytes` over `n` devices: 2(n-1)/n * M/link + latency."""
  if n == 1:
    return 0.0
  return _ring_factor(n) * msg_bytes / link + latency


def rs_ag_time(msg_bytes: float, n: int, link: float, latency: float) -> float:
  """Reduce-scatter, RMSNorm on the token shard, all-gather of `msg_bytes`, fused into one
  kernel as TokenWeave does: the all-reduce's bytes and one start-up latency."""
  if n == 1:
    return 0.0
  return _ring_factor(n) * msg_bytes / link + latency


@dataclasses.dataclass(frozen=True)
class Sublayer:
  """FLOPs and bytes of one sublayer on one device (see `FORMULAS`)."""

  name: str
  matmul_flops: float
  attention_flops: float
  weight_bytes: float
  kv_bytes: float
  act_bytes: float
  comm_bytes: float

  @property
  def flops(self) -> float:
    return self.matmul_flops + self.attention_flops

  @property
  def bytes(self) -> float:
    return self.weight_bytes + self.kv_bytes + self.act_bytes


def per_device_heads(m: ModelShape, n: int) -> tuple[float, int, float]:
  """(h, kvh, f): query heads, KV heads (replicated when n > Hkv) and MLP columns per device."""
  return m.heads / n, math.ceil(m.kv_heads / n), m.d_ff / n


def layer_weights(m: ModelShape, n: int) -> tuple[float, float]:
  """(W_attn, W_mlp): matmul weight elements of one layer on one device."""
  h, kvh, f = per_device_heads(m, n)
  d, hd = m.d_model, m.head_dim
  return d * h * hd + 2 * d * kvh * hd + h * hd * d, 3 * d * f


def sublayers(
  m: ModelShape, w: Workload, prec: Precision, n: int, n_data: int = 1, *, split: int = 1
) -> tuple[Sublayer, Sublayer]:
  """The attention and MLP sublayers of one layer on one device.

  Args:
    m, w, prec: model, workload, precision.
    n: tensor-parallel degree; n_data: data-parallel degree (the batch is split over it).
    split: the device's tokens and pairs are cut into `split` equal parts; the figures are
      those of one part (weights are read again by every part). With `prec.tokenweave` the
      norms run on the token shard (1/n of the part's tokens).
  """
  d, hd = m.d_model, m.head_dim
  h, kvh, f = per_device_heads(m, n)
  t = w.tokens / n_data / split
  p = w.pairs() / n_data / split
  b = w.batch / n_data / split
  s = w.context + w.new_tokens
  ab, ab_in = prec.act_bytes, prec.matmul_in_bytes
  norm = 4 * t * d * ab / (n if prec.tokenweave else 1)
  w_attn, w_mlp = layer_weights(m, n)
  kv = b * s * 2 * kvh * hd * prec.kv_bytes + t * 2 * kvh * hd * prec.kv_bytes
  attn = Sublayer(
    "attention",
    matmul_flops=2 * t * w_attn,
    attention_flops=4 * p * h * hd,
    weight_bytes=w_attn * prec.weight_bytes,
    kv_bytes=kv,
    act_bytes=norm
    + t * d * ab_in  # q/k/v projection input
    + t * h * hd * ab  # q written (k, v go to the cache: KV_write)
    + 2 * t * h * hd * ab  # attention reads q, writes its output
    + t * h * hd * ab_in  # o projection input
    + t * d * ab  # o projection output (partial sums, all-reduced)
    + (0.0 if w.flash else 4 * p * h * ab),  # materialised scores and probabilities
    comm_bytes=t * d * prec.comm_bytes,
  )
  mlp = Sublayer(
    "mlp",
    matmul_flops=2 * t * w_mlp,
    attention_flops=0.0,
    weight_bytes=w_mlp * prec.weight_bytes,
    kv_bytes=0.0,
    act_bytes=norm
    + t * d * ab_in  # gate/up input
    + 2 * t * f * ab  # gate/up output
    + 2 * t * f * ab  # SiLU(gate)*up reads both
    + t * f * ab_in  # ... writes the down projection's input
    + t * f * ab_in  # down projection input
    + t * d * ab,  # down projection output (partial sums, all-reduced)
    comm_bytes=t * d * prec.comm_bytes,
  )
  return attn, mlp


def sublayer_time(
  sub: Sublayer, dev: Device, prec: Precision, compute_share: float = 1.0
) -> dict[str, float]:
  """Roofline time of `sub`: max(compute, memory), with the compute and memory terms."""
  mm_rate = dev.int8_flops if prec.int8_matmuls else dev.dense_flops
  compute = (sub.matmul_flops / mm_rate + sub.attention_flops / dev.dense_flops) / compute_share
  memory = sub.bytes / dev.hbm_bytes_per_s
  return {"compute_s": compute, "memory_s": memory, "time_s": max(compute, memory)}


@dataclasses.dataclass(frozen=True)
class Projection:
  """Projected times of one forward step (seconds) and its per-layer figures."""

  layer: dict
  head: dict
  total_s: float
  comm_s: float  # communication time (exposed communication with TokenWeave)
  fill_s: float  # TokenWeave's pipeline fill, once per forward

  @property
  def comm_fraction(self) -> float:
    return self.comm_s / self.total_s


def head_time(m: ModelShape, w: Workload, prec: Precision, dev: Device, n_data: int = 1) -> dict:
  """The vocabulary-sharded LM head on `out_tokens` rows, then the logits' all-gather."""
  n = dev.count // n_data
  o = w.out_tokens / n_data
  v = m.vocab / n
  flops = 2 * o * m.d_model * v
  nbytes = (
    m.d_model * v * prec.head_bytes
    + o * m.d_model * prec.matmul_in_bytes
    + o * v * (prec.act_bytes)
  )
  compute = flops / dev.dense_flops
  memory = nbytes / dev.hbm_bytes_per_s
  comm = (
    0.0
    if n == 1
    else (n - 1) / n * o * m.vocab * prec.act_bytes / dev.link_bytes_per_s
    + dev.collective_latency_s
  )
  return {
    "flops": flops,
    "bytes": nbytes,
    "compute_s": compute,
    "memory_s": memory,
    "comm_s": comm,
    "time_s": max(compute, memory) + comm,
  }


def project(
  m: ModelShape, w: Workload, prec: Precision, dev: Device, n_data: int = 1
) -> Projection:
  """Projected time of one forward step of `m` on `dev` (tensor degree dev.count / n_data).

  Without TokenWeave: T_layer = sum over sublayers of max(compute, memory) + all-reduce.
  With it: each sublayer takes 2*max(c, m) for its two token halves (see `FORMULAS`).
  """
  if dev.count % n_data:
    raise ValueError(f"data degree {n_data} does not divide the {dev.count} devices")
  n = dev.count // n_data
  link, lat = dev.link_bytes_per_s, dev.collective_latency_s
  rows, layer_s, comm_s, fill_s = [], 0.0, 0.0, 0.0
  if not prec.tokenweave:
    for sub in sublayers(m, w, prec, n, n_data):
      t = sublayer_time(sub, dev, prec)
      ar = allreduce_time(sub.comm_bytes, n, link, lat)
      rows.append({"name": sub.name, "flops": sub.flops, "bytes": sub.bytes, **t, "comm_s": ar})
      layer_s += t["time_s"] + ar
      comm_s += ar
  else:
    if w.tokens / n_data < 2:
      raise ValueError(
        f"TokenWeave needs at least 2 tokens per device to split, got {w.tokens / n_data:g}"
      )
    for sub in sublayers(m, w, prec, n, n_data, split=2):
      t = sublayer_time(sub, dev, prec, dev.overlap_compute_share)
      mm = rs_ag_time(sub.comm_bytes, n, link, lat)
      exposed = 2 * max(0.0, mm - t["time_s"])
      rows.append(
        {
          "name": sub.name,
          "flops": 2 * sub.flops,
          "bytes": 2 * sub.bytes,
          "half_time_s": t["time_s"],
          "half_comm_s": mm,
          "compute_s": 2 * t["compute_s"],
          "memory_s": 2 * t["memory_s"],
          "time_s": 2 * t["time_s"],
          "comm_s": exposed,
        }
      )
      layer_s += 2 * max(t["time_s"], mm)
      comm_s += exposed
    fill_s = min(rows[-1]["half_time_s"], rows[-1]["half_comm_s"])
  head = head_time(m, w, prec, dev, n_data)
  layer = {"sublayers": rows, "time_s": layer_s, "comm_s": comm_s}
  total = m.layers * layer_s + head["time_s"] + fill_s
  return Projection(layer, head, total, m.layers * comm_s + head["comm_s"] + fill_s, fill_s)


def memory_per_device(m: ModelShape, w: Workload, prec: Precision, n: int) -> float:
  """Bytes of weights (layers, LM head, embedding) and KV cache on one device."""
  _, kvh, _ = per_device_heads(m, n)
  w_attn, w_mlp = layer_weights(m, n)
  weights = m.layers * (w_attn + w_mlp) * prec.weight_bytes + 2 * m.d_model * m.vocab / n * (
    prec.head_bytes
  )
  kv = m.layers * w.batch * (w.context + w.new_tokens) * 2 * kvh * m.head_dim * prec.kv_bytes
  return weights + kv


def recovered_fraction(base: Projection, overlapped: Projection) -> float:
  """Share of the baseline's communication time that overlap wins back (see `FORMULAS`)."""
  return (base.total_s - overlapped.total_s) / base.comm_s
