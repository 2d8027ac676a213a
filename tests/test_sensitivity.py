"""Tests for jaxq.sensitivity and jaxq.partial_quantize.

A three-layer MLP whose middle kernel holds one huge outlier weight fed by a
dead unit: quantized per tensor, that kernel's other weights all round to a
few levels, so it is the fragile layer. Metrics, SQNR and MSE are checked against an independent
numpy forward pass with numpy fake-quantization.
"""

from __future__ import annotations

import functools
import math
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

import jaxq
from jaxq import PerTensor, PerToken, QuantSpec
from jaxq.sensitivity import SensitivityTable
from jaxq.sensitivity import metric_target

W8_T = QuantSpec("int8", PerTensor())
WEIGHT_ONLY = (jaxq.Rule(r".*", weight=W8_T),)
LAYERS = ("fc1", "fc2", "fc3")
OUTLIER = 40.0


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, name="fc1")(x))
    x = nn.relu(nn.Dense(16, name="fc2")(x))
    return nn.Dense(4, name="fc3")(x)


def fake_quant_np(w: np.ndarray, amax: np.ndarray | float) -> np.ndarray:
  """Symmetric narrow-range int8 with scale amax / 127 (half-to-even)."""
  scale = np.maximum(np.asarray(amax, np.float64), 1e-30) / 127.0
  return np.clip(np.round(w / scale), -127, 127) * scale


def forward_np(params, x, quantized=(), act_amax=None):
  """The MLP in float64 numpy; ``quantized`` layers get int8 per-tensor
  weights (and inputs, when ``act_amax`` gives their static ranges).
  Returns (output, {layer: output of that layer})."""
  h = np.asarray(x, np.float64)
  outputs = {}
  for i, name in enumerate(LAYERS):
    w = np.asarray(params[name]["kernel"], np.float64)
    b = np.asarray(params[name]["bias"], np.float64)
    if name in quantized:
      w = fake_quant_np(w, np.abs(w).max())
      if act_amax is not None:
        h = fake_quant_np(h, act_amax[name])
    h = h @ w + b
    outputs[name] = h
    if i < len(LAYERS) - 1:
      h = np.maximum(h, 0.0)
  return h, outputs


@pytest.fixture(scope="module")
def setup():
  model = MLP()
  x = jax.random.normal(jax.random.key(0), (96, 8))
  variables = model.init(jax.random.key(1), x)
  params = jax.tree.map(np.array, variables["params"])  # writable copies
  # fc1's unit 3 is dead (zero weights, bias -1e3: relu gives 0), so the
  # outlier it feeds in fc2 leaves the float model's outputs as they are but
  # sets fc2's per-tensor scale: its other weights round to a few levels.
  params["fc1"]["kernel"][:, 3] = 0.0
  params["fc1"]["bias"][3] = -1e3
  params["fc2"]["kernel"][3, 5] = OUTLIER
  variables = {"params": params}
  calib = [x[:48], x[48:]]
  x_eval = np.asarray(jax.random.normal(jax.random.key(2), (64, 8)))
  reference, _ = forward_np(params, x_eval)

  def relative_error(y):
    return float(np.sum((np.asarray(y, np.float64) - reference) ** 2)
                 / np.sum(reference ** 2))

  def eval_fn(apply_fn, v):  # Higher is better: minus the relative error.
    return -relative_error(apply_fn(v, x_eval))

  return model, variables, calib, x_eval, relative_error, eval_fn


@pytest.fixture(scope="module")
def table(setup) -> SensitivityTable:
  model, variables, calib, _, _, eval_fn = setup
  return jaxq.sensitivity(model, variables, WEIGHT_ONLY, eval_fn, calib,
                          progress=False)


def test_fragile_layer_ranks_first(table):
  assert table.paths[0] == "fc2"
  assert sorted(table.paths) == list(LAYERS)
  drops = [row.drop for row in table.rows]
  assert drops == sorted(drops, reverse=True)
  # The outlier layer is far worse than the others, in metric and SQNR.
  assert table.rows[0].drop > 50 * max(r.drop for r in table.rows[1:])
  assert table.rows[0].sqnr_db < min(r.sqnr_db for r in table.rows[1:]) - 10


def test_rows_match_numpy_single_layer_quantization(setup, table):
  model, variables, calib, x_eval, relative_error, _ = setup
  params = variables["params"]
  assert table.float_metric == pytest.approx(0.0, abs=1e-10)
  x_calib = np.concatenate([np.asarray(b) for b in calib])
  _, float_outputs = forward_np(params, x_calib)
  for row in table.rows:
    y, _ = forward_np(params, x_eval, quantized=(row.path,))
    np.testing.assert_allclose(row.metric, -relative_error(y), rtol=1e-3,
                               atol=1e-9)
    np.testing.assert_allclose(row.drop, table.float_metric - row.metric,
                               rtol=1e-12)
    _, outputs = forward_np(params, x_calib, quantized=(row.path,))
    noise = np.sum((outputs[row.path] - float_outputs[row.path]) ** 2)
    signal = np.sum(float_outputs[row.path] ** 2)
    np.testing.assert_allclose(row.sqnr_db, 10 * np.log10(signal / noise),
                               atol=0.02)
    np.testing.assert_allclose(row.mse, noise / outputs[row.path].size,
                               rtol=5e-3)
    assert row.module_type == "Dense"


def test_static_act_ranges_come_from_calibration(setup, capsys):
  model, variables, calib, x_eval, relative_error, eval_fn = setup
  static = QuantSpec("int8", PerTensor(), dynamic=False)
  rules = (jaxq.Rule(r"fc1", weight=W8_T, act=static),)
  table = jaxq.sensitivity(model, variables, rules, eval_fn, calib,
                           progress=False)
  assert capsys.readouterr().err == ""  # progress=False is silent.
  # fc1's input is the data itself: its static range is max |x| over calib.
  amax = {"fc1": np.abs(np.concatenate([np.asarray(b) for b in calib])).max()}
  y, _ = forward_np(variables["params"], x_eval, ("fc1",), act_amax=amax)
  (row,) = table.rows
  np.testing.assert_allclose(row.metric, -relative_error(y), rtol=1e-3)


def test_lower_is_better_ranks_the_same(setup, table):
  model, variables, calib, _, _, eval_fn = setup
  loss_table = jaxq.sensitivity(
      model, variables, WEIGHT_ONLY, lambda f, v: -eval_fn(f, v), calib,
      higher_is_better=False, progress=False)
  assert loss_table.paths == table.paths
  for loss_row, row in zip(loss_table.rows, table.rows):
    np.testing.assert_allclose(loss_row.drop, row.drop, rtol=1e-6)
  assert "lower is better" in str(loss_table)


def test_table_str_lists_every_layer(table):
  text = str(table)
  assert all(path in text for path in LAYERS)
  assert text.index("fc2") < text.index("fc1")


def test_partial_quantize_skips_exactly_the_fragile_layer(setup, table):
  model, variables, calib, _, _, eval_fn = setup
  result = jaxq.partial_quantize(model, variables, WEIGHT_ONLY, eval_fn,
                                 calib, max_drop=1e-2, relative=False,
                                 table=table, progress=False)
  assert result.skipped == ("fc2",)
  assert result.target == pytest.approx(-1e-2)
  assert result.history[0] < result.target <= result.history[1]
  assert result.metric == result.history[-1]
  assert result.rules[0] == jaxq.Rule(re.escape("fc2"), skip=True)
  assert result.rules[1:] == WEIGHT_ONLY
  # The returned rules reproduce the metric.
  qmodel = jaxq.quantize_model(model, result.rules, mode="qat")
  assert eval_fn(jax.jit(qmodel.apply), variables) == pytest.approx(
      result.metric, rel=1e-6)
  assert "fc2" in str(result)


def test_partial_quantize_meets_a_loose_target_without_skipping(setup, table):
  model, variables, calib, _, _, eval_fn = setup
  result = jaxq.partial_quantize(model, variables, WEIGHT_ONLY, eval_fn,
                                 calib, max_drop=10.0, relative=False,
                                 table=table, progress=False)
  assert result.skipped == ()
  assert result.rules == WEIGHT_ONLY


def test_partial_quantize_reports_when_only_float_meets_the_target(setup,
                                                                    table):
  model, variables, calib, _, _, eval_fn = setup
  with pytest.warns(UserWarning, match="every quantized layer"):
    result = jaxq.partial_quantize(model, variables, WEIGHT_ONLY, eval_fn,
                                   calib, max_drop=0.0, table=table,
                                   progress=False)
  assert result.skipped == table.paths
  assert result.metric == table.float_metric
  with pytest.raises(ValueError, match=r"not met with up to 1 of 3 layers"):
    jaxq.partial_quantize(model, variables, WEIGHT_ONLY, eval_fn, calib,
                          max_drop=0.0, table=table, max_skipped=1,
                          progress=False)


def test_metric_target():
  assert metric_target(0.8, 0.01, True, True) == pytest.approx(0.792)
  assert metric_target(2.0, 0.5, False, False) == pytest.approx(2.5)
  with pytest.raises(ValueError, match="max_drop must be >= 0"):
    metric_target(1.0, -0.1, True, True)


def test_errors(setup, table):
  model, variables, calib, _, _, eval_fn = setup
  with pytest.raises(ValueError, match="no batches"):
    jaxq.sensitivity(model, variables, WEIGHT_ONLY, eval_fn, [])
  with pytest.raises(ValueError, match="quantize none"):
    jaxq.sensitivity(model, variables, (jaxq.Rule(r".*", skip=True),),
                     eval_fn, calib)
  with pytest.raises(ValueError, match="scalar float"):
    jaxq.sensitivity(model, variables, WEIGHT_ONLY,
                     lambda f, v: f(v, calib[0]), calib, progress=False)
  with pytest.raises(ValueError, match="flax.linen or flax.nnx Module, got "
                     "function"):
    jaxq.sensitivity(eval_fn, variables, WEIGHT_ONLY, eval_fn, calib)
  with pytest.raises(ValueError, match=r"variables \{'params': ...\}, got "
                     r"collections \['batch_stats'\]"):
    jaxq.sensitivity(model, {"batch_stats": {}}, WEIGHT_ONLY, eval_fn, calib)
  with pytest.raises(ValueError, match="float model and the rules"):
    jaxq.sensitivity(jaxq.quantize_model(model, WEIGHT_ONLY), variables,
                     WEIGHT_ONLY, eval_fn, calib)
  with pytest.raises(ValueError, match="mode must be"):
    jaxq.sensitivity(model, variables, WEIGHT_ONLY, eval_fn, calib,
                     mode="calibrate")
  with pytest.raises(ValueError, match="higher_is_better"):
    jaxq.partial_quantize(model, variables, WEIGHT_ONLY, eval_fn, calib,
                          table=table, higher_is_better=False)


def test_serve_mode_and_dynamic_acts_agree_with_qat(setup):
  model, variables, calib, _, _, eval_fn = setup
  rules = (jaxq.Rule(r"fc3", weight=W8_T, act=QuantSpec("int8", PerToken())),)
  qat = jaxq.sensitivity(model, variables, rules, eval_fn, calib,
                         progress=False)
  serve = jaxq.sensitivity(model, variables, rules, eval_fn, calib,
                           mode="serve", progress=False)
  assert qat.paths == serve.paths == ("fc3",)
  np.testing.assert_allclose(qat.rows[0].metric, serve.rows[0].metric,
                             rtol=1e-3)
  assert math.isclose(qat.rows[0].sqnr_db, serve.rows[0].sqnr_db,
                      abs_tol=0.05)


class SharedAndEinsum(nn.Module):
  """A Dense called twice (shared weights), then an Einsum whose equation
  comes as a call argument (a static leaf the capture must replay)."""

  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(8, name="shared")
    h = shared(nn.relu(shared(x)))
    return nn.Einsum((8, 4), name="ein")(h, einsum_str="bi,ij->bj")


@functools.lru_cache(maxsize=None)
def shared_and_einsum():
  """``(x, variables, eval_fn, table)``: `SharedAndEinsum`'s weight-only
  table on ``x``, computed once; test_sensitivity_nnx.py checks its nnx
  twin's table against this one (same ``eval_fn``)."""
  model = SharedAndEinsum()
  x = jax.random.normal(jax.random.key(3), (16, 8))
  variables = model.init(jax.random.key(4), x)

  def eval_fn(apply_fn, v):
    return float(apply_fn(v, x).sum())

  table = jaxq.sensitivity(model, variables, WEIGHT_ONLY, eval_fn, [x],
                           progress=False)
  return x, variables, eval_fn, table


def test_output_sqnr_of_a_shared_layer_and_a_call_argument():
  x, variables, _, table = shared_and_einsum()
  rows = {r.path: r for r in table.rows}
  assert set(rows) == {"shared", "ein"}
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  w, b = p["shared"]["kernel"], p["shared"]["bias"]
  wq = fake_quant_np(w, np.abs(w).max())
  x = np.asarray(x, np.float64)
  h1 = np.maximum(x @ w + b, 0.0)  # the second call's float input
  y = np.concatenate([x @ w + b, h1 @ w + b])
  y_q = np.concatenate([x @ wq + b, h1 @ wq + b])  # each call on float input
  np.testing.assert_allclose(
      rows["shared"].sqnr_db,
      10 * np.log10(np.sum(y ** 2) / np.sum((y_q - y) ** 2)), atol=0.02)
  h = h1 @ w + b
  k = p["ein"]["kernel"]
  y, y_q = h @ k + p["ein"]["bias"], h @ fake_quant_np(k, np.abs(k).max())
  y_q = y_q + p["ein"]["bias"]
  np.testing.assert_allclose(
      rows["ein"].sqnr_db,
      10 * np.log10(np.sum(y ** 2) / np.sum((y_q - y) ** 2)), atol=0.02)
