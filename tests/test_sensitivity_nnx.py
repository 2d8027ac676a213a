"""Tests for jaxq.sensitivity, jaxq.partial_quantize and jaxq.report on nnx.

Each nnx model here is the twin of a linen model of tests/test_sensitivity.py
or tests/test_report.py, with the linen weights copied into its layers; the
linen tests check linen against numpy references, so an nnx result equal to
the linen one (same layer order, metrics, SQNR, MSE, choices, report rows)
is checked against them too. The ``eval_fn`` is the very same function for
both APIs: ``apply_fn(variables, x)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq
from jaxq import PerTensor, QuantSpec
from jaxq.flax import QuantStat

from test_report import D, RULES as REPORT_RULES, SEQ, VOCAB, Tiny
from test_sensitivity import (LAYERS, MLP, OUTLIER, W8_T, WEIGHT_ONLY,
                              fake_quant_np, shared_and_einsum)

A8_STATIC = QuantSpec("int8", PerTensor(), dynamic=False)
STATIC = (jaxq.Rule(r"fc[12]", weight=W8_T, act=A8_STATIC),
          jaxq.Rule(r"fc3", weight=W8_T,
                    act=dataclasses.replace(A8_STATIC, calibration="percentile",
                                            percentile=99.0)))
LINEN_TYPES = {"Linear": "Dense", "Einsum": "Einsum", "Embed": "Embed"}


class NnxMLP(nnx.Module):
  """`test_sensitivity.MLP` in nnx."""

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(8, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 16, rngs=rngs)
    self.fc3 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.fc1(x))
    x = nnx.relu(self.fc2(x))
    return self.fc3(x)


class NnxSharedAndEinsum(nnx.Module):
  """`test_sensitivity.SharedAndEinsum` in nnx: a Linear called twice, then
  an Einsum whose equation comes as a call argument."""

  def __init__(self, rngs: nnx.Rngs):
    self.shared = nnx.Linear(8, 8, rngs=rngs)
    self.ein = nnx.Einsum("bi,ij->bj", (8, 4), (4,), rngs=rngs)

  def __call__(self, x):
    h = self.shared(nnx.relu(self.shared(x)))
    return self.ein(h, einsum_str="bi,ij->bj")


class NnxTiny(nnx.Module):
  """`test_report.Tiny` in nnx."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.fc1 = nnx.Linear(D, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, ids):
    return self.fc2(nnx.relu(self.fc1(self.embed(ids))))


def state_of(model: nnx.Module, params) -> nnx.State:
  """``model``'s state with the linen ``params`` copied into its layers."""
  model = nnx.clone(model)
  for name, leaves in params.items():
    for key, value in leaves.items():
      getattr(getattr(model, name), key).set_value(jnp.asarray(value))
  return nnx.state(model)


def assert_tables_equal(nnx_table, linen_table):
  assert nnx_table.paths == linen_table.paths
  np.testing.assert_allclose(nnx_table.float_metric, linen_table.float_metric,
                             rtol=1e-5, atol=1e-9)
  for a, b in zip(nnx_table.rows, linen_table.rows):
    assert LINEN_TYPES[a.module_type] == b.module_type
    np.testing.assert_allclose(
        [a.metric, a.drop, a.sqnr_db, a.mse],
        [b.metric, b.drop, b.sqnr_db, b.mse], rtol=1e-4, atol=1e-9)


@pytest.fixture(scope="module")
def mlp():
  linen = MLP()
  x = jax.random.normal(jax.random.key(0), (96, 8))
  params = jax.tree.map(np.array, linen.init(jax.random.key(1), x)["params"])
  # The fragile layer of test_sensitivity: a dead unit feeding an outlier.
  params["fc1"]["kernel"][:, 3] = 0.0
  params["fc1"]["bias"][3] = -1e3
  params["fc2"]["kernel"][3, 5] = OUTLIER
  variables = {"params": params}
  calib = [x[:48], x[48:]]
  x_eval = jax.random.normal(jax.random.key(2), (64, 8))
  reference = np.asarray(linen.apply(variables, x_eval), np.float64)

  def eval_fn(apply_fn, v):  # The same function for linen and nnx.
    y = np.asarray(apply_fn(v, x_eval), np.float64)
    return -float(np.sum((y - reference) ** 2) / np.sum(reference ** 2))

  # A fresh nnx model (other weights); the state carries the linen ones.
  model = NnxMLP(nnx.Rngs(5))
  return linen, variables, model, state_of(model, params), calib, eval_fn


@pytest.fixture(scope="module")
def spied(mlp):
  """``(table, seen, kernel)``: the nnx weight-only table, computed once
  with an ``eval_fn`` that records the variables it is given (``seen``),
  and the model's fc2 kernel before the run. It is also the nnx
  weight-only table of `tables`."""
  _, _, model, state, calib, eval_fn = mlp
  kernel = np.array(model.fc2.kernel.get_value())
  seen = []

  def spy(apply_fn, v):
    seen.append(v)
    return eval_fn(apply_fn, v)

  table = jaxq.sensitivity(model, state, WEIGHT_ONLY, spy, calib,
                           progress=False)
  return table, seen, kernel


@pytest.fixture(scope="module")
def tables(mlp, spied):
  """``{rules: (linen table, nnx table)}`` for both rule sets, computed
  once for the module's tests (each table is a sensitivity run)."""
  linen, variables, model, state, calib, eval_fn = mlp
  nnx_tables = {WEIGHT_ONLY: spied[0],
                STATIC: jaxq.sensitivity(model, state, STATIC, eval_fn, calib,
                                         progress=False)}
  return {rules: (jaxq.sensitivity(linen, variables, rules, eval_fn, calib,
                                   progress=False), nnx_tables[rules])
          for rules in (WEIGHT_ONLY, STATIC)}


@pytest.mark.parametrize("rules", [WEIGHT_ONLY, STATIC],
                         ids=["weight_only", "static_acts"])
def test_table_equals_linen(tables, rules):
  linen_table, nnx_table = tables[rules]
  assert_tables_equal(nnx_table, linen_table)
  assert nnx_table.paths[0] == "fc2"
  assert sorted(nnx_table.paths) == list(LAYERS)


def test_static_ranges_are_calibrated_once_and_reusable(mlp, tables):
  _, _, model, state, calib, eval_fn = mlp
  _, table = tables[STATIC]
  assert isinstance(table.stats, nnx.State)
  stat_paths = {path[:-1] for path, var in nnx.to_flat_state(table.stats)
                if isinstance(var, QuantStat) and path[-1] == "jaxq_act_stats"}
  assert stat_paths == {("fc1",), ("fc2",), ("fc3",)}
  # The static ranges matter: scoring without them (dynamic) differs...
  dynamic = tuple(dataclasses.replace(
      r, act=dataclasses.replace(r.act, dynamic=True)) for r in STATIC)
  dynamic_table = jaxq.sensitivity(model, state, dynamic, eval_fn, calib,
                                   progress=False)
  assert {r.path: r.metric for r in dynamic_table.rows} != pytest.approx(
      {r.path: r.metric for r in table.rows}, rel=1e-6)
  # ...and the table's stats give the same table without calibrating.
  again = jaxq.sensitivity(model, state, STATIC, eval_fn, calib,
                           stats=table.stats, progress=False)
  for a, b in zip(again.rows, table.rows):
    assert a == b


def test_eval_fn_gets_an_nnx_state_and_the_model_is_untouched(mlp, spied):
  _, _, model, state, _, _ = mlp
  table, seen, kernel = spied
  assert all(isinstance(v, nnx.State) for v in seen)
  assert len(seen) == 1 + len(table)  # Float, then one per layer.
  np.testing.assert_array_equal(model.fc2.kernel.get_value(), kernel)
  np.testing.assert_array_equal(seen[0]["fc2"]["kernel"].get_value(),
                                state["fc2"]["kernel"].get_value())


def test_variables_none_uses_the_models_own_state(mlp, tables):
  _, _, model, state, calib, eval_fn = mlp
  own = NnxMLP(nnx.Rngs(5))
  nnx.update(own, state)
  table = jaxq.sensitivity(own, None, WEIGHT_ONLY, eval_fn, calib,
                           progress=False)
  assert_tables_equal(table, tables[WEIGHT_ONLY][0])


# Skipping every layer a rule reaches leaves that rule unmatched.
@pytest.mark.filterwarnings("ignore:jaxq. 1 rule.s. matched no layer")
@pytest.mark.parametrize("rules", [WEIGHT_ONLY, STATIC],
                         ids=["weight_only", "static_acts"])
def test_partial_quantize_equals_linen(mlp, tables, rules):
  """Weight-only, the nnx run builds its own table (equal to linen's); with
  static acts it is given its table, as the linen runs are."""
  linen, variables, model, state, calib, eval_fn = mlp
  linen_table, nnx_table = tables[rules]
  builds_its_own = rules == WEIGHT_ONLY
  kwargs = dict(max_drop=1e-2, relative=False, progress=False)
  linen_result = jaxq.partial_quantize(linen, variables, rules, eval_fn,
                                       calib, table=linen_table, **kwargs)
  nnx_result = jaxq.partial_quantize(
      model, state, rules, eval_fn, calib,
      table=None if builds_its_own else nnx_table, **kwargs)
  if builds_its_own:
    assert nnx_result.skipped == ("fc2",)
    assert_tables_equal(nnx_result.table, linen_table)
  assert nnx_result.skipped == linen_result.skipped
  assert nnx_result.skipped[0] == "fc2"
  assert nnx_result.rules == linen_result.rules
  np.testing.assert_allclose(nnx_result.history, linen_result.history,
                             rtol=1e-4)
  assert nnx_result.target == pytest.approx(linen_result.target)
  # The returned rules reproduce the metric on the nnx model.
  qmodel = jaxq.quantize_model(model, nnx_result.rules, mode="qat")
  nnx.update(qmodel, state)
  nnx.update(qmodel, jaxq.act_ranges(qmodel, nnx_table.stats))
  assert eval_fn(lambda _, x: qmodel(x), None) == pytest.approx(
      nnx_result.metric, rel=1e-5)


def test_serve_mode_agrees_with_qat(mlp, tables):
  _, _, model, state, calib, eval_fn = mlp
  serve = jaxq.sensitivity(model, state, STATIC, eval_fn, calib,
                           mode="serve", progress=False)
  qat = tables[STATIC][1]
  assert serve.paths == qat.paths
  np.testing.assert_allclose([r.metric for r in serve.rows],
                             [r.metric for r in qat.rows], rtol=1e-3)
  np.testing.assert_allclose([r.sqnr_db for r in serve.rows],
                             [r.sqnr_db for r in qat.rows], atol=0.05)


def test_shared_layer_is_measured_call_by_call():
  # The linen table (test_sensitivity's, computed once there) and its
  # eval_fn, the same for both APIs.
  x, variables, eval_fn, linen_table = shared_and_einsum()
  params = variables["params"]
  model = NnxSharedAndEinsum(nnx.Rngs(0))
  state = state_of(model, params)
  table = jaxq.sensitivity(model, state, WEIGHT_ONLY, eval_fn, [x],
                           progress=False)
  assert_tables_equal(table, linen_table)
  # And directly: each call of the shared layer on its own float input.
  w, b = (np.asarray(params["shared"][k], np.float64)
          for k in ("kernel", "bias"))
  wq = fake_quant_np(w, np.abs(w).max())
  x = np.asarray(x, np.float64)
  h1 = np.maximum(x @ w + b, 0.0)
  y = np.concatenate([x @ w + b, h1 @ w + b])
  y_q = np.concatenate([x @ wq + b, h1 @ wq + b])
  row = {r.path: r for r in table.rows}["shared"]
  np.testing.assert_allclose(
      row.sqnr_db, 10 * np.log10(np.sum(y ** 2) / np.sum((y_q - y) ** 2)),
      atol=0.02)
  np.testing.assert_allclose(row.mse, np.mean((y_q - y) ** 2), rtol=5e-3)


@pytest.fixture(scope="module")
def reports():
  linen = Tiny()
  batches = [jax.random.randint(jax.random.key(i), (6, SEQ), 0, VOCAB)
             for i in range(2)]
  variables = linen.init(jax.random.key(7), batches[0])
  model = NnxTiny(nnx.Rngs(1))
  state = state_of(model, variables["params"])
  return (model, state, batches,
          jaxq.report(linen, variables, batches, rules=REPORT_RULES),
          jaxq.report(model, state, batches, rules=REPORT_RULES))


def assert_reports_equal(nnx_report, linen_report):
  assert [r.path for r in nnx_report.rows] == [r.path for r in
                                               linen_report.rows]
  for a, b in zip(nnx_report.rows, linen_report.rows):
    assert LINEN_TYPES[a.module_type] == b.module_type
    assert (a.weight_spec, a.act_spec, a.float_bytes, a.quantized_bytes) == (
        b.weight_spec, b.act_spec, b.float_bytes, b.quantized_bytes)
    for name in ("weight_sqnr_db", "act_sqnr_db", "act_amax", "input_absmax"):
      x, y = getattr(a, name), getattr(b, name)
      assert (x is None) == (y is None), name
      if x is not None:
        np.testing.assert_allclose(x, y, rtol=1e-5, err_msg=name)
  assert list(nnx_report.histograms) == list(linen_report.histograms)
  for path, hist in nnx_report.histograms.items():
    other = linen_report.histograms[path]
    np.testing.assert_array_equal(hist.counts, other.counts)
    assert hist.format == other.format
    np.testing.assert_allclose(hist.bin_width, other.bin_width, rtol=1e-6)
    np.testing.assert_allclose(list(hist.ranges.values()),
                               list(other.ranges.values()), rtol=1e-5)


def test_report_equals_linen(reports):
  _, _, _, linen_report, nnx_report = reports
  assert [r.path for r in nnx_report.rows] == ["embed", "fc1", "fc2"]
  assert_reports_equal(nnx_report, linen_report)
  assert nnx_report.quantized_bytes == linen_report.quantized_bytes


def test_report_in_call_order_and_with_given_stats(reports):
  model, state, batches, _, rep = reports
  # Layers are listed as the model calls them, not in graph (name) order.
  class Reordered(nnx.Module):

    def __init__(self, tiny: NnxTiny):
      self.z_embed, self.fc1, self.a_head = tiny.embed, tiny.fc1, tiny.fc2

    def __call__(self, ids):
      return self.a_head(nnx.relu(self.fc1(self.z_embed(ids))))

  twin = NnxTiny(nnx.Rngs(1))
  nnx.update(twin, state)
  rules = tuple(dataclasses.replace(r, path_regex=p) for r, p in
                zip(REPORT_RULES, ("z_embed", "fc1", "a_head")))
  reordered = jaxq.report(Reordered(twin), None, batches, rules=rules)
  assert [r.path for r in reordered.rows] == ["z_embed", "fc1", "a_head"]
  # Stats from calibrate give the same report.
  cal = jaxq.quantize_model(model, REPORT_RULES, mode="calibrate")
  stats = jaxq.calibrate(cal, state, batches, progress=False).stats
  again = jaxq.report(model, state, batches, rules=REPORT_RULES,
                      stats=stats)
  for a, b in zip(again.rows, rep.rows):
    assert a == b


def test_plots_of_nnx_results(reports, tables, tmp_path):
  _, _, _, _, rep = reports
  _, table = tables[WEIGHT_ONLY]
  for path in (jaxq.report.plot_histograms(rep, tmp_path / "hist.png"),
               jaxq.report.plot_sensitivity(table, tmp_path / "sens.png")):
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_errors(mlp, reports, tables):
  linen, variables, model, state, calib, eval_fn = mlp
  with pytest.raises(ValueError, match="variables must be an nnx.State .* "
                     "got dict"):
    jaxq.sensitivity(model, variables, WEIGHT_ONLY, eval_fn, calib)
  with pytest.raises(ValueError, match="variables must be an nnx.State"):
    jaxq.partial_quantize(model, {"fc1": {}}, WEIGHT_ONLY, eval_fn, calib)
  with pytest.raises(ValueError, match="not a model from jaxq.quantize_model"):
    jaxq.sensitivity(jaxq.quantize_model(model, WEIGHT_ONLY), state,
                     WEIGHT_ONLY, eval_fn, calib)
  with pytest.raises(ValueError, match="stats must be an nnx.State"):
    jaxq.sensitivity(model, state, STATIC, eval_fn, calib,
                     stats=tables[STATIC][0].stats)
  with pytest.raises(ValueError, match="a linen model needs its variables"):
    jaxq.sensitivity(linen, state, WEIGHT_ONLY, eval_fn, calib)
  with pytest.raises(ValueError, match="stats must be the 'quant_stats'"):
    jaxq.sensitivity(linen, variables, STATIC, eval_fn, calib,
                     stats=tables[STATIC][1].stats)
  with pytest.raises(ValueError, match="quantize none"):
    jaxq.sensitivity(model, state, (jaxq.Rule(r".*", skip=True),), eval_fn,
                     calib)
  tiny, tiny_state, batches, _, _ = reports
  with pytest.raises(ValueError, match="pass rules="):
    jaxq.report(tiny, tiny_state, batches)
  with pytest.raises(ValueError, match="not a model from jaxq.quantize_model"):
    jaxq.report(jaxq.quantize_model(tiny, REPORT_RULES), tiny_state, batches)
