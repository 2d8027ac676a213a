"""Tests for `jaxq.formats`: ranges, saturating casts and rounding.

Float casts are checked against a brute-force reference that enumerates every
bit pattern of the storage dtype and picks the nearest finite value (ties to
the even code, i.e. the even mantissa). Stochastic rounding is checked for
unbiasedness with a tolerance derived from the number of samples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxq import formats

FLOAT_NAMES = ("float8_e4m3fn", "float8_e5m2", "float4_e2m1fn")


def _grid(fmt: formats.Format) -> tuple[np.ndarray, np.ndarray]:
  """Every finite value of ``fmt`` (sorted, -0 dropped) and its bit code."""
  num_codes = 2 ** fmt.bits
  codes = np.arange(num_codes, dtype=np.uint8)
  values = codes.view(fmt.dtype).astype(np.float64)
  keep = np.isfinite(values) & ~((values == 0) & np.signbit(values))
  order = np.argsort(values[keep])
  return values[keep][order], codes[keep][order]


def _reference_nearest_even(x: np.ndarray, fmt: formats.Format) -> np.ndarray:
  """Nearest grid value of ``fmt`` to ``x`` (saturating), ties to even code."""
  values, codes = _grid(fmt)
  x = np.clip(x.astype(np.float64), fmt.qmin, fmt.qmax)
  distance = np.abs(x[:, None] - values[None, :])
  best = distance.min(axis=1, keepdims=True)
  tied = distance == best
  # Among the (at most two) nearest values prefer the even code.
  prefer = tied & (codes[None, :] % 2 == 0)
  pick = np.where(prefer.any(axis=1), prefer.argmax(axis=1), tied.argmax(axis=1))
  return values[pick]


def _neighbours(x: float, fmt: formats.Format) -> tuple[float, float]:
  """The grid values just below and just above ``x`` (equal if on the grid)."""
  if fmt.kind == "int":
    return float(np.floor(x)), float(np.ceil(x))
  values, _ = _grid(fmt)
  return float(values[values <= x].max()), float(values[values >= x].min())


@pytest.mark.parametrize(
    "name,narrow_range,kind,qmin,qmax,emax,bits",
    [("int8", True, "int", -127, 127, 6, 8),
     ("int8", False, "int", -128, 127, 6, 8),
     ("int4", True, "int", -7, 7, 2, 4),
     ("int4", False, "int", -8, 7, 2, 4),
     ("uint8", True, "int", 0, 255, 7, 8),
     ("uint8", False, "int", 0, 255, 7, 8),
     ("float8_e4m3fn", True, "float", -448, 448, 8, 8),
     ("float8_e5m2", True, "float", -57344, 57344, 15, 8),
     ("float4_e2m1fn", True, "float", -6, 6, 2, 4)])
def test_format_table(name, narrow_range, kind, qmin, qmax, emax, bits):
  fmt = formats.get_format(name, narrow_range=narrow_range)
  assert (fmt.name, fmt.kind, fmt.qmin, fmt.qmax, fmt.emax, fmt.bits) == (
      name, kind, qmin, qmax, emax, bits)
  assert fmt.dtype == np.dtype(getattr(ml_dtypes, name, name))
  assert fmt.is_signed == (qmin < 0)


@pytest.mark.parametrize(
    "dtype,name",
    [(jnp.int8, "int8"), (jnp.int4, "int4"), (np.uint8, "uint8"),
     (jnp.float8_e4m3fn, "float8_e4m3fn"), (jnp.float8_e5m2, "float8_e5m2"),
     (jnp.float4_e2m1fn, "float4_e2m1fn"),
     (np.dtype(ml_dtypes.float8_e4m3fn), "float8_e4m3fn")])
def test_dtypes_are_accepted_as_format_names(dtype, name):
  assert formats.canonical_name(dtype) == name
  assert formats.get_format(dtype).name == name


@pytest.mark.parametrize("bad", ["int7", "fp8", "bfloat16", "", jnp.float32,
                                 jnp.int16, "float8_e4m3"])
def test_unknown_format_is_a_value_error_naming_it(bad):
  with pytest.raises(ValueError, match="Unknown quantization format") as info:
    formats.get_format(bad)
  assert repr(bad) in str(info.value)


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_float_cast_matches_nearest_even_reference(name):
  fmt = formats.get_format(name)
  values, _ = _grid(fmt)
  midpoints = (values[1:] + values[:-1]) / 2
  rng = np.random.default_rng(0)
  random = rng.uniform(fmt.qmin * 1.2, fmt.qmax * 1.2, 2000)
  small = rng.standard_normal(2000) * values[values > 0].min() * 4
  x = np.concatenate([values, midpoints, random, small]).astype(np.float32)
  got = np.asarray(formats.cast(jnp.asarray(x), fmt)).astype(np.float64)
  np.testing.assert_array_equal(got, _reference_nearest_even(x, fmt))


@pytest.mark.parametrize(
    "name,x,want",
    [("float8_e4m3fn", [1.0625, 1.1875, -1.0625, 448.0, 464.0, 1e9],
      [1.0, 1.25, -1.0, 448.0, 448.0, 448.0]),
     ("float8_e5m2", [1.125, 1.375, 57344.0, 61440.0, -1e9],
      [1.0, 1.5, 57344.0, 57344.0, -57344.0]),
     ("float4_e2m1fn", [0.25, 0.75, 1.25, 2.5, 3.5, 5.0, 7.0, -100.0],
      [0.0, 1.0, 1.0, 2.0, 4.0, 4.0, 6.0, -6.0])])
def test_float_ties_to_even_and_saturation(name, x, want):
  fmt = formats.get_format(name)
  got = formats.cast(jnp.asarray(x, jnp.float32), fmt)
  assert got.dtype == fmt.dtype
  np.testing.assert_array_equal(np.asarray(got).astype(np.float32), want)


def test_round_to_integer_is_half_to_even():
  x = jnp.asarray([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 0.49999997, 2.5000002])
  np.testing.assert_array_equal(
      np.asarray(formats.round_to_integer(x)),
      [0.0, 2.0, 2.0, 4.0, -0.0, -2.0, -2.0, 0.0, 3.0])


@pytest.mark.parametrize(
    "name,narrow_range,want",
    [("int8", True, [-127, -127, -126, 0, 2, 126, 127, 127]),
     ("int8", False, [-128, -128, -126, 0, 2, 126, 127, 127]),
     ("int4", True, [-7, -7, -7, 0, 2, 7, 7, 7]),
     ("int4", False, [-8, -8, -8, 0, 2, 7, 7, 7]),
     ("uint8", False, [0, 0, 0, 0, 2, 126, 128, 255])])
def test_int_cast_rounds_half_to_even_and_saturates(name, narrow_range, want):
  fmt = formats.get_format(name, narrow_range=narrow_range)
  x = jnp.asarray([-1e6, -128.5, -126.5, 0.5, 2.5, 126.5, 127.5, 1e6])
  got = formats.cast(x, fmt)
  assert got.dtype == fmt.dtype
  np.testing.assert_array_equal(np.asarray(got).astype(np.int32), want)


@pytest.mark.parametrize(
    "name,narrow_range",
    [("int8", True), ("int8", False), ("int4", True), ("uint8", False),
     ("float8_e4m3fn", True), ("float8_e5m2", True), ("float4_e2m1fn", True)])
def test_non_finite_inputs(name, narrow_range):
  fmt = formats.get_format(name, narrow_range=narrow_range)
  got = np.asarray(formats.cast(jnp.asarray([np.inf, -np.inf, np.nan, 1.0]),
                                fmt)).astype(np.float32)
  np.testing.assert_array_equal(got[:2], [fmt.qmax, fmt.qmin])
  if fmt.has_nan:
    assert np.isnan(got[2])
  else:
    assert got[2] == 0.0
  assert got[3] == 1.0


@pytest.mark.parametrize("name", ("int8", "int4") + FLOAT_NAMES)
def test_stochastic_rounding_needs_a_key(name):
  fmt = formats.get_format(name)
  with pytest.raises(ValueError, match="PRNG key"):
    formats.cast(jnp.ones(3), fmt, rounding="stochastic")
  with pytest.raises(ValueError, match="Unknown rounding"):
    formats.cast(jnp.ones(3), fmt, rounding="up")


def test_round_to_integer_stochastic_needs_a_key():
  with pytest.raises(ValueError, match="PRNG key"):
    formats.round_to_integer(jnp.ones(3), "stochastic")


@pytest.mark.parametrize(
    "name,x",
    [("int8", [0.3, -1.7, 2.5, 126.6, -0.5, 5.0]),
     ("int4", [0.9, -6.2, 3.5]),
     # Normal, subnormal and top-binade points of each float format.
     ("float8_e4m3fn", [1.1, -3.3, 0.01, 300.0, 440.0, 2.0]),
     ("float8_e5m2", [1.1, -1000.0, 3e-5, 50000.0]),
     ("float4_e2m1fn", [2.4, 0.3, -4.5, 5.9, 1.5])])
def test_stochastic_rounding_is_unbiased(name, x):
  fmt = formats.get_format(name)
  num_keys = 4096
  keys = jax.random.split(jax.random.key(0), num_keys)
  x = np.asarray(x, np.float32)
  samples = jax.jit(jax.vmap(lambda k: formats.cast(
      jnp.asarray(x), fmt, rounding="stochastic", key=k)))(keys)
  samples = np.asarray(samples).astype(np.float64)
  for j, xj in enumerate(x.astype(np.float64)):
    lo, hi = _neighbours(xj, fmt)
    # Only the two neighbouring grid values may come out.
    assert set(np.unique(samples[:, j])) <= {lo, hi}, (xj, lo, hi)
    # Each sample is lo or hi with P(hi) = p, so the sample mean has standard
    # deviation (hi - lo) * sqrt(p (1 - p) / n); allow six of them.
    p = 0.0 if hi == lo else (xj - lo) / (hi - lo)
    tolerance = 6 * (hi - lo) * np.sqrt(p * (1 - p) / num_keys)
    assert abs(samples[:, j].mean() - xj) <= tolerance, (xj, lo, hi)


@pytest.mark.parametrize("name", ("int8",) + FLOAT_NAMES)
def test_stochastic_rounding_is_a_function_of_the_key(name):
  fmt = formats.get_format(name)
  x = jax.random.uniform(jax.random.key(1), (256,), minval=-3.0, maxval=3.0)
  cast = jax.jit(lambda x, k: formats.cast(x, fmt, rounding="stochastic",
                                           key=k))
  a, b = cast(x, jax.random.key(2)), cast(x, jax.random.key(2))
  c = cast(x, jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.any(np.asarray(a) != np.asarray(c))


def test_floor_log2_is_exact_at_and_below_powers_of_two():
  powers = np.ldexp(np.float32(1.0), np.arange(-126, 128)).astype(np.float32)
  below = np.nextafter(powers, np.float32(0))
  x = np.concatenate([powers, below[1:], -powers, [3.0, 0.75, 448.0]])
  x = x.astype(np.float32)
  _, exponent = np.frexp(x.astype(np.float64))
  np.testing.assert_array_equal(np.asarray(formats.floor_log2(x)),
                                exponent - 1)
  special = np.asarray([0.0, 1e-40, np.inf, np.nan], np.float32)
  np.testing.assert_array_equal(np.asarray(formats.floor_log2(special)),
                                [-127, -127, 128, 128])


def test_pow2_is_exact_and_clamped_to_normal_float32():
  exponent = np.arange(-130, 131)
  got = np.asarray(formats.pow2(jnp.asarray(exponent))).astype(np.float64)
  np.testing.assert_array_equal(got, np.ldexp(1.0, np.clip(exponent, -126,
                                                           127)))


def test_to_e8m0_stores_clamped_powers_of_two():
  exponent = jnp.asarray([-200, -127, -126, -3, 0, 5, 127, 300])
  got = formats.to_e8m0(exponent)
  assert got.dtype == formats.E8M0_DTYPE
  np.testing.assert_array_equal(
      np.asarray(got).astype(np.float64),
      np.ldexp(1.0, [-126, -126, -126, -3, 0, 5, 127, 127]))


@pytest.mark.parametrize("name,count,want",
                         [("int8", 10, 10), ("int4", 10, 5), ("int4", 11, 6),
                          ("float8_e5m2", 3, 3), ("float4_e2m1fn", 7, 4)])
def test_storage_bytes_packs_sub_byte_formats(name, count, want):
  assert formats.storage_bytes(formats.get_format(name), count) == want


# The full range's level qmax + 0.5 is nudged up by 2**-20, off the tie.
NUDGE = 1 + 2.0**-20


@pytest.mark.parametrize(
    "name,narrow,qmin,amax_level",
    [("int8", True, -127, 127.0), ("int4", False, -8, 7.5 * NUDGE),
     ("uint8", True, 0, 255.0), ("float8_e4m3fn", True, -448, 448.0),
     ("float4_e2m1fn", True, -6, 6.0)])
def test_default_range_is_full_for_int4_and_narrow_for_int8(
    name, narrow, qmin, amax_level):
  assert formats.default_narrow_range(name) is narrow
  fmt = formats.get_format(name)
  assert fmt == formats.get_format(name, narrow_range=narrow)
  assert fmt.qmin == qmin and fmt.amax_level == amax_level
  assert fmt.is_full_range == (fmt.kind == "int" and not narrow)


@pytest.mark.parametrize("name,narrow_range,qmin,amax_level",
                         [("int4", True, -7, 7.0),
                          ("int8", False, -128, 127.5 * NUDGE)])
def test_explicit_range_overrides_the_default(name, narrow_range, qmin,
                                              amax_level):
  fmt = formats.get_format(name, narrow_range=narrow_range)
  assert (fmt.qmin, fmt.amax_level) == (qmin, amax_level)
  assert fmt.is_full_range == (not narrow_range)
