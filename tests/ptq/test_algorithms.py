"""Tests of `jaxq.smoothquant`, `jaxq.awq`, `jaxq.gptq` (jaxq/ptq/algorithms.py)
and of weight ranges that honour ``calibration`` (convert, serve, qat)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq
import jaxq.algorithms
from jaxq import PerChannel, PerTensor, QuantSpec
from jaxq.flax import Batch

W4 = QuantSpec("int4", PerChannel(axis=-1))
A8 = QuantSpec("int8", PerTensor(), dynamic=False)
RULES = (jaxq.Rule(".*", weight=W4, act=A8),)
PATHS = ("q", "k", "down")
FOLD = {"q": "ln", "k": "ln"}


class Linen(nn.Module):
  """LayerNorm -> q, k (one input) -> down(q * k)."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln")(x)
    q = nn.Dense(16, name="q")(h)
    k = nn.Dense(16, name="k")(h)
    return nn.Dense(8, name="down")(q * k)


class Nnx(nnx.Module):
  """The same model in nnx."""

  def __init__(self, rngs: nnx.Rngs):
    self.ln = nnx.LayerNorm(16, rngs=rngs)
    self.q = nnx.Linear(16, 16, rngs=rngs)
    self.k = nnx.Linear(16, 16, rngs=rngs)
    self.down = nnx.Linear(16, 8, rngs=rngs)

  def __call__(self, x):
    h = self.ln(x)
    return self.down(self.q(h) * self.k(h))


def _inputs(seed: int) -> jax.Array:
  # Outlier channels, as in transformer activations.
  scale = jnp.ones((16,)).at[3].set(20.0).at[11].set(8.0)
  return jax.random.normal(jax.random.key(seed), (4, 6, 16)) * scale


MASK = jnp.ones((4, 6), bool).at[:, 4:].set(False)


@functools.lru_cache(maxsize=None)
def _linen():
  model = Linen()
  x = _inputs(0)
  params = model.init(jax.random.key(1), x)
  cal = jaxq.quantize_model(model, RULES, mode="calibrate")
  jax.eval_shape(lambda v: cal.apply(v, x, mutable=["quant_stats"]), params)
  return model, cal, params


def _nnx_twin():
  """A fresh nnx twin of `_linen`'s model and its calibrate-mode model."""
  _, _, params = _linen()
  model = Nnx(nnx.Rngs(0))
  p = params["params"]
  model.ln.scale[...] = p["ln"]["scale"]
  model.ln.bias[...] = p["ln"]["bias"]
  for name in PATHS:
    getattr(model, name).kernel[...] = p[name]["kernel"]
    getattr(model, name).bias[...] = p[name]["bias"]
  return model, jaxq.quantize_model(model, RULES, mode="calibrate")


def _batches(x: jax.Array | None = None):
  return [Batch((_inputs(0) if x is None else x,), {}, MASK)]


def _run(algorithm: str, cal, variables):
  if algorithm == "gptq":
    return jaxq.gptq(cal, variables, _batches(), progress=False)
  if algorithm == "awq":
    return jaxq.awq(cal, variables, _batches(), fold_into=FOLD,
                    num_exponents=5, clip_ratios=5, progress=False)
  return jaxq.smoothquant(cal, variables, _batches(), alpha=None,
                          alphas=(0.3, 0.6, 0.9), fold_into=FOLD,
                          progress=False)


@functools.lru_cache(maxsize=None)
def _linen_result(algorithm: str):
  _, cal, params = _linen()
  return _run(algorithm, cal, params)


@functools.lru_cache(maxsize=None)
def _nnx_result(algorithm: str):
  """``(calibrate-mode twin, its variables after `_run`)``, computed once
  for the tests of this module and of test_algorithms_hostile.py (the
  runs are the costly part; the results are only read)."""
  _, ncal = _nnx_twin()
  return ncal, _run(algorithm, ncal, None)


def _read_all(adapter, variables):
  names = ("kernel", "bias", "weight_range", "act_smooth")
  out = {}
  for path in PATHS:
    for name in names:
      value = adapter.read(path, name, variables)
      if isinstance(value, dict):  # A weight range {"amax"[, "amin"]}.
        out.update({(path, name, k): v for k, v in value.items()})
      elif value is not None:
        out[(path, name)] = value
  for name in ("scale", "bias"):
    out[("ln", name)] = adapter.read("ln", name, variables)
  return jax.tree.map(np.asarray, out)


def _serve_vs_fake_quant(cal, variables):
  """Max |serve - qat| after calibrating and converting ``variables``."""
  x = _inputs(5)
  result = jaxq.calibrate(cal, variables, _batches(), progress=False)
  serving, _ = jaxq.convert(cal, variables, result.stats)
  served = cal.with_mode("serve").apply(serving, x)
  qat = cal.with_mode("qat").apply(
      {**variables, "quant_ranges": serving["quant_ranges"]}, x)
  return served, qat, serving


# Weight ranges honour the spec's calibration.


@functools.lru_cache(maxsize=None)
def _dense_weight_error(calibration: str):
  """The kernel, its dequantized converted weights, and the outputs served
  on the fly, served converted and fake-quantized; cached, as "max" is the
  reference of two tests."""
  model = nn.Dense(8)
  x = jnp.ones((2, 64))
  params = model.init(jax.random.key(0), x)
  # A heavy-tailed kernel, where clipping pays.
  kernel = jax.random.t(jax.random.key(1), 2.0, (64, 8))
  params = {"params": {**params["params"], "kernel": kernel}}
  spec = QuantSpec("int4", PerChannel(axis=-1), calibration=calibration)
  qmodel = jaxq.quantize_model(model, [jaxq.Rule(".*", weight=spec)],
                               mode="serve")
  jax.eval_shape(qmodel.init, jax.random.key(0), x)
  serving, _ = jaxq.convert(qmodel, params)
  w_hat = jaxq.dequantize(serving["params"]["kernel"])
  on_the_fly = qmodel.apply(params, x)
  converted = qmodel.apply(serving, x)
  fake = qmodel.with_mode("qat").apply(params, x)
  return kernel, w_hat, on_the_fly, converted, fake


def test_weight_calibration_mse_changes_convert_and_lowers_error():
  kernel, w_max, *_ = _dense_weight_error("max")
  _, w_mse, on_the_fly, converted, fake = _dense_weight_error("mse")
  assert not np.allclose(w_max, w_mse)
  err = lambda w: float(jnp.sum((kernel - w) ** 2))
  assert err(w_mse) < err(w_max)
  # Serve on the fly, convert and qat use the same range.
  np.testing.assert_allclose(on_the_fly, converted, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fake, converted, rtol=1e-5, atol=1e-5)


def test_weight_calibration_percentile_clips():
  kernel, w_max, *_ = _dense_weight_error("max")
  _, w_pct, *_ = _dense_weight_error("percentile")
  assert float(jnp.max(jnp.abs(w_pct))) < float(jnp.max(jnp.abs(w_max)))


def test_entropy_weight_calibration_raises_naming_layer():
  spec = QuantSpec("int8", PerChannel(axis=-1), calibration="entropy")
  qmodel = jaxq.quantize_model(Linen(), [jaxq.Rule(".*", weight=spec)])
  with pytest.raises(ValueError, match=r"'q'.*entropy"):
    qmodel.init(jax.random.key(0), _inputs(0))


# The workflows.


@pytest.mark.parametrize("algorithm", ["gptq", "awq", "smoothquant"])
def test_linen_and_nnx_twins_give_the_same_variables(algorithm):
  _, cal, params = _linen()
  linen_vars = _linen_result(algorithm)
  ncal, nnx_vars = _nnx_result(algorithm)
  linen_read = _read_all(jaxq.flax.adapt(cal, linen_vars), linen_vars)
  nnx_read = _read_all(jaxq.flax.adapt(ncal, nnx_vars), nnx_vars)
  assert linen_read.keys() == nnx_read.keys()
  for key in linen_read:
    np.testing.assert_allclose(linen_read[key], nnx_read[key], rtol=1e-4,
                               atol=1e-5, err_msg=str(key))
  # The algorithm changed the kernels (AWQ's coarse grid of 5 exponents keeps
  # exponent 0 for the LayerNorm group q, k of this toy; it scales down's).
  changed = [path for path in PATHS
             if not np.allclose(linen_read[(path, "kernel")],
                                params["params"][path]["kernel"])]
  assert changed, algorithm


def test_what_each_algorithm_stores():
  gptq, awq, sq = (_linen_result(a) for a in ("gptq", "awq", "smoothquant"))
  assert set(gptq["quant_fixed"]) == set(PATHS)
  assert all(set(v) == {"weight_range"} for v in gptq["quant_fixed"].values())
  # q and k fold into the LayerNorm; down has no op before it to fold into.
  assert set(awq["quant_fixed"]["down"]) == {"weight_range", "act_smooth"}
  assert set(awq["quant_fixed"]["q"]) == {"weight_range"}
  assert set(sq["quant_fixed"]) == {"down"}
  _, _, params = _linen()
  assert not np.allclose(sq["params"]["ln"]["scale"],
                         params["params"]["ln"]["scale"])


@pytest.mark.parametrize("algorithm", ["gptq", "awq", "smoothquant"])
def test_convert_and_serve_equal_fake_quant(algorithm):
  _, cal, _ = _linen()
  variables = _linen_result(algorithm)
  served, qat, serving = _serve_vs_fake_quant(cal, variables)
  np.testing.assert_allclose(served, qat, rtol=1e-4, atol=1e-4)
  # The QArrays hold the stored weight ranges: the serving variables drop
  # them (a float32 amin and amax per group weighed more than the scales).
  fixed = serving.get("quant_fixed", {})
  assert all("weight_range" not in fixed.get(p, {}) for p in PATHS)
  assert {p for p in PATHS if "act_smooth" in fixed.get(p, {})} == {
      p for p in PATHS
      if "act_smooth" in variables.get("quant_fixed", {}).get(p, {})}


def test_smoothing_keeps_the_float_function():
  model, cal, params = _linen()
  x = _inputs(3)
  smoothed = _linen_result("smoothquant")
  out, _ = cal.apply(smoothed, x, mutable=["quant_stats"])
  np.testing.assert_allclose(out, model.apply(params, x), rtol=1e-4,
                             atol=1e-4)


def test_gptq_kernel_is_exactly_on_the_stored_grid():
  _, cal, _ = _linen()
  variables = _linen_result("gptq")
  serving, _ = jaxq.convert(cal.with_mode("serve"), {
      k: v for k, v in variables.items()},
                            ranges={p: {"amax": jnp.ones(())} for p in PATHS})
  for path in PATHS:
    np.testing.assert_allclose(
        jaxq.dequantize(serving["params"][path]["kernel"]),
        variables["params"][path]["kernel"], rtol=1e-6, atol=1e-6)


def test_gptq_beats_rounding_held_out():
  model, cal, params = _linen()
  x = _inputs(9)
  ref = model.apply(params, x)
  rules = (jaxq.Rule(".*", weight=W4),)
  weight_only = jaxq.quantize_model(model, rules, mode="qat")
  rtn = weight_only.apply(params, x)
  gptq = weight_only.apply(_linen_result("gptq"), x)
  err = lambda y: float(jnp.mean((y - ref) ** 2))
  assert err(gptq) < err(rtn)


def test_stored_ranges_survive_save_and_load(tmp_path):
  _, cal, _ = _linen()
  served, _, serving = _serve_vs_fake_quant(cal, _linen_result("awq"))
  path = str(tmp_path / "awq.safetensors")
  jaxq.save(path, serving, RULES)
  loaded = jaxq.load(path).variables
  # AWQ's weight range is in the QArray's scales; its factors stay.
  assert set(loaded["quant_fixed"]["down"]) == {"act_smooth"}
  np.testing.assert_array_equal(
      loaded["quant_fixed"]["down"]["act_smooth"],
      serving["quant_fixed"]["down"]["act_smooth"])
  again = cal.with_mode("serve").apply(loaded, _inputs(5))
  np.testing.assert_array_equal(again, served)


def test_nnx_stored_ranges_survive_save_and_load(tmp_path):
  ncal, variables = _nnx_result("awq")
  result = jaxq.calibrate(ncal, variables, _batches(), progress=False)
  serve = jaxq.quantize_model(_nnx_twin()[0], RULES, mode="serve")
  serving, _ = jaxq.convert(serve, variables, result.stats)
  nnx.update(serve, serving)
  x = _inputs(5)
  before = serve(x)
  path = str(tmp_path / "awq_nnx.safetensors")
  jaxq.save(path, serving, RULES)
  loaded = jaxq.load(path).variables
  assert "jaxq_act_smooth" in loaded["down"]
  assert "jaxq_weight_range" not in loaded["down"]  # In the QArray's scales.
  assert "jaxq_weight_range" in nnx.to_pure_dict(variables)["down"]
  fresh = jaxq.quantize_model(_nnx_twin()[0], RULES, mode="serve")
  nnx.update(fresh, serving)  # The structure, with every value replaced:
  flat = nnx.to_flat_state(nnx.state(fresh))
  for key, variable in flat:
    node = loaded
    for name in key:
      node = node[name]
    variable.set_value(node)
  np.testing.assert_array_equal(fresh(x), before)
  assert isinstance(fresh.down.jaxq_act_smooth, jaxq.flax.QuantFixed)


@pytest.mark.parametrize("algorithm", ["gptq", "awq", "smoothquant"])
def test_masked_rows_change_nothing(algorithm):
  # Only at masked positions (MASK keeps [:, :4]): huge values, which a
  # mask that weighs rows by 0 would stop, and NaN, which only a mask that
  # selects rows out of every statistic stops (valid input: a NaN at
  # padding is no error). The same variables as on clean data.
  _, cal, params = _linen()
  padded = _inputs(0).at[:, 4].set(1e6).at[:, 5].set(jnp.nan)
  reference = _linen_result(algorithm)
  if algorithm == "gptq":
    got = jaxq.gptq(cal, params, _batches(padded), progress=False)
  elif algorithm == "awq":
    got = jaxq.awq(cal, params, _batches(padded), fold_into=FOLD,
                   num_exponents=5, clip_ratios=5, progress=False)
  else:
    got = jaxq.smoothquant(cal, params, _batches(padded), alpha=None,
                           alphas=(0.3, 0.6, 0.9), fold_into=FOLD,
                           progress=False)
  jax.tree.map(np.testing.assert_array_equal, got, reference)


def test_smoothquant_w8a8_serves_int8_dots():
  rules = (jaxq.Rule(".*", weight=QuantSpec("int8", PerChannel(axis=-1)),
                     act=A8),)
  model, _, params = _linen()
  cal = jaxq.quantize_model(model, rules, mode="calibrate")
  smoothed = jaxq.smoothquant(cal, params, _batches(), alpha=0.8,
                              fold_into=FOLD, progress=False)
  served, qat, serving = _serve_vs_fake_quant(cal, smoothed)
  np.testing.assert_allclose(served, qat, rtol=1e-4, atol=1e-4)
  serve = cal.with_mode("serve")
  summary = jaxq.inspect(serve.apply, serving, _inputs(5)).summary()
  assert summary.shares["int8"] == 1.0


# Errors name the layer.


def test_alpha_outside_unit_interval_raises():
  _, cal, params = _linen()
  with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
    jaxq.smoothquant(cal, params, _batches(), alpha=1.5, progress=False)
  with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
    jaxq.smoothquant(cal, params, _batches(), alpha={"q": -0.1},
                     progress=False)


def test_singular_hessian_names_the_layer():
  _, cal, params = _linen()
  # One real row: X^T X has rank 1, and percdamp=0 leaves it singular.
  mask = jnp.zeros((4, 6), bool).at[0, 0].set(True)
  with pytest.raises(ValueError, match=r"gptq: 'q'.*singular"):
    jaxq.gptq(cal, params, [Batch((_inputs(0),), {}, mask)], percdamp=0.0,
              progress=False)


def test_fully_masked_layer_names_the_layer():
  _, cal, params = _linen()
  mask = jnp.zeros((4, 6), bool)
  with pytest.raises(ValueError, match=r"'q'.*masked"):
    jaxq.awq(cal, params, [Batch((_inputs(0),), {}, mask)], progress=False)


class _Branchy(nn.Module):
  @nn.compact
  def __call__(self, x, use_extra: bool = False):
    y = nn.Dense(8, name="main")(x)
    return nn.Dense(8, name="extra")(y) if use_extra else y


def test_layer_never_reached_names_the_layer():
  model = _Branchy()
  x = _inputs(0)
  params = model.init(jax.random.key(0), x, True)
  cal = jaxq.quantize_model(model, RULES, mode="calibrate")
  jax.eval_shape(lambda v: cal.apply(v, x, True, mutable=["quant_stats"]),
                 params)
  with pytest.raises(ValueError, match=r"gptq.*never reached.*\['extra'\]"):
    jaxq.gptq(cal, params, [x], layers=["main", "extra"], progress=False)


class _Convy(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="head")(nn.Conv(4, (3, 3), name="conv")(x))


def test_convolution_gets_a_clear_error_naming_it():
  model = _Convy()
  x = jnp.ones((2, 6, 6, 3))
  params = model.init(jax.random.key(0), x)
  cal = jaxq.quantize_model(model, [jaxq.Rule(".*", weight=W4)],
                            mode="calibrate")
  jax.eval_shape(lambda v: cal.apply(v, x, mutable=["quant_stats"]), params)
  for run in (jaxq.gptq, jaxq.awq, jaxq.smoothquant):
    with pytest.raises(ValueError, match=r"'conv' is a Conv"):
      run(cal, params, [x], progress=False)
  # Leaving the convolution out works.
  out = jaxq.gptq(cal, params, [x], layers=["head"], progress=False)
  assert set(out["quant_fixed"]) == {"head"}


def test_calibrate_mode_is_required():
  model, cal, params = _linen()
  with pytest.raises(ValueError, match="mode='calibrate'"):
    jaxq.gptq(cal.with_mode("qat"), params, _batches(), progress=False)


def _smooth_with_act_ranges(x: jax.Array | None = None):
  """`_linen`'s variables smoothed (alpha 0.5) with static act ranges."""
  _, cal, params = _linen()
  return jaxq.smoothquant(cal, params, _batches(x), alpha=0.5, fold_into=FOLD,
                          act_ranges=True, progress=False)


@functools.lru_cache(maxsize=None)
def _smoothed_with_act_ranges():
  """`_smooth_with_act_ranges` on the clean batches, run once for the two
  tests that read it."""
  return _smooth_with_act_ranges()


def test_smoothquant_act_ranges_skip_padding_and_serve():
  _, cal, _ = _linen()
  smoothed = _smoothed_with_act_ranges()
  # Huge values at padding positions change no range.
  jax.tree.map(np.testing.assert_array_equal,
               _smooth_with_act_ranges(_inputs(0).at[:, 4:].set(1e6)),
               smoothed)
  assert set(smoothed["quant_ranges"]) == set(PATHS)
  # down's range is the max of its unmasked inputs divided by its factors.
  captured = jaxq.flax.adapt(cal, smoothed).capture_inputs(_batches(),
                                                          ["down"])
  x_down = np.asarray(captured.inputs["down"][0][0])[np.asarray(MASK)]
  factors = smoothed["quant_fixed"]["down"]["act_smooth"]
  np.testing.assert_allclose(
      smoothed["quant_ranges"]["down"]["act"]["amax"].reshape(()),
      np.max(np.abs(x_down / factors)), rtol=1e-6)
  # Convert needs no calibration pass: the ranges are in the variables.
  serving, _ = jaxq.convert(cal, smoothed)
  x = _inputs(5)
  served = cal.with_mode("serve").apply(serving, x)
  qat = cal.with_mode("qat").apply(smoothed, x)
  np.testing.assert_allclose(served, qat, rtol=1e-4, atol=1e-4)


class _General(nn.Module):
  """DenseGeneral contracting two axes, then an Einsum."""

  @nn.compact
  def __call__(self, x):  # (b, t, 2, 8)
    h = nn.DenseGeneral(12, axis=(-2, -1), name="general")(x)
    return nn.Einsum((12, 6), "btd,dh->bth", name="einsum")(h)


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_dense_general_and_einsum_kernels_reshape_to_2d(algorithm):
  model = _General()
  x = _inputs(0).reshape(4, 6, 2, 8)
  params = model.init(jax.random.key(0), x)
  cal = jaxq.quantize_model(model, RULES, mode="calibrate")
  batches = [Batch((x,), {}, MASK)]
  variables = getattr(jaxq, algorithm)(cal, params, batches, progress=False)
  kernel = variables["params"]["general"]["kernel"]
  assert kernel.shape == (2, 8, 12)
  assert variables["quant_fixed"]["general"]["weight_range"]["amax"].shape \
      == (1, 1, 12)
  result = jaxq.calibrate(cal, variables, batches, progress=False)
  serving, _ = jaxq.convert(cal, variables, result.stats)
  served = cal.with_mode("serve").apply(serving, x)
  qat = cal.with_mode("qat").apply(
      {**variables, "quant_ranges": serving["quant_ranges"]}, x)
  np.testing.assert_allclose(served, qat, rtol=1e-4, atol=1e-4)


def test_nnx_smoothquant_act_ranges_match_linen():
  _, cal, _ = _linen()
  linen_vars = _smoothed_with_act_ranges()
  model, ncal = _nnx_twin()
  nnx_vars = jaxq.smoothquant(ncal, None, _batches(), alpha=0.5,
                              fold_into=FOLD, act_ranges=True, progress=False)
  for path in PATHS:
    np.testing.assert_allclose(
        nnx_vars[path]["jaxq_act_range"].get_value()["amax"],
        linen_vars["quant_ranges"][path]["act"]["amax"], rtol=1e-5)
  serve = jaxq.quantize_model(model, RULES, mode="serve")
  serving, _ = jaxq.convert(serve, nnx_vars)
  nnx.update(serve, serving)
  linen_serving, _ = jaxq.convert(cal, linen_vars)
  np.testing.assert_allclose(
      serve(_inputs(5)),
      cal.with_mode("serve").apply(linen_serving, _inputs(5)),
      rtol=1e-4, atol=1e-4)


def test_gptq_after_smoothquant_sees_the_smoothed_inputs():
  model, cal, params = _linen()
  smoothed = _linen_result("smoothquant")
  both = jaxq.gptq(cal, smoothed, _batches(), progress=False)
  # down's Hessian is built from its inputs divided by its factors.
  captured = jaxq.flax.adapt(cal, both).capture_inputs(_batches(), ["down"])
  rows = np.asarray(captured.inputs["down"][0][0])[np.asarray(MASK)]
  factors = smoothed["quant_fixed"]["down"]["act_smooth"]
  hessian = jaxq.algorithms.hessian_update(jnp.zeros((16, 16)),
                                          jnp.asarray(rows / factors))
  expected = jaxq.algorithms.gptq(smoothed["params"]["down"]["kernel"],
                                  hessian, W4, percdamp=0.1, act_order=True)
  np.testing.assert_allclose(both["params"]["down"]["kernel"],
                             expected.kernel, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(both["quant_fixed"]["down"]["act_smooth"],
                                factors)


def test_a_second_smoothing_pass_stacks_its_factors():
  model, cal, params = _linen()
  once = _linen_result("smoothquant")
  twice = jaxq.smoothquant(cal, once, _batches(), alpha=0.5, progress=False)
  x = _inputs(3)
  out, _ = cal.apply(twice, x, mutable=["quant_stats"])
  np.testing.assert_allclose(out, model.apply(params, x), rtol=1e-4,
                             atol=1e-4)
  assert not np.allclose(twice["quant_fixed"]["down"]["act_smooth"],
                         once["quant_fixed"]["down"]["act_smooth"])


def test_learned_weight_scale_starts_from_the_calibrated_range():
  model = nn.Dense(8)
  x = jnp.ones((2, 64))
  spec = QuantSpec("int4", PerChannel(axis=-1), calibration="mse",
                   learn="lsq")
  qmodel = jaxq.quantize_model(model, [jaxq.Rule(".*", weight=spec)])
  variables = qmodel.init(jax.random.key(0), x)
  kernel = variables["params"]["kernel"]
  _, amax = jaxq.algorithms.weight_range(kernel, spec)
  np.testing.assert_allclose(variables["params"]["jaxq"]["weight_scale"],
                             jaxq.learned.init_param(spec, amax), rtol=1e-6)
  _, abs_max = jaxq.compute_range(kernel, spec.replace(calibration="max"))
  assert not np.allclose(amax, abs_max)  # mse clipped some channel.


# "g128" on SmolLM2's width: 576 inputs, four groups of 128 and one of 64.


class LinenG128(nn.Module):
  """One 576-input Dense, as SmolLM2's q/k/v/gate/up projections."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(16, name="proj")(x)


G128_RULES = (jaxq.Rule(".*", weight=QuantSpec("int4", jaxq.PerGroup(0, 128)),
                        act=A8),)


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_ragged_g128_algorithms_store_ragged_ranges_and_serve(algorithm):
  model = LinenG128()
  # Correlated inputs (GPTQ's error feedback needs them) with outliers, one
  # in the short last group; more rows than inputs, so the Hessian is full.
  mix = jnp.eye(576) + 0.05 * jax.random.normal(jax.random.key(3),
                                                 (576, 576))
  scale = jnp.ones((576,)).at[5].set(20.0).at[570].set(8.0)
  x, held_out = (jax.random.normal(jax.random.key(i), (1024, 576)) @ mix *
                 scale for i in (0, 1))
  params = model.init(jax.random.key(2), x)
  cal = jaxq.quantize_model(model, G128_RULES, mode="calibrate")
  batches = [Batch((x,), {})]
  if algorithm == "gptq":
    variables = jaxq.gptq(cal, params, batches, progress=False)
  else:
    variables = jaxq.awq(cal, params, batches, num_exponents=5, clip_ratios=3,
                         progress=False)
  assert variables["quant_fixed"]["proj"]["weight_range"]["amax"].shape == (
      5, 16)
  result = jaxq.calibrate(cal, variables, batches, progress=False)
  serving, _ = jaxq.convert(cal, variables, result.stats)
  assert serving["params"]["proj"]["kernel"].scale.shape == (5, 16)
  served = cal.with_mode("serve").apply(serving, held_out)
  qat = cal.with_mode("qat").apply(
      {**variables, "quant_ranges": serving["quant_ranges"]}, held_out)
  np.testing.assert_allclose(served, qat, rtol=1e-4, atol=1e-4)
  # Weight-only, the algorithm's kernel beats rounding the float one.
  weight_only = jaxq.quantize_model(
      model, (jaxq.Rule(".*", weight=G128_RULES[0].weight),), mode="qat")
  ref = model.apply(params, held_out)
  err = lambda v: float(jnp.mean((weight_only.apply(v, held_out) - ref) ** 2))
  assert err(variables) < err(params)
