"""Tests for examples/digits_sensitivity.py: the study, end to end.

The study runs on a freshly initialised DigitsCNN (training is tested in
test_example_digits.py and costs a compile this test does not need): the
accuracies are chance level, but every step (fold, calibrate, sensitivity,
partial quantization to within 1% of float, report, plots) runs as in the
full example, whose numbers are in the README, on two of its layers.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import sys

import jax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] /
                       "examples"))
import digits_cnn  # noqa: E402
import digits_sensitivity  # noqa: E402

LAYERS = ("conv1", "dw2", "pw3", "dw4", "pw5", "head")
STUDIED = r"pw3|head"


@pytest.mark.slow
def test_study_end_to_end(tmp_path, capsys, monkeypatch):
  # Two of the six layers keep the test to a few compiles of the model.
  monkeypatch.setattr(digits_sensitivity, "CONFIGS", {
      name: tuple(dataclasses.replace(rule, path_regex=STUDIED)
                  for rule in rules)
      for name, rules in digits_sensitivity.CONFIGS.items()})
  data = digits_cnn.load_digits()
  model = digits_cnn.DigitsCNN()
  variables = digits_cnn.init_variables(jax.random.key(0), data.x_train[:1],
                                        model=model)
  calib = digits_sensitivity.calibration_batches(data, 256)
  table, partial, report = digits_sensitivity.study(
      model, variables, data, calib, progress=False, plots=tmp_path)
  out = capsys.readouterr().out
  accuracies = re.findall(r"^(\S+).*?: [\d.]+% test accuracy", out,
                          re.MULTILINE)
  assert accuracies == ["float", "W8A8", "W4A4"]
  assert sorted(table.paths) == ["head", "pw3"]
  assert partial.metric >= partial.target
  assert partial.skipped == table.paths[:len(partial.skipped)]
  assert [row.path for row in report.rows] == list(LAYERS)
  for row in report.rows:  # the other layers are listed, in float
    assert (row.weight_spec is not None) == (row.path in ("pw3", "head"))
    assert row.weight_spec is None or row.weight_spec.format == "int4"
  for text in (str(table), str(partial), str(report)):
    assert text in out
  for name in ("digits_histograms.png", "digits_sensitivity.png"):
    assert (tmp_path / name).stat().st_size > 5000
