"""Workflows on bad input: nothing silently wrong (issue 13, items 4 and 11).

* NaN/inf weights: `jaxq.calibrate`, `jaxq.convert` and (nnx)
  `jaxq.quantize_model` raise naming the layer path and the parameter, with
  the NaN and inf counts; a served model never turns them into finite
  numbers.
* Invalid static ranges (non-finite, negative amax, ``amin > amax``, 0
  everywhere): convert and loading them into an eagerly called QAT or serve
  model raise naming the layer. A layer whose calibration input was 0 in
  every batch gets a range of 0, refused by `jaxq.act_ranges`,
  `jaxq.CalibrationResult.ranges` and `jaxq.convert` with a message saying
  what to do; under ``jit`` a loaded range of 0 gives NaN. Ranges with only
  some zero channels (dead units) stay valid.
* `jaxq.act_ranges` on a linen model that never traced its layers raises
  saying what to call; ``init`` of a QAT model with static activations
  traces under ``jax.eval_shape`` before it has ranges.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq
from jaxq import PerChannel, PerTensor, QuantSpec

W8 = QuantSpec("int8", PerChannel(axis=-1))
STATIC = (jaxq.Rule(r".*", weight=W8,
                    act=QuantSpec("int8", PerTensor(), dynamic=False)),)
AFFINE = (jaxq.Rule(r".*", weight=W8,
                    act=QuantSpec("uint8", PerTensor(), symmetric=False,
                                  dynamic=False)),)
IN, HIDDEN, OUT = 6, 8, 3


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(OUT)(nn.relu(nn.Dense(HIDDEN)(x)))


class NnxMLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(IN, HIDDEN, rngs=rngs)
    self.fc2 = nnx.Linear(HIDDEN, OUT, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


def _x(seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (4, IN))


def _poison(kernel: jax.Array, nan: int, inf: int, seed: int) -> jax.Array:
  """``kernel`` with ``nan`` NaNs and ``inf`` ±infs at random positions."""
  flat = np.array(kernel).ravel()
  where = np.random.default_rng(seed).permutation(flat.size)[:nan + inf]
  flat[where[:nan]] = np.nan
  flat[where[nan:]] = np.inf * np.sign(np.arange(inf) % 2 - 0.5)
  return jnp.asarray(flat.reshape(kernel.shape))


def _linen(nan: int, inf: int, seed: int = 0):
  model, x = LinenMLP(), _x()
  variables = model.init(jax.random.key(1), x)
  params = jax.tree.map(lambda a: a, variables["params"])
  params["Dense_1"]["kernel"] = _poison(params["Dense_1"]["kernel"], nan, inf,
                                        seed)
  return model, {"params": params}, x


def _nnx(nan: int, inf: int, seed: int = 0) -> nnx.Module:
  model = NnxMLP(nnx.Rngs(1))
  model.fc2.kernel.set_value(_poison(model.fc2.kernel.get_value(), nan, inf,
                                     seed))
  return model


@pytest.mark.parametrize("nan,inf,seed", [(3, 1, 0), (1, 0, 1), (0, 2, 2),
                                          (5, 4, 3)])
def test_nonfinite_weights_are_refused_naming_layer_and_counts(nan, inf, seed):
  """Property over counts and positions: every entry point names the layer,
  the parameter and the exact NaN and inf counts."""
  message = (rf"layer '{{}}' parameter 'kernel' holds {nan} NaN and {inf} "
             rf"inf values")
  model, variables, x = _linen(nan, inf, seed)
  linen_message = message.format("Dense_1")
  cal = jaxq.quantize_model(model, STATIC, "calibrate")
  with pytest.raises(ValueError, match="calibrate: " + linen_message):
    jaxq.calibrate(cal, variables, [x])
  serve = jaxq.quantize_model(model, STATIC, "serve")
  jax.eval_shape(serve.init, jax.random.key(0), x)
  with pytest.raises(ValueError, match="convert: " + linen_message):
    jaxq.convert(serve, variables, ranges={})

  nnx_message = message.format("fc2")
  with pytest.raises(ValueError, match="quantize_model: " + nnx_message):
    jaxq.quantize_model(_nnx(nan, inf, seed), STATIC, "calibrate")
  clean = NnxMLP(nnx.Rngs(1))
  for what, mode in (("calibrate", "calibrate"), ("convert", "serve")):
    qmodel = jaxq.quantize_model(clean, STATIC, mode)
    poisoned = nnx.state(_nnx(nan, inf, seed))
    with pytest.raises(ValueError, match=f"{what}: " + nnx_message):
      if what == "calibrate":
        jaxq.calibrate(qmodel, poisoned, [x])
      else:
        jaxq.convert(qmodel, poisoned, ranges=nnx.State({}))


def test_serve_on_the_fly_refuses_nonfinite_weights_loaded_later():
  """An nnx serve model quantizing float weights in an eager call refuses
  NaN weights loaded after quantize_model (no NaN -> 0)."""
  serve = jaxq.quantize_model(NnxMLP(nnx.Rngs(1)), (
      jaxq.Rule(r".*", weight=W8, act=QuantSpec("int8", PerTensor())),),
      "serve")
  nnx.update(serve, nnx.state(_nnx(2, 0), nnx.Param))
  with pytest.raises(ValueError, match=r"layer 'fc2' parameter 'kernel' "
                                       r"holds 2 NaN"):
    serve(_x())


_BAD_RANGES = [
    ({"amax": jnp.array([jnp.nan])}, r"amax must be finite.*amax\(0,\) = nan"),
    ({"amax": jnp.array([jnp.inf])}, r"amax must be finite.*= inf"),
    ({"amax": jnp.array([-1.0])}, r"amax must be non-negative.*= -1.0"),
]
_BAD_AFFINE = [
    ({"amin": jnp.array([2.0]), "amax": jnp.array([1.0])},
     r"amin\(0,\) = 2.0 is greater than amax"),
    ({"amin": jnp.array([-jnp.inf]), "amax": jnp.array([1.0])},
     r"amin must be finite.*= -inf"),
]


@pytest.mark.parametrize("rules,bad,problem",
                         [(STATIC, *b) for b in _BAD_RANGES] +
                         [(AFFINE, *b) for b in _BAD_AFFINE])
def test_invalid_static_ranges_are_refused(rules, bad, problem):
  """convert, and an eager QAT/serve call with the range loaded, refuse it,
  naming the layer; a valid range passes (a range of 0 is refused too, see
  test_calibrated_zero_range_is_refused_naming_the_layer)."""
  model, x = LinenMLP(), _x()
  variables = model.init(jax.random.key(1), x)
  serve = jaxq.quantize_model(model, rules, "serve")
  jax.eval_shape(serve.init, jax.random.key(0), x)
  good = {"amax": jnp.array([1.0])}
  if "amin" in bad:
    good = {"amin": jnp.array([-1.0]), "amax": jnp.array([1.0])}
  ranges = {"Dense_0": {"act": good}, "Dense_1": {"act": bad}}
  match = rf"the static activation range of layer 'Dense_1' is invalid: " \
          rf".*{problem}"
  with pytest.raises(ValueError, match="convert: " + match):
    jaxq.convert(serve, variables, ranges=ranges)
  qat = jaxq.quantize_model(model, rules, "qat")
  with pytest.raises(ValueError, match=match):
    qat.apply({**variables, "quant_ranges": ranges}, x)
  jaxq.convert(serve, variables, ranges={"Dense_0": {"act": good},
                                          "Dense_1": {"act": good}})

  nnx_model = NnxMLP(nnx.Rngs(1))
  nnx_serve = jaxq.quantize_model(nnx_model, rules, "serve")
  nnx_ranges = nnx.State({
      "fc1": {"jaxq_act_range": jaxq.flax.QuantRange(good)},
      "fc2": {"jaxq_act_range": jaxq.flax.QuantRange(bad)}})
  nnx_match = match.replace("Dense_1", "fc2")
  with pytest.raises(ValueError, match="convert: " + nnx_match):
    jaxq.convert(nnx_serve, nnx.state(nnx_model), ranges=nnx_ranges)
  nnx_qat = jaxq.quantize_model(nnx_model, rules, "qat")
  nnx.update(nnx_qat, nnx_ranges)
  with pytest.raises(ValueError, match=nnx_match):
    nnx_qat(x)


def _dead_first_layer(params: dict, kernel: str, bias: str, units) -> dict:
  """``params`` with the given hidden units of the first layer dead: zero
  kernel columns and bias -1, so relu gives 0 there for every input."""
  params = dict(params)
  params[kernel] = jnp.asarray(params[kernel]).at[:, units].set(0.0)
  params[bias] = jnp.asarray(params[bias]).at[units].set(-1.0)
  return params


_ZERO_RANGE = (r"{what}: layer '{path}': its static activation range \(act\) "
               r"is 0 .*the calibration data never reached it with a "
               r"non-zero value.*dynamic=True.*skip=True")


def _zero_ranges(result: jaxq.CalibrationResult) -> dict:
  """The linen ranges of ``result``'s stats, finalized without checks."""
  return {path: {"act": jaxq.flax.core.finalize_range(
      jaxq.observers.max(), node["act"])}
          for path, node in result.stats.items()}


@pytest.mark.parametrize("rules", [STATIC, AFFINE], ids=["symmetric",
                                                          "affine"])
def test_calibrated_zero_range_is_refused_naming_the_layer(rules):
  """The second layer's input is 0 in every calibration batch (its inputs
  are dead relu units): act_ranges, CalibrationResult.ranges and convert
  refuse the range of 0 (it would serve every input as 0), linen and nnx."""
  model, x = LinenMLP(), _x()
  variables = model.init(jax.random.key(1), x)
  params = dict(variables["params"])
  # Linen names the layers in construction order: Dense_1 runs first.
  params["Dense_1"] = _dead_first_layer(params["Dense_1"], "kernel", "bias",
                                        slice(None))
  variables = {"params": params}
  cal = jaxq.quantize_model(model, rules, "calibrate")
  result = jaxq.calibrate(cal, variables, [x, _x(1)], progress=False)
  serve = jaxq.quantize_model(model, rules, "serve")
  jax.eval_shape(serve.init, jax.random.key(0), x)
  for what, call in (
      ("act_ranges", lambda: jaxq.act_ranges(serve, result.stats)),
      ("act_ranges", result.ranges),
      # convert finalizes the stats with act_ranges, which names itself.
      ("act_ranges", lambda: jaxq.convert(serve, variables, result.stats)),
      ("convert", lambda: jaxq.convert(serve, variables,
                                       ranges=_zero_ranges(result)))):
    with pytest.raises(jaxq.ZeroRangeError,
                       match=_ZERO_RANGE.format(what=what, path="Dense_0")):
      call()
  # One pass, several methods (affine specs keep no histogram).
  methods = ("max", "mse") if rules is STATIC else ("max",)
  several = jaxq.calibrate(cal, variables, [x], methods=methods,
                           progress=False)
  with pytest.raises(jaxq.ZeroRangeError,
                     match=_ZERO_RANGE.format(what="jaxq", path="Dense_0")):
    several.ranges(methods[-1])

  nnx_model = NnxMLP(nnx.Rngs(1))
  fc1 = _dead_first_layer({"kernel": nnx_model.fc1.kernel.get_value(),
                           "bias": nnx_model.fc1.bias.get_value()},
                          "kernel", "bias", slice(None))
  nnx_model.fc1.kernel.set_value(fc1["kernel"])
  nnx_model.fc1.bias.set_value(fc1["bias"])
  nnx_cal = jaxq.quantize_model(nnx_model, rules, "calibrate")
  stats = jaxq.calibrate(nnx_cal, None, [x], progress=False).stats
  nnx_serve = jaxq.quantize_model(nnx_model, rules, "serve")
  zero = {"amax": jnp.zeros((1,))}
  if rules is AFFINE:
    zero["amin"] = jnp.zeros((1,))
  zero_ranges = nnx.State({
      "fc1": {"jaxq_act_range": jaxq.flax.QuantRange(
          jax.tree.map(lambda a: a + 1.0, zero))},
      "fc2": {"jaxq_act_range": jaxq.flax.QuantRange(zero)}})
  for what, call in (
      ("act_ranges", lambda: jaxq.act_ranges(nnx_serve, stats)),
      ("act_ranges", lambda: jaxq.convert(nnx_serve, nnx.state(nnx_model),
                                          stats)),
      ("convert", lambda: jaxq.convert(nnx_serve, nnx.state(nnx_model),
                                       ranges=zero_ranges))):
    with pytest.raises(jaxq.ZeroRangeError,
                       match=_ZERO_RANGE.format(what=what, path="fc2")):
      call()


def test_loaded_zero_range_raises_eagerly_and_is_nan_under_jit():
  """A range of 0 loaded by hand into QAT or serve: an eager call raises
  naming the layer; a jitted call (ranges traced) outputs NaN, never the
  finite output of an input quantized to 0."""
  model, x = LinenMLP(), _x()
  variables = model.init(jax.random.key(1), x)
  # The output layer's (Dense_0): a NaN input to a later static quantizer
  # would become 0 there (NaN quantizes to 0).
  ranges = {"Dense_1": {"act": {"amax": jnp.array([4.0])}},
            "Dense_0": {"act": {"amax": jnp.array([0.0])}}}
  loaded = {**variables, "quant_ranges": ranges}
  qat = jaxq.quantize_model(model, STATIC, "qat")
  with pytest.raises(jaxq.ZeroRangeError,
                     match=_ZERO_RANGE.format(what="jaxq", path="Dense_0")):
    qat.apply(loaded, x)
  assert np.all(np.isnan(np.asarray(jax.jit(qat.apply)(loaded, x))))
  serve = jaxq.quantize_model(model, STATIC, "serve")
  jax.eval_shape(serve.init, jax.random.key(0), x)
  serving, _ = jaxq.convert(serve, variables, ranges={
      "Dense_1": ranges["Dense_1"], "Dense_0": {"act": {"amax":
                                                       jnp.array([1.0])}}})
  serving["quant_ranges"] = ranges
  with pytest.raises(jaxq.ZeroRangeError, match="'Dense_0'"):
    serve.apply(serving, x)
  assert np.all(np.isnan(np.asarray(jax.jit(serve.apply)(serving, x))))

  nnx_qat = jaxq.quantize_model(NnxMLP(nnx.Rngs(1)), STATIC, "qat")
  nnx.update(nnx_qat, nnx.State({
      "fc1": {"jaxq_act_range": jaxq.flax.QuantRange({"amax":
                                                      jnp.array([4.0])})},
      "fc2": {"jaxq_act_range": jaxq.flax.QuantRange({"amax":
                                                      jnp.array([0.0])})}}))
  with pytest.raises(jaxq.ZeroRangeError,
                     match=_ZERO_RANGE.format(what="jaxq", path="fc2")):
    nnx_qat(x)
  assert np.all(np.isnan(np.asarray(nnx.jit(lambda m, x: m(x))(nnx_qat, x))))


def test_dead_channels_keep_a_valid_per_channel_range():
  """Some dead units (0 in every batch) in a per-channel static range: the
  range is valid, convert and serve run, and serve equals QAT."""
  rules = (jaxq.Rule(r".*", weight=W8, act=QuantSpec(
      "int8", PerChannel(axis=-1), dynamic=False)),)
  model, x = LinenMLP(), _x()
  variables = model.init(jax.random.key(1), x)
  params = dict(variables["params"])
  params["Dense_1"] = _dead_first_layer(params["Dense_1"], "kernel", "bias",
                                        jnp.array([0, 3, 5]))
  variables = {"params": params}
  cal = jaxq.quantize_model(model, rules, "calibrate")
  stats = jaxq.calibrate(cal, variables, [x, _x(1)], progress=False).stats
  ranges = jaxq.act_ranges(cal, stats)
  amax = np.asarray(ranges["Dense_0"]["act"]["amax"]).ravel()
  assert np.all(amax[[0, 3, 5]] == 0) and np.all(amax[[1, 2, 4, 6, 7]] > 0)
  qat = jaxq.quantize_model(model, rules, "qat")
  want = qat.apply({**variables, "quant_ranges": ranges}, x)
  serve = jaxq.quantize_model(model, rules, "serve")
  jax.eval_shape(serve.init, jax.random.key(0), x)
  serving, _ = jaxq.convert(serve, variables, stats)
  got = serve.apply(serving, x)
  assert bool(jnp.all(jnp.isfinite(got)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                             atol=1e-5)


def test_linen_init_on_zeros_traces_static_act_layers():
  """init on an all-zero input (the usual shape-only init) is not refused
  as a range of 0: the stand-in range of init is the input's own."""
  model = LinenMLP()
  zeros = jnp.zeros((1, IN))
  for int8_forward in (False, True):
    qat = jaxq.quantize_model(model, STATIC, "qat", int8_forward=int8_forward)
    variables = qat.init(jax.random.key(0), zeros)
    assert sorted(variables["params"]) == ["Dense_0", "Dense_1"]


def test_act_ranges_of_an_untraced_linen_model_says_what_to_call():
  """The partial_quantize recipe on linen: act_ranges before any trace
  raises; init under eval_shape (no ranges yet) traces the layers."""
  model, x = LinenMLP(), _x()
  variables = model.init(jax.random.key(1), x)
  cal = jaxq.quantize_model(model, STATIC, "calibrate")
  stats = jaxq.calibrate(cal, variables, [x]).stats
  qat = jaxq.quantize_model(model, STATIC, "qat")
  with pytest.raises(ValueError, match=r"has not traced the layers "
                                       r"\['Dense_0', 'Dense_1'\].*eval_shape"):
    jaxq.act_ranges(qat, stats)
  shapes = jax.eval_shape(qat.init, jax.random.key(0), x)
  assert jax.tree.map(lambda a: a.shape, shapes["params"]) == jax.tree.map(
      lambda a: a.shape, variables["params"])
  ranges = jaxq.act_ranges(qat, stats)
  assert sorted(ranges) == ["Dense_0", "Dense_1"]
  jax.tree.map(np.testing.assert_array_equal, ranges,
               jaxq.act_ranges(cal, stats))
  out = qat.apply({**variables, "quant_ranges": ranges}, x)
  assert out.shape == (4, OUT) and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("mode,int8_forward", [("qat", False), ("qat", True),
                                               ("serve", False)])
def test_linen_init_traces_static_act_layers_before_ranges(mode, int8_forward):
  """init under eval_shape records the layers and their variables' shapes
  before any range is loaded (every mode that needs ranges)."""
  model, x = LinenMLP(), _x()
  qmodel = jaxq.quantize_model(model, STATIC, mode, int8_forward=int8_forward)
  shapes = jax.eval_shape(qmodel.init, jax.random.key(0), x)
  assert jax.tree.map(lambda a: a.shape, shapes["params"]) == jax.tree.map(
      lambda a: a.shape, model.init(jax.random.key(1), x)["params"])
  assert sorted(jaxq.layers(qmodel)) == ["Dense_0", "Dense_1"]
  # The stand-in range of init is not kept: apply still needs real ones.
  with pytest.raises(ValueError, match="no calibrated range"):
    qmodel.apply(model.init(jax.random.key(1), x), x)
