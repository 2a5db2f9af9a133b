"""Orbax save/restore round trip, and one-line errors for damaged checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from in_process import run_perplexity_main

from jaxllm import checkpoint


def test_round_trip_is_exact(tiny_model, tmp_path):
  size = checkpoint.save(tiny_model, tmp_path / "ckpt")
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(tiny_model)))
  assert size >= param_bytes * 0.5  # compressed or not, the weights are on disk
  restored = checkpoint.restore(tmp_path / "ckpt")
  assert restored.config == tiny_model.config
  for a, b in zip(jax.tree.leaves(nnx.state(tiny_model)), jax.tree.leaves(nnx.state(restored))):
    np.testing.assert_array_equal(a, b)
  tokens = jnp.array([[1, 2, 3, 4]])
  np.testing.assert_array_equal(tiny_model(tokens)[0], restored(tokens)[0])


def test_restore_with_dtype(tiny_model, tmp_path):
  checkpoint.save(tiny_model, tmp_path / "ckpt")
  restored = checkpoint.restore(tmp_path / "ckpt", dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(nnx.state(restored))} == {jnp.dtype(jnp.bfloat16)}


def test_restore_from_non_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a jaxllm checkpoint"):
    checkpoint.restore(tmp_path)


def _one_line(excinfo) -> str:
  msg = str(excinfo.value)
  assert "\n" not in msg, msg
  return msg


@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory):
  """A complete checkpoint of the tiny model, to copy and damage."""
  path = tmp_path_factory.mktemp("saved") / "ckpt"
  checkpoint.save(tiny_model, path)
  return path


def _copy(saved, tmp_path):
  path = tmp_path / "ckpt"
  shutil.copytree(saved, path)
  return path


def _edit_config(path, edit):
  config = json.loads((path / "config.json").read_text())
  edit(config)
  (path / "config.json").write_text(json.dumps(config, indent=1))


@pytest.mark.parametrize(
  "case, want",
  [
    ("bad_json", r"config.json is not valid JSON \(line 3, column"),
    ("list", r"config.json holds a JSON list, expected an object"),
    ("unknown_key", r"config.json has unknown keys \['rope_scaling'\]"),
    ("missing_key", r"config.json is missing keys \['num_heads'\]"),
    ("wrong_type", r"config.json: 'num_heads' must be a JSON int, got \"6\""),
    ("bool_for_int", r"config.json: 'num_layers' must be a JSON int, got true"),
    ("zero_heads", r"config.json: ModelConfig.num_heads must be a positive int, got 0"),
  ],
)
def test_bad_config_json_is_one_line_naming_the_path(saved, tmp_path, case, want):
  path = _copy(saved, tmp_path)
  if case == "bad_json":
    (path / "config.json").write_text('{\n "name": "tiny",\n oops\n}')
  elif case == "list":
    (path / "config.json").write_text("[1, 2]")
  else:
    edits = {
      "unknown_key": lambda c: c.update(rope_scaling=2.0),
      "missing_key": lambda c: c.pop("num_heads"),
      "wrong_type": lambda c: c.update(num_heads="6"),
      "bool_for_int": lambda c: c.update(num_layers=True),
      "zero_heads": lambda c: c.update(num_heads=0),
    }
    _edit_config(path, edits[case])
  for read in (checkpoint.load_config, checkpoint.restore):
    with pytest.raises(ValueError, match=f"^checkpoint {path}: {want}") as excinfo:
      read(path)
    _one_line(excinfo)


def test_partial_checkpoint_is_one_line_naming_the_path(saved, tmp_path):
  path = _copy(saved, tmp_path)
  shutil.rmtree(path / "params")  # config.json written, params never committed
  for read in (checkpoint.load_config, checkpoint.restore):
    with pytest.raises(ValueError, match=f"^checkpoint {path}: params/ is missing") as excinfo:
      read(path)
    _one_line(excinfo)


def test_half_written_params_are_one_line_naming_the_path(saved, tmp_path):
  path = _copy(saved, tmp_path)
  data = [f for f in (path / "params").rglob("*") if f.is_file() and f.parent.name == "d"]
  assert data
  for f in data:  # every data file cut in half, as by a crash mid-write
    os.truncate(f, f.stat().st_size // 2)
  with pytest.raises(ValueError, match=f"^checkpoint {path}: params/ cannot be read") as excinfo:
    checkpoint.restore(path)
  _one_line(excinfo)


@pytest.mark.parametrize(
  "quant, want",
  [
    ("{oops", r"quant.json cannot be read: Expecting property name"),
    ('{"[\'embed\']": {"keys": ["nope"]}}', r"the params do not match config.json/quant.json"),
  ],
)
def test_bad_quant_json_is_one_line_naming_the_path(saved, tmp_path, quant, want):
  path = _copy(saved, tmp_path)
  (path / "quant.json").write_text(quant)
  with pytest.raises(ValueError, match=f"^checkpoint {path}: {want}") as excinfo:
    checkpoint.restore(path)
  _one_line(excinfo)


def test_missing_directory_is_not_found(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"checkpoint {tmp_path / 'nope'}: no such directory"):
    checkpoint.load_config(tmp_path / "nope")


def test_save_to_a_file_is_one_line_naming_the_path(tiny_model, tmp_path):
  path = tmp_path / "model.bin"
  path.write_bytes(b"not a directory")
  with pytest.raises(ValueError, match=f"^checkpoint {path}: exists and is not a directory$"):
    checkpoint.save(tiny_model, path)
  assert path.read_bytes() == b"not a directory"


def test_perplexity_cli_on_a_partial_checkpoint(saved, tmp_path, capsys):
  path = _copy(saved, tmp_path)
  shutil.rmtree(path / "params")
  text = tmp_path / "text.txt"
  text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
  code = run_perplexity_main(
    f"--checkpoint={path}", f"--text_file={text}", "--context=32", f"--out_dir={tmp_path / 'out'}"
  )
  out, err = capsys.readouterr()
  assert code not in (0, None)
  lines = [line for line in err.splitlines() if line.strip()]
  assert (
    lines[-1]
    == f"error: checkpoint {path}: params/ is missing (an interrupted save, or not a jaxllm checkpoint)"
  )
  assert out == "" and not (tmp_path / "out").exists()
