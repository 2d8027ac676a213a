"""Runs an example notebook in the test process, as Jupyter's kernel would.

The notebooks (examples/*.ipynb) run their examples' quick paths: the same
models, at the sizes the examples' own tests use. Executed here, cell by
cell in IPython's shell (the shell ipykernel runs, magics and ``display``
included), they share the test process's loaded weights and compiled
programs instead of paying a kernel's start, imports, weight loading and
tracing again; and the example's test module can assert on what the
notebook computed (its namespace) rather than compute it a second time.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
from typing import Any

import nbformat
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


class NotebookError(AssertionError):
  """A notebook cell raised; says which cell."""


class _Shell(InteractiveShell):
  """IPython's shell as a kernel runs it: ``%matplotlib inline`` needs no
  GUI event loop (ipykernel's shell does the same)."""

  def enable_gui(self, gui: str | None = None) -> None:
    del gui  # inline figures: nothing to start


def _shell() -> InteractiveShell:
  """The (process-wide) shell, without a history file or colours."""
  config = Config()
  config.HistoryManager.enabled = False
  config.InteractiveShell.colors = "NoColor"
  return _Shell.instance(config=config)


def run_notebook(name: str) -> dict[str, Any]:
  """Runs examples/NAME top to bottom in quick mode (``JAXQ_NOTEBOOK_QUICK``
  set, examples/ the working directory, as the notebooks expect) and
  returns its namespace. Raises `NotebookError` naming the first cell that
  fails."""
  notebook = nbformat.read(EXAMPLES / name, as_version=4)
  shell = _shell()
  shell.reset(new_session=False)
  import matplotlib  # pylint: disable=import-outside-toplevel
  backend = matplotlib.get_backend()
  quick = os.environ.get("JAXQ_NOTEBOOK_QUICK")
  os.environ["JAXQ_NOTEBOOK_QUICK"] = "1"
  added = str(EXAMPLES) not in sys.path
  if added:
    sys.path.insert(0, str(EXAMPLES))
  try:
    with contextlib.chdir(EXAMPLES):
      for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
          continue
        result = shell.run_cell(cell.source, store_history=False)
        if not result.success:
          error = result.error_in_exec or result.error_before_exec
          raise NotebookError(
              f"{name}, code cell {index}:\n{cell.source}") from error
    return dict(shell.user_ns)
  finally:
    shell.reset(new_session=False)  # drops the notebook's arrays
    if added:
      sys.path.remove(str(EXAMPLES))
    if quick is None:
      del os.environ["JAXQ_NOTEBOOK_QUICK"]
    else:
      os.environ["JAXQ_NOTEBOOK_QUICK"] = quick
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    plt.close("all")
    plt.switch_backend(backend)  # %matplotlib inline switched it
