"""Every notebook in colab/ runs top to bottom (second half; see tests/notebook_runner.py)."""

from __future__ import annotations

import pytest
from notebook_runner import SECOND_HALF, run_notebook


@pytest.mark.parametrize("name", SECOND_HALF)
def test_notebook_runs(name):
  run_notebook(name)
