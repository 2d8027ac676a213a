"""Tests for `jaxq.algorithms.awq` and `jaxq.algorithms.stats`: AWQ never
loses to plain rounding on its objective, clipping never loses to none, the
statistics match NumPy and ignore masked rows."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import MX, PerChannel, PerGroup, QuantSpec
from jaxq.algorithms import (awq, awq_factors, init_input_stats, scale_kernel,
                             update_input_stats)
from jaxq.algorithms.awq import block_output_error


def salient_problem(n=256, d_in=64, d_out=32, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d_in)) * np.exp(1.5 * rng.normal(size=d_in))
  w = rng.normal(size=(d_in, d_out)) * 0.1
  return x.astype(np.float32), w.astype(np.float32)


def stats_of(x, mask=None):
  return update_input_stats(init_input_stats(x.shape[-1]), x, mask)


def awq_kernel(w, result, spec):
  scaled = scale_kernel(jnp.asarray(w), result.factors)
  q = jaxq.fake_quant(scaled, spec, amax=result.amax, amin=result.amin)
  return q / result.factors[:, None]


def output_error(x, w, w_hat):
  x, w, w_hat = (np.asarray(a, np.float64) for a in (x, w, w_hat))
  return float(np.sum((x @ w - x @ w_hat) ** 2))


def test_stats_match_numpy_and_ignore_masked_rows():
  x, _ = salient_problem()
  junk = np.full((4, x.shape[1]), np.inf, np.float32)
  padded = np.concatenate([x, junk])
  mask = np.arange(len(padded)) < len(x)
  stats = update_input_stats(stats_of(padded[:100], mask[:100]),
                             padded[100:], mask[100:])
  assert float(stats.count) == len(x)
  np.testing.assert_allclose(stats.abs_mean, np.abs(x).mean(axis=0),
                             rtol=1e-5)
  np.testing.assert_array_equal(stats.abs_max, np.abs(x).max(axis=0))
  np.testing.assert_allclose(stats.gram, x.astype(np.float64).T @ x,
                             rtol=1e-4, atol=1e-2)


def test_factors_are_normalised_and_finite():
  abs_mean = jnp.array([0.0, 1e-3, 1.0, 10.0, 1e3])
  factors = awq_factors(abs_mean, 0.5)
  assert float(factors[0]) == 1.0  # A channel that never fires.
  alive = np.asarray(factors[1:])
  np.testing.assert_allclose(np.sqrt(alive.max() * alive.min()), 1.0,
                             rtol=1e-5)
  np.testing.assert_allclose(alive / alive[1], np.sqrt(abs_mean[1:] / 1.0),
                             rtol=1e-5)
  np.testing.assert_array_equal(awq_factors(abs_mean, 0.0), 1.0)


@pytest.mark.parametrize("spec", [
    QuantSpec("int4", PerChannel(-1)),
    QuantSpec("int4", PerGroup(axis=0, size=16)),
    QuantSpec("int4", PerGroup(axis=0, size=24)),  # Ragged: 24 + 24 + 16.
    QuantSpec("float8_e4m3fn", MX(axis=0, size=32)),
])
def test_awq_beats_rounding(spec):
  x, w = salient_problem()
  # The grid of test_clipping_never_loses_per_scale's plain search: one
  # compiled search for both (got / rtn measured at most 0.85, MX).
  result = awq(w, stats_of(x), spec, num_exponents=5)
  rtn = output_error(x, w, jaxq.fake_quant(jnp.asarray(w), spec))
  got = output_error(x, w, awq_kernel(w, result, spec))
  # The grid holds exponent 0 (no scaling), so AWQ can only tie or win;
  # these salient channels make it win.
  assert got < 0.9 * rtn
  assert float(result.exponent) > 0
  np.testing.assert_allclose(got, float(np.min(result.errors)), rtol=1e-3)


@pytest.mark.parametrize("spec", [
    QuantSpec("int4", PerChannel(-1)),
    QuantSpec("int4", PerGroup(axis=0, size=16)),
    QuantSpec("uint8", PerGroup(axis=0, size=16), symmetric=False),
    QuantSpec("int4", PerGroup(axis=0, size=24)),  # Ragged: 24 + 24 + 16.
])
def test_clipping_never_loses_per_scale(spec):
  x, w = salient_problem(seed=1)
  stats = stats_of(x)
  plain = awq(w, stats, spec, num_exponents=5)
  clipped = awq(w, stats, spec, num_exponents=5, clip_ratios=10)
  np.testing.assert_array_equal(clipped.factors, plain.factors)
  assert clipped.amax.shape == plain.amax.shape
  assert (clipped.amin is None) == spec.symmetric
  blocks = spec.granularity.block_shape(w.shape)
  gram = stats.gram / (plain.factors[:, None] * plain.factors[None, :])
  scaled = scale_kernel(jnp.asarray(w), plain.factors)

  def errors(result):
    q = jaxq.fake_quant(scaled, spec, amax=result.amax, amin=result.amin)
    return block_output_error(gram, scaled - q, blocks)

  assert np.all(errors(clipped) <= errors(plain) * (1 + 1e-5))
  assert np.all(clipped.clip_ratio <= 1.0) and np.all(clipped.clip_ratio >= 0.5)


def test_mse_range_weighs_the_scaled_inputs_second_moment():
  """Without clipping, an "mse" spec searches the output error's diagonal
  (each squared error times the scaled input's E[x^2]), not the weight's."""
  x, w = salient_problem(seed=2)
  spec = QuantSpec("int4", PerChannel(-1), calibration="mse")
  result = awq(w, stats_of(x), spec, num_exponents=5)
  scaled = scale_kernel(jnp.asarray(w), result.factors)
  moment = np.sum(x.astype(np.float64) ** 2, axis=0) / np.square(
      np.asarray(result.factors, np.float64))
  _, weighted = jaxq.algorithms.weight_range(
      scaled, spec, error_weight=jnp.asarray(moment, jnp.float32)[:, None])
  np.testing.assert_allclose(result.amax, weighted, rtol=1e-6)
  _, plain = jaxq.algorithms.weight_range(scaled, spec)
  assert not np.allclose(result.amax, plain)


def test_block_output_error_sums_to_the_output_error():
  x, w = salient_problem(seed=2)
  diff = np.random.default_rng(0).normal(size=w.shape).astype(np.float32)
  gram = jnp.asarray(x.astype(np.float64).T @ x, jnp.float32)
  per_channel = block_output_error(gram, diff, (64, 1))
  np.testing.assert_allclose(np.sum(per_channel),
                             np.sum((x.astype(np.float64) @ diff) ** 2),
                             rtol=1e-4)
  per_group = block_output_error(gram, diff, (16, 1))
  x4 = x.reshape(len(x), 4, 16).astype(np.float64)
  d4 = diff.reshape(4, 16, -1)
  want = np.sum(np.einsum("ngk,gko->ngo", x4, d4) ** 2, axis=0)
  np.testing.assert_allclose(per_group, want, rtol=1e-4)


def test_block_output_error_of_ragged_blocks_is_each_blocks_own():
  x, w = salient_problem(seed=4)
  diff = np.random.default_rng(1).normal(size=w.shape).astype(np.float64)
  gram = jnp.asarray(x.astype(np.float64).T @ x, jnp.float32)
  # (64, 32) in blocks of (24, 10): rows 24 + 24 + 16, columns 10+10+10+2.
  got = np.asarray(block_output_error(gram, jnp.asarray(diff, jnp.float32),
                                      (24, 10)))
  assert got.shape == (3, 4)
  x64 = x.astype(np.float64)
  for i, rows in enumerate((slice(0, 24), slice(24, 48), slice(48, 64))):
    for j, cols in enumerate((slice(0, 10), slice(10, 20), slice(20, 30),
                              slice(30, 32))):
      want = np.sum((x64[:, rows] @ diff[rows, cols]) ** 2)
      np.testing.assert_allclose(got[i, j], want, rtol=1e-4)


def test_masked_rows_change_nothing():
  x, w = salient_problem(seed=3)
  spec = QuantSpec("int4", PerGroup(axis=0, size=16))
  padded = np.concatenate([x, np.full((3, x.shape[1]), 1e9, np.float32)])
  mask = np.arange(len(padded)) < len(x)
  # test_clipping_never_loses_per_scale's grids: its compiled search.
  a = awq(w, stats_of(x), spec, num_exponents=5, clip_ratios=10)
  b = awq(w, stats_of(padded, mask), spec, num_exponents=5, clip_ratios=10)
  np.testing.assert_allclose(a.factors, b.factors, rtol=1e-6)
  np.testing.assert_allclose(a.amax, b.amax, rtol=1e-6)


def test_bad_inputs_raise():
  x, w = salient_problem()
  # A group may be ragged (tested above), an MX block may not.
  with pytest.raises(ValueError, match="size 24 does not divide axis 0 of "
                     "length 64"):
    awq(w, stats_of(x), QuantSpec("float8_e4m3fn", MX(axis=0, size=24)))
  with pytest.raises(ValueError, match="hold no rows"):
    awq(w, init_input_stats(64), QuantSpec("int4", PerChannel(-1)))
  with pytest.raises(ValueError, match="do not match"):
    awq(w, stats_of(x[:, :32]), QuantSpec("int4", PerChannel(-1)))
