"""The example notebooks execute top to bottom (at small sizes), so they cannot rot."""

from __future__ import annotations

import os
import pathlib

import nbclient
import nbformat
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = sorted(p.name for p in EXAMPLES.glob("*.ipynb"))


def test_notebooks_exist():
  assert {"quickstart.ipynb", "ptq.ipynb", "minilm_ptq.ipynb",
          "smollm.ipynb", "smollm_lora.ipynb"} <= set(NOTEBOOKS)


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, monkeypatch):
  monkeypatch.setenv("JAXQ_NOTEBOOK_QUICK", "1")
  # The kernel must not inherit the suite's 8 fake host devices, only its
  # compile-time flags (conftest.py).
  flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
           if not flag.startswith("--xla_force_host_platform_device_count")]
  monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
  notebook = nbformat.read(EXAMPLES / name, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=600,
                                   kernel_name="python3",
                                   resources={"metadata": {"path": str(EXAMPLES)}})
  client.execute()  # raises CellExecutionError, with the cell, on failure
  errors = [o for c in notebook.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors
