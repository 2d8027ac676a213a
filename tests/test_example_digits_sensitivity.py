"""Tests for examples/digits_sensitivity.py: its quick run, end to end.

Two training epochs, 256 calibration images: the float model is weaker than
the full run's, but the pipeline (fold, calibrate, sensitivity, partial
quantization to within 1% of float, report, plots) is the same.
"""

from __future__ import annotations

import pathlib
import re
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] /
                       "examples"))
import digits_sensitivity  # noqa: E402

LAYERS = ("conv1", "dw2", "pw3", "dw4", "pw5", "head")


@pytest.mark.slow
def test_quick_run_end_to_end(tmp_path, capsys):
  digits_sensitivity.main(["--quick", "--no-progress", "--plots",
                           str(tmp_path)])
  out = capsys.readouterr().out
  accuracies = dict(re.findall(r"^(\S+).*?: ([\d.]+)% test accuracy", out,
                               re.MULTILINE))
  assert set(accuracies) == {"float", "W8A8", "W4A4"}
  assert float(accuracies["W8A8"]) > float(accuracies["float"]) - 2.0
  study = out[out.index("sensitivity of W4A4"):out.index("partial")]
  assert all(layer in study for layer in LAYERS)
  target = re.search(r"target ([\d.]+)", out)
  reached = re.search(r"layers left in float, metric ([\d.]+)", out)
  assert float(reached.group(1)) >= float(target.group(1))
  assert "per-layer report of W4A4" in out and "total" in out
  for name in ("digits_histograms.png", "digits_sensitivity.png"):
    assert (tmp_path / name).stat().st_size > 5000
