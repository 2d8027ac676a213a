"""Tests for switchable layers and the one compilation of the accuracy tools.

`ModelAdapter.quantize(rules, mode, switchable=True)` (qat or serve mode)
gives every quantized layer an on/off flag in the variables
(`ModelAdapter.set_enabled`). With the layers of a subset on, the model must
compute exactly (bit for bit) what the model quantized by rules restricted
to that subset computes, for linen and nnx (in serve mode: that model with
its weights converted by `jaxq.convert`); flipping flags must not recompile;
a model built without the switch must trace to the same program as before
(no select added). `jaxq.sensitivity` and `jaxq.partial_quantize` then trace
the model a number of times that does not grow with its depth, in both
modes.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq
from jaxq import PerChannel, PerTensor, QuantSpec
from jaxq import flax as jaxq_flax

W4_C = QuantSpec("int4", PerChannel(axis=-1))
A8_STATIC = QuantSpec("int8", PerTensor(), dynamic=False)
A8_DYNAMIC = QuantSpec("int8", PerTensor())
RULES = (jaxq.Rule(r"conv.*", weight=W4_C, act=A8_STATIC),
         jaxq.Rule(r"embed", weight=W4_C),
         jaxq.Rule(r"head", skip=True),
         jaxq.Rule(r".*", weight=W4_C, act=A8_DYNAMIC))
QUANTIZED = ("embed", "conv", "dense")


class Linen(nn.Module):
  """An Embed, a Conv, a Dense and a float head (skip rule)."""

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(16, 6, name="embed")(ids)
    x = nn.relu(nn.Conv(6, (3,), name="conv")(x))
    x = nn.relu(nn.Dense(5, name="dense")(x))
    return nn.Dense(3, name="head")(x)


class Nnx(nnx.Module):
  """`Linen` in nnx."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(16, 6, rngs=rngs)
    self.conv = nnx.Conv(6, 6, (3,), rngs=rngs)
    self.dense = nnx.Linear(6, 5, rngs=rngs)
    self.head = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    x = nnx.relu(self.conv(x))
    x = nnx.relu(self.dense(x))
    return self.head(x)


IDS = jax.random.randint(jax.random.key(0), (4, 7), 0, 16)


def _adapter(api: str):
  if api == "linen":
    model = Linen()
    return jaxq_flax.adapt(model, model.init(jax.random.key(1), IDS))
  return jaxq_flax.adapt(Nnx(nnx.Rngs(1)), None)


def _restricted(subset) -> tuple[jaxq.Rule, ...]:
  """``RULES`` quantizing the layers of ``subset`` only."""
  skipped = [p for p in QUANTIZED if p not in subset]
  return tuple(jaxq.Rule(re.escape(p), skip=True) for p in skipped) + RULES


def _ranges(adapter):
  calibrating = adapter.quantize(RULES, "calibrate")
  stats = jaxq.ptq.calibration_pass.calibrate_adapter(
      calibrating, [IDS], progress=False).stats
  calibrating.ordered_layers(IDS)
  return calibrating.ranges_by_path(calibrating.act_ranges(stats))


@functools.lru_cache(maxsize=None)
def _calibrated(api: str) -> tuple[jaxq_flax.ModelAdapter, dict, np.ndarray]:
  """``(float adapter, its act ranges by path, its float output on IDS)``
  of ``api``'s model, built and calibrated once for every test of the
  module: the tests quantize it into new adapters and only read these."""
  adapter = _adapter(api)
  float_out = np.asarray(adapter.apply_fn()(adapter.variables, IDS))
  return adapter, _ranges(adapter), float_out


class _Compilations(logging.Handler):
  """Counts compilations of ``prefix`` (``jit(apply)``, the model) logged
  while installed (the jitted-function cache size depends on JAX's
  dispatch path; the log does not)."""

  def __init__(self, prefix: str = "Compiling jit(apply)"):
    super().__init__()
    self.prefix = prefix
    self.count = 0

  def emit(self, record: logging.LogRecord) -> None:
    if record.getMessage().startswith(self.prefix):
      self.count += 1

  def run(self, fn, *args):
    """``fn(*args)``, counting its compilations."""
    logger = logging.getLogger("jax")
    logger.addHandler(self)
    try:
      with jax.log_compiles(True):
        return fn(*args)
    finally:
      logger.removeHandler(self)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_every_subset_equals_its_own_model_from_one_compilation(api):
  adapter, ranges, float_out = _calibrated(api)
  switched = adapter.quantize(RULES, "qat", switchable=True).with_ranges(
      ranges)
  apply_fn, compilations = switched.apply_fn(), _Compilations()
  # None, each alone (sensitivity's), all but the first (partial_quantize's).
  subsets = [()] + [(p,) for p in QUANTIZED] + [QUANTIZED[1:]]
  for subset in subsets:
    variables = switched.set_enabled({p: p in subset for p in QUANTIZED})
    own = adapter.quantize(_restricted(subset), "qat").with_ranges(ranges)
    expected = np.asarray(own.apply_fn()(own.variables, IDS))
    got = np.asarray(compilations.run(apply_fn, variables, IDS))
    np.testing.assert_array_equal(got, expected, err_msg=str(subset))
    if not subset:
      np.testing.assert_array_equal(got, float_out)
    else:  # The switch does change the output.
      assert not np.array_equal(got, float_out), subset
  assert compilations.count == 1  # Flags are data: one compilation.


def _converted(adapter, subset, ranges):
  """``(apply_fn, variables)`` of the model served by ``_restricted(subset)``
  with its weights converted to QArrays by `jaxq.convert`."""
  own = adapter.quantize(_restricted(subset), "serve").with_ranges(ranges)
  own.apply(IDS)  # linen learns its layers by tracing.
  qmodel = own.qmodel if hasattr(own, "qmodel") else own.model
  serving, _ = jaxq.convert(qmodel, own.variables)
  return own.apply_fn(), serving


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_every_served_subset_equals_its_converted_model(api):
  """Serve mode: the flag picks the low-bit op (the weight quantized on the
  fly, as convert quantizes it) or the float op, by lax.cond; both are the
  ops the separately served models run, so the outputs are bit-exact."""
  adapter, ranges, float_out = _calibrated(api)
  switched = adapter.quantize(RULES, "serve", switchable=True).with_ranges(
      ranges)
  apply_fn, compilations = switched.apply_fn(), _Compilations()
  subsets = [()] + [(p,) for p in QUANTIZED] + [QUANTIZED[1:], QUANTIZED]
  for subset in subsets:
    variables = switched.set_enabled({p: p in subset for p in QUANTIZED})
    own_fn, serving = _converted(adapter, subset, ranges)
    expected = np.asarray(own_fn(serving, IDS))
    got = np.asarray(compilations.run(apply_fn, variables, IDS))
    np.testing.assert_array_equal(got, expected, err_msg=str(subset))
    if not subset:
      np.testing.assert_array_equal(got, float_out)
    else:
      assert not np.array_equal(got, float_out), subset
  assert compilations.count == 1  # Flags are data: one compilation.


def _conds(jaxpr) -> int:
  """The ``cond`` equations, in every sub-jaxpr (cond branches included)."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == "cond"
    for param in eqn.params.values():
      for sub in param if isinstance(param, tuple) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          count += _conds(sub)
  return count


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_a_switchable_serve_layer_runs_one_op(api):
  """One cond more per matmul/conv layer (its two branches: the low-bit op,
  the float op) than without the switch; the embedding lookup selects
  rows."""
  adapter, ranges, _ = _calibrated(api)
  plain = adapter.quantize(RULES, "serve").with_ranges(ranges)
  switched = adapter.quantize(RULES, "serve", switchable=True).with_ranges(
      ranges)
  flags = switched.set_enabled({p: True for p in QUANTIZED})
  jaxpr = lambda q, v: jax.make_jaxpr(q.apply_fn())(v, IDS).jaxpr
  plain_conds = _conds(jaxpr(plain, plain.variables))
  assert _conds(jaxpr(switched, flags)) == plain_conds + 2  # conv, dense.


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_a_switchable_serve_model_refuses_converted_weights(api):
  adapter, ranges, _ = _calibrated(api)
  _, serving = _converted(adapter, QUANTIZED, ranges)
  switched = adapter.quantize(RULES, "serve", switchable=True).with_ranges(
      ranges)
  if api == "nnx":  # The converted state, plus the switched model's flags.
    serving = nnx.merge_state(switched.variables, serving)
  with pytest.raises(ValueError, match="switchable layer 'embed'.*float "
                     "weights"):
    switched.apply(IDS, serving)


def _flag_selects(jaxpr) -> int:
  """The ``select_n`` equations on a scalar predicate, in every sub-jaxpr."""
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "select_n" and eqn.invars[0].aval.shape == ():
      count += 1
    for param in eqn.params.values():
      sub = getattr(param, "jaxpr", param)
      if hasattr(sub, "eqns"):
        count += _flag_selects(sub)
  return count


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_a_model_without_the_switch_traces_as_before(api):
  adapter, ranges, _ = _calibrated(api)

  def jaxpr(quantized, variables):
    return jax.make_jaxpr(quantized.apply_fn())(variables, IDS).jaxpr

  plain = adapter.quantize(RULES, "qat").with_ranges(ranges)
  switched = adapter.quantize(RULES, "qat", switchable=True).with_ranges(
      ranges)
  flags = switched.set_enabled({p: True for p in QUANTIZED})
  plain_jaxpr = jaxpr(plain, plain.variables)
  switched_jaxpr = jaxpr(switched, flags)
  # One select on a flag per quantized operand: the weights of embed, conv
  # and dense and the inputs of conv and dense (the embedding lookup is
  # weight-only; it selects the looked-up rows). None without the switch
  # (the plain model's own scalar selects, e.g. the guard that turns a zero
  # static range into NaN, are in both).
  assert _flag_selects(switched_jaxpr) - _flag_selects(plain_jaxpr) == 5
  if api == "linen":  # Without flags the switchable model is the plain one.
    assert str(jaxpr(switched, switched.variables)) == str(plain_jaxpr)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_switch_errors(api):
  adapter, ranges, _ = _calibrated(api)
  with pytest.raises(ValueError, match="switchable layers need mode='qat'"):
    adapter.quantize(RULES, "calibrate", switchable=True)
  with pytest.raises(ValueError, match="without int8_forward"):
    jaxq_flax.core.check_switchable(True, "qat", int8_forward=True)
  jaxq_flax.core.check_switchable(True, "serve", int8_forward=False)
  with pytest.raises(ValueError, match="switchable"):
    adapter.quantize(RULES, "qat").set_enabled({"conv": False})
  switched = adapter.quantize(RULES, "qat", switchable=True).with_ranges(
      ranges)
  switched.apply(IDS)  # linen learns its layers by tracing.
  with pytest.raises(ValueError, match=r"\['head'\]"):  # A float layer.
    switched.set_enabled({"head": True})


TRACES = [0]  # How many times `Deep` was traced (its Python body ran).


class Deep(nn.Module):
  """``depth`` Dense layers; counts its traces in ``TRACES``."""

  depth: int

  @nn.compact
  def __call__(self, x):
    TRACES[0] += 1
    for i in range(self.depth):
      x = nn.tanh(nn.Dense(6, name=f"fc{i}")(x))
    return x


def _traces(depth: int, mode: str = "qat") -> tuple[int, int, int, int]:
  """Model traces of `jaxq.sensitivity` and of `jaxq.partial_quantize`,
  then the compilations of the model (``jit(apply)``) by each."""
  model = Deep(depth)
  x = jax.random.normal(jax.random.key(0), (16, 6))
  variables = model.init(jax.random.key(1), x)
  reference = model.apply(variables, x)

  def eval_fn(apply_fn, v):
    return -float(jnp.mean((apply_fn(v, x) - reference) ** 2))

  rules = (jaxq.Rule(r".*", weight=QuantSpec("int4", PerTensor()),
                     act=A8_STATIC),)
  TRACES[0] = 0
  sensitivity_compiles = _Compilations()
  table = sensitivity_compiles.run(
      lambda: jaxq.sensitivity(model, variables, rules, eval_fn, [x],
                               mode=mode, progress=False))
  assert len(table) == depth
  in_sensitivity = TRACES[0]
  TRACES[0] = 0
  partial_compiles = _Compilations()
  with pytest.warns(UserWarning, match="only with every quantized layer"):
    result = partial_compiles.run(
        lambda: jaxq.partial_quantize(model, variables, rules, eval_fn, [x],
                                      max_drop=0.0, table=table, mode=mode,
                                      progress=False))
  assert len(result.history) == depth + 1  # Every configuration evaluated.
  return (in_sensitivity, TRACES[0], sensitivity_compiles.count,
          partial_compiles.count)


@pytest.mark.parametrize("mode", ["qat", "serve"])
def test_accuracy_tools_trace_the_model_a_fixed_number_of_times(mode):
  shallow, deep = _traces(2, mode), _traces(4, mode)
  assert shallow == deep
  # partial_quantize, given the table's stats: the layer order and one
  # switchable model for every configuration.
  assert deep[1] <= 2
  # Compilations of the model, in either mode: sensitivity's float model
  # and its switchable one (every layer scored by flags); partial_quantize's
  # switchable one, for every configuration.
  assert deep[2:] == (2, 1)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_serve_mode_tools_equal_the_per_configuration_path(api, monkeypatch):
  """jaxq.sensitivity and partial_quantize in serve mode give what they gave
  when they compiled a served model per configuration and each layer alone:
  the same metrics and skipped layers, and the same SQNR and MSE."""
  adapter, _, reference = _calibrated(api)

  def eval_fn(apply_fn, variables):
    return -float(np.mean((np.asarray(apply_fn(variables, IDS)) -
                           reference) ** 2))

  def tools():
    table = jaxq.sensitivity(adapter.model, adapter.variables, RULES, eval_fn,
                             [IDS], mode="serve", progress=False)
    result = jaxq.partial_quantize(
        adapter.model, adapter.variables, RULES, eval_fn, [IDS],
        max_drop=0.5, table=table, mode="serve", progress=False)
    return table, result

  table, result = tools()
  # The module (``jaxq.sensitivity`` the name is the function). SQNR and
  # MSE come from other programs (the model with one layer on, against the
  # layer compiled alone), whose float sums XLA may order differently.
  monkeypatch.setattr(importlib.import_module("jaxq.sensitivity"),
                      "_switched", lambda *args: None)
  old_table, old_result = tools()
  assert table.paths == old_table.paths and set(table.paths) == set(QUANTIZED)
  for row, old in zip(table.rows, old_table.rows):
    assert (row.metric, row.drop) == (old.metric, old.drop), row.path
    np.testing.assert_allclose(row.sqnr_db, old.sqnr_db, rtol=1e-5)
    np.testing.assert_allclose(row.mse, old.mse, rtol=1e-4)
  assert (result.skipped, result.history) == (old_result.skipped,
                                              old_result.history)


class LinenOthers(nn.Module):
  """The layers serve mode runs through jaxq's own calls: an Einsum, a
  ConvTranspose and an embedding's ``attend``."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(16, 6, name="embed")
    x = embed(ids)
    x = nn.Einsum((6, 6), "btd,de->bte", name="einsum")(x)
    x = nn.ConvTranspose(6, (3,), strides=(2,), name="convt")(x)
    return embed.attend(x)


class NnxOthers(nnx.Module):
  """`LinenOthers` in nnx."""

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(16, 6, rngs=rngs)
    self.einsum = nnx.Einsum("btd,de->bte", (6, 6), (6,), rngs=rngs)
    self.convt = nnx.ConvTranspose(6, 6, (3,), strides=(2,), rngs=rngs)

  def __call__(self, ids):
    x = self.einsum(self.embed(ids))
    return self.embed.attend(self.convt(x))


OTHERS = ("embed", "einsum", "convt")
OTHER_RULES = (jaxq.Rule(r"embed", weight=W4_C),
               jaxq.Rule(r".*", weight=W4_C, act=A8_DYNAMIC))


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_switchable_serve_einsum_conv_transpose_and_attend(api):
  """Every subset equals the model served by its own rules. The float
  branch of a ConvTranspose is jaxq's convolution of the dilated input, the
  float layer's lax.conv_transpose a different program for the same sums:
  equal to float32 rounding."""
  if api == "linen":
    model = LinenOthers()
    adapter = jaxq_flax.adapt(model, model.init(jax.random.key(1), IDS))
  else:
    adapter = jaxq_flax.adapt(NnxOthers(nnx.Rngs(1)), None)
  switched = adapter.quantize(OTHER_RULES, "serve", switchable=True)
  apply_fn, compilations = switched.apply_fn(), _Compilations()
  float_out = np.asarray(adapter.apply_fn()(adapter.variables, IDS))
  for subset in [()] + [(p,) for p in OTHERS] + [OTHERS]:
    rules = tuple(jaxq.Rule(re.escape(p), skip=True) for p in OTHERS
                  if p not in subset) + OTHER_RULES
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # Rules the subset leaves unmatched.
      own = adapter.quantize(rules, "serve")
      expected = np.asarray(own.apply_fn()(own.variables, IDS))
    got = np.asarray(compilations.run(
        apply_fn, switched.set_enabled({p: p in subset for p in OTHERS}),
        IDS))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5,
                               err_msg=str(subset))
    # The flags take effect: int4 weights move the output far more.
    assert np.allclose(got, float_out, rtol=1e-5, atol=1e-5) == (
        not subset), subset
  assert compilations.count == 1  # Flags are data: one compilation.
