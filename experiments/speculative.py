r"""Speculative decoding at batch 1 (issue 27): acceptance, tokens per target call, wall-clock
speedup against plain greedy decoding, and the cost model's prediction.

  python -m experiments.speculative --draft=lookup --gamma=2,4,8 --task=grounded \
      --num_prompts=8 [--max_new_tokens=64] [--text_file=F]

Prompts (`--text_file`, default WikiText-2's test split):
  * ``continuation``: paragraph openings, the first ``--prompt_tokens`` tokens of
    paragraphs spread evenly over the text (raw text, as the perplexity protocol reads it);
  * ``grounded``: chat-template requests (the tokenizer's ``apply_chat_template``) to
    rewrite, summarize or answer from a paragraph given in the prompt (whole sentences up to
    ``--paragraph_tokens`` tokens, WikiText's ``@-@`` / `` , `` spacing undone), so that
    the answer reuses the prompt's text.

Drafts (`jaxllm.drafts`): ``lookup`` (prompt lookup, n-grams of the prompt and the
generated text), ``layerskip`` (the target's first ``--layerskip_layers`` layers and its LM
head), ``quantized`` (a copy of the target quantized with ``--quant_recipe``), ``easyspec``
(the target's first ``--easyspec_layers`` layers run layer-parallel in groups of
``--easyspec_group``, its cache recalibrated by an exact pass each step).

For each gamma and each prompt, at batch 1 and greedy: plain decoding (`Generator`) and
speculative decoding (`SpeculativeGenerator`) each run once untimed (compile; its tokens
are compared: ``greedy_identical``), once step by step for the cost model, then
``--repeats`` times each, alternating, timed end to end (``generate``, prefill included).

Figures per gamma:
  * ``acceptance_rate`` alpha (accepted / drafted), ``tokens_per_target_call`` tau
    (generated tokens / target calls, prefill included), ``target_calls_per_token`` 1 / tau;
  * ``speedup``: the median over ``--repeats`` repetitions of plain decoding's time over
    every prompt / speculative decoding's (repetition r of each method, the two alternating
    prompt by prompt), with ``speedup_min``/``_max`` the least and greatest of those ratios;
  * ``predicted_speedup`` tau / (gamma c + v): c = a draft token's cost / a target decode
    step's (the draft's ``propose`` call / gamma), v = a verify call's cost (gamma + 1
    tokens scored, accepted, rolled back) / a decode step's; each the median over every
    step of the step-by-step runs, in this run, with the host's wait for the step's ids;
  * ``decode_phase_speedup``: from those step-by-step runs, the plain decode steps' summed
    time / the speculative steps' (draft + verify), prefills left out, which the cost model
    also leaves out.

With ``--draft=easyspec``, each gamma also has ``easyspec``: the same draft run sequentially
(`EasySpecDraft` with group size 1: the same layers, calibration and cache, no layer
parallelism) and the layer-skip draft of the same layers, each with its alpha, tau and
greedy identity from one generation per prompt, and every draft's ``propose`` call time
(calibration included) as the median over every step of ``--repeats`` step-by-step
generations per prompt, the three drafts alternating; ``draft_speedup_vs_sequential`` is the
sequential draft's median over EasySpec's, ``acceptance_loss`` and ``tau_loss`` the
sequential draft's alpha and tau minus EasySpec's.

Outputs ``out_dir/speculative.json`` (config, versions, per-gamma figures and per-prompt
rows) and ``speculative.png`` (speedup against gamma, measured and predicted). The last
stdout line is ``{"draft", "gamma", "task", "acceptance_rate", "tokens_per_target_call",
"speedup", "predicted_speedup", "greedy_identical"}`` for the gamma with the best measured
speedup (``greedy_identical`` over every gamma and prompt).
"""

from __future__ import annotations

import os
import re
import statistics
import sys
import time

from absl import app, flags

from experiments import common

NAME = "speculative"
DRAFTS = ("lookup", "layerskip", "quantized", "easyspec")
DRAFT_NAMES = {"layerskip": "a layer-skip draft", "easyspec": "an EasySpec draft"}
TASKS = ("continuation", "grounded")
# Grounded requests, cycled over the prompts; each answer should reuse the paragraph.
REQUESTS = (
  "Rewrite the following paragraph in plain English, keeping every fact in it.",
  "Summarize the following paragraph in a few sentences, reusing its wording.",
  "Using only the paragraph below, answer: who or what is it about, and what are the key "
  "facts it gives? Quote the paragraph where you can.",
)

common.define_common_flags(NAME, ("model", "gguf", "text_file", "out_dir", "seed", "dtype"))
_DRAFT = flags.DEFINE_string("draft", "lookup", f"Draft: {', '.join(DRAFTS)}.")
_GAMMA = flags.DEFINE_list("gamma", ["4"], "Draft tokens per target call; several: a sweep.")
_TASK = flags.DEFINE_string("task", "continuation", f"Prompts: {' or '.join(TASKS)}.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 8, "Prompts (batch 1 each).", lower_bound=1)
_MAX_NEW = flags.DEFINE_integer(
  "max_new_tokens", 64, "Tokens generated per prompt (fewer at EOS).", lower_bound=1
)
_PROMPT_TOKENS = flags.DEFINE_integer(
  "prompt_tokens", 128, "continuation: tokens of each paragraph opening.", lower_bound=1
)
_PARAGRAPH_TOKENS = flags.DEFINE_integer(
  "paragraph_tokens", 192, "grounded: at most this many tokens of paragraph.", lower_bound=8
)
_LAYERSKIP_LAYERS = flags.DEFINE_integer(
  "layerskip_layers", None, "layerskip: the draft's layers (default: half the target's)."
)
_EASYSPEC_LAYERS = flags.DEFINE_integer(
  "easyspec_layers", None, "easyspec: the draft's layers (default: as --layerskip_layers)."
)
_EASYSPEC_GROUP = flags.DEFINE_integer(
  "easyspec_group",
  2,
  "easyspec: layers per layer-parallel group (a smaller last group takes the remainder).",
)
_EASYSPEC_FUSE = flags.DEFINE_boolean(
  "easyspec_fuse", False, "easyspec: run each group with its weights joined (wider matmuls)."
)
_QUANT_RECIPE = flags.DEFINE_string(
  "quant_recipe", "w8a8", "quantized: weight format of jaxllm.quant (w8a8, w4a16, ...)."
)
_QUANT_GROUP = flags.DEFINE_integer(
  "quant_group_size",
  None,
  "quantized: group size (default: per channel for w8a8, 32 otherwise).",
  lower_bound=2,
)
_REPEATS = flags.DEFINE_integer(
  "repeats", 3, "Timed runs per prompt and method (median).", lower_bound=1
)
_PROMPT_BUCKET = flags.DEFINE_integer(
  "prompt_bucket", 64, "Prompts are left-padded to a multiple of this.", lower_bound=1
)
FLAGS = flags.FLAGS


# ---------------------------------------------------------------------------- flags, prompts


def _gammas() -> list[int]:
  try:
    gammas = [int(g) for g in _GAMMA.value]
  except ValueError:
    common.fail(f"--gamma must list integers, got {','.join(_GAMMA.value)}")
  if not gammas or min(gammas) < 1:
    common.fail(f"--gamma must list integers >= 1 (draft tokens per step), got {_GAMMA.value}")
  return list(dict.fromkeys(gammas))


def _layers_flag(draft: str):
  """The flag that sets a layer-skip or EasySpec draft's layers (easyspec: its own when
  given, else --layerskip_layers)."""
  if draft == "easyspec" and _EASYSPEC_LAYERS.value is not None:
    return _EASYSPEC_LAYERS
  return _LAYERSKIP_LAYERS


def _draft_layers(cfg) -> int:
  return _layers_flag(_DRAFT.value).value or max(1, cfg.num_layers // 2)


def _check_flags(cfg) -> list[int]:
  """Checks that need no text or model; returns the gammas."""
  draft = _DRAFT.value
  if draft not in DRAFTS:
    common.fail(f"unknown --draft={draft!r}; choose one of {', '.join(DRAFTS)}")
  if _TASK.value not in TASKS:
    common.fail(f"unknown --task={_TASK.value!r}; choose one of {', '.join(TASKS)}")
  gammas = _gammas()
  if draft in ("layerskip", "easyspec"):
    flag = _layers_flag(draft)
    layers = flag.value
    if layers is not None and not 1 <= layers < cfg.num_layers:
      common.fail(
        f"--{flag.name}={layers}: {DRAFT_NAMES[draft]} needs between 1 and "
        f"{cfg.num_layers - 1} layers ({cfg.name} has {cfg.num_layers}; the draft must be "
        "shallower than the target)"
      )
  if draft == "easyspec" and _EASYSPEC_GROUP.value < 1:
    common.fail(
      f"--easyspec_group={_EASYSPEC_GROUP.value}: a layer-parallel group needs at least 1 layer"
    )
  if FLAGS.gguf is not None and not os.path.isfile(FLAGS.gguf):
    common.fail(f"GGUF file not found: {FLAGS.gguf}")
  return gammas


_WIKI_SPACING = (
  (" @-@ ", "-"),
  (" @,@ ", ","),
  (" @.@ ", "."),
  (" , ", ", "),
  (" . ", ". "),
  (" ; ", "; "),
  (" : ", ": "),
  (" 's ", "'s "),
  ("( ", "("),
  (" )", ")"),
)


def _paragraphs(text: str) -> list[str]:
  """Non-empty lines that are not WikiText headings (`` = Title = ``), in order."""
  out = []
  for line in text.splitlines():
    line = line.strip()
    if line and not (line.startswith("=") and line.endswith("=")):
      out.append(line)
  return out


def _spread(items: list, n: int) -> list:
  """`n` items spread evenly over `items` (all of them when there are no more)."""
  if len(items) <= n:
    return list(items)
  return [items[i * len(items) // n] for i in range(n)]


def _continuation_prompts(paragraphs, encode, n: int, tokens: int) -> list[list[int]]:
  candidates = [ids[:tokens] for ids in map(encode, paragraphs) if len(ids) >= tokens]
  return _spread(candidates, n)


def _clean(paragraph: str) -> str:
  for a, b in _WIKI_SPACING:
    paragraph = paragraph.replace(a, b)
  paragraph = re.sub(r'" ([^"]*?) "', r'"\1"', paragraph)
  return re.sub(r" ([.,;:])$", r"\1", paragraph)


def _grounded_prompts(paragraphs, chat, encode, n: int, budget: int) -> list[list[int]]:
  """Chat requests over whole sentences (at most `budget` tokens) of evenly spread
  paragraphs of at least two sentences."""
  excerpts = []
  for paragraph in paragraphs:
    sentences = re.split(r"(?<=\.) ", _clean(paragraph))
    kept = []
    for sentence in sentences:
      if len(encode(" ".join([*kept, sentence]))) > budget:
        break
      kept.append(sentence)
    if len(kept) >= 2:
      excerpts.append(" ".join(kept))
  prompts = []
  for i, excerpt in enumerate(_spread(excerpts, n)):
    request = f"{REQUESTS[i % len(REQUESTS)]}\n\n{excerpt}"
    prompts.append(encode(chat([{"role": "user", "content": request}])))
  return prompts


def _prompts(text: str, label: str, gguf: str, cfg) -> list[list[int]]:
  from jaxllm.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel

  with common.one_line_errors(f"{gguf}: "):
    tokenizer = Tokenizer.from_gguf(gguf)
  chat = tokenizer.apply_chat_template
  encoder = tokenizer
  if FLAGS.model == "tiny":  # the tiny model's ids: SmolLM2's modulo its vocabulary
    encoder = common.ModuloTokenizer(tokenizer, cfg.vocab_size)
  paragraphs = _paragraphs(text)
  n = _NUM_PROMPTS.value
  try:
    if _TASK.value == "continuation":
      prompts = _continuation_prompts(paragraphs, encoder.encode, n, _PROMPT_TOKENS.value)
      need = f"paragraphs of at least {_PROMPT_TOKENS.value} tokens"
    else:
      prompts = _grounded_prompts(paragraphs, chat, encoder.encode, n, _PARAGRAPH_TOKENS.value)
      need = f"paragraphs with two or more sentences in {_PARAGRAPH_TOKENS.value} tokens"
  except ValueError as e:
    common.fail(f"{label}: {e}")
  if len(prompts) < n:
    common.fail(f"{label} has {len(prompts)} {need}; --num_prompts={n} needs {n}")
  return prompts


def _check_lengths(prompts, gammas, cfg) -> None:
  longest = max(map(len, prompts))
  need = longest + max(gammas) + _MAX_NEW.value
  if need > cfg.max_seq_len:
    common.fail(
      f"the longest prompt ({longest} tokens) + gamma={max(gammas)} + "
      f"--max_new_tokens={_MAX_NEW.value} = {need} tokens exceeds {cfg.name}'s "
      f"max_seq_len={cfg.max_seq_len}"
    )


# ------------------------------------------------------------------------------ measuring


def _spread_s(times: list[float]) -> dict:
  return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def _plain_step_seconds(plain, prompt: list[int], steps: int) -> list[float]:
  """Seconds of each of `steps` decode steps after an untimed prefill, as
  `Generator.generate` runs them (the host waits for each step's ids)."""
  # pylint: disable=import-outside-toplevel,protected-access
  import jax
  import numpy as np

  from jaxllm.decoding import bucket, left_pad
  from jaxllm.sampling import SamplingConfig

  sampling, key = SamplingConfig(), jax.random.key(0)
  new = _MAX_NEW.value
  length = min(bucket(len(prompt), plain.prompt_bucket), plain.max_cache_len - new)
  capacity = bucket(length + new, plain.prompt_bucket)
  tokens, start = left_pad([prompt], length, plain.config.pad_id)
  tok, _, cache = plain._prefill(
    plain.params, tokens, start, key, capacity=capacity, sampling=sampling
  )
  np.asarray(tok)
  out = []
  for _ in range(steps):
    t0 = time.perf_counter()
    tok, _, cache = plain._step(plain.params, cache, tok, key, sampling=sampling)
    np.asarray(tok)
    out.append(time.perf_counter() - t0)
  return out


def _spec_step_seconds(spec, prompt: list[int]) -> tuple[list[float], list[float]]:
  """(seconds of each draft `propose` call, of each verify call) over one generation,
  the steps of `SpeculativeGenerator.generate` run one by one with a wait after each half."""
  # pylint: disable=import-outside-toplevel,protected-access
  import jax
  import numpy as np

  from jaxllm.sampling import SamplingConfig

  sampling, key = SamplingConfig(), jax.random.key(0)
  loop, _, _ = spec._begin([prompt], _MAX_NEW.value, sampling, key, True)
  propose_s, verify_s = [], []
  while loop.remaining.any():
    t0 = time.perf_counter()
    draft_state, cache, drafts, q = spec._propose(
      spec.draft.params,
      loop.draft_state,
      loop.cache,
      loop.history,
      loop.count,
      key,
      gamma=spec.spec.gamma,
      sampling=sampling,
    )
    jax.block_until_ready(drafts)
    t1 = time.perf_counter()
    cache, history, count, out, emit, remaining, a, finite = spec._verify(
      spec.params,
      cache,
      loop.history,
      loop.count,
      jax.numpy.asarray(loop.remaining),
      drafts,
      q,
      key,
      sampling=sampling,
      stop_at_eos=True,
    )
    _, _, remaining, _, _ = jax.device_get((out, emit, remaining, a, finite))
    t2 = time.perf_counter()
    propose_s.append(t1 - t0)
    verify_s.append(t2 - t1)
    loop = type(loop)(cache, draft_state, history, count, np.array(remaining))
  return propose_s, verify_s


def _first_difference(a: list[int], b: list[int]) -> int | None:
  for i, (x, y) in enumerate(zip(a, b)):
    if x != y:
      return i
  return None if len(a) == len(b) else min(len(a), len(b))


def _generator(model, draft, gamma: int):
  # pylint: disable=import-outside-toplevel
  from jaxllm.speculative import SpeculativeConfig, SpeculativeGenerator

  try:
    return SpeculativeGenerator(
      model,
      draft,
      SpeculativeConfig(gamma),
      max_cache_len=model.config.max_seq_len,
      prompt_bucket=_PROMPT_BUCKET.value,
    )
  except ValueError as e:
    common.fail(f"gamma={gamma}: {e}")


def _measure_gamma(spec, gamma: int, plain, plain_tokens, prompts, bar) -> dict:
  """Every figure of one gamma (see the module docstring)."""
  new, repeats = _MAX_NEW.value, _REPEATS.value
  rows, decode_s, propose_s, verify_s = [], [], [], []
  for i, prompt in enumerate(prompts):
    bar.set_postfix_str(f"gamma {gamma}, prompt {i + 1}/{len(prompts)}")
    t0 = time.perf_counter()
    out = spec.generate([prompt], new)  # compiles this prompt's shapes
    first_call_s = time.perf_counter() - t0
    stats = out.stats
    p, v = _spec_step_seconds(spec, prompt)
    propose_s += p
    verify_s += v
    decode_s += _plain_step_seconds(plain, prompt, max(stats.generated[0] - 1, 1))
    plain_s, spec_s = [], []
    for _ in range(repeats):
      t0 = time.perf_counter()
      plain.generate([prompt], new)
      t1 = time.perf_counter()
      spec.generate([prompt], new)
      plain_s.append(t1 - t0)
      spec_s.append(time.perf_counter() - t1)
    diff = _first_difference(out.tokens[0], plain_tokens[i])
    rows.append(
      {
        "gamma": gamma,
        "prompt": i,
        "prompt_tokens": len(prompt),
        "generated": stats.generated[0],
        "finished_at_eos": out.finished[0],
        "target_calls": stats.target_calls[0],
        "drafted": stats.drafted[0],
        "accepted": stats.accepted[0],
        "acceptance_rate": stats.acceptance_rate,
        "tokens_per_target_call": stats.tokens_per_target_call,
        "greedy_identical": diff is None,
        "first_difference_at": diff,
        "speculative_first_call_s": first_call_s,
        "plain_s": _spread_s(plain_s),
        "speculative_s": _spread_s(spec_s),
        "speedup": statistics.median(plain_s) / statistics.median(spec_s),
        "_plain": plain_s,
        "_spec": spec_s,
      }
    )
    bar.update()
  generated = sum(r["generated"] for r in rows)
  calls = sum(r["target_calls"] for r in rows)
  drafted, accepted = sum(r["drafted"] for r in rows), sum(r["accepted"] for r in rows)
  tau = generated / calls
  plain_total = sum(r["plain_s"]["median"] for r in rows)
  spec_total = sum(r["speculative_s"]["median"] for r in rows)
  ratios = [
    sum(r["_plain"][k] for r in rows) / sum(r["_spec"][k] for r in rows) for k in range(repeats)
  ]
  for r in rows:
    del r["_plain"], r["_spec"]
  decode_phase = sum(decode_s) / (sum(propose_s) + sum(verify_s))
  t_decode = statistics.median(decode_s)
  t_propose, t_verify = statistics.median(propose_s), statistics.median(verify_s)
  c, v = t_propose / gamma / t_decode, t_verify / t_decode
  predicted = tau / (gamma * c + v)
  speedup = statistics.median(ratios)
  return {
    "gamma": gamma,
    "acceptance_rate": accepted / max(drafted, 1),
    "tokens_per_target_call": tau,
    "target_calls_per_token": calls / generated,
    "generated": generated,
    "target_calls": calls,
    "drafted": drafted,
    "accepted": accepted,
    "speedup": speedup,
    "speedup_min": min(ratios),
    "speedup_max": max(ratios),
    "predicted_speedup": predicted,
    "prediction_error_pct": 100.0 * (predicted / speedup - 1.0),
    "decode_phase_speedup": decode_phase,
    "c": c,
    "v": v,
    "decode_step_ms": 1e3 * t_decode,
    "draft_propose_ms": 1e3 * t_propose,
    "verify_ms": 1e3 * t_verify,
    "cost_steps": {"decode": len(decode_s), "propose": len(propose_s), "verify": len(verify_s)},
    "plain_tok_s": generated / plain_total,
    "speculative_tok_s": generated / spec_total,
    "greedy_identical": all(r["greedy_identical"] for r in rows),
    "prompts": rows,
  }


def _easyspec_peers(model, spec, gamma: int, plain_tokens, prompts, bar) -> dict:
  """EasySpec (`spec`'s draft) against the same draft run sequentially and the layer-skip
  draft of the same layers (see the module docstring)."""
  # pylint: disable=import-outside-toplevel
  from jaxllm.drafts import EasySpecDraft, LayerSkipDraft

  draft = spec.draft
  gens = {
    "easyspec": spec,
    "sequential": _generator(model, EasySpecDraft(model, draft.num_layers, 1, draft.fuse), gamma),
    "layerskip": _generator(model, LayerSkipDraft(model, draft.num_layers), gamma),
  }
  totals = {name: {"generated": 0, "calls": 0, "drafted": 0, "accepted": 0} for name in gens}
  identical = {name: True for name in gens}
  propose_s = {name: [] for name in gens}
  for i, prompt in enumerate(prompts):
    bar.set_postfix_str(f"gamma {gamma}, easyspec peers, prompt {i + 1}/{len(prompts)}")
    for name, gen in gens.items():
      out = gen.generate([prompt], _MAX_NEW.value)  # compiles this prompt's shapes
      st = out.stats
      for key, value in (
        ("generated", st.generated),
        ("calls", st.target_calls),
        ("drafted", st.drafted),
        ("accepted", st.accepted),
      ):
        totals[name][key] += value[0]
      identical[name] &= _first_difference(out.tokens[0], plain_tokens[i]) is None
    for _ in range(_REPEATS.value):
      for name, gen in gens.items():
        propose_s[name] += _spec_step_seconds(gen, prompt)[0]
    bar.update()
  peers = {}
  for name, t in totals.items():
    peers[name] = {
      "acceptance_rate": t["accepted"] / max(t["drafted"], 1),
      "tokens_per_target_call": t["generated"] / t["calls"],
      "draft_propose_ms": 1e3 * statistics.median(propose_s[name]),
      "draft_propose_ms_min": 1e3 * min(propose_s[name]),
      "draft_propose_ms_max": 1e3 * max(propose_s[name]),
      "propose_calls": len(propose_s[name]),
      "greedy_identical": identical[name],
      **t,
    }
  es, seq, ls = peers["easyspec"], peers["sequential"], peers["layerskip"]
  return {
    "groups": draft.groups,
    "fuse": draft.fuse,
    "drafts": peers,
    "draft_speedup_vs_sequential": seq["draft_propose_ms"] / es["draft_propose_ms"],
    "draft_speedup_vs_layerskip": ls["draft_propose_ms"] / es["draft_propose_ms"],
    "acceptance_loss": seq["acceptance_rate"] - es["acceptance_rate"],
    "tau_loss": seq["tokens_per_target_call"] - es["tokens_per_target_call"],
  }


def _plot(path: str, results: list[dict], title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  gammas = [r["gamma"] for r in results]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  measured = [r["speedup"] for r in results]
  err = [
    [r["speedup"] - r["speedup_min"] for r in results],
    [r["speedup_max"] - r["speedup"] for r in results],
  ]
  ax.errorbar(gammas, measured, yerr=err, marker="o", capsize=3, label="measured (min-max)")
  ax.plot(gammas, [r["predicted_speedup"] for r in results], "s--", label="cost model")
  ax.axhline(1.0, color="grey", lw=0.8)
  ax.set_xlabel("gamma (draft tokens per target call)")
  ax.set_ylabel("speedup vs plain greedy decoding (batch 1)")
  ax.set_xticks(gammas)
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ----------------------------------------------------------------------------------- main


def _easyspec_table(results: list[dict]):
  rows = []
  for r in results:
    peers = r["easyspec"]
    for name, d in peers["drafts"].items():
      rows.append({"gamma": r["gamma"], "draft": name, **d})
  return common.Table(
    (
      common.Column("gamma", "gamma", "d", width=5),
      common.Column("draft", "draft", "s", width=10, left=True),
      common.Column("propose ms", "draft_propose_ms", ".2f", width=10),
      common.Column(
        "min-max",
        lambda d: f"{d['draft_propose_ms_min']:.1f}-{d['draft_propose_ms_max']:.1f}",
        width=11,
      ),
      common.Column("alpha", "acceptance_rate", ".3f", width=6),
      common.Column("tau", "tokens_per_target_call", ".2f", width=5),
      common.Column("identical", "greedy_identical", lambda b: "yes" if b else "NO", width=9),
    ),
    rows,
    title="\nEasySpec against the same draft run sequentially (group size 1) and the layer-skip "
    "draft of the same layers; propose = one draft call of gamma tokens, calibration included: "
    + "; ".join(
      f"gamma {r['gamma']}: draft speedup vs sequential "
      f"{r['easyspec']['draft_speedup_vs_sequential']:.2f}x, alpha loss "
      f"{r['easyspec']['acceptance_loss']:+.3f}, tau loss {r['easyspec']['tau_loss']:+.2f}"
      for r in results
    ),
  )


def _check_recipe() -> None:
  from jaxllm.quant.formats import FORMATS  # pylint: disable=import-outside-toplevel

  if _DRAFT.value == "quantized" and _QUANT_RECIPE.value not in FORMATS:
    common.fail(f"unknown --quant_recipe={_QUANT_RECIPE.value!r}; choose one of {sorted(FORMATS)}")


def _make_draft(model):
  # pylint: disable=import-outside-toplevel
  from jaxllm.drafts import EasySpecDraft, LayerSkipDraft, LookupDraft, quantized_draft

  name = _DRAFT.value
  if name == "lookup":
    return LookupDraft(), {"max_ngram": 3, "min_ngram": 1}
  layers = _draft_layers(model.config)
  if name == "layerskip":
    return LayerSkipDraft(model, layers), {"layers": layers}
  if name == "easyspec":
    group, fuse = _EASYSPEC_GROUP.value, _EASYSPEC_FUSE.value
    with common.one_line_errors():
      draft = EasySpecDraft(model, layers, group, fuse)
    return draft, {"layers": layers, "group_size": group, "groups": draft.groups, "fuse": fuse}
  recipe = _QUANT_RECIPE.value
  group = _QUANT_GROUP.value or (None if recipe == "w8a8" else 32)
  with common.one_line_errors(f"--quant_recipe={recipe}: "):
    return quantized_draft(model, recipe, group), {"recipe": recipe, "group_size": group}


def main(argv):
  del argv
  cfg = common.model_config(FLAGS.model, 1)
  gammas = _check_flags(cfg)
  common.start()
  _check_recipe()
  text, label, path = common.read_eval_text(FLAGS.text_file)
  # pylint: disable=import-outside-toplevel
  import tqdm

  from experiments.common import load_pipeline  # sharded by --mesh
  from jaxllm.decoding import Generator
  from jaxllm.gguf_loader import default_gguf_path

  with common.one_line_errors():
    gguf = FLAGS.gguf or default_gguf_path()
  prompts = _prompts(text, label, gguf, cfg)
  _check_lengths(prompts, gammas, cfg)

  with common.one_line_errors():
    pipe = load_pipeline(FLAGS.model, FLAGS.gguf, FLAGS.dtype, FLAGS.seed)
  model = pipe.model
  draft, draft_config = _make_draft(model)
  plain = Generator(model, prompt_bucket=_PROMPT_BUCKET.value)
  plain_tokens = []
  for prompt in prompts:
    with common.one_line_errors():
      plain_tokens.append(plain.generate([prompt], _MAX_NEW.value).tokens[0])

  results = []
  easyspec = _DRAFT.value == "easyspec"
  total = len(gammas) * len(prompts) * (2 if easyspec else 1)
  with tqdm.tqdm(total=total, desc=NAME, unit="prompt") as bar:
    for gamma in gammas:
      spec = _generator(model, draft, gamma)
      try:
        results.append(_measure_gamma(spec, gamma, plain, plain_tokens, prompts, bar))
        if easyspec:
          results[-1]["easyspec"] = _easyspec_peers(model, spec, gamma, plain_tokens, prompts, bar)
      except ValueError as e:  # NaN logits and the like, named by the generator
        common.fail(f"gamma={gamma}: {e}")
  identical = all(r["greedy_identical"] for r in results)
  if not identical:
    diffs = [
      f"gamma {r['gamma']} prompt {p['prompt']} at token {p['first_difference_at']}"
      for r in results
      for p in r["prompts"]
      if not p["greedy_identical"]
    ]
    print(
      f"warning: speculative output differs from plain greedy: {'; '.join(diffs)}", file=sys.stderr
    )

  best = max(results, key=lambda r: r["speedup"])
  summary = {
    "draft": draft.name,
    "gamma": best["gamma"],
    "task": _TASK.value,
    "acceptance_rate": best["acceptance_rate"],
    "tokens_per_target_call": best["tokens_per_target_call"],
    "speedup": best["speedup"],
    "predicted_speedup": best["predicted_speedup"],
    "greedy_identical": identical,
  }
  table = common.Table(
    (
      common.Column("gamma", "gamma", "d", width=5),
      common.Column("alpha", "acceptance_rate", ".3f", width=6),
      common.Column("tau", "tokens_per_target_call", ".2f", width=5),
      common.Column("calls/tok", "target_calls_per_token", ".3f", width=9),
      common.Column("c", "c", ".3f", width=6),
      common.Column("v", "v", ".2f", width=5),
      common.Column("predicted", "predicted_speedup", ".2f", width=9),
      common.Column("speedup", "speedup", ".2f", width=7),
      common.Column("min-max", lambda r: f"{r['speedup_min']:.2f}-{r['speedup_max']:.2f}", width=9),
      common.Column("pred err %", "prediction_error_pct", "+.1f", width=10),
      common.Column("decode only", "decode_phase_speedup", ".2f", width=11),
      common.Column("identical", "greedy_identical", lambda b: "yes" if b else "NO", width=9),
    ),
    results,
    title=f"\n{cfg.name}, draft {draft.name} {draft_config}, task {_TASK.value}, "
    f"{len(prompts)} prompts ({label}), batch 1, greedy, max_new_tokens {_MAX_NEW.value}; "
    f"plain decode step {results[0]['decode_step_ms']:.2f} ms",
  )
  lines = table.lines()
  if easyspec:
    lines += _easyspec_table(results).lines()
  record = {
    "config": {
      "model": FLAGS.model,
      "gguf": gguf if FLAGS.model != "tiny" else None,
      "dtype": FLAGS.dtype,
      "seed": FLAGS.seed,
      "draft": _DRAFT.value,
      "draft_name": draft.name,
      "draft_config": draft_config,
      "gammas": gammas,
      "task": _TASK.value,
      "num_prompts": len(prompts),
      "max_new_tokens": _MAX_NEW.value,
      "prompt_tokens": _PROMPT_TOKENS.value if _TASK.value == "continuation" else None,
      "paragraph_tokens": _PARAGRAPH_TOKENS.value if _TASK.value == "grounded" else None,
      "repeats": _REPEATS.value,
      "prompt_bucket": _PROMPT_BUCKET.value,
      "batch": 1,
      "sampling": "greedy",
      "stop_at_eos": True,
    },
    "text": {"label": label, "path": os.path.abspath(path) if path else None},
    "prompt_tokens": [len(p) for p in prompts],
    "timing": (
      "after an untimed first run (compile) per prompt: plain Generator.generate and "
      "SpeculativeGenerator.generate alternate --repeats times per prompt, wall clock, "
      "prefill included; speedup = median over repetitions r of (plain time of repetition r "
      "summed over prompts) / (speculative time of repetition r summed over prompts), "
      "speedup_min/max the least/greatest of those ratios. Cost model: c = median draft propose call / gamma / median "
      "decode step, v = median verify call / median decode step, from one step-by-step "
      "generation per prompt (host waits for each call's outputs); decode_phase_speedup = "
      "summed plain decode steps / summed draft + verify calls of those runs (no prefill)"
    ),
    "results": results,
    "summary": summary,
    **common.run_info(),
  }
  print("\n".join(lines), flush=True)
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  record["plot"] = os.path.join(FLAGS.out_dir, f"{NAME}.png")
  _plot(
    record["plot"],
    results,
    f"{cfg.name}, {draft.name}, {_TASK.value}, {len(prompts)} prompts, batch 1",
  )
  print(f"results: {common.write_results(FLAGS.out_dir, NAME, record)}", flush=True)
  common.print_summary(summary)


if __name__ == "__main__":
  app.run(main)
