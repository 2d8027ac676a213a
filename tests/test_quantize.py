"""Tests for `jaxq.quantize`: quantize, dequantize, fake_quant.

References are written independently of the library: block ranges come from
a NumPy reshape that splits *every* axis into (blocks, block), scales from
the formulas in the module docstring evaluated in NumPy, and float grids
from `numpy.frexp`. Property tests run every format x granularity pairing on
Hypothesis-chosen arrays.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxq
from jaxq import MX, PerBlock, PerChannel, PerGroup, PerTensor, PerToken
from jaxq import QuantSpec

Shape = tuple[int, ...]

SPECS: dict[str, QuantSpec] = {
    "int8": QuantSpec("int8"),
    "int8-full": QuantSpec("int8", narrow_range=False),
    "int4": QuantSpec("int4"),
    "uint8-affine": QuantSpec("uint8", symmetric=False),
    "int8-affine": QuantSpec("int8", symmetric=False),
    "e4m3": QuantSpec("float8_e4m3fn"),
    "e5m2": QuantSpec("float8_e5m2"),
    "e2m1": QuantSpec("float4_e2m1fn"),
}

# Each granularity with its block shape for an array shape, written by hand.
GRANULARITIES: dict[str, tuple[jaxq.granularity.GranularityLike,
                               Callable[[Shape], Shape]]] = {
    "T": (PerTensor(), lambda s: s),
    "C": (PerChannel(axis=-1), lambda s: s[:-1] + (1,)),
    "K": (PerToken(), lambda s: (1,) * (len(s) - 1) + s[-1:]),
    "G16": (PerGroup(axis=-1, size=16), lambda s: (1,) * (len(s) - 1) + (16,)),
    "G4-rows": (PerGroup(axis=-2, size=4),
                lambda s: (1,) * (len(s) - 2) + (4, 1)),
    "B4x16": (PerBlock(shape=(4, 16)), lambda s: (1,) * (len(s) - 2) + (4, 16)),
    "MX32": (MX(axis=-1, size=32), lambda s: (1,) * (len(s) - 1) + (32,)),
}

# Every pairing the library accepts: MX scales are symmetric powers of two.
PAIRINGS = [(s, g) for s in SPECS for g in GRANULARITIES
            if SPECS[s].symmetric or g != "MX32"]

# One shape for the property tests: every new shape costs a fresh compile of
# each op, while more examples of the same shape are nearly free.
SHAPE: Shape = (8, 64)


def _spec(spec_name: str, granularity_name: str) -> QuantSpec:
  return SPECS[spec_name].replace(
      granularity=GRANULARITIES[granularity_name][0])


@functools.cache
def _round_trip(spec: QuantSpec) -> Callable[
    [np.ndarray], tuple[jaxq.QArray, jax.Array, jax.Array]]:
  """``x -> (quantize(x), dequantize of it, fake_quant(x))`` for ``spec``,
  one compiled program per spec and shape, shared by the tests that sweep
  every pairing (and by the per-group reference).

  Each eager entry point is a compiled program of its own: three per
  pairing, where this jitted one costs less than half as much to compile.
  The computation is the same (`test_jit_matches_eager`); the eager calls
  are tested on their own throughout this file.
  """
  def run(x: jax.Array) -> tuple[jaxq.QArray, jax.Array, jax.Array]:
    qa = jaxq.quantize(x, spec)
    return qa, jaxq.dequantize(qa), jaxq.fake_quant(x, spec)

  return jax.jit(run)


# ----------------------------------------------------------------------------
# Independent NumPy references.


def _block_reduce(x: np.ndarray, blocks: Shape, reducer) -> np.ndarray:
  """Reduces each block, splitting every axis d into (d // b, b)."""
  split = [n for d, b in zip(x.shape, blocks) for n in (d // b, b)]
  return reducer(x.reshape(split), axis=tuple(range(1, 2 * len(blocks), 2)))


def _expand(s: np.ndarray, blocks: Shape) -> np.ndarray:
  """Repeats each block's value over the elements of its block."""
  for axis, b in enumerate(blocks):
    s = np.repeat(s, b, axis=axis)
  return s


def _reference_range(x: np.ndarray, spec: QuantSpec, blocks: Shape
                     ) -> tuple[np.ndarray | None, np.ndarray]:
  finite = np.where(np.isfinite(x), x, 0.0).astype(np.float32)
  if spec.symmetric:
    fmt = spec.fmt
    if fmt.kind == "int" and not spec.narrow_range and not spec.is_mx:
      # The full range counts a negative value at (qmax + .5) / (qmax + 1.5):
      # its grid reaches one step further below zero.
      magnitude = np.maximum(
          finite, -finite * np.float32((fmt.qmax + 0.5) / (fmt.qmax + 1.5)))
    else:
      magnitude = np.abs(finite)
    return None, _block_reduce(magnitude, blocks, np.max)
  return (_block_reduce(finite, blocks, np.min),
          _block_reduce(finite, blocks, np.max))


def _reference_scale(spec: QuantSpec, amin: np.ndarray | None,
                     amax: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
  """Scale and zero point from the formulas in `jaxq.quantize`'s docstring."""
  fmt = spec.fmt
  if spec.is_mx:
    # OCP MX: 2 ** (floor(log2(amax)) - emax), exponent clamped to e8m0.
    exponent = np.floor(np.log2(np.where(amax > 0, amax, 1.0).astype(
        np.float64))) - fmt.emax
    exponent = np.clip(np.where(amax > 0, exponent, -126), -126, 127)
    return np.ldexp(np.float32(1.0), exponent.astype(np.int32)), None
  if spec.symmetric:
    # The full signed integer range maps amax to qmax + 0.5 (nudged up by
    # 2**-20 off the rounding tie), else to qmax.
    full = fmt.kind == "int" and not spec.narrow_range
    level = np.float32((fmt.qmax + 0.5) * (1 + 2.0**-20) if full
                       else fmt.qmax)
    return np.where(amax > 0, amax / level,
                    np.float32(1.0)).astype(np.float32), None
  amin, amax = np.minimum(amin, 0), np.maximum(amax, 0)
  span = (amax - amin).astype(np.float32)
  scale = np.where(span > 0, span / np.float32(fmt.qmax - fmt.qmin),
                   np.float32(1.0)).astype(np.float32)
  zero_point = np.clip(np.round(fmt.qmin - amin / scale), fmt.qmin, fmt.qmax)
  return scale, zero_point.astype(np.int32)


def _half_ulp(y: np.ndarray, spec: QuantSpec) -> np.ndarray:
  """Half the spacing of ``spec``'s grid around scaled values ``y``."""
  fmt = spec.fmt
  if fmt.kind == "int":
    return np.full(y.shape, 0.5)
  _, exponent = np.frexp(np.abs(y))
  exponent = np.maximum(exponent - 1, fmt.min_normal_exponent)
  return 0.5 * np.ldexp(1.0, exponent - fmt.mantissa_bits)


@st.composite
def _inputs(draw, shape: Shape = SHAPE) -> np.ndarray:
  """Arrays whose rows span several binades, plus Hypothesis-chosen values."""
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  row_exponents = rng.integers(-6, 7, size=shape[:-1] + (1,))
  noise = rng.standard_normal(shape) * np.exp2(row_exponents)
  # Hypothesis fills most of this with one value and sets a few others, so
  # the sum has shifted (all-positive, all-negative) blocks, exact repeats
  # and outliers.
  overlay = draw(hnp.arrays(np.float32, shape,
                            elements=st.floats(-8, 8, width=32)))
  magnitude = 2.0 ** draw(st.integers(-12, 12))
  return ((noise + overlay) * magnitude).astype(np.float32)


# ----------------------------------------------------------------------------
# The worked example.

# Flax (in, out) kernel; column maxima 3.0, 2.5, 1.2.
W = np.array([[0.1, 0.2, -0.1],
              [3.0, -2.5, 1.2],
              [0.05, 0.1, -0.05],
              [-1.0, 0.5, 0.2]], np.float32)


def test_worked_example_per_tensor():
  qa = jaxq.quantize(W, QuantSpec("int8", PerTensor()))
  assert qa.scale.shape == (1, 1)
  np.testing.assert_allclose(np.asarray(qa.scale), [[3.0 / 127]], rtol=1e-7)
  np.testing.assert_array_equal(np.asarray(qa.values),
                                np.round(W / np.float32(3.0 / 127)))
  assert qa.values.dtype == jnp.int8 and qa.zero_point is None


def test_worked_example_per_output_channel():
  qa = jaxq.quantize(W, QuantSpec("int8", PerChannel(axis=-1)))
  assert qa.scale.shape == (1, 3)
  np.testing.assert_allclose(np.asarray(qa.scale),
                             [[3.0 / 127, 2.5 / 127, 1.2 / 127]], rtol=1e-7)
  # Each column's largest magnitude lands exactly on +-127.
  np.testing.assert_array_equal(np.asarray(qa.values)[1], [127, -127, 127])


def test_worked_example_per_channel_error_is_lower():
  def error(granularity):
    w_hat = jaxq.dequantize(jaxq.quantize(W, QuantSpec("int8", granularity)))
    return float(np.sum((np.asarray(w_hat, np.float64) - W) ** 2))

  per_tensor, per_channel = error(PerTensor()), error(PerChannel(axis=-1))
  assert per_channel < per_tensor, (per_channel, per_tensor)


# ----------------------------------------------------------------------------
# Integer ranges: int4 defaults to the full [-8, 7], int8 to [-127, 127].


def _signed_columns(seed: int = 0) -> np.ndarray:
  """(64, 6) Gaussian columns whose abs-max is negative in columns 0-2 and
  positive in 3-5."""
  x = np.random.default_rng(seed).standard_normal((64, 6)).astype(np.float32)
  x *= np.float32([0.3, 1.0, 4.0, 0.5, 2.0, 9.0])
  peak = np.abs(x).max(axis=0) * np.float32(1.25)
  x[7] = np.where(np.arange(6) < 3, -peak, peak)
  return x


def test_int4_defaults_to_the_full_range_with_a_step_holding_both_ends():
  x = _signed_columns()
  spec = QuantSpec("int4", PerChannel(axis=-1))
  assert not spec.narrow_range and (spec.fmt.qmin, spec.fmt.qmax) == (-8, 7)
  qa = jaxq.quantize(x, spec)
  scale = np.asarray(qa.scale)
  # The smallest step that keeps max x within half a step of 7 and min x
  # within half a step of -8 (up to the 2**-20 nudge off the ties).
  step = np.maximum(x.max(axis=0) / 7.5, -x.min(axis=0) / 8.5)[None]
  np.testing.assert_allclose(scale, step, rtol=2e-6)
  # Columns 0-2 end further below zero: their step is amax / 8.5, finer
  # than the abs-max step amax / 7.5 of columns 3-5.
  amax = np.abs(x).max(axis=0, keepdims=True)
  np.testing.assert_allclose(scale[:, :3], amax[:, :3] / 8.5, rtol=2e-6)
  np.testing.assert_allclose(scale[:, 3:], amax[:, 3:] / 7.5, rtol=2e-6)
  values = np.asarray(qa.values).astype(np.int32)
  # The negative extremes reach -8; the positive ones saturate to 7.
  np.testing.assert_array_equal(values[7], [-8, -8, -8, 7, 7, 7])
  assert values.min() >= -8 and values.max() <= 7
  error = np.abs(np.asarray(jaxq.dequantize(qa), np.float64) - x)
  assert np.all(error <= 0.5 * scale * (1 + 1e-4))
  np.testing.assert_array_equal(np.asarray(jaxq.fake_quant(x, spec)),
                                np.asarray(jaxq.dequantize(qa)))
  # The finer step beats the narrow range's amax / 7 on Gaussian data, and
  # the abs-max step amax / 7.5 where the negative end dominates.
  narrow = jaxq.fake_quant(x, spec.replace(narrow_range=True))
  assert np.sum(error ** 2) < 0.95 * np.sum((np.asarray(narrow) - x) ** 2)
  abs_max_step = jaxq.fake_quant(x, spec, amax=amax)
  per_column = lambda x_hat: np.sum((np.asarray(x_hat) - x) ** 2, axis=0)
  assert np.all(per_column(jaxq.dequantize(qa))[:3]
                < per_column(abs_max_step)[:3])


def test_full_range_is_the_smallest_holding_both_ends_within_half_a_step():
  x = _signed_columns(3)
  for spec in (QuantSpec("int4", PerChannel(axis=-1)),
               QuantSpec("int8", PerChannel(axis=-1), narrow_range=False)):
    qmax = spec.fmt.qmax
    _, amax = jaxq.compute_range(x, spec)
    np.testing.assert_allclose(
        amax[0], np.maximum(x.max(0), -x.min(0) * (qmax + 0.5) / (qmax + 1.5)),
        rtol=1e-6)
    step = np.asarray(jaxq.quantize(x, spec).scale)
    error = np.abs(np.asarray(jaxq.fake_quant(x, spec), np.float64) - x)
    # Half a step, plus the 2**-20 nudge of the level at the far end.
    assert np.all(error <= step * (0.5 + (qmax + 1.5) * 2.0**-19))
    # One percent finer, and an end leaves the grid by more than half a step.
    finer = jaxq.fake_quant(x, spec, amax=amax * 0.99)
    assert np.all(np.abs(np.asarray(finer) - x).max(axis=0)
                  > 0.5 * 0.99 * step[0])
  # Narrow and float formats keep max |x|.
  for spec in (QuantSpec("int4", PerChannel(-1), narrow_range=True),
               QuantSpec("int8", PerChannel(-1)),
               QuantSpec("float8_e4m3fn", PerChannel(-1))):
    np.testing.assert_array_equal(jaxq.compute_range(x, spec)[1],
                                  np.abs(x).max(axis=0, keepdims=True))


def test_int4_narrow_range_keeps_step_amax_over_7():
  x = _signed_columns(1)
  spec = QuantSpec("int4", PerChannel(axis=-1), narrow_range=True)
  qa = jaxq.quantize(x, spec)
  amax = np.abs(x).max(axis=0, keepdims=True)
  np.testing.assert_array_equal(np.asarray(qa.scale),
                                amax * np.float32(1 / 7))
  values = np.asarray(qa.values).astype(np.int32)
  np.testing.assert_array_equal(values[7], [-7, -7, -7, 7, 7, 7])
  assert values.min() >= -7


def test_int8_default_is_unchanged_narrow():
  x = _signed_columns(2)
  spec = QuantSpec("int8", PerChannel(axis=-1))
  assert spec.narrow_range and spec == QuantSpec("int8", PerChannel(-1),
                                                 narrow_range=True)
  qa = jaxq.quantize(x, spec)
  amax = np.abs(x).max(axis=0, keepdims=True)
  np.testing.assert_array_equal(np.asarray(qa.scale),
                                amax * np.float32(1 / 127))
  np.testing.assert_array_equal(np.asarray(qa.values)[7],
                                [-127, -127, -127, 127, 127, 127])
  # The explicit full int8 range takes the same rule as int4's default.
  full = jaxq.quantize(x, spec.replace(narrow_range=False))
  np.testing.assert_allclose(
      np.asarray(full.scale)[0],
      np.maximum(x.max(axis=0) / 127.5, -x.min(axis=0) / 128.5), rtol=2e-6)
  np.testing.assert_array_equal(np.asarray(full.values)[7],
                                [-128, -128, -128, 127, 127, 127])


def test_full_range_static_amax_jit_matches_eager():
  x = _signed_columns(3)
  spec = QuantSpec("int4", PerGroup(axis=0, size=16))
  amax = jaxq.compute_range(x, spec)[1] * 0.8  # Some clipping at both ends.
  eager = jaxq.quantize(x, spec, amax=amax)
  jitted = jax.jit(lambda x, a: jaxq.quantize(x, spec, amax=a))(x, amax)
  chex.assert_trees_all_equal(jitted, eager)
  values = np.asarray(eager.values).astype(np.int32)
  assert values.min() == -8 and values.max() == 7


# ----------------------------------------------------------------------------
# Ragged groups: a size that does not divide its axis leaves a shorter last
# group, quantized exactly as if it were quantized on its own.

RAGGED_SPECS = {
    "int8": QuantSpec("int8"),
    "int4-full": QuantSpec("int4"),
    "uint8-affine": QuantSpec("uint8", symmetric=False),
    "e4m3": QuantSpec("float8_e4m3fn"),
}


def _per_group_reference(x: np.ndarray, spec: QuantSpec, axis: int,
                         size: int) -> tuple[np.ndarray, np.ndarray]:
  """(values, dequantized) quantizing each group of ``size`` along ``axis``
  (the last one shorter) separately, one scale per index of the other
  axis."""
  per_slice = spec.replace(granularity=PerChannel(axis=1 - axis))
  parts = [_round_trip(per_slice)(np.take(x, range(start, min(
      start + size, x.shape[axis])), axis))
           for start in range(0, x.shape[axis], size)]
  values = np.concatenate([np.asarray(qa.values).astype(np.float32)
                           for qa, _, _ in parts], axis)
  x_hat = np.concatenate([np.asarray(x_hat) for _, x_hat, _ in parts], axis)
  return values, x_hat


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("name", RAGGED_SPECS)
def test_ragged_last_group_quantizes_as_its_own_group(name, axis):
  # 20 = 8 + 8 + 4 along the grouped axis; the short group gets the largest
  # magnitudes so that its scale differs from every other group's.
  x = np.asarray(_signed_columns(5))[:20, :3]
  x = np.moveaxis(np.where(np.arange(20)[:, None] >= 16, 4 * x, x), 0, axis)
  spec = RAGGED_SPECS[name].replace(granularity=PerGroup(axis=axis, size=8))
  qa = jaxq.quantize(x, spec)
  assert qa.scale.shape == (3, 3)
  values, x_hat = _per_group_reference(x, spec, axis, 8)
  np.testing.assert_array_equal(np.asarray(qa.values).astype(np.float32),
                                values)
  np.testing.assert_array_equal(np.asarray(jaxq.dequantize(qa)), x_hat)
  np.testing.assert_array_equal(np.asarray(jaxq.fake_quant(x, spec)), x_hat)
  # The range of the short group is its own (negative reach, affine ends).
  amin, amax = jaxq.compute_range(x, spec)
  tail = np.take(x, range(16, 20), axis)
  _, want = jaxq.compute_range(
      tail, spec.replace(granularity=PerChannel(axis=1 - axis)))
  np.testing.assert_array_equal(np.take(np.asarray(amax), [2], axis),
                                np.asarray(want))
  if amin is not None:
    np.testing.assert_array_equal(
        np.take(np.asarray(amin), [2], axis),
        np.min(tail, axis=axis, keepdims=True))


def test_ragged_fake_quant_gradient_is_the_ste_mask_per_group():
  x = np.asarray(_signed_columns(6))[:20, :3]
  spec = QuantSpec("int8", PerGroup(axis=0, size=8))
  amax = np.asarray(jaxq.compute_range(x, spec)[1]) * 0.5  # Clips.
  grad = jax.jit(jax.grad(lambda x: jnp.sum(
      jaxq.fake_quant(x, spec, amax=amax) * jnp.arange(60.0).reshape(20, 3))))
  limit = np.repeat(amax * np.float32(1 / 127), 8, axis=0)[:20] * 127
  want = np.where(np.abs(x) <= limit, np.arange(60.0).reshape(20, 3), 0.0)
  np.testing.assert_array_equal(np.asarray(grad(x)), want)
  assert 0 < np.count_nonzero(want[16:]) < 12  # The short group clips too.


def test_g128_on_576_inputs_and_static_range_shape():
  w = np.random.default_rng(7).standard_normal((576, 4)).astype(np.float32)
  spec = QuantSpec("int4", PerGroup(axis=0, size=128))
  qa = jaxq.quantize(w, spec)
  assert qa.scale.shape == (5, 4)
  values, x_hat = _per_group_reference(np.asarray(w), spec, 0, 128)
  np.testing.assert_array_equal(np.asarray(jaxq.dequantize(qa)), x_hat)
  with pytest.raises(ValueError, match=r"needs scale shape \(5, 4\)"):
    jaxq.quantize(w, spec, amax=jnp.ones((4, 4)))


# ----------------------------------------------------------------------------
# Properties over every format x granularity.


def _check_round_trip(x: np.ndarray, spec: QuantSpec, blocks: Shape) -> None:
  """Checks quantize / dequantize / fake_quant of ``x`` against references."""
  fmt = spec.fmt
  amin, amax = _reference_range(x, spec, blocks)
  qa, x_hat, fake_quantized = _round_trip(spec)(x)

  # Storage types and the scale against the reference.
  assert qa.values.dtype == fmt.dtype and qa.values.shape == x.shape
  assert qa.scale.dtype == (ml_dtypes.float8_e8m0fnu if spec.is_mx
                            else jnp.float32)
  want_scale, want_zero_point = _reference_scale(spec, amin, amax)
  scale = np.asarray(qa.scale).astype(np.float32)
  np.testing.assert_allclose(scale, want_scale, rtol=1e-6)
  if spec.symmetric:
    assert qa.zero_point is None
  else:
    # The narrowest byte-wide integer holding [qmin, qmax]: int8 for int4
    # and int8, uint8 for uint8.
    assert qa.zero_point.dtype == (jnp.uint8 if fmt.qmin >= 0 else jnp.int8)
    np.testing.assert_array_equal(np.asarray(qa.zero_point), want_zero_point)

  # Stored values lie in [qmin, qmax].
  values = np.asarray(qa.values).astype(np.float64)
  assert np.all((values >= fmt.qmin) & (values <= fmt.qmax))

  # Elementwise error bound, with each element's own scale.
  s = _expand(scale.astype(np.float64), blocks)
  zero = 0.0 if spec.symmetric else _expand(
      np.asarray(qa.zero_point, np.float64), blocks)
  y = x / s + zero
  assert x_hat.dtype == x.dtype
  x_hat = np.asarray(x_hat, np.float64)
  if fmt.kind == "int":
    # The full range puts amax at qmax + 0.5 raised by 2**-20, so allow
    # that and float32 rounding of amax / scale beyond it.
    edge = 1 + 2.0**-19
    representable = (y >= (fmt.qmin - 0.5) * edge) & (
        y <= (fmt.qmax + 0.5) * edge)
  else:  # allow for float32 rounding of amax / scale just above qmax
    representable = np.abs(y) <= fmt.qmax * (1 + 2.0**-20)
  # float32 rounding in x / scale and q * scale adds a few ulps of |x|.
  slack = 2.0**-21 * (np.abs(x) + np.abs(x_hat))
  if spec.symmetric and fmt.kind == "int" and not spec.narrow_range:
    # +amax sits the 2**-20 nudge of (qmax + 0.5) beyond half a step.
    slack = slack + (fmt.qmax + 0.5) * 2.0**-20 * s
  bound = _half_ulp(np.clip(y, fmt.qmin, fmt.qmax), spec) * s + slack
  error = np.abs(x_hat - x)
  worst = np.argmax(np.where(representable, error - bound, -np.inf))
  assert np.all(error[representable] <= bound[representable]), (
      x.flat[worst], x_hat.flat[worst], bound.flat[worst])
  # Only MX clips data-derived ranges: its power-of-two scale can put amax
  # above qmax. Clipped elements saturate.
  if not spec.is_mx:
    assert representable.all()
  np.testing.assert_array_equal(values[~representable],
                                np.where(y[~representable] > fmt.qmax,
                                         fmt.qmax, fmt.qmin))

  # Re-quantizing the output with the same scale gives the same values.
  again = jaxq.quantize(x_hat.astype(np.float32), spec, amax=amax, amin=amin)
  np.testing.assert_array_equal(np.asarray(again.scale),
                                np.asarray(qa.scale))
  np.testing.assert_array_equal(np.asarray(again.values),
                                np.asarray(qa.values))

  # fake_quant is exactly dequantize(quantize(.)).
  np.testing.assert_array_equal(np.asarray(fake_quantized), x_hat)


@pytest.mark.parametrize("spec_name,granularity_name", PAIRINGS)
@hypothesis.settings(max_examples=8)
@hypothesis.given(x=_inputs())
def test_quantize_properties(spec_name, granularity_name, x):
  _check_round_trip(x, _spec(spec_name, granularity_name),
                    GRANULARITIES[granularity_name][1](x.shape))


@pytest.mark.parametrize("granularity_name", GRANULARITIES)
@hypothesis.settings(max_examples=3)
@hypothesis.given(x=_inputs(shape=(2, 8, 64)))
def test_quantize_properties_with_a_leading_batch_axis(granularity_name, x):
  _check_round_trip(x, _spec("int8", granularity_name),
                    GRANULARITIES[granularity_name][1](x.shape))


@functools.cache
def _ste_gradients(spec: QuantSpec) -> Callable[..., tuple[jax.Array,
                                                           jax.Array]]:
  """``(x, amax, amin, cotangent) -> (clipped, identity)``: the gradients of
  ``sum(fake_quant(x, amax, amin) * cotangent)`` for ``spec`` and for
  ``spec`` with ``ste="identity"``.

  Both in one compiled program per spec, shared by the Hypothesis examples:
  an eager ``jax.grad`` compiles a forward and a backward program per spec.
  """
  def grad(spec: QuantSpec) -> Callable[..., jax.Array]:
    return jax.grad(lambda x, amax, amin, cotangent: jnp.sum(
        jaxq.fake_quant(x, spec, amax=amax, amin=amin) * cotangent))

  clipped, identity = grad(spec), grad(spec.replace(ste="identity"))
  return jax.jit(lambda *args: (clipped(*args), identity(*args)))


@pytest.mark.parametrize("spec_name,granularity_name", PAIRINGS)
@hypothesis.settings(max_examples=5)
@hypothesis.given(x=_inputs(), seed=st.integers(0, 2**32 - 1))
def test_fake_quant_gradient_is_the_ste_mask(spec_name, granularity_name, x,
                                             seed):
  spec = _spec(spec_name, granularity_name)
  fmt = spec.fmt
  blocks = GRANULARITIES[granularity_name][1](x.shape)
  # A static range half the data's, so that some elements are clipped.
  amin, amax = _reference_range(x, spec, blocks)
  amax = amax * 0.5
  amin = None if amin is None else amin * 0.5
  cotangent = np.random.default_rng(seed).standard_normal(x.shape).astype(
      np.float32)
  clipped, identity = _ste_gradients(spec)(x, amax, amin, cotangent)

  qa = jaxq.quantize(x, spec, amax=amax, amin=amin)
  s = _expand(np.asarray(qa.scale).astype(np.float64), blocks)
  zero = 0.0 if spec.symmetric else _expand(
      np.asarray(qa.zero_point, np.float64), blocks)
  lo, hi = (fmt.qmin - zero) * s, (fmt.qmax - zero) * s
  inside = (x >= lo) & (x <= hi)
  assert not inside.all()
  # Leave out elements within float rounding of the range's ends.
  decided = ((np.abs(x - lo) > 1e-6 * np.abs(lo)) &
             (np.abs(x - hi) > 1e-6 * np.abs(hi)))

  np.testing.assert_array_equal(np.asarray(clipped)[decided],
                                np.where(inside, cotangent, 0.0)[decided])
  np.testing.assert_array_equal(np.asarray(identity), cotangent)


# ----------------------------------------------------------------------------
# MX follows the OCP rule.

# (amax of the block, element format, expected shared exponent), by hand.
MX_CASES = [
    (448.0, "float8_e4m3fn", 0),
    (256.0, "float8_e4m3fn", 0),
    (float(np.nextafter(np.float32(256), np.float32(0))), "float8_e4m3fn", -1),
    (1.0, "float8_e4m3fn", -8),
    (0.75, "float8_e4m3fn", -9),
    (57344.0, "float8_e5m2", 0),
    (32768.0, "float8_e5m2", 0),
    (float(np.nextafter(np.float32(32768), np.float32(0))), "float8_e5m2", -1),
    (6.0, "float4_e2m1fn", 0),
    (4.0, "float4_e2m1fn", 0),
    (float(np.nextafter(np.float32(4), np.float32(0))), "float4_e2m1fn", -1),
    (0.01, "float4_e2m1fn", -9),
    (127.0, "int8", 0),
    (64.0, "int8", 0),
    (1.0, "int8", -6),
    (2.0**-100, "float8_e4m3fn", -108),
    (2.0**-120, "float8_e4m3fn", -126),  # clamped to e8m0's normal range
    (3e38, "float8_e4m3fn", 119),
    (0.0, "float8_e4m3fn", -126),
]


def test_mx_scales_follow_the_ocp_rule_on_hand_made_blocks():
  # One block of 32 per case; the amax element sits at a different place in
  # each block and the rest are smaller, of both signs.
  blocks = np.random.default_rng(0).uniform(-1, 1, (len(MX_CASES), 32))
  blocks = blocks.astype(np.float32)
  for i, (amax, _, _) in enumerate(MX_CASES):
    blocks[i] *= np.float32(amax) * np.float32(0.99)
    blocks[i, (5 * i) % 32] = -amax if i % 2 else amax
  for name in {case[1] for case in MX_CASES}:
    qa = jaxq.quantize(blocks, QuantSpec(name, MX()))
    assert qa.scale.dtype == ml_dtypes.float8_e8m0fnu
    assert qa.scale.shape == (len(MX_CASES), 1)
    scale = np.asarray(qa.scale).astype(np.float64)[:, 0]
    mantissa, _ = np.frexp(scale)
    np.testing.assert_array_equal(mantissa, 0.5)  # exact powers of two
    rows = [i for i, case in enumerate(MX_CASES) if case[1] == name]
    np.testing.assert_array_equal(
        scale[rows], np.ldexp(1.0, [MX_CASES[i][2] for i in rows]),
        err_msg=name)


@pytest.mark.parametrize("name", ["int8", "int4", "float8_e4m3fn",
                                  "float8_e5m2", "float4_e2m1fn"])
def test_mx_dequantize_uses_the_stored_power_of_two(name):
  x = jax.random.normal(jax.random.key(0), SHAPE) * 1e-4
  spec = QuantSpec(name, MX())
  qa = jaxq.quantize(x, spec)
  scale = np.asarray(qa.scale).astype(np.float32)
  want = np.asarray(qa.values).astype(np.float32) * np.repeat(scale, 32, axis=1)
  np.testing.assert_array_equal(np.asarray(jaxq.dequantize(qa)), want)
  np.testing.assert_array_equal(np.asarray(jaxq.fake_quant(x, spec)), want)


# ----------------------------------------------------------------------------
# Affine keeps 0.0 exact.


@pytest.mark.parametrize("name", ["uint8", "int8", "int4"])
@pytest.mark.parametrize("low,high", [(0.3, 2.7), (-5.1, -0.2), (-0.37, 2.3),
                                      (-3.0, 0.01)],
                         ids=["positive", "negative", "mixed", "mostly-neg"])
@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(axis=-1)],
                         ids=["T", "C"])
def test_affine_represents_zero_exactly(name, low, high, granularity):
  spec = QuantSpec(name, granularity, symmetric=False)
  x = np.random.default_rng(0).uniform(low, high, SHAPE).astype(np.float32)
  x[3] = 0.0
  x_hat = np.asarray(jaxq.dequantize(jaxq.quantize(x, spec)))
  np.testing.assert_array_equal(x_hat[3], 0.0)
  np.testing.assert_array_equal(np.asarray(jaxq.fake_quant(x, spec))[3], 0.0)
  # The quantized range still covers the data to within half a step.
  qa = jaxq.quantize(x, spec)
  assert np.all(np.abs(x_hat - x) <= 0.5 * np.asarray(qa.scale) * (1 + 1e-5))


# ----------------------------------------------------------------------------
# jit, vmap, grad and input dtypes.


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("spec", [
    QuantSpec("int8", PerChannel()),
    QuantSpec("uint8", PerToken(), symmetric=False),
    QuantSpec("float8_e4m3fn", PerGroup(size=16)),
    QuantSpec("float4_e2m1fn", MX()),
], ids=["int8-C", "uint8-K", "e4m3-G16", "e2m1-MX"])
def test_input_dtypes(dtype, spec):
  x = (jax.random.normal(jax.random.key(0), SHAPE) * 3).astype(dtype)
  qa = jaxq.quantize(x, spec)
  assert qa.dtype == dtype
  x_hat = jaxq.dequantize(qa)
  assert x_hat.dtype == dtype
  # Quantizing works in float32: only the final cast depends on the dtype.
  want = jaxq.dequantize(jaxq.quantize(x.astype(jnp.float32), spec))
  np.testing.assert_array_equal(np.asarray(x_hat), np.asarray(want.astype(dtype)))
  y = jaxq.fake_quant(x, spec)
  assert y.dtype == dtype
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x_hat))
  # Jitted: one program, where an eager grad compiles a forward and a
  # backward one.
  grad = jax.jit(jax.grad(lambda x: jnp.sum(jaxq.fake_quant(x, spec))))(x)
  assert grad.dtype == dtype and bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.parametrize("spec_name,granularity_name",
                         [("int8", "C"), ("int8-affine", "G16"),
                          ("e4m3", "MX32"), ("int4", "B4x16")])
def test_jit_matches_eager(spec_name, granularity_name):
  spec = _spec(spec_name, granularity_name)
  x = jax.random.normal(jax.random.key(1), SHAPE)
  eager = jaxq.quantize(x, spec)
  jitted = jax.jit(jaxq.quantize, static_argnums=1)(x, spec)
  assert isinstance(jitted, jaxq.QArray) and jitted.spec == spec
  chex.assert_trees_all_equal(jitted, eager)
  np.testing.assert_array_equal(
      np.asarray(jax.jit(jaxq.dequantize)(jitted)),
      np.asarray(jaxq.dequantize(eager)))
  np.testing.assert_array_equal(
      np.asarray(jax.jit(jaxq.fake_quant, static_argnums=1)(x, spec)),
      np.asarray(jaxq.fake_quant(x, spec)))


@pytest.mark.parametrize("spec_name", ["int8", "uint8-affine", "e5m2"])
def test_vmap_over_rows_is_per_token(spec_name):
  x = jax.random.normal(jax.random.key(2), SHAPE) * jnp.arange(1, 9)[:, None]
  per_row = jax.vmap(lambda r: jaxq.quantize(r, _spec(spec_name, "T")))(x)
  per_token = jaxq.quantize(x, _spec(spec_name, "K"))
  np.testing.assert_array_equal(np.asarray(per_row.values),
                                np.asarray(per_token.values))
  np.testing.assert_array_equal(np.asarray(per_row.scale),
                                np.asarray(per_token.scale))
  fq = jax.jit(jax.vmap(lambda r: jaxq.fake_quant(r, _spec(spec_name, "T"))))
  np.testing.assert_array_equal(
      np.asarray(fq(x)), np.asarray(jaxq.fake_quant(x, _spec(spec_name, "K"))))


def test_grad_under_jit_and_vmap():
  spec = QuantSpec("int8", PerChannel())
  x = jax.random.normal(jax.random.key(3), (3, 8, 16))
  amax = jnp.full((1, 16), 1.0)
  grad = jax.jit(jax.vmap(jax.grad(
      lambda x: jnp.sum(jaxq.fake_quant(x, spec, amax=amax)))))(x)
  np.testing.assert_array_equal(np.asarray(grad),
                                (np.abs(np.asarray(x)) <= 1.0).astype(np.float32))


def test_stochastic_rounding_through_quantize():
  spec = QuantSpec("int8", PerTensor(), rounding="stochastic")
  x = jnp.full((4096,), 0.25).at[0].set(127.0)
  with pytest.raises(ValueError, match="PRNG key"):
    jaxq.quantize(x, spec)
  key = jax.random.key(4)
  qa = jaxq.quantize(x, spec, key=key)
  values = np.asarray(qa.values[1:]).astype(np.float64)
  assert set(np.unique(values)) <= {0.0, 1.0}
  # 0.25 rounds up with probability 1/4: six standard deviations of slack.
  assert abs(values.mean() - 0.25) <= 6 * math.sqrt(0.25 * 0.75 / values.size)
  np.testing.assert_array_equal(np.asarray(jaxq.fake_quant(x, spec, key=key)),
                                np.asarray(jaxq.dequantize(qa)))


# ----------------------------------------------------------------------------
# Zeros, NaN and Inf.


@pytest.mark.parametrize("spec_name,granularity_name",
                         [(s, g) for s, g in PAIRINGS if g in ("T", "C", "MX32")])
def test_all_zero_input_gives_zeros_and_finite_scales(spec_name,
                                                      granularity_name):
  spec = _spec(spec_name, granularity_name)
  x = jnp.zeros(SHAPE, jnp.float32)
  qa, x_hat, fake_quantized = _round_trip(spec)(x)
  scale = np.asarray(qa.scale).astype(np.float32)
  assert np.all(np.isfinite(scale) & (scale > 0))
  np.testing.assert_array_equal(np.asarray(x_hat), 0.0)
  np.testing.assert_array_equal(np.asarray(fake_quantized), 0.0)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(jaxq.fake_quant(x, spec))))(x)
  np.testing.assert_array_equal(np.asarray(grad), 1.0)


@pytest.mark.parametrize("spec_name,granularity_name",
                         [(s, g) for s, g in PAIRINGS if g != "T"])
def test_non_finite_values_stay_in_their_block(spec_name, granularity_name):
  spec = _spec(spec_name, granularity_name)
  fmt = spec.fmt
  blocks = GRANULARITIES[granularity_name][1](SHAPE)
  clean = np.asarray(jax.random.normal(jax.random.key(5), SHAPE))
  bad = clean.copy()
  # NaN, +inf and -inf, all in the block that holds element (4, 33).
  if granularity_name in ("K", "G16", "MX32"):  # blocks within one row
    rows, cols = [4, 4, 4], [33, 34, 35]
  else:  # blocks that span rows
    rows, cols = [4, 5, 6], [33, 33, 33]
  bad[rows, cols] = [np.nan, np.inf, -np.inf]
  poisoned = np.isnan(_block_reduce(
      np.where(np.isfinite(bad), 0.0, np.nan), blocks, np.sum))
  assert poisoned.sum() == 1

  (qa_clean, _, _), (qa_bad, x_hat, _) = map(_round_trip(spec), (clean, bad))
  for name in ("scale", "zero_point"):
    a, b = getattr(qa_clean, name), getattr(qa_bad, name)
    if a is None:
      continue
    a, b = np.asarray(a).astype(np.float64), np.asarray(b).astype(np.float64)
    # Every other block keeps exactly its clean scale ...
    np.testing.assert_array_equal(b[~poisoned], a[~poisoned])
  # ... and the bad block's own scale comes from its finite elements.
  amin, amax = _reference_range(bad, spec, blocks)
  want_scale, want_zero_point = _reference_scale(spec, amin, amax)
  np.testing.assert_allclose(np.asarray(qa_bad.scale).astype(np.float32),
                             want_scale, rtol=1e-6)
  assert np.all(np.isfinite(np.asarray(qa_bad.scale).astype(np.float32)))
  if want_zero_point is not None:
    np.testing.assert_array_equal(np.asarray(qa_bad.zero_point),
                                  want_zero_point)

  values = np.asarray(qa_bad.values).astype(np.float64)
  x_hat = np.asarray(x_hat)
  np.testing.assert_array_equal(values[rows, cols][1:], [fmt.qmax, fmt.qmin])
  if fmt.has_nan:
    assert np.isnan(values[4, 33]) and np.isnan(x_hat[4, 33])
  else:
    assert x_hat[4, 33] == 0.0
  # Finite elements quantize as before wherever the scale did not change.
  same = _expand(~poisoned, blocks)
  np.testing.assert_array_equal(values[same],
                                np.asarray(qa_clean.values).astype(
                                    np.float64)[same])


# ----------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("fn", [jaxq.quantize, jaxq.fake_quant,
                                jaxq.compute_range])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.uint8, jnp.bool_])
def test_integer_input_is_rejected(fn, dtype):
  x = jnp.zeros((2, 3), dtype)
  with pytest.raises(ValueError, match="floating-point") as info:
    fn(x, QuantSpec("int8"))
  assert "(2, 3)" in str(info.value)
  assert jnp.dtype(dtype).name in str(info.value)


@pytest.mark.parametrize(
    "granularity,shape,fragments",
    [(MX(axis=-1, size=32), (4, 16), ("size 32", "axis 1", "(4, 16)")),
     (MX(axis=0, size=32), (48, 4), ("size 32", "axis 0", "(48, 4)")),
     (PerChannel(axis=2), (4, 16), ("axis 2", "out of range", "(4, 16)")),
     (PerGroup(axis=-3, size=4), (4, 16), ("axis -3", "out of range",
                                           "(4, 16)"))])
@pytest.mark.parametrize("fn", [jaxq.quantize, jaxq.fake_quant])
def test_granularity_that_does_not_fit_is_rejected(fn, granularity, shape,
                                                   fragments):
  with pytest.raises(ValueError) as info:
    fn(jnp.ones(shape), QuantSpec("int8", granularity))
  for fragment in fragments:
    assert fragment in str(info.value)


@pytest.mark.parametrize("size", [0, -32])
def test_non_positive_group_size_is_rejected(size):
  with pytest.raises(ValueError, match="positive integer") as info:
    QuantSpec("int8", PerGroup(axis=-1, size=size))
  assert f"size={size}" in str(info.value)


@pytest.mark.parametrize("name", ["int7", "fp8", "float8"])
def test_unknown_format_name_is_rejected(name):
  with pytest.raises(ValueError, match="Unknown quantization format") as info:
    QuantSpec(name)
  assert repr(name) in str(info.value)


def test_static_range_of_the_wrong_shape_is_rejected():
  spec = QuantSpec("int8", PerChannel(axis=-1))
  with pytest.raises(ValueError, match=r"\(5,\).*\(4, 3\).*\(1, 3\)"):
    jaxq.quantize(jnp.ones((4, 3)), spec, amax=jnp.ones(5))
  # A broadcastable range is accepted.
  qa = jaxq.quantize(jnp.ones((4, 3)), spec, amax=2.0)
  np.testing.assert_allclose(np.asarray(qa.scale), np.full((1, 3), 2.0 / 127))


def test_affine_static_range_needs_both_ends():
  spec = QuantSpec("uint8", symmetric=False)
  with pytest.raises(ValueError, match="amin"):
    jaxq.quantize(jnp.ones((4, 3)), spec, amax=1.0)
  with pytest.raises(ValueError, match="amin was given without amax"):
    jaxq.quantize(jnp.ones((4, 3)), spec, amin=-1.0)
