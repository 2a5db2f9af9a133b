"""Running a notebook of colab/ top to bottom (on the real model, on CPU), for the two
notebook test files: `make test`'s two processes take a file each, and xdist runs files
with few tests last, so the two halves run side by side at the end of the suite."""

from __future__ import annotations

import pathlib

import nbformat
from nbclient import NotebookClient

COLAB = pathlib.Path(__file__).parents[1] / "colab"
ALL = sorted(p.stem for p in COLAB.glob("*.ipynb"))
# About 320 s and 260 s of CPU on this machine.
FIRST_HALF = ("kv_cache_compression", "quickstart", "sharding")
SECOND_HALF = ("block_attention", "quantization", "speculative_decoding")


def run_notebook(name: str) -> None:
  """Executes colab/<name>.ipynb in a fresh kernel; fails on any cell's error."""
  path = COLAB / f"{name}.ipynb"
  nb = nbformat.read(path, as_version=4)
  NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(COLAB)}}
  ).execute()
  errors = [
    o
    for c in nb.cells
    if c.cell_type == "code"
    for o in c.get("outputs", [])
    if o.output_type == "error"
  ]
  assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
