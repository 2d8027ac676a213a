"""Tests for `jaxq.algorithms.smoothquant`: the factor formula, the float
identity of the rescaling, the alpha search and its row mask."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxq import PerChannel, PerTensor, QuantSpec
from jaxq.algorithms import (scale_input, scale_kernel, search_alpha,
                             smoothing_factors)
from jaxq.algorithms.smoothquant import smoothed_output_error


def outlier_problem(n=128, d_in=32, d_out=16, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d_in))
  x[:, 3] *= 60.0  # Activation outlier channels, as in LLMs.
  x[:, 17] *= 25.0
  w = rng.normal(size=(d_in, d_out)) * 0.1
  return x.astype(np.float32), w.astype(np.float32)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_factors_formula(alpha):
  x, w = outlier_problem()
  act_amax = np.abs(x).max(axis=0)
  want = act_amax ** alpha / np.abs(w).max(axis=1) ** (1 - alpha)
  np.testing.assert_allclose(smoothing_factors(act_amax, w, alpha), want,
                             rtol=1e-5)


def test_zero_channels_get_factor_one():
  x, w = outlier_problem()
  act_amax = np.abs(x).max(axis=0)
  act_amax[0] = 0.0
  w[1] = 0.0
  factors = smoothing_factors(act_amax, w, 0.5)
  assert np.all(np.isfinite(factors)) and np.all(factors > 0)
  np.testing.assert_array_equal(factors[:2], 1.0)


def test_rescaling_preserves_the_float_product():
  x, w = outlier_problem()
  factors = smoothing_factors(np.abs(x).max(axis=0), w, 0.7)
  np.testing.assert_allclose(
      scale_input(jnp.asarray(x), factors) @ scale_kernel(w, factors), x @ w,
      rtol=1e-4, atol=1e-3)


def test_search_beats_no_smoothing_and_reports_the_grid_minimum():
  x, w = outlier_problem()
  w_spec = QuantSpec("int8", PerChannel(-1))
  a_spec = QuantSpec("int8", PerTensor(), dynamic=False)
  alphas = (0.0, 0.25, 0.5, 0.75, 1.0)
  result = search_alpha(w, x, alphas=alphas)
  assert float(result.alpha) in alphas
  assert result.errors.shape == (5,)
  best = float(np.min(result.errors))
  np.testing.assert_allclose(
      smoothed_output_error(jnp.asarray(w), jnp.asarray(x), result.factors,
                            w_spec, a_spec), best, rtol=1e-5)
  unsmoothed = smoothed_output_error(jnp.asarray(w), jnp.asarray(x),
                                     jnp.ones(32), w_spec, a_spec)
  assert best < 0.5 * float(unsmoothed)


def test_masked_rows_change_nothing():
  x, w = outlier_problem()
  junk = np.full((2, x.shape[1]), 1e8, np.float32)
  padded = np.concatenate([x, junk]).reshape(2, -1, x.shape[1])
  mask = (np.arange(len(x) + 2) < len(x)).reshape(2, -1)
  a = search_alpha(w, x)
  b = search_alpha(w, padded, mask=mask)
  assert float(a.alpha) == float(b.alpha)
  np.testing.assert_allclose(a.factors, b.factors, rtol=1e-6)
  np.testing.assert_allclose(a.errors, b.errors, rtol=1e-5)


def test_bad_alpha_and_shapes_raise():
  x, w = outlier_problem()
  with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 1.5"):
    smoothing_factors(np.abs(x).max(axis=0), w, 1.5)
  with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got -0.1"):
    search_alpha(w, x, alphas=(0.5, -0.1))
  with pytest.raises(ValueError, match="row mask has shape"):
    search_alpha(w, x, mask=np.ones(3, bool))
  with pytest.raises(ValueError, match="do not match"):
    search_alpha(w, x[:, :8])
