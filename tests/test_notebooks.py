"""Every notebook in colab/ runs top to bottom (first half; see tests/notebook_runner.py)."""

from __future__ import annotations

import pytest
from notebook_runner import ALL, FIRST_HALF, SECOND_HALF, run_notebook


def test_every_notebook_is_in_one_half():
  assert sorted(FIRST_HALF + SECOND_HALF) == ALL


@pytest.mark.parametrize("name", FIRST_HALF)
def test_notebook_runs(name):
  run_notebook(name)
