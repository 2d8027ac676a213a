"""End to end: `examples/demo.py --quick` into a temporary out directory.

One run (2 training epochs, 256 calibration images) checks that every
step leaves its row in the summary, that the accuracies are sane, that the
model served from the reloaded checkpoint scores exactly what the QAT model
scores, and that the files exist: the float cache (a second call loads it
instead of training), the checkpoint and the two PNG plots.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

import jaxq

sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "examples"))
import demo  # noqa: E402
import digits_cnn  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
  argv = ["--quick", "--no-progress", "--out", str(tmp_path)]
  summary = demo.main(argv)
  printed = capsys.readouterr().out
  rows = {row.setting: row for row in summary.rows}

  # Every step's rows, in order: float, folded, the sweep, partial,
  # auto_quantize, QAT.
  settings = [row.setting for row in summary.rows]
  assert settings[0] == "float32 (trained, 2 epochs)"
  assert settings[1] == "float32, BatchNorm folded"
  sweep = [f"PTQ {name}, {method}" for name in demo.A8_SWEEP
           for method in demo.METHODS]
  weight_only = [f"PTQ {name} (weight-only)" for name in demo.WEIGHT_ONLY]
  assert settings[2:2 + len(sweep) + len(weight_only)] == sweep + weight_only
  assert settings[-3].startswith(f"partial W4A8 C, {demo.STUDY_METHOD}: ")
  assert settings[-2].startswith("auto_quantize within 6 bits/weight: ")
  assert settings[-1].startswith("QAT W4A8 C")
  assert len(settings) == 2 + len(sweep) + len(weight_only) + 3
  for setting in settings:
    assert setting in printed

  # Sane numbers: a trained float model; folding is exact enough to keep
  # every prediction's accuracy; 8-bit PTQ stays close to float.
  float_accuracy = summary.rows[0].accuracy
  assert float_accuracy > 0.8
  assert rows["float32, BatchNorm folded"].accuracy == pytest.approx(
      float_accuracy, abs=1 / 360 + 1e-6)
  for method in demo.METHODS:
    assert rows[f"PTQ W8A8 C, {method}"].accuracy > float_accuracy - 0.03
  for row in summary.rows:
    assert 0.0 <= row.accuracy <= 1.0 and row.seconds >= 0.0
  auto = summary.rows[-2]
  assert auto.accuracy > float_accuracy - 0.03
  assert auto.model_bytes < summary.rows[1].model_bytes
  # Bytes: int8 about a quarter of float32 (plus scales, biases, ranges),
  # int4 less than int8.
  assert rows["PTQ W8A8 C, max"].model_bytes < 0.5 * summary.rows[0].model_bytes
  assert (rows["PTQ W4A8 C, max"].model_bytes <
          rows["PTQ W8A8 C, max"].model_bytes)

  # Served from the reloaded checkpoint == the QAT model, bit for bit.
  served = summary.served
  assert served.accuracy == summary.qat_accuracy
  assert served.bit_exact
  assert summary.rows[-1].accuracy == served.accuracy

  # The files: checkpoint (loads, int4 weights, the rules), plots, cache.
  assert served.path == tmp_path / "digits_w4a8_qat.safetensors"
  assert served.disk_bytes == served.path.stat().st_size
  loaded = jaxq.load(served.path)
  assert loaded.rules == demo.W4A8
  kernel = loaded.variables["params"]["pw3"]["kernel"]
  assert isinstance(kernel, jaxq.QArray)
  assert np.dtype(kernel.values.dtype).name == "int4"
  assert "quant_ranges" in loaded.variables
  assert sorted(pathlib.Path(p).name for p in summary.plots) == [
      "histograms.png", "sensitivity.png"]
  for plot in summary.plots:
    assert pathlib.Path(plot).read_bytes()[:8] == PNG_MAGIC
    assert pathlib.Path(plot).stat().st_size > 10_000

  run, _, _ = demo.parse_settings(argv)
  data = digits_cnn.load_digits(seed=run.train.seed)
  _, cached = demo.train_or_load(tmp_path, data, run)
  assert cached.setting == ("float32 (loaded from "
                            "digits_float_e2_s0.safetensors)")
  assert cached.accuracy == float_accuracy
