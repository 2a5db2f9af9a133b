"""The on-paper roofline (`experiments.roofline_model`) and its runner (`experiments.roofline`).

The formulas are checked against numbers worked out by hand for a made-up toy model and
device; the Llama figures against independent arithmetic from the published configs; the
projections against the signs the issue asks for (W4A8 decode faster than bf16 decode,
TokenWeave's exposed communication below the baseline's); the runner's JSON, files and
one-line errors in subprocesses (one small run with the CPU check).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import roofline_model as rm

ROOT = Path(__file__).resolve().parents[1]

# A made-up model and device, small enough to work out by hand (see the comments).
TOY = rm.ModelShape("toy", layers=2, d_model=8, heads=4, kv_heads=2, head_dim=2, d_ff=16, vocab=32)
TOY_DEV = rm.Device(
  "toy", 2, dense_flops=100.0, int8_flops=200.0, hbm_bytes_per_s=10.0, hbm_bytes=1e9,
  link_bytes_per_s=4.0, collective_latency_s=1.0,
)  # fmt: skip
TOY_WORK = rm.prefill(batch=1, prompt=4)


def test_toy_layer_by_hand():
  # n = 2: 2 query heads, 1 KV head, 8 MLP columns per device; t = 4 tokens.
  assert rm.layer_weights(TOY, 2) == (8 * 2 * 2 + 2 * 8 * 1 * 2 + 2 * 2 * 8, 3 * 8 * 8)
  attn, mlp = rm.sublayers(TOY, TOY_WORK, rm.BF16, 2)
  assert attn.matmul_flops == 2 * 4 * 96
  assert attn.attention_flops == 4 * 10 * 2 * 2  # causal pairs 1 + 2 + 3 + 4 = 10
  assert mlp.matmul_flops == 2 * 4 * 192
  # attention bytes: weights 192, norm 4*4*8*2 = 256, q/k/v in 64, q out 32, attention
  # q in + out 64, o in 32, o out 64, KV read 4 positions * 2 * 1 head * 2 * 2 B = 32, KV write 32
  assert attn.bytes == 192 + 256 + 64 + 32 + 64 + 32 + 64 + 32 + 32 == 768
  # MLP bytes: weights 384, norm 256, in 64, gate/up out 128, SiLU*up reads 128, writes 64,
  # down in 64, out 64
  assert mlp.bytes == 384 + 256 + 64 + 128 + 128 + 64 + 64 + 64 == 1152
  assert attn.comm_bytes == mlp.comm_bytes == 4 * 8 * 2


def test_toy_projection_by_hand():
  p = rm.project(TOY, TOY_WORK, rm.BF16, TOY_DEV)
  # attention: compute (768 + 160)/100 = 9.28 < memory 768/10 = 76.8; MLP: 15.36 < 115.2;
  # each all-reduce 2*(1/2)*64/4 + 1 = 17
  assert p.layer["time_s"] == pytest.approx(76.8 + 17 + 115.2 + 17)
  # head: 1 row, 16 vocab columns per device: FLOPs 256 -> 2.56, bytes 256 + 16 + 32 = 304 ->
  # 30.4; logits all-gather (1/2)*32*2/4 + 1 = 9
  assert p.head["time_s"] == pytest.approx(30.4 + 9)
  assert p.total_s == pytest.approx(2 * 226 + 39.4)
  assert p.comm_fraction == pytest.approx((2 * 34 + 9) / 491.4)


def test_toy_tokenweave_by_hand():
  tw = rm.project(TOY, TOY_WORK, rm.TOKENWEAVE, TOY_DEV)
  # each half: 2 tokens, 5 pairs, half a sequence of cache; the norm on 2/2 = 1 token (64 B).
  # attention half bytes 192 + 64 + 32 + 16 + 32 + 16 + 32 + 16 + 16 = 416 -> 41.6 us; MLP half
  # 384 + 64 + 32 + 64 + 64 + 32 + 32 + 32 = 704 -> 70.4; fused collective 2*(1/2)*32/4 + 1 = 9
  assert [s["half_time_s"] for s in tw.layer["sublayers"]] == pytest.approx([41.6, 70.4])
  assert [s["half_comm_s"] for s in tw.layer["sublayers"]] == pytest.approx([9.0, 9.0])
  assert tw.layer["time_s"] == pytest.approx(2 * 41.6 + 2 * 70.4)
  assert tw.fill_s == pytest.approx(9.0)
  assert tw.total_s == pytest.approx(2 * 224 + 39.4 + 9)
  base = rm.project(TOY, TOY_WORK, rm.BF16, TOY_DEV)
  assert rm.recovered_fraction(base, tw) == pytest.approx((491.4 - 496.4) / 77)


def test_collective_formulas():
  assert rm.allreduce_time(8e6, 8, 4e9, 1e-5) == pytest.approx(2 * 7 / 8 * 2e-3 + 1e-5)
  assert rm.rs_ag_time(8e6, 8, 4e9, 1e-5) == pytest.approx(2 * 7 / 8 * 2e-3 + 1e-5)
  assert rm.allreduce_time(8e6, 1, 4e9, 1e-5) == 0.0


def test_llama_flops_and_weights():
  # Llama-3-8B per layer: q, o 4096 x 4096; k, v 4096 x 1024; MLP 3 x 4096 x 14336.
  per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336
  w_attn, w_mlp = rm.layer_weights(rm.LLAMA3_8B, 8)
  assert 8 * (w_attn + w_mlp) == per_layer
  tokens = 512
  attn, mlp = rm.sublayers(rm.LLAMA3_8B, rm.prefill(1, tokens), rm.BF16, 8)
  assert 8 * (attn.matmul_flops + mlp.matmul_flops) == 2 * per_layer * tokens
  # causal attention, all 32 heads: 4 * (512*513/2 pairs) * 32 * 128
  assert 8 * attn.attention_flops == 4 * (512 * 513 / 2) * 32 * 128
  # the 70B model, about 70.6e9 params; in bf16 over 8 chips it overflows a v5e's 16 GiB
  m = rm.LLAMA3_70B
  params = m.layers * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672) + 2 * 128256 * 8192
  assert 70.0e9 < params < 71.0e9
  bf16_bytes = rm.memory_per_device(m, rm.decode(1, 0), rm.BF16, 8)
  assert bf16_bytes > params * 2 / 8 > rm.V5E_HBM_BYTES
  assert bf16_bytes < rm.H100_HBM_BYTES


def test_quantized_bytes():
  work = rm.decode(16, 4096)
  bf16, w4a8 = (rm.sublayers(rm.LLAMA3_8B, work, p, 8) for p in (rm.BF16, rm.W4A8))
  ratio = (w4a8[0].weight_bytes + w4a8[1].weight_bytes) / (
    bf16[0].weight_bytes + bf16[1].weight_bytes
  )
  assert ratio == pytest.approx((0.5 + 2 / 128) / 2)  # int4 + a bf16 scale per 128
  kv4 = rm.sublayers(rm.LLAMA3_8B, work, rm.W4A8_KV4, 8)[0]
  assert kv4.kv_bytes / w4a8[0].kv_bytes == pytest.approx((0.5 + 4 / 128) / 2)


@pytest.mark.parametrize("model", list(rm.MODELS))
@pytest.mark.parametrize("device", list(rm.DEVICES))
def test_signs(model, device):
  m, dev = rm.MODELS[model], rm.DEVICES[device]
  dec = rm.decode(32, 2048)
  t = {c: rm.project(m, dec, rm.CONFIGS[c], dev).total_s for c in ("bf16", "w4a8", "w4a8_kv4")}
  assert t["w4a8_kv4"] < t["w4a8"] < t["bf16"]  # memory-bound decode: fewer bytes, less time
  pre = rm.prefill(1, 2048)
  for prec in (rm.TOKENWEAVE, rm.W4A8_KV4_TOKENWEAVE):
    base, tw = rm.project(m, pre, prec.base(), dev), rm.project(m, pre, prec, dev)
    assert 0 <= tw.comm_s < base.comm_s
    assert tw.total_s < base.total_s
  # TokenWeave's claim: overlap recovers most of bf16 prefill's communication time
  base, tw = (rm.project(m, pre, p, dev) for p in (rm.BF16, rm.TOKENWEAVE))
  assert rm.recovered_fraction(base, tw) > 0.5 and 0 < base.comm_fraction < 1


def test_tokenweave_needs_two_tokens():
  with pytest.raises(ValueError, match="at least 2 tokens"):
    rm.project(rm.LLAMA3_8B, rm.decode(1, 16), rm.TOKENWEAVE, rm.H100_X8)


def run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "experiments.roofline", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )


def _finite_numbers(obj):
  if isinstance(obj, dict):
    for v in obj.values():
      yield from _finite_numbers(v)
  elif isinstance(obj, list):
    for v in obj:
      yield from _finite_numbers(v)
  elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
    yield obj


@pytest.fixture(scope="module")
def runner_output(tmp_path_factory):
  out = tmp_path_factory.mktemp("roofline")
  proc = run(
    "--models=llama3-8b",
    "--configs=bf16,w4a8,bf16_tokenweave",
    "--prompt_len=256",
    "--decode_batch=4",
    "--context=512",
    "--cpu_batch=4",
    "--cpu_seq=16",
    "--cpu_repeats=2",
    f"--out_dir={out}",
  )
  return proc, out


def test_runner_json_and_files(runner_output):
  proc, out = runner_output
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  keys = {
    f"llama3-8b/{d}/{c}" for d in ("h100", "v5e") for c in ("bf16", "w4a8", "bf16_tokenweave")
  }
  assert set(summary["results"]) == keys
  numbers = list(_finite_numbers(summary))
  assert numbers and all(math.isfinite(x) for x in numbers)
  for key in keys:
    entry = summary["results"][key]
    assert entry["prefill_ms"] > 0 and entry["decode_ms"] > 0
    assert 0 <= entry["decode_comm_fraction"] < 1
    assert ("prefill_tokenweave_recovered" in entry) == key.endswith("tokenweave")
  record = json.loads((out / "roofline.json").read_text())
  assert record["formulas"]["allreduce"].startswith("T_AR(M) = 2*(n-1)/n")
  assert (out / "roofline.png").stat().st_size > 0
  assert "What the model cannot capture" in (out / "roofline.md").read_text()
  assert "allreduce: T_AR(M)" in proc.stdout  # formulas printed
  sweep = record["tokenweave_sweep"]
  for device in ("h100", "v5e"):
    rec = [r["tokenweave_recovered"] for r in sweep if r["device"] == device]
    assert len(rec) == 7 and rec[-1] > 0.5 and rec[-1] > rec[0]  # grows with the prompt


def test_runner_cpu_check(runner_output):
  proc, _ = runner_output
  assert proc.returncode == 0, proc.stderr[-2000:]
  cpu = json.loads(proc.stdout.strip().splitlines()[-1])["cpu_check"]
  assert set(cpu) == {"one_device", "mesh_data4_tensor2"}
  for run_ in cpu.values():
    assert run_["projected_ms"] > 0 and run_["measured_ms"] > 0
    assert run_["measured_over_projected"] == pytest.approx(
      run_["measured_ms"] / run_["projected_ms"]
    )


@pytest.mark.parametrize(
  "flag, message",
  [
    ("--models=llama2-7b", "--models: unknown model 'llama2-7b'"),
    ("--devices=a100", "--devices: unknown device 'a100'"),
    ("--configs=fp4", "--configs: unknown config 'fp4'"),
    ("--prompt_len=0", "--prompt_len=0 must be >= 1"),
    ("--decode_batch=-2", "--decode_batch=-2 must be >= 1"),
    ("--decode_batch=1", "TokenWeave (bf16_tokenweave) needs at least 2"),
    ("--cpu_batch=6", "--cpu_batch=6 must be a multiple of the data degree 4"),
    ("--cpu_seq=513", "--cpu_seq=513 exceeds the tiny model's max_seq_len=512"),
  ],
)
def test_bad_flags(flag, message):
  proc = run(flag, "--nocheck_cpu")
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
