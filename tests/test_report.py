"""Tests for jaxq.report and its plots.

A tiny embedding + MLP model with three kinds of layers: a weight-only
embedding (one scale per row), a Dense with a static per-tensor input range
and a Dense with dynamic per-token inputs. Every number in the report is
recomputed here in numpy from the SQNR formula.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

import jaxq
from jaxq import PerChannel, PerTensor, PerToken, QuantSpec
from jaxq.sensitivity import LayerSensitivity
from jaxq.sensitivity import SensitivityTable

VOCAB, SEQ, D = 12, 5, 8
EMBED = QuantSpec("int8", PerChannel(axis=0))
W8 = QuantSpec("int8", PerChannel(axis=-1))
A8_STATIC = QuantSpec("int8", PerTensor(), dynamic=False)
A8_TOKEN = QuantSpec("int8", PerToken())
RULES = (jaxq.Rule(r"embed", weight=EMBED),
         jaxq.Rule(r"fc1", weight=W8, act=A8_STATIC),
         jaxq.Rule(r"fc2", weight=W8, act=A8_TOKEN))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Tiny(nn.Module):

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(VOCAB, D, name="embed")(ids)
    x = nn.relu(nn.Dense(16, name="fc1")(x))
    return nn.Dense(4, name="fc2")(x)


def sqnr_np(x: np.ndarray, x_hat: np.ndarray) -> float:
  x, x_hat = np.asarray(x, np.float64), np.asarray(x_hat, np.float64)
  return 10 * np.log10(np.sum(x ** 2) / np.sum((x - x_hat) ** 2))


def fake_quant_np(x: np.ndarray, amax: np.ndarray) -> np.ndarray:
  scale = np.asarray(amax, np.float64) / 127.0
  return np.clip(np.round(x / scale), -127, 127) * scale


@pytest.fixture(scope="module")
def setup():
  model = Tiny()
  batches = [jax.random.randint(jax.random.key(i), (6, SEQ), 0, VOCAB)
             for i in range(2)]
  variables = model.init(jax.random.key(7), batches[0])
  rep = jaxq.report(model, variables, batches, rules=RULES)
  return model, variables, batches, rep


def layer_inputs(variables, batches):
  """fc1's and fc2's float inputs for each batch, in numpy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  fc1, fc2 = [], []
  for ids in batches:
    x = p["embed"]["embedding"][np.asarray(ids)]
    fc1.append(x)
    fc2.append(np.maximum(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0.0))
  return fc1, fc2


def test_weight_numbers_match_numpy(setup):
  _, variables, _, rep = setup
  rows = {r.path: r for r in rep.rows}
  assert list(rows) == ["embed", "fc1", "fc2"]
  for path, name, axis in (("embed", "embedding", 1), ("fc1", "kernel", 0),
                           ("fc2", "kernel", 0)):
    w = np.asarray(variables["params"][path][name], np.float64)
    amax = np.abs(w).max(axis=axis, keepdims=True)  # rows / output columns
    np.testing.assert_allclose(rows[path].weight_sqnr_db,
                               sqnr_np(w, fake_quant_np(w, amax)), atol=1e-3)
    assert rows[path].float_bytes == w.size * 4
    # int8 values and one float32 scale per row / column.
    assert rows[path].quantized_bytes == w.size + amax.size * 4
  assert rep.float_bytes == sum(r.float_bytes for r in rep.rows)
  assert rows["embed"].weight_spec == EMBED
  assert rows["embed"].act_sqnr_db is None and rows["embed"].act_spec is None


def test_activation_numbers_match_numpy(setup):
  _, variables, batches, rep = setup
  rows = {r.path: r for r in rep.rows}
  fc1, fc2 = layer_inputs(variables, batches)
  # fc1: one static range over all calibration batches.
  amax = max(np.abs(x).max() for x in fc1)
  assert rows["fc1"].act_amax == pytest.approx(amax, rel=1e-6)
  assert rows["fc1"].input_absmax == pytest.approx(amax, rel=1e-6)
  x = np.concatenate(fc1)
  np.testing.assert_allclose(rows["fc1"].act_sqnr_db,
                             sqnr_np(x, fake_quant_np(x, amax)), atol=1e-3)
  # fc2: dynamic per-token ranges, no calibrated range.
  x = np.concatenate(fc2)
  token_amax = np.abs(x).max(axis=-1, keepdims=True)
  np.testing.assert_allclose(rows["fc2"].act_sqnr_db,
                             sqnr_np(x, fake_quant_np(x, token_amax)),
                             atol=1e-3)
  assert rows["fc2"].act_amax is None
  assert rows["fc2"].input_absmax == pytest.approx(np.abs(x).max(), rel=1e-6)


def test_histogram_ranges(setup):
  _, variables, batches, rep = setup
  assert sorted(rep.histograms) == ["fc1", "fc2"]
  _, fc2 = layer_inputs(variables, batches)
  x = np.abs(np.concatenate(fc2)).ravel()
  hist = rep.histograms["fc2"]
  assert hist.counts.sum() == x.size
  assert hist.format == "int8"
  assert set(hist.ranges) == {"max", "percentile(99.99)", "entropy", "mse"}
  assert hist.ranges["max"] == pytest.approx(x.max(), rel=1e-6)
  # The histogram percentile is within half a bin of numpy's.
  assert abs(hist.ranges["percentile(99.99)"] - np.percentile(x, 99.99)
             ) <= 0.5 * hist.bin_width + 1e-6
  for method in ("entropy", "mse"):
    assert 0.0 < hist.ranges[method] <= x.max() + hist.bin_width


def test_str_and_dicts(setup):
  _, _, _, rep = setup
  text = str(rep)
  for needle in ("embed", "fc1", "fc2", "int8 C(0)", "int8 T static",
                 "int8 K", "total", str(rep.quantized_bytes)):
    assert needle in text
  dicts = rep.as_dicts()
  assert [d["path"] for d in dicts] == ["embed", "fc1", "fc2"]
  assert dicts[1]["act_spec"] == "int8 T static"


def test_quantized_model_and_given_stats_give_the_same_report(setup):
  model, variables, batches, rep = setup
  cal = jaxq.quantize_model(model, RULES, mode="calibrate")
  _, state = cal.apply(variables, batches[0], mutable=["quant_stats"])
  _, state = cal.apply({**variables, **state}, batches[1],
                       mutable=["quant_stats"])
  again = jaxq.report(jaxq.quantize_model(model, RULES), variables, batches,
                      stats=state["quant_stats"])
  for a, b in zip(rep.rows, again.rows):
    assert a == b


def test_plots_are_written(setup, tmp_path):
  _, _, _, rep = setup
  hist_png = jaxq.report.plot_histograms(rep, tmp_path / "hist.png")
  table = SensitivityTable(
      rows=(LayerSensitivity("fc1", "Dense", 0.5, 0.3, 12.0, 0.1),
            LayerSensitivity("fc2", "Dense", 0.7, 0.1, float("inf"), 0.0)),
      float_metric=0.8)
  sens_png = jaxq.report.plot_sensitivity(table, tmp_path / "sens.png")
  for path in (hist_png, sens_png):
    data = open(path, "rb").read()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000


def test_errors(setup, tmp_path):
  model, variables, batches, rep = setup
  with pytest.raises(ValueError, match="pass rules="):
    jaxq.report(model, variables, batches)
  with pytest.raises(ValueError, match="carries its rules"):
    jaxq.report(jaxq.quantize_model(model, RULES), variables, batches,
                rules=RULES)
  with pytest.raises(ValueError, match="no batches"):
    jaxq.report(model, variables, [], rules=RULES)
  with pytest.raises(ValueError, match="no histogram for"):
    jaxq.report.plot_histograms(rep, tmp_path / "x.png", layers=["embed"])
  with pytest.raises(ValueError, match="no rows"):
    jaxq.report.plot_sensitivity(SensitivityTable((), 0.0), tmp_path / "y.png")
