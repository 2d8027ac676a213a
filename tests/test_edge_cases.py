"""Edge inputs of the primitives: nothing silently wrong (issue 13).

Each numbered test is the regression test of one item of the issue: invalid
static ranges raise, affine spans beyond float32 stay finite, histogram
ranges never overflow, MSE calibration survives tiny data, hand-built
QArrays are validated against their spec, granularity arguments are checked
and zero-size arrays give empty results. The property test at the end runs
every format x granularity x symmetric/affine x f32/bf16 pairing on edge data
against a float64 NumPy reference of the documented semantics.
"""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import MX, PerBlock, PerChannel, PerGroup, PerTensor, PerToken
from jaxq import QArray, QuantSpec

F32_MAX = float(np.finfo(np.float32).max)

# Item 2: invalid static ranges.


@pytest.mark.parametrize("amax", [np.inf, -np.inf, np.nan, -1.0])
def test_invalid_static_amax_raises(amax):
  spec = QuantSpec("int8")
  x = jnp.linspace(-1.0, 1.0, 8)
  for fn in (jaxq.fake_quant, jaxq.quantize):
    with pytest.raises(ValueError, match="amax"):
      fn(x, spec, amax=amax)
  with pytest.raises(ValueError, match="amax"):
    jaxq.scale_from_range(spec, jnp.float32(amax))


def test_invalid_static_amax_names_the_bad_element():
  spec = QuantSpec("int8", PerChannel(axis=-1))
  amax = jnp.array([[1.0, np.nan, 2.0]])
  with pytest.raises(ValueError, match=r"amax.*\(0, 1\).*nan"):
    jaxq.fake_quant(jnp.ones((4, 3)), spec, amax=amax)


def test_affine_amin_above_amax_raises():
  spec = QuantSpec("uint8", symmetric=False)
  x = jnp.linspace(-1.0, 1.0, 8)
  with pytest.raises(ValueError, match="amin.*greater than amax"):
    jaxq.quantize(x, spec, amin=2.0, amax=1.0)
  with pytest.raises(ValueError, match="amin"):
    jaxq.scale_from_range(spec, jnp.float32(1.0), jnp.float32(np.inf))


ZERO_RANGE_SPECS = [QuantSpec("int8"), QuantSpec("int4", PerChannel(axis=-1)),
                    QuantSpec("uint8", symmetric=False),
                    QuantSpec("float8_e4m3fn", MX(axis=-1, size=8))]


def _spec_id(spec: QuantSpec) -> str:
  return f"{spec.format}-{type(spec.granularity).__name__}"


def _zero_range(spec: QuantSpec, x: jax.Array) -> dict[str, jax.Array]:
  shape = jaxq.granularity.scale_shape(spec.granularity, tuple(x.shape))
  zeros = jnp.zeros(shape, jnp.float32)
  return {"amax": zeros} if spec.symmetric else {"amin": zeros,
                                                 "amax": zeros}


@pytest.mark.parametrize("spec", ZERO_RANGE_SPECS, ids=_spec_id)
def test_static_range_of_zero_raises(spec):
  # A static range of 0 would quantize every input to 0: silently wrong
  # for any input that is not 0. Symmetric, affine (amin == amax == 0)
  # and MX alike.
  x = jnp.linspace(-1.0, 1.0, 16).reshape(2, 8)
  zero = _zero_range(spec, x)
  for fn in (jaxq.fake_quant, jaxq.quantize):
    with pytest.raises(jaxq.ZeroRangeError,
                       match=r"0 in every one of (its|their) \d+ "
                             r"element\(s\)"):
      fn(x, spec, **zero)
  with pytest.raises(jaxq.ZeroRangeError, match="'scale_from_range'"):
    jaxq.scale_from_range(spec, **zero)
  with pytest.raises(ValueError, match=r"'dense/act'.* 0 in every"):
    jaxq.check_range(spec, where="dense/act", **zero)


def test_scalar_amax_zero_raises():
  with pytest.raises(ValueError, match="amax is 0"):
    jaxq.fake_quant(jnp.ones(4), QuantSpec("int8"), amax=0.0)


@pytest.mark.parametrize("spec", ZERO_RANGE_SPECS, ids=_spec_id)
def test_traced_static_range_of_zero_is_nan(spec):
  # Under jit the values are unknown while tracing: a range of 0 makes the
  # output NaN, as any invalid traced range does; a valid one does not.
  x = jnp.linspace(-1.0, 1.0, 16).reshape(2, 8)
  zero = _zero_range(spec, x)
  # fake_quant, dequantize(quantize) and scale_from_range in one program,
  # run on the zero range and on a valid one.
  traced = jax.jit(lambda x, r: (
      jaxq.fake_quant(x, spec, **r),
      jaxq.dequantize(jaxq.quantize(x, spec, **r)),
      jaxq.scale_from_range(spec, **r)[0]))
  for out in traced(x, zero):
    assert np.all(np.isnan(np.asarray(out, np.float32)))
  ones = jax.tree.map(lambda a: a + 1.0, zero)
  ones = {**ones, "amin": -ones["amin"]} if "amin" in ones else ones
  out, _, scale = traced(x, ones)
  np.testing.assert_array_equal(np.asarray(out),
                                np.asarray(jaxq.fake_quant(x, spec, **ones)))
  assert not np.any(np.isnan(np.asarray(scale, np.float32)))
  checked = jax.jit(lambda r: jaxq.check_range(spec, where="fc/act", **r))
  with pytest.raises(Exception, match=r"'fc/act'.* 0 in every"):
    jax.block_until_ready(checked(zero))


@pytest.mark.parametrize("spec", [QuantSpec("int8", PerChannel(axis=-1)),
                                  QuantSpec("uint8", PerChannel(axis=-1),
                                            symmetric=False)],
                         ids=_spec_id)
def test_static_range_with_some_zero_channels_is_valid(spec):
  # Dead channels (calibration only saw zeros there) keep a finite scale;
  # their zeros stay zeros and the other channels quantize on their range.
  x = jnp.array([[0.0, 1.0, 0.0], [0.0, -2.0, 0.5]])
  amin, amax = jaxq.compute_range(x, spec)  # Given as a static range.
  assert float(amax[0, 0]) == 0.0 and float(amax[0, 1]) != 0.0
  want = jaxq.fake_quant(x, spec)
  for fq in (jaxq.fake_quant, jax.jit(jaxq.fake_quant, static_argnums=1)):
    out = fq(x, spec, amax=amax, amin=amin)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(out[:, 0]), [0.0, 0.0])
  jaxq.check_range(spec, amax, amin)
  scale, _ = jaxq.scale_from_range(spec, amax, amin)
  assert np.all(np.isfinite(np.asarray(scale))) and np.all(scale > 0)


@pytest.mark.parametrize("spec", ZERO_RANGE_SPECS, ids=_spec_id)
def test_ranges_from_data_may_be_zero(spec):
  # A range computed from the data (a dynamic range, a zero tensor, a
  # weight's own range passed with range_from_data=True) may be 0: the
  # zeros quantize to zeros exactly, with a finite positive scale, eager
  # and under jit.
  x = jnp.zeros((2, 8), jnp.float32)
  zero = _zero_range(spec, x)
  fns = (lambda x: jaxq.fake_quant(x, spec),
         lambda x: jaxq.fake_quant(x, spec, range_from_data=True, **zero),
         lambda x: jaxq.dequantize(jaxq.quantize(x, spec)),
         lambda x: jaxq.dequantize(jaxq.quantize(
             x, spec, range_from_data=True, **zero)))
  # Eager, then all under one jit (one program, not one per function), with
  # scale_from_range of the zero range.
  jitted = jax.jit(lambda x, r: ([fn(x) for fn in fns],
                                 jaxq.scale_from_range(
                                     spec, range_from_data=True, **r)[0]))
  outs, jitted_scale = jitted(x, zero)
  for out in [fn(x) for fn in fns] + outs:
    out = np.asarray(out)
    np.testing.assert_array_equal(out, np.zeros_like(out))
  qa = jaxq.quantize(x, spec)
  for scale in (qa.scale, jitted_scale):
    scale = np.asarray(scale).astype(np.float32)
    assert np.all(np.isfinite(scale) & (scale > 0))


def test_invalid_traced_range_is_nan_not_garbage():
  # Under jit the values are unknown at trace time: an invalid range makes
  # the output NaN (never a finite, wrong answer); check_range raises.
  spec = QuantSpec("int8")
  x = jnp.linspace(-1.0, 1.0, 8)
  fq = jax.jit(lambda x, a: jaxq.fake_quant(x, spec, amax=a))
  for bad in (np.nan, -1.0, np.inf):
    assert np.all(np.isnan(np.asarray(fq(x, jnp.float32(bad)))))
  np.testing.assert_array_equal(
      np.asarray(fq(x, jnp.float32(1.0))),
      np.asarray(jaxq.fake_quant(x, spec, amax=1.0)))
  checked = jax.jit(lambda a: jaxq.check_range(spec, a, where="layer/act"))
  checked(jnp.float32(1.0))
  with pytest.raises(Exception, match="layer/act"):
    jax.block_until_ready(checked(jnp.float32(np.nan)))


def test_check_range_concrete():
  spec = QuantSpec("int8", symmetric=False)
  jaxq.check_range(spec, jnp.float32(1.0), jnp.float32(-1.0), where="m")
  with pytest.raises(ValueError, match=r"'dense/act'.*amax.*inf"):
    jaxq.check_range(spec, jnp.float32(np.inf), jnp.float32(-1.0),
                     where="dense/act")
  with pytest.raises(ValueError, match="needs amin"):
    jaxq.check_range(spec, jnp.float32(1.0), where="m")


# Item 3: affine spans beyond the float32 max.


@pytest.mark.parametrize("fmt", ["uint8", "int8"])
@pytest.mark.parametrize("data", [[-2e38, 2e38, 1.0],
                                  [F32_MAX, -F32_MAX, 3.0],
                                  [np.finfo(np.float32).min, 0.5, 1.0]])
def test_affine_span_beyond_float32_max(fmt, data):
  spec = QuantSpec(fmt, symmetric=False)
  x = jnp.array(data, jnp.float32)
  qa = jaxq.quantize(x, spec)
  out = np.asarray(jaxq.dequantize(qa))
  assert np.all(np.isfinite(np.asarray(qa.scale)))
  assert np.all(np.isfinite(out))
  step = float(np.asarray(qa.scale).reshape(()))
  np.testing.assert_allclose(out, data, rtol=0, atol=step)
  np.testing.assert_array_equal(out, np.asarray(jaxq.fake_quant(x, spec)))


# Items 1 and 7: histogram observers.


def _scalar(x) -> float:
  return float(np.asarray(x).reshape(()))


def _histogram_state(observer, batches, spec):
  state = observer.init(batches[0], spec)
  update = jax.jit(observer.update)
  for batch in batches:
    state = update(state, batch)
  return state


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_histogram_range_growth_stays_finite(method):
  spec = QuantSpec("int8")
  observer = {"percentile": jaxq.observers.percentile(99.0),
              "entropy": jaxq.observers.entropy(),
              "mse": jaxq.observers.mse()}[method]
  small = jax.random.normal(jax.random.key(0), (1000,)) * 1e-30
  large = jnp.zeros(1000).at[0].set(1e30).at[1].set(-3e38)
  state = _histogram_state(observer, [small, large], spec)
  assert np.isfinite(_scalar(state.range)) and _scalar(state.range) >= 3e38 / 2
  amax = _scalar(observer.finalize(state))
  assert np.isfinite(amax) and 0.0 < amax <= 3e38
  assert int(state.counts.sum()) == 2000


def test_histogram_growth_keeps_exact_bins_when_range_fits():
  # The power-of-two growth is unchanged when no overflow is near.
  spec = QuantSpec("int8")
  observer = jaxq.observers.percentile(100.0, num_bins=64)
  a = jnp.linspace(0.0, 1.0, 33)
  b = jnp.linspace(0.0, 5.0, 17)
  state = _histogram_state(observer, [a, b], spec)
  assert _scalar(state.range) == 8.0
  expected, _ = np.histogram(np.concatenate([np.asarray(a), np.asarray(b)]),
                             bins=64, range=(0.0, 8.0))
  # Bins here are right-closed: recount the edges numpy puts on the left.
  values = np.abs(np.concatenate([np.asarray(a), np.asarray(b)]))
  index = np.clip(np.ceil(values * 64 / 8.0) - 1, 0, 63).astype(int)
  np.testing.assert_array_equal(np.asarray(state.counts).reshape(-1),
                                np.bincount(index, minlength=64))
  assert expected.sum() == np.asarray(state.counts).sum()


@pytest.mark.parametrize("magnitude", [1e-20, 1e-25, 1e-30, 1.0, 1e30])
def test_mse_is_scale_invariant(magnitude):
  spec = QuantSpec("int8")
  observer = jaxq.observers.mse(num_bins=256)
  x = jax.random.normal(jax.random.key(1), (4096,))
  reference = _scalar(observer.finalize(_histogram_state(observer, [x], spec)))
  scaled = jnp.asarray(np.asarray(x, np.float64) * magnitude, jnp.float32)
  amax = _scalar(observer.finalize(_histogram_state(observer, [scaled], spec)))
  np.testing.assert_allclose(amax / magnitude, reference, rtol=1e-4)
  assert amax > _scalar(jnp.max(jnp.abs(scaled))) / 20


# Item 8: hand-built QArrays.


def _qa(spec, shape=(4, 8)):
  x = jax.random.normal(jax.random.key(2), shape)
  return jaxq.quantize(x, spec)


MATMUL = (((1,), (0,)), ((), ()))


def test_qarray_with_float_values_is_refused():
  good = _qa(QuantSpec("int8"))
  bad = QArray(good.values.astype(jnp.float32) + 0.5, good.scale, None,
               good.spec, good.dtype)
  w = _qa(QuantSpec("int8"), (8, 3))
  with pytest.raises(ValueError, match=r"lhs.*values.*float32.*int8"):
    jaxq.dot_general(bad, w, MATMUL)
  with pytest.raises(ValueError, match=r"values.*float32.*int8"):
    jaxq.dequantize(bad)


def test_qarray_per_tensor_spec_with_per_channel_scale_is_refused():
  w = _qa(QuantSpec("int8", PerChannel(axis=-1)), (8, 3))
  bad = QArray(w.values, w.scale, None, QuantSpec("int8"), w.dtype)
  x = _qa(QuantSpec("int8"))
  with pytest.raises(ValueError, match=r"rhs.*scale.*\(1, 3\).*\(1, 1\)"):
    jaxq.dot_general(x, bad, MATMUL)


def test_qarray_int8_values_under_int4_spec_is_refused():
  good = _qa(QuantSpec("int8"))
  bad = QArray(good.values, good.scale, None, QuantSpec("int4"), good.dtype)
  w = _qa(QuantSpec("int4"), (8, 3))
  with pytest.raises(ValueError, match=r"lhs.*int8.*int4"):
    jaxq.dot_general(bad, w, MATMUL)


def test_qarray_values_outside_the_format_range_are_refused():
  good = _qa(QuantSpec("int8"))
  bad = QArray(good.values.at[0, 0].set(-128), good.scale, None, good.spec,
               good.dtype)
  with pytest.raises(ValueError, match=r"-128.*\[-127, 127\]"):
    jaxq.dequantize(bad)
  # Full range specs hold -128.
  full = QuantSpec("int8", narrow_range=False)
  jaxq.dequantize(QArray(bad.values, bad.scale, None, full, bad.dtype))


def test_qarray_zero_point_must_match_spec():
  affine = _qa(QuantSpec("uint8", symmetric=False))
  no_zero = QArray(affine.values, affine.scale, None, affine.spec,
                   affine.dtype)
  with pytest.raises(ValueError, match="zero_point"):
    jaxq.dequantize(no_zero)


def test_dequantize_refuses_a_plain_array():
  with pytest.raises(TypeError, match=r"dequantize.*QArray.*ndarray"):
    jaxq.dequantize(np.ones((2, 2), np.int8))


def test_qarray_checks_work_under_jit_and_tree_map():
  qa = _qa(QuantSpec("int8", PerChannel(axis=-1)))
  out = jax.jit(jaxq.dequantize)(qa)
  np.testing.assert_array_equal(np.asarray(out),
                                np.asarray(jaxq.dequantize(qa)))
  shapes = jax.tree.map(lambda a: a.shape, qa)  # Leaves need not be arrays.
  assert shapes.values == (4, 8)


# Item 12 and zero-size arrays: granularity arguments.


@pytest.mark.parametrize("make", [
    lambda: PerChannel(axis=1.5), lambda: PerChannel(axis=(0, 0.5)),
    lambda: PerChannel(axis=True), lambda: PerToken(contraction_axis="a"),
    lambda: PerGroup(axis=0.5), lambda: PerGroup(axis=0, size=0),
    lambda: PerGroup(axis=0, size=2.0), lambda: MX(axis=None),
    lambda: PerBlock(shape=(4, 4), axes=(0, 1.0)),
    lambda: PerBlock(shape=(4, -4))])
def test_granularity_arguments_are_validated(make):
  with pytest.raises(ValueError, match=r"axis|axes|size"):
    make()


def test_granularity_accepts_numpy_integers():
  assert PerChannel(axis=np.int64(1)).axis == 1
  assert PerGroup(axis=np.int32(0), size=np.int64(4)).size == 4


@pytest.mark.parametrize("granularity,expected", [
    (PerTensor(), (1, 1)), (PerChannel(axis=-1), (1, 4)),
    (PerToken(), (0, 1)), (PerGroup(axis=0, size=2), (0, 4)),
    (PerGroup(axis=-1, size=2), (0, 2))])
def test_zero_size_arrays(granularity, expected):
  x = jnp.zeros((0, 4), jnp.float32)
  assert jaxq.granularity.scale_shape(granularity, x.shape) == expected
  for spec in (QuantSpec("int8", granularity),
               QuantSpec("uint8", granularity, symmetric=False)):
    qa = jaxq.quantize(x, spec)
    assert qa.values.shape == (0, 4) and qa.scale.shape == expected
    assert jaxq.dequantize(qa).shape == (0, 4)
    assert jaxq.fake_quant(x, spec).shape == (0, 4)
    amin, amax = jaxq.compute_range(x, spec)
    assert amax.shape == expected


# Property test: every format x granularity x symmetric/affine x f32/bf16
# on edge data, against a float64 NumPy reference of the documented rules:
#
# * XLA flushes subnormal float32 to zero (inputs and results): a subnormal
#   input is 0 (with its sign).
# * Ranges come from the finite elements of each block (0 if none); a zero
#   range gives scale 1 (2**-126 for MX), every scale is at least the
#   smallest normal float32.
# * Values round half to even after the float32 division x / scale and
#   saturate: +inf to qmax, -inf to qmin. NaN becomes 0 (the zero point when
#   affine) in the integer formats and e2m1, and stays NaN in fp8.
# * Affine results are clipped to the finite float32 range.

TINY = float(np.finfo(np.float32).tiny)

EDGE_VALUES = [0.0, -0.0, 1.0, -1.0, 0.5, 2.5, -3.5, 1e-40, -1e-41, 1e-30,
               1e30, -1e30, 3e38, -3.3e38, F32_MAX, -F32_MAX, np.inf, -np.inf,
               np.nan, 7.0, 1e-3, 1234.5]

FORMATS = [("int8", True), ("int4", True), ("int8", False), ("int4", False),
           ("uint8", False), ("float8_e4m3fn", True), ("float8_e5m2", True),
           ("float4_e2m1fn", True)]

GRANULARITIES = {
    "T": PerTensor(), "C": PerChannel(axis=-1), "K": PerToken(),
    "G": PerGroup(axis=-1, size=8), "B": PerBlock(shape=(2, 8)),
    "MX": MX(axis=-1, size=8)}


def _f32(x: np.ndarray) -> np.ndarray:
  """float64 -> float32 -> float64 with subnormals flushed to zero."""
  with np.errstate(over="ignore"):
    x = np.asarray(x, np.float64).astype(np.float32)
  x = np.where(np.abs(x) < TINY, np.copysign(0.0, x), x)
  return x.astype(np.float64)


def _blocks_view(x: np.ndarray, blocks: tuple[int, ...]) -> np.ndarray:
  """``x`` reshaped to (n_0, b_0, n_1, b_1, ...)."""
  shape = []
  for d, b in zip(x.shape, blocks):
    shape += [d // b, b]
  return x.reshape(shape)


def _per_block(x: np.ndarray, blocks, reducer) -> np.ndarray:
  """Reduces each block; returns the keepdims scale shape."""
  view = _blocks_view(x, blocks)
  axes = tuple(range(1, view.ndim, 2))
  return reducer(view, axis=axes)


def _broadcast(scale: np.ndarray, shape, blocks) -> np.ndarray:
  for axis, b in enumerate(blocks):
    scale = np.repeat(scale, b, axis=axis)
  return scale.reshape(shape)


def _divisions(a, b) -> tuple[np.ndarray, np.ndarray]:
  """``a / b`` in float32 both ways XLA computes it: correctly rounded, or
  (on CPU, for a broadcast divisor) as ``a`` times the rounded ``1 / b``."""
  with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
    return _f32(a / b), _f32(a * _f32(1.0 / b))


def _one_of(actual, candidates, what) -> np.ndarray:
  """Asserts each element equals one candidate (NaN matching NaN)."""
  actual = np.asarray(actual, np.float64)
  ok = np.zeros(actual.shape, bool)
  for c in candidates:
    c = np.broadcast_to(c, actual.shape)
    ok |= (actual == c) | (np.isnan(actual) & np.isnan(c))
  wanted = [np.broadcast_to(c, actual.shape)[~ok][:4] for c in candidates]
  assert ok.all(), f"{what}: {actual[~ok][:4]} not among {wanted}"
  return actual


def _quantized(x, spec, s, z):
  """The stored values of float64 ``x`` with scale ``s``, zero point ``z``
  (broadcast), both ways of dividing."""
  fmt = spec.fmt
  out = []
  for scaled in _divisions(x, s):
    nan = np.isnan(scaled)
    if fmt.kind == "int":
      q = np.clip(np.round(np.where(nan, 0.0, scaled)) + z, fmt.qmin,
                  fmt.qmax)
      q = np.where(nan, z, q)
    else:
      clipped = np.clip(np.where(nan, 0.0, scaled), fmt.qmin, fmt.qmax)
      q = clipped.astype(np.float32).astype(fmt.dtype).astype(np.float64)
      q = np.where(nan, np.nan if fmt.has_nan else 0.0, q)
    out.append(q)
  return out


def _dequantized(q, s, z, symmetric) -> np.ndarray:
  out = _f32((q - z) * s)
  return out if symmetric else np.clip(out, -F32_MAX, F32_MAX)


def _check_against_reference(x: np.ndarray, spec: QuantSpec, qa: QArray,
                             outputs: dict[str, jax.Array], dtype) -> None:
  """Checks ``qa`` and the fake-quant ``outputs`` of float64 ``x``."""
  fmt = spec.fmt
  to_dtype = lambda a: np.asarray(jnp.asarray(a, jnp.float32).astype(dtype)
                                  .astype(jnp.float32), np.float64)
  if x.size == 0:  # Unit scales (zero points 0) of the scale shape.
    ones = np.ones(jaxq.granularity.scale_shape(spec.granularity, x.shape))
    _one_of(qa.scale.astype(jnp.float32), [ones], "scale")
    for name, out in outputs.items():
      assert out.shape == x.shape, name
    return
  blocks = spec.granularity.block_shape(x.shape)
  with np.errstate(over="ignore"):
    x = _f32(x)
  finite = np.where(np.isfinite(x), x, 0.0)
  actual_scale = np.asarray(qa.scale.astype(jnp.float32), np.float64)
  if spec.symmetric:
    magnitude = np.abs(finite)
    if fmt.kind == "int" and not spec.narrow_range and not spec.is_mx:
      # The full range's grid reaches one step further below zero: negative
      # values count (qmax + 0.5) / (qmax + 1.5) of their size (a float32
      # product, exact in float64 before rounding).
      magnitude = _f32(np.maximum(finite, -finite * np.float64(np.float32(
          (fmt.qmax + 0.5) / (fmt.qmax + 1.5)))))
    amax = _per_block(magnitude, blocks, np.max)
    if spec.is_mx:
      exponent = np.where(amax > 0, np.floor(np.log2(np.where(
          amax > 0, amax, 1.0))), -127)
      candidates = [2.0 ** np.clip(exponent - fmt.emax, -126, 127)]
    else:
      # The full signed integer range maps amax to qmax + 0.5, nudged up
      # by 2**-20 off the rounding tie.
      full = fmt.kind == "int" and not spec.narrow_range
      level = (fmt.qmax + 0.5) * (1 + 2.0**-20) if full else fmt.qmax
      candidates = [np.maximum(np.where(amax > 0, d, 1.0), TINY)
                    for d in _divisions(amax, level)]
    scale = _one_of(actual_scale, candidates, "scale")
    zero = np.zeros_like(scale)
  else:
    amin = np.minimum(_per_block(finite, blocks, np.min), 0.0)
    amax = np.maximum(_per_block(finite, blocks, np.max), 0.0)
    levels = fmt.qmax - fmt.qmin
    span = _f32(amax - amin)
    candidates = []
    for way in (0, 1):
      wide = _f32(_divisions(amax, levels)[way] -
                  _divisions(amin, levels)[way])
      per_level = np.where(np.isfinite(span),
                           _divisions(span, levels)[way], wide)
      candidates.append(np.maximum(np.where(span > 0, per_level, 1.0), TINY))
    scale = _one_of(actual_scale, candidates, "scale")
    zero = _one_of(qa.zero_point, [
        np.clip(np.round(_f32(fmt.qmin - d)), fmt.qmin, fmt.qmax)
        for d in _divisions(amin, scale)], "zero_point")
  s = _broadcast(scale, x.shape, blocks)
  z = _broadcast(zero, x.shape, blocks)
  values = _one_of(qa.values.astype(jnp.float32), _quantized(x, spec, s, z),
                   "values")
  expected = [to_dtype(_dequantized(q, s, z, spec.symmetric))
              for q in _quantized(x, spec, s, z)]
  exact = to_dtype(_dequantized(values, s, z, spec.symmetric))
  _one_of(outputs["dequantize"].astype(jnp.float32), [exact], "dequantize")
  for name, out in outputs.items():
    assert out.dtype == dtype, name
    got = _one_of(out.astype(jnp.float32), expected, name)
    # NaN only where the input is NaN.
    assert not np.any(np.isnan(got) & ~np.isnan(x)), name


def _edge_arrays(shape):
  elements = st.one_of(st.sampled_from(EDGE_VALUES),
                       st.floats(-100.0, 100.0, width=32))
  size = int(np.prod(shape))
  return st.lists(elements, min_size=size, max_size=size).map(
      lambda v: np.asarray(v, np.float64).reshape(shape))


def _assert_same(actual, expected, what):
  actual = np.asarray(actual, np.float64)
  np.testing.assert_array_equal(actual, expected, err_msg=what)


@pytest.mark.parametrize("fmt,symmetric", FORMATS,
                         ids=[f"{f}-{'sym' if s else 'affine'}"
                              for f, s in FORMATS])
@hypothesis.settings(max_examples=6, deadline=None)
@hypothesis.given(data=st.data())
def test_edge_data_matches_float64_reference(fmt, symmetric, data):
  names = [g for g in GRANULARITIES if symmetric or g != "MX"]
  name = data.draw(st.sampled_from(names), "granularity")
  dtype = data.draw(st.sampled_from([jnp.float32, jnp.bfloat16]), "dtype")
  shape = data.draw(st.sampled_from(
      [(4, 16)] + ([(1, 1), (0, 16)] if name in "TCK" else [])), "shape")
  spec = QuantSpec(fmt, GRANULARITIES[name], symmetric=symmetric)
  x64 = data.draw(_edge_arrays(shape), "x")
  with np.errstate(over="ignore"):
    x = jnp.asarray(x64.astype(np.float32)).astype(dtype)
  # The reference sees the input the library sees (bf16-rounded).
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  qa = jaxq.quantize(x, spec)
  outputs = {"dequantize": jaxq.dequantize(qa),
             "fake_quant": jaxq.fake_quant(x, spec)}
  jitted = _jitted_fake_quant(spec)(x)
  finite = x64[np.isfinite(x64)]
  # An affine span beyond the float32 max is computed as amax/q - amin/q;
  # compiled, XLA may fuse that into a multiply-add, one ulp from eager.
  wide = (not symmetric and finite.size > 0 and
          float(finite.max()) - float(finite.min()) > F32_MAX)
  if not wide:
    outputs["jit fake_quant"] = jitted
  _check_against_reference(x64, spec, qa, outputs, dtype)
  eager = np.asarray(outputs["fake_quant"].astype(jnp.float32), np.float64)
  if wide:
    np.testing.assert_allclose(np.asarray(jitted.astype(jnp.float32)), eager,
                               rtol=2 * np.finfo(np.float32).eps, atol=0,
                               err_msg="jit vs eager (wide affine span)")
  else:
    # Eager and jit agree exactly, ties included.
    _one_of(jitted.astype(jnp.float32), [eager], "jit vs eager")


_JITTED = {}


def _jitted_fake_quant(spec: QuantSpec):
  if spec not in _JITTED:
    _JITTED[spec] = jax.jit(lambda x: jaxq.fake_quant(x, spec))
  return _JITTED[spec]


@pytest.mark.parametrize("observer", [jaxq.observers.max(),
                                      jaxq.observers.percentile(99.0)])
def test_observers_skip_zero_size_batches(observer):
  spec = QuantSpec("int8", PerChannel(axis=-1))
  x = jnp.arange(8.0).reshape(2, 4)
  state = observer.update(observer.init(x, spec), x)
  after = observer.update(state, jnp.zeros((0, 4)))
  np.testing.assert_array_equal(np.asarray(observer.finalize(after)),
                                np.asarray(observer.finalize(state)))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_tiny_inputs_agree_with_float64_but_for_float32_limits(fmt):
  """A sweep of tiny rows (|x| from 1e-45 to 1e-25, one scale per row)
  against a float64 reference: every difference is float32's own, as the
  README's Numerics says. Subnormal inputs (|x| < 2**-126) are flushed to
  zero by XLA (so they neither set the range nor survive), and the scale is
  at least the smallest normal float32, 2**-126; with those two rules the
  float64 reference is matched exactly (ties of the rounding aside)."""
  rng = np.random.default_rng(0)
  magnitudes = np.logspace(-45, -25, 64)[:, None]
  x = (rng.standard_normal((64, 16)) * magnitudes).astype(np.float32)
  spec = QuantSpec(fmt, PerToken())
  got = np.asarray(jaxq.fake_quant(jnp.asarray(x), spec), np.float64)
  tiny = float(np.finfo(np.float32).tiny)
  x64 = np.where(np.abs(x) < tiny, 0.0, x.astype(np.float64))  # FTZ.
  amax = np.maximum(x64.max(axis=1), -x64.min(axis=1) / spec.negative_reach)
  scale = np.where(amax > 0, np.maximum(amax / spec.fmt.amax_level, tiny),
                   1.0)[:, None]
  scaled = x64 / scale
  want = np.clip(np.round(scaled), spec.fmt.qmin, spec.fmt.qmax) * scale
  tie = np.abs(np.abs(scaled - np.floor(scaled)) - 0.5) < 1e-4
  np.testing.assert_allclose(np.where(tie, 0, got), np.where(tie, 0, want),
                             rtol=1e-5, atol=0)
  # Without the two rules the reference would differ: they are exercised.
  assert np.any((x != 0) & (x64 == 0))
  assert np.any(amax / spec.fmt.amax_level < tiny)
