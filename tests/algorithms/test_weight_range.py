"""Tests for `jaxq.algorithms.weight_range`: max, percentile and mse ranges
per scale, checked against NumPy block by block."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import MX, PerBlock, PerChannel, PerGroup, PerTensor, QuantSpec
from jaxq.algorithms import weight_range
from jaxq.algorithms.weight_range import block_squared_error


def heavy_tailed(shape=(64, 24), seed=0):
  rng = np.random.default_rng(seed)
  return rng.standard_t(df=3, size=shape).astype(np.float32)


def numpy_blocks(w, blocks):
  """Every block of w as a flat array, in scale (row-major) order."""
  rows, cols = w.shape[0] // blocks[0], w.shape[1] // blocks[1]
  return np.array([[w[i * blocks[0]:(i + 1) * blocks[0],
                      j * blocks[1]:(j + 1) * blocks[1]].ravel()
                    for j in range(cols)] for i in range(rows)])


@pytest.mark.parametrize("granularity", [
    PerChannel(-1), PerGroup(axis=0, size=16), PerTensor(),
    PerBlock((16, 8))])
def test_max_equals_compute_range(granularity):
  w = heavy_tailed()
  spec = QuantSpec("int4", granularity)
  np.testing.assert_array_equal(weight_range(w, spec)[1],
                                jaxq.compute_range(w, spec)[1])


@pytest.mark.parametrize("granularity,blocks", [
    (PerChannel(-1), (64, 1)), (PerGroup(axis=0, size=16), (16, 1)),
    (PerBlock((16, 8)), (16, 8))])
def test_percentile_equals_numpy(granularity, blocks):
  w = heavy_tailed()
  spec = QuantSpec("int8", granularity, calibration="percentile",
                   percentile=99.0)
  amin, amax = weight_range(w, spec)
  assert amin is None
  want = np.percentile(np.abs(numpy_blocks(w, blocks)), 99.0, axis=-1)
  np.testing.assert_allclose(amax, want, rtol=1e-5)
  affine = spec.replace(symmetric=False)
  amin, amax = weight_range(w, affine)
  np.testing.assert_allclose(
      amin, np.percentile(numpy_blocks(w, blocks), 1.0, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(
      amax, np.percentile(numpy_blocks(w, blocks), 99.0, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("granularity", [PerGroup(axis=0, size=24),
                                         PerBlock((24, 10))],
                         ids=["G24", "B24x10"])
@pytest.mark.parametrize("calibration", ["max", "percentile"])
def test_ragged_blocks_are_ranged_over_their_own_elements(granularity,
                                                          calibration):
  # (64, 24): rows 24 + 24 + 16, columns (blocks of 10) 10 + 10 + 4.
  w = heavy_tailed()
  spec = QuantSpec("uint8", granularity, symmetric=False,
                   calibration=calibration,
                   **({"percentile": 90.0} if calibration == "percentile"
                      else {}))
  amin, amax = weight_range(w, spec)
  b_rows, b_cols = spec.granularity.block_shape(w.shape)
  assert amax.shape == (3, 24 if b_cols == 1 else 3)
  low, high = ((np.min, np.max) if calibration == "max" else
               (lambda b: np.percentile(b, 10.0),
                lambda b: np.percentile(b, 90.0)))
  for i in range(amax.shape[0]):
    for j in range(amax.shape[1]):
      block = w[i * b_rows:(i + 1) * b_rows, j * b_cols:(j + 1) * b_cols]
      np.testing.assert_allclose(amin[i, j], low(block), rtol=1e-5)
      np.testing.assert_allclose(amax[i, j], high(block), rtol=1e-5)


@pytest.mark.parametrize("spec", [
    QuantSpec("int4", PerChannel(-1), calibration="mse"),
    QuantSpec("int4", PerGroup(axis=0, size=16), calibration="mse"),
    QuantSpec("int4", PerGroup(axis=0, size=24), calibration="mse"),
    QuantSpec("uint8", PerChannel(-1), symmetric=False, calibration="mse"),
    QuantSpec("float8_e4m3fn", MX(axis=0, size=32), calibration="mse"),
])
def test_mse_never_worse_than_max_per_scale(spec):
  w = jnp.asarray(heavy_tailed())
  blocks = spec.granularity.block_shape(w.shape)
  amin, amax = weight_range(w, spec, num_ratios=50)
  max_spec = spec.replace(calibration="max")
  err_mse = block_squared_error(
      w, jaxq.fake_quant(w, spec, amax=amax, amin=amin), blocks)
  err_max = block_squared_error(w, jaxq.fake_quant(w, max_spec), blocks)
  assert amax.shape == jaxq.compute_range(w, max_spec)[1].shape
  assert np.all(err_mse <= err_max * (1 + 1e-6))
  if spec.format == "int4":  # Clipping t(3) tails pays off at 4 bits,
    # most over the 64 weights of a channel (the max range of a group of 16
    # clips little less than the best ratio does).
    gain = 0.98 if isinstance(spec.granularity, PerChannel) else 0.999
    assert np.sum(err_mse) < gain * np.sum(err_max)


# int4's default full range: step amax / 7.5 over [-8, 7]; narrow: amax / 7.
@pytest.mark.parametrize("narrow_range,level,qmin", [(None, 7.5, -8),
                                                     (True, 7.0, -7)])
def test_mse_picks_the_grid_minimum(narrow_range, level, qmin):
  w = heavy_tailed((32, 4), seed=3)
  spec = QuantSpec("int4", PerChannel(-1), calibration="mse",
                   narrow_range=narrow_range)
  _, amax = weight_range(w, spec, num_ratios=11, min_ratio=0.5)
  # Ratio 1 is the max range: in the full range, the smallest holding both
  # ends within half a step.
  reach = 1.0 if narrow_range else 8.5 / 7.5
  full = np.maximum(w.max(axis=0), -w.min(axis=0) / reach)
  for col in range(4):
    errors = []
    for r in np.linspace(1.0, 0.5, 11):
      step = full[col] * r / level
      q = np.clip(np.round(w[:, col] / step), qmin, 7) * step
      errors.append(np.sum((w[:, col] - q) ** 2))
    best = np.linspace(1.0, 0.5, 11)[int(np.argmin(errors))]
    np.testing.assert_allclose(amax[0, col], full[col] * best, rtol=1e-5)


def test_bad_calibration_and_sizes_raise():
  w = heavy_tailed()
  with pytest.raises(ValueError, match="'entropy' is for activations"):
    weight_range(w, QuantSpec("int8", PerChannel(-1), calibration="entropy"))
  # A group may be ragged, an MX block may not.
  with pytest.raises(ValueError, match="size 48 does not divide axis 0 of "
                     "length 64"):
    weight_range(w, QuantSpec("float8_e4m3fn", MX(axis=0, size=48)))
  with pytest.raises(ValueError, match="min_ratio"):
    weight_range(w, QuantSpec("int4", calibration="mse"), min_ratio=0.0)


def test_ranges_of_a_dense_general_kernel():
  # A (d_in, heads, head_dim) kernel with one scale per output (head, dim).
  w = heavy_tailed((32, 4, 6), seed=5)
  spec = QuantSpec("int4", PerChannel(axis=(1, 2)), calibration="percentile",
                   percentile=90.0)
  _, amax = weight_range(w, spec)
  # int4's full range: negative values reach 8.5 / 7.5 further.
  magnitude = np.maximum(w, -w * 7.5 / 8.5)
  np.testing.assert_allclose(
      amax, np.percentile(magnitude, 90.0, axis=0, keepdims=True), rtol=1e-5)
  mse = spec.replace(calibration="mse")
  _, amax = weight_range(w, mse, num_ratios=20)
  assert amax.shape == (1, 4, 6)
  assert np.all(amax <= np.abs(w).max(axis=0, keepdims=True))


def test_mse_error_weight_picks_the_weighted_grid_minimum():
  w = heavy_tailed((32, 4), seed=4)
  rng = np.random.default_rng(4)
  row_weight = np.exp(2.0 * rng.normal(size=(32, 1))).astype(np.float32)
  spec = QuantSpec("int4", PerChannel(-1), calibration="mse")
  _, amax = weight_range(w, spec, num_ratios=11, min_ratio=0.5,
                         error_weight=row_weight)
  full = jaxq.compute_range(w, spec.replace(calibration="max"))[1]
  ratios = np.linspace(1.0, 0.5, 11, dtype=np.float32)
  errors = [np.sum(row_weight * (w - np.asarray(
      jaxq.fake_quant(w, spec, amax=full * r))) ** 2, axis=0)
            for r in ratios]
  best = ratios[np.argmin(errors, axis=0)]
  np.testing.assert_allclose(amax, full * best, rtol=1e-5)
  _, unweighted = weight_range(w, spec, num_ratios=11, min_ratio=0.5)
  assert not np.allclose(amax, unweighted)


def test_error_weight_is_checked():
  w = heavy_tailed()
  mse = QuantSpec("int4", PerChannel(-1), calibration="mse")
  with pytest.raises(ValueError, match="error_weight weights the 'mse'"):
    weight_range(w, mse.replace(calibration="max"),
                 error_weight=np.ones((64, 1)))
  with pytest.raises(ValueError, match=r"shape \(24, 1\) does not broadcast "
                     r"to the weight's shape \(64, 24\)"):
    weight_range(w, mse, error_weight=np.ones((24, 1)))
