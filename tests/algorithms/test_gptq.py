"""Tests for `jaxq.algorithms.gptq` against a float64 NumPy GPTQ.

The reference follows the paper row by row (no blocks, no lazy updates):
round one input row of the (d_in, d_out) kernel, push its error onto the
later rows through the upper Cholesky factor of the inverse Hessian.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import MX, PerChannel, PerGroup, PerTensor, QuantSpec
from jaxq.algorithms import gptq, hessian_update


def reference_gptq(w, h, qmax, group_size, act_order=False, percdamp=0.01,
                   full_range=True):
  """The paper's GPTQ in float64, symmetric integers; groups along d_in (the
  last one shorter when ``group_size`` does not divide d_in), each group's
  abs-max taken from its current rows when first reached.
  The full range (int4's default) rounds onto [-qmax - 1, qmax] with the
  step that clips neither end, max(max w / qmax, -min w / (qmax + 1)),
  stored as amax = step * (qmax + 0.5) (nudged by 2**-20); the narrow one
  onto [-qmax, qmax] with step amax / qmax, amax = max |w|."""
  level = (qmax + 0.5) * (1 + 2.0**-20) if full_range else qmax
  qmin = -qmax - 1 if full_range else -qmax
  w, h = np.array(w, np.float64), np.array(h, np.float64)
  d_in, d_out = w.shape
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[dead] = 0.0
  h += percdamp * np.mean(np.diag(h)) * np.eye(d_in)
  perm = (np.argsort(-np.diag(h), kind="stable") if act_order
          else np.arange(d_in))
  w, h = w[perm], h[perm][:, perm]
  u = np.linalg.cholesky(np.linalg.inv(h)).T
  group_of = perm // group_size
  num_groups = -(-d_in // group_size)  # The last group may be shorter.
  amax = np.zeros((num_groups, d_out))
  done = np.zeros(num_groups, bool)
  q = np.zeros_like(w)
  for i in range(d_in):
    g = group_of[i]
    if not done[g]:
      rows = w[group_of == g]
      amax[g] = (np.maximum(rows.max(0) / qmax, -rows.min(0) / -qmin) * level
                 if full_range else np.max(np.abs(rows), axis=0))
      done[g] = True
    scale = np.where(amax[g] > 0, amax[g] / level, 1.0)
    q[i] = np.clip(np.round(w[i] / scale), qmin, qmax) * scale
    err = (w[i] - q[i]) / u[i, i]
    w[i:] -= np.outer(u[i, i:], err)
  return q[np.argsort(perm)], amax


def problem(d_in=64, d_out=16, n=256, seed=0):
  rng = np.random.default_rng(seed)
  # Correlated inputs with uneven channel magnitudes, as in a transformer.
  mix = rng.normal(size=(d_in, d_in)) * 0.3 + np.eye(d_in)
  x = (rng.normal(size=(n, d_in)) @ mix) * np.exp(rng.normal(size=d_in))
  w = rng.normal(size=(d_in, d_out)) * 0.1
  return x.astype(np.float32), w.astype(np.float32)


def layer_error(x, w, w_hat):
  x, w, w_hat = (np.asarray(a, np.float64) for a in (x, w, w_hat))
  return float(np.sum((x @ w - x @ w_hat) ** 2))


def hessian_of(x, mask=None):
  return hessian_update(jnp.zeros((x.shape[-1],) * 2), x, mask)


# int4's default full range, and its narrow range once.
@pytest.mark.parametrize("group_size,act_order,full_range", [
    (64, False, True), (64, True, True), (16, False, False), (16, True, True),
    (24, True, True)])  # Ragged: 24 + 24 + 16.
def test_matches_numpy_reference(group_size, act_order, full_range):
  x, w = problem()
  granularity = (PerChannel(-1) if group_size == 64
                 else PerGroup(axis=0, size=group_size))
  spec = QuantSpec("int4", granularity, narrow_range=not full_range)
  h = 2.0 * x.astype(np.float64).T @ x
  want, want_amax = reference_gptq(w, h, 7, group_size, act_order,
                                   full_range=full_range)
  got = gptq(w, hessian_of(x), spec, block_size=24, act_order=act_order)
  step = want_amax.max() / 7
  # float32 vs float64 can flip a rounding near a tie; almost all agree.
  agree = np.abs(np.asarray(got.kernel) - want) < 1e-3 * step
  assert agree.mean() > 0.98
  np.testing.assert_allclose(np.asarray(got.amax).reshape(want_amax.shape),
                             want_amax, rtol=2e-3, atol=1e-6)
  assert layer_error(x, w, got.kernel) == pytest.approx(
      layer_error(x, w, want), rel=0.05)


@pytest.mark.parametrize("granularity,act_order", [
    (PerChannel(-1), True), (PerGroup(axis=0, size=16), False),
    (PerTensor(), True)])
def test_beats_round_to_nearest(granularity, act_order):
  x, w = problem(seed=1)
  spec = QuantSpec("int4", granularity)
  result = gptq(w, hessian_of(x), spec, act_order=act_order)
  rtn = jaxq.fake_quant(jnp.asarray(w), spec)
  assert layer_error(x, w, result.kernel) < 0.8 * layer_error(x, w, rtn)


@pytest.mark.parametrize("spec", [
    QuantSpec("int4", PerChannel(-1)),
    QuantSpec("int4", PerGroup(axis=0, size=16), calibration="mse"),
    QuantSpec("int8", PerGroup(axis=0, size=32), symmetric=False),
    QuantSpec("uint8", PerChannel(-1), symmetric=False),
    QuantSpec("float8_e4m3fn", MX(axis=0, size=32)),
    QuantSpec("int4", PerTensor(), calibration="percentile", percentile=99.0),
    # Ragged groups: 24 + 24 + 16.
    QuantSpec("int4", PerGroup(axis=0, size=24), calibration="mse"),
    QuantSpec("uint8", PerGroup(axis=0, size=24), symmetric=False,
              calibration="percentile", percentile=99.0),
])
def test_result_is_exactly_representable(spec):
  x, w = problem(seed=2)
  result = gptq(w, hessian_of(x), spec, act_order=True)
  qa = jaxq.quantize(result.kernel, spec, amax=result.amax, amin=result.amin)
  np.testing.assert_allclose(jaxq.dequantize(qa), result.kernel, rtol=1e-6,
                             atol=1e-7)
  assert (result.amin is None) == spec.symmetric
  assert result.amax.shape == qa.scale.shape


def outlier_input_problem(seed, d_in=32, d_out=8, n_cal=24, n_held_out=512):
  """A transformer's outlier feature: input 0 is ~30 on every row, the
  others ~1, and each kernel column's largest weight multiplies it. Fewer
  calibration rows than inputs, as MiniLM's 338 tokens for d_in 384."""
  rng = np.random.default_rng(seed)

  def inputs(n):
    x = rng.normal(size=(n, d_in))
    x[:, 0] = 30.0 * (1.0 + 0.1 * rng.normal(size=n))
    return x.astype(np.float32)

  w = (0.1 * rng.normal(size=(d_in, d_out))).astype(np.float32)
  w[0] = 0.6
  return inputs(n_cal), inputs(n_held_out), w


@pytest.mark.parametrize("granularity", [PerChannel(-1),
                                         PerGroup(axis=0, size=16)])
def test_mse_ranges_do_not_clip_the_weights_of_an_outlier_input(granularity):
  # A clipping search by the weight's own error clips w[0] like any other
  # weight; GPTQ then spreads that error, 30x amplified, over the other
  # inputs, which cancels it on the calibration rows only (on MiniLM a
  # held-out sentence fell to cosine 0.59). Weighted by the Hessian
  # diagonal, the search keeps w[0] and GPTQ + mse generalises like GPTQ.
  x_cal, x_held_out, w = outlier_input_problem(seed=10)
  spec = QuantSpec("int4", granularity)
  h = hessian_of(x_cal)
  plain = gptq(w, h, spec, percdamp=0.1, act_order=True)
  mse = gptq(w, h, spec.replace(calibration="mse"), percdamp=0.1,
             act_order=True)
  # GPTQ's full-range step clips neither end of the grid, so w[0] = 0.6
  # stays on it in both (the weight's own error clipped it to 0.4).
  np.testing.assert_allclose(plain.kernel[0], w[0], rtol=1e-5)
  np.testing.assert_allclose(mse.kernel[0], w[0], rtol=1e-5)
  assert layer_error(x_held_out, w, mse.kernel) <= 1.1 * layer_error(
      x_held_out, w, plain.kernel)


def test_block_size_does_not_change_the_result():
  x, w = problem(seed=3)
  spec = QuantSpec("int4", PerGroup(axis=0, size=8))
  h = hessian_of(x)
  one = gptq(w, h, spec, block_size=1)
  for block_size in (7, 128):
    blocked = gptq(w, h, spec, block_size=block_size)
    agree = np.isclose(blocked.kernel, one.kernel, atol=1e-6)
    assert agree.mean() > 0.98


def test_mask_excludes_rows():
  x, w = problem(seed=4)
  spec = QuantSpec("int4", PerGroup(axis=0, size=16))
  extra = np.full((3, x.shape[1]), 1e6, np.float32)
  extra[1, 0] = np.nan
  padded = np.concatenate([x, extra])
  mask = np.arange(len(padded)) < len(x)
  h_masked = hessian_of(padded, mask)
  np.testing.assert_array_equal(h_masked, hessian_of(x))
  batched = hessian_of(padded.reshape(1, -1, x.shape[1]), mask[None])
  np.testing.assert_array_equal(batched, h_masked)
  np.testing.assert_array_equal(gptq(w, h_masked, spec).kernel,
                                gptq(w, hessian_of(x), spec).kernel)


def test_hessian_accumulates_over_batches():
  x, _ = problem(seed=5)
  h = hessian_of(x[:100])
  h = hessian_update(h, x[100:])
  np.testing.assert_allclose(h, 2.0 * x.astype(np.float64).T @ x, rtol=1e-5,
                             atol=1e-2)


def test_dead_input_gets_a_zero_row():
  x, w = problem(seed=6)
  x[:, 5] = 0.0
  result = gptq(w, hessian_of(x), QuantSpec("int4", PerChannel(-1)),
                act_order=True)
  np.testing.assert_array_equal(result.kernel[5], 0.0)
  assert np.all(np.isfinite(result.kernel))


@pytest.mark.parametrize("spec", [QuantSpec("int4", PerChannel(-1)),
                                  QuantSpec("int4", PerGroup(axis=0, size=4))])
def test_zero_hessian_rounds_to_nearest(spec):
  # No nonzero input: nothing to weight the rounding by; the kernel is
  # rounded to nearest on its range rather than zeroed.
  _, w = problem(seed=8)
  result = gptq(w, np.zeros((w.shape[0],) * 2, np.float32), spec,
                act_order=True)
  np.testing.assert_allclose(
      result.kernel, jaxq.fake_quant(jnp.asarray(w), spec, amax=result.amax,
                                     range_from_data=True),
      rtol=1e-6, atol=1e-7)
  assert np.linalg.norm(result.kernel - w) < 0.2 * np.linalg.norm(w)


def test_singular_hessian_raises():
  x, w = problem(seed=7)
  x[:, 1] = x[:, 0]  # Rank deficient, with no dead row to fix it.
  with pytest.raises(ValueError, match="singular after dampening"):
    gptq(w, hessian_of(x), QuantSpec("int4", PerChannel(-1)), percdamp=0.0)


def test_bad_inputs_name_the_problem():
  x, w = problem()
  h = hessian_of(x)
  # A group may be ragged, an MX block may not.
  with pytest.raises(ValueError, match="size 48 does not divide axis 0 of "
                     "length 64"):
    gptq(w, h, QuantSpec("float8_e4m3fn", MX(axis=0, size=48)))
  with pytest.raises(ValueError, match="groups along the input axis"):
    gptq(w, h, QuantSpec("int4", PerGroup(axis=-1, size=8)))
  with pytest.raises(ValueError, match=r"must be \(64, 64\)"):
    gptq(w, h[:32, :32], QuantSpec("int4", PerChannel(-1)))
  with pytest.raises(ValueError, match="NaN or inf"):
    gptq(w, h.at[0, 0].set(jnp.nan), QuantSpec("int4", PerChannel(-1)))


def test_fixed_range_is_used_and_checked():
  x, w = problem(seed=8)
  spec = QuantSpec("int4", PerChannel(-1))
  amax = 0.8 * np.abs(w).max(axis=0, keepdims=True)
  result = gptq(w, hessian_of(x), spec, amax=amax)
  np.testing.assert_array_equal(result.amax, amax)
  # int4's full range: [-8, 7] steps of amax / 7.5 (nudged by 2**-20).
  step = amax / (7.5 * (1 + 2.0**-20))
  assert np.all(result.kernel <= 7 * step * (1 + 1e-6))
  assert np.all(result.kernel >= -8 * step * (1 + 1e-6))
  with pytest.raises(ValueError, match=r"scale shape \(1, 16\)"):
    gptq(w, hessian_of(x), spec, amax=amax[0])
  with pytest.raises(ValueError, match="chooses each group's range"):
    gptq(w, hessian_of(x), QuantSpec("int4", PerGroup(axis=0, size=16)),
         amax=amax)
