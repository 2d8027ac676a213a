"""The example notebooks execute top to bottom (at small sizes), so they cannot rot."""

from __future__ import annotations

import pathlib

import nbclient
import nbformat
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
NOTEBOOKS = sorted(p.name for p in EXAMPLES.glob("*.ipynb"))


def test_notebooks_exist():
  assert {"quickstart.ipynb", "ptq.ipynb", "minilm_ptq.ipynb",
          "smollm.ipynb", "smollm_lora.ipynb"} <= set(NOTEBOOKS)


# After the other tests: the kernels inherit the suite's XLA flags and
# compilation cache (conftest.py), so the programs the examples' own tests
# compiled (the same models at the same quick sizes) are loaded, not compiled
# again. The flags are part of the cache key: the kernel keeps all of them,
# the 8 host devices included (the notebooks print ``jax.devices()``).
@pytest.mark.reuses_compiled
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, monkeypatch):
  monkeypatch.setenv("JAXQ_NOTEBOOK_QUICK", "1")
  notebook = nbformat.read(EXAMPLES / name, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=600,
                                   kernel_name="python3",
                                   resources={"metadata": {"path": str(EXAMPLES)}})
  client.execute()  # raises CellExecutionError, with the cell, on failure
  errors = [o for c in notebook.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors
