"""jaxllm's SmolLM2 logits against a committed HF-transformers fixture.

The fixture (tests/fixtures/reference_logits.json, made by
`python -m experiments.make_reference_logits`) holds, per prompt and position,
transformers' top-k token ids and float32 logits on the same GGUF.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "reference_logits.json"
REFERENCE = json.loads(FIXTURE.read_text())
PROMPTS = REFERENCE["prompts"]


@pytest.mark.parametrize("prompt", PROMPTS, ids=[p["name"] for p in PROMPTS])
def test_logits_match_transformers(smollm, prompt):
  ids = smollm.tokenizer.encode(prompt["text"])
  assert ids == prompt["ids"], "tokenizer disagrees with the fixture"
  logits = np.asarray(smollm.logits(np.asarray([ids])))[0]  # [S, V]
  ref_ids = np.asarray(prompt["top_ids"])
  ref_vals = np.asarray(prompt["top_logits"], np.float64)
  ours = np.take_along_axis(logits, ref_ids, axis=-1)
  # Fixture values are rounded to 4 decimals; 1e-3 is the parity target.
  np.testing.assert_allclose(ours, ref_vals, atol=1e-3, rtol=0)
  np.testing.assert_array_equal(logits.argmax(-1), ref_ids[:, 0])
  np.testing.assert_allclose(np.abs(logits).max(-1), prompt["max_abs_logit"], atol=1e-3)
