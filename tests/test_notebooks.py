"""The example notebooks execute top to bottom (at small sizes), so they
cannot rot.

Each notebook that runs an example's quick path runs in that example's test
module (`notebook_runner.run_notebook`, in the test process), which reuses
its loaded weights and compiled programs and checks what the notebook
computed; the quickstart, which runs no example, runs here.
"""

from __future__ import annotations

import pathlib
import re

import notebook_runner

TESTS = pathlib.Path(__file__).resolve().parent
NOTEBOOKS = sorted(p.name for p in notebook_runner.EXAMPLES.glob("*.ipynb"))


def test_notebooks_exist():
  assert {"quickstart.ipynb", "ptq.ipynb", "minilm_ptq.ipynb",
          "smollm.ipynb", "smollm_lora.ipynb"} <= set(NOTEBOOKS)


def test_every_notebook_is_run_by_a_test():
  run = {name for path in TESTS.rglob("test_*.py") for name in re.findall(
      r'run_notebook\("([^"]+)"\)', path.read_text())}
  assert set(NOTEBOOKS) <= run, set(NOTEBOOKS) - run


def test_quickstart_runs():
  namespace = notebook_runner.run_notebook("quickstart.ipynb")
  assert namespace["QUICK"] and namespace["STEPS"] == 5
  # The notebook asserts its own serve == QAT check; its nnx QAT trained.
  assert 0 < float(namespace["loss"]) < float("inf")
