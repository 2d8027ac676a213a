"""The ``calibration="mse"`` weight range from calibration data.

`jaxq.calibrate` records, for a layer whose weight spec has
``calibration="mse"``, its input's per-channel sum of squares and row count
(an `jaxq.algorithms.InputMoment`, masked rows out); `jaxq.convert` given
those stats weights each squared weight error by its input channel's
``E[x^2]``, so the search minimises the layer's output error. The models
have one input channel 100x larger than the others (an LLM's outlier
channel): the plain weight MSE clips the weights that multiply it, the
data-aware search does not.
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
from jaxq.algorithms import weight_range
from jaxq.flax import core

D_IN, D_OUT, BATCH, SEQ = 32, 16, 4, 8
OUTLIER = 3
W4_MSE = QuantSpec("int4", PerChannel(axis=-1), calibration="mse")
W4_MAX = QuantSpec("int4", PerChannel(axis=-1))


class LinenDense(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(D_OUT, use_bias=False, name="fc")(x)


class NnxDense(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.fc = nnx.Linear(D_IN, D_OUT, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.fc(x)


def _inputs(seed: int = 0) -> jax.Array:
  """(BATCH, SEQ, D_IN) normal inputs, channel OUTLIER 100x larger."""
  scale = np.ones(D_IN, np.float32)
  scale[OUTLIER] = 100.0
  x = np.random.default_rng(seed).standard_normal((BATCH, SEQ, D_IN))
  return jnp.asarray(x.astype(np.float32) * scale)


def _linen(x):
  model = LinenDense()
  variables = model.init(jax.random.key(0), x)
  kernel = variables["params"]["fc"]["kernel"]
  return model, variables, kernel


def _nnx(x):
  del x
  model = NnxDense(nnx.Rngs(0))
  return model, nnx.state(model), model.fc.kernel.get_value()


def _converted(framework, weight, x, with_stats=True):
  """``(serve output, float output, input moments)`` of the calibrate and
  convert path."""
  model, variables, _ = (_linen if framework == "linen" else _nnx)(x)
  rules = [jaxq.Rule(r".*", weight=weight)]
  cal = jaxq.quantize_model(model, rules, mode="calibrate")
  stats = jaxq.calibrate(cal, variables, [x], progress=False).stats
  moments = jaxq.flax.adapt(cal).input_moments(stats)
  serve = jaxq.quantize_model(model, rules, mode="serve")
  serving, _ = jaxq.convert(cal, variables, stats if with_stats else None)
  if framework == "linen":
    return serve.apply(serving, x), model.apply(variables, x), moments
  nnx.update(serve, serving)
  return serve(x), model(x), moments


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_data_aware_mse_lowers_the_layer_output_error(framework):
  x = _inputs()
  data, y, moments = _converted(framework, W4_MSE, x)
  plain, _, _ = _converted(framework, W4_MSE, x, with_stats=False)
  absmax, _, _ = _converted(framework, W4_MAX, x)
  error = lambda out: float(jnp.mean(jnp.square(out - y)))
  # The plain weight MSE clips the outlier channel's weights: worse output.
  assert error(data) < 0.5 * error(plain)
  assert error(data) < 0.5 * error(absmax)
  moment = moments["fc"]
  np.testing.assert_allclose(moment.count, BATCH * SEQ)
  np.testing.assert_allclose(moment.square_sum,
                             jnp.sum(jnp.square(x), axis=(0, 1)), rtol=1e-5)


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_convert_searches_with_the_input_second_moment(framework):
  """The served kernel is exactly `weight_range`'s with E[x^2] per row."""
  x = _inputs()
  model, variables, kernel = (_linen if framework == "linen" else _nnx)(x)
  rules = [jaxq.Rule(r".*", weight=W4_MSE)]
  cal = jaxq.quantize_model(model, rules, mode="calibrate")
  stats = jaxq.calibrate(cal, variables, [x], progress=False).stats
  serving, _ = jaxq.convert(cal, variables, stats)
  adapter = jaxq.flax.adapt(cal, serving)
  served = adapter.read("fc", "kernel", serving)
  mean_square = jnp.mean(jnp.square(x), axis=(0, 1))
  _, amax = weight_range(kernel, W4_MSE, error_weight=mean_square[:, None])
  np.testing.assert_array_equal(served.values,
                                jaxq.quantize(kernel, W4_MSE, amax=amax).values)
  _, plain_amax = weight_range(kernel, W4_MSE)
  assert not np.allclose(amax, plain_amax)


def test_input_moment_ignores_masked_rows():
  x = _inputs()
  mask = jnp.arange(SEQ)[None, :] < jnp.asarray([8, 5, 3, 1])[:, None]
  padded = jnp.where(mask[..., None], x, 1e4)  # Huge padding: would show.
  model, variables, _ = _linen(x)
  cal = jaxq.quantize_model(model, [jaxq.Rule(r".*", weight=W4_MSE)],
                            mode="calibrate")
  stats = jaxq.calibrate(cal, variables,
                         [jaxq.flax.Batch((padded,), mask=mask)],
                         progress=False).stats
  moment = stats["fc"][core.INPUT_MOMENT]
  np.testing.assert_allclose(moment.count, int(jnp.sum(mask)))
  np.testing.assert_allclose(moment.square_sum,
                             jnp.sum(jnp.square(x[mask]), axis=0), rtol=1e-5)


def test_only_mse_weights_record_a_moment():
  x = _inputs()
  model, variables, _ = _linen(x)
  for weight in (W4_MAX, W4_MSE.replace(calibration="percentile")):
    cal = jaxq.quantize_model(model, [jaxq.Rule(r".*", weight=weight)],
                              mode="calibrate")
    stats = jaxq.calibrate(cal, variables, [x], progress=False).stats
    assert core.INPUT_MOMENT not in stats["fc"]


def test_convert_takes_ranges_and_the_stats_of_mse_weights():
  """``ranges=`` (a method's act ranges) and ``stats`` together: the act
  ranges come from ``ranges``, the weight's search from the stats."""
  x = _inputs()
  model, variables, kernel = _linen(x)
  act = QuantSpec("int8", PerTensor(), dynamic=False)
  rules = [jaxq.Rule(r".*", weight=W4_MSE, act=act)]
  cal = jaxq.quantize_model(model, rules, mode="calibrate")
  result = jaxq.calibrate(cal, variables, [x], methods=("max",),
                          progress=False)
  ranges = jax.tree.map(lambda a: a / 2, result.ranges("max"))
  serving, _ = jaxq.convert(cal, variables, result.stats, ranges=ranges)
  np.testing.assert_allclose(serving["quant_ranges"]["fc"]["act"]["amax"],
                             ranges["fc"]["act"]["amax"])
  mean_square = jnp.mean(jnp.square(x), axis=(0, 1))
  _, amax = weight_range(kernel, W4_MSE, error_weight=mean_square[:, None])
  np.testing.assert_allclose(serving["params"]["fc"]["kernel"].scale,
                             jaxq.quantize(kernel, W4_MSE, amax=amax).scale)


def test_input_error_weight_maps_channels_onto_the_kernel():
  layer = core.LayerQuant("conv", "Conv", W4_MSE, None, "serve")
  moment = jaxq.algorithms.InputMoment(
      count=jnp.asarray(2.0), square_sum=jnp.asarray([2.0, 4.0, 6.0, 8.0]))
  dense = core.input_error_weight(layer, (4, 5), moment)
  np.testing.assert_allclose(dense, [[1.0], [2.0], [3.0], [4.0]])
  assert core.input_error_weight(layer, (3, 3, 4, 6), moment).shape == (
      1, 1, 4, 1)
  # Two groups of two input channels, three outputs each.
  grouped = core.input_error_weight(layer, (3, 3, 2, 6), moment)
  np.testing.assert_allclose(grouped[0, 0], [[1, 1, 1, 3, 3, 3],
                                             [2, 2, 2, 4, 4, 4]])
  with pytest.raises(ValueError, match="4 channels.*kernel of shape"):
    core.input_error_weight(layer, (3, 5), moment)
  empty = moment._replace(count=jnp.asarray(0.0))
  np.testing.assert_allclose(core.input_error_weight(layer, (4, 5), empty),
                             np.ones((4, 1)))


class _ScanBlock(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(D_IN, use_bias=False, name="fc")(x), None


class _Scanned(nn.Module):
  """Two blocks in one ``nn.scan``: stacked kernels and statistics."""

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(_ScanBlock,
                    variable_axes={"params": 0, **jaxq.flax.SCAN_AXES},
                    split_rngs={"params": True}, length=2)
    return stack(name="layers")(x, None)[0]


def test_stacked_layers_search_with_their_own_moments():
  x = _inputs()
  model = _Scanned()
  variables = model.init(jax.random.key(0), x)
  rules = [jaxq.Rule(r".*", weight=W4_MSE)]
  cal = jaxq.quantize_model(model, rules, mode="calibrate")
  stats = jaxq.calibrate(cal, variables, [x], progress=False).stats
  moment = jaxq.flax.adapt(cal).input_moments(stats)["layers/fc"]
  assert moment.square_sum.shape == (2, D_IN)
  # Layer 0 sees x itself; layer 1 the first block's output.
  np.testing.assert_allclose(moment.square_sum[0],
                             jnp.sum(jnp.square(x), axis=(0, 1)), rtol=1e-5)
  serving, _ = jaxq.convert(cal, variables, stats)
  kernels = variables["params"]["layers"]["fc"]["kernel"]
  served = serving["params"]["layers"]["fc"]["kernel"]
  for i in range(2):
    _, amax = weight_range(kernels[i], W4_MSE,
                           error_weight=moment.mean_square[i][:, None])
    np.testing.assert_array_equal(
        served.values[i], jaxq.quantize(kernels[i], W4_MSE, amax=amax).values)
