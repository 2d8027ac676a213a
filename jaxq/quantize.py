"""The primitives: `quantize`, `dequantize` and `fake_quant`.

Shapes: ``x`` has any shape ``S``; the range arrays (``amax``, ``amin``), the
``scale`` and the ``zero_point`` have the keepdims scale shape of
``spec.granularity`` for ``S`` (see `jaxq.granularity`).

Numerics:

* Symmetric: ``scale = amax / amax_level``; ``q = round(x / scale)``
  saturated to ``[qmin, qmax]``; ``x_hat = q * scale``. ``amax_level`` is
  the format's `jaxq.formats.Format.amax_level`: ``qmax`` for floats and
  the narrow integer range (int8's default, [-127, 127]), ``qmax + 0.5``
  for the full range (int4's default, [-8, 7], ``scale = amax / 7.5``),
  where ``+amax`` saturates to ``qmax`` and ``-amax`` rounds to ``qmin``:
  the error stays within half a step on a finer grid. (The full range's
  level is raised by 2**-20 relative, so that ``-amax`` lies off its
  rounding tie whatever the float32 rounding.) A range computed from data
  (`compute_range`) is ``max |x|``, except in the full range, where the
  grid reaches one step further below zero: ``max(max x, -min x *
  (qmax + 0.5) / (qmax + 1.5))``, the smallest range holding both ends of
  ``x`` within half a step (`jaxq.formats.Format.negative_reach`), so a
  block whose negative end dominates gets a finer step. The scale's division
  is a multiplication by the float32 reciprocal of ``amax_level``
  (``qmax - qmin`` when affine), as XLA compiles it inside ``jit``, so
  eager and jitted scales, and the ties they round, are identical.
* Affine (integer formats): the range is widened to include 0, then
  ``scale = (amax - amin) / (qmax - qmin)`` and
  ``zero_point = round(qmin - amin / scale)``, so 0.0 is exact;
  ``q = round(x / scale) + zero_point``; ``x_hat = (q - zero_point) * scale``.
* MX: ``scale = 2 ** (floor(log2(amax)) - emax)`` with ``emax`` the element
  format's (OCP Microscaling v1.0), stored as e8m0.
* A zero range computed from data gives ``scale = 1`` (``2**-126`` for
  MX): an all-zero block quantizes to zeros exactly. Affine spans wider
  than the float32 maximum (``[-2e38, 2e38]``) are divided by the number
  of levels end by end, so the scale stays finite, and dequantized values
  are clipped to the finite float32 range.
* Static ranges (``amax``, ``amin`` passed in) must be finite, with
  ``amax >= 0`` when symmetric and ``amin <= amax`` when affine, and not
  zero everywhere: a static range of 0 (``amin == amax == 0`` when affine)
  would quantize every input to 0, right only if the input is always 0.
  Some zero entries (dead channels) are valid. Concrete ranges are checked
  and raise a ValueError naming the bad element (`jaxq.check_range`). Under
  ``jit`` their values are unknown when tracing, so an invalid traced range
  makes the scale, and with it the output, NaN: never a finite, wrong
  answer. `jaxq.check_range` also checks traced ranges, with a host callback,
  for callers that can afford one. Callers passing a range they computed
  from ``x`` itself (a weight's clipped range) say so with
  ``range_from_data=True``: a zero range is then ``x`` being zero there.
* Zero-size arrays quantize to zero-size values with unit scales (see
  `jaxq.granularity.scale_shape` for the scale shape).
* A range not given is computed from ``x`` as ``spec.calibration`` asks
  (`compute_range`): abs-max by default, a percentile of each block, or
  the abs-max range clipped by the ratio of least squared error
  (`jaxq.range_search`); ``"entropy"`` needs calibration data and raises.
  Clipped ranges are the data's too: a zero range there is ``x`` being
  (mostly) zero.
* Ranges computed from data ignore NaN and +-inf, block by block, so one bad
  element never poisons the scale of another channel or group (nor of its
  own). The bad elements themselves follow `jaxq.formats.cast`: +inf
  saturates to qmax, -inf to qmin, and NaN becomes 0 (NaN in fp8); in
  affine specs NaN is stored as the zero point, so it dequantizes to 0.0.

All functions are pure, work under ``jit``, ``vmap`` and ``grad``, accept
float32, bfloat16 and float16, and compute scales in float32. `fake_quant`
returns ``x``'s dtype and is a straight-through estimator (``custom_vjp``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import formats as formats_lib
from jaxq import granularity as granularity_lib
from jaxq import range_checks
from jaxq import range_search
from jaxq.spec import PackedQArray, QArray, QuantSpec, check_qarray


def _check_float(x: jax.Array, what: str) -> None:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{what} expects a floating-point array, got dtype "
                     f"{x.dtype} with shape {tuple(x.shape)}; integer input is "
                     f"already quantized or needs a cast to float first.")


def _check_range_shape(name: str, value: jax.Array, expected: tuple[int, ...],
                       spec: QuantSpec, shape: tuple[int, ...]) -> jax.Array:
  value = jnp.asarray(value, jnp.float32)
  if value.shape != expected:
    try:
      value = jnp.broadcast_to(value, expected)
    except ValueError:
      raise ValueError(
          f"{name} has shape {tuple(value.shape)} but {spec.granularity} on an "
          f"array of shape {shape} needs scale shape {expected}.") from None
  return value


def _finite_block_max(x: jax.Array, blocks: tuple[int, ...],
                      negative_reach: float) -> jax.Array:
  """The block maximum of ``range_magnitude(x)`` (``max |x|`` when
  ``negative_reach`` is 1) over finite elements (0 if none).

  The plain reduction fuses into one pass with no masked copy of ``x``, and
  it is the answer whenever it is finite everywhere: a finite block maximum
  means no inf in the block, and a NaN either propagates (not finite) or is
  skipped, which is what masking it to 0 does too, as the magnitude is
  ``>= 0``. Only otherwise is the masked reduction computed.
  """
  magnitude = lambda: formats_lib.range_magnitude(x, negative_reach)
  fast = granularity_lib.block_reduce(magnitude(), blocks, jnp.max)
  # The magnitude is recomputed in the branch: shared, it would be
  # materialised.
  masked = lambda: granularity_lib.block_reduce(
      jnp.where(jnp.isfinite(x), magnitude(), 0.0), blocks, jnp.max)
  return jax.lax.cond(jnp.all(jnp.isfinite(fast)), lambda: fast, masked)


def compute_range(x: jax.Array, spec: QuantSpec
                  ) -> tuple[jax.Array | None, jax.Array]:
  """The range of each block of ``x`` as ``spec.calibration`` asks,
  ignoring non-finite elements: the range `quantize` and `fake_quant` use
  when no ``amax`` is given.

  Returns:
    ``(amin, amax)`` in float32 of the scale shape; ``amin`` is None for
    symmetric specs. ``calibration="max"``: symmetric specs give ``amax =
    max |x|``, or, in the full integer range (int4's default), ``max(max x,
    -min x / negative_reach)``, the smallest range that holds both ends
    within half a step (see `jaxq.formats.Format.negative_reach`); affine
    specs give the minimum and maximum. ``"percentile"`` and ``"mse"``: the
    clipped ranges of `jaxq.range_search` (a percentile of each block, or
    the abs-max range scaled by the clipping ratio of least squared error).
    A block with no finite element gives 0.

  Raises:
    ValueError: for ``calibration="entropy"``, which needs a histogram of
      calibration data, or a granularity that does not fit ``x``.
  """
  _check_float(x, "compute_range")
  range_search.check_array_calibration(spec, "compute_range")
  if x.size == 0:  # Nothing to reduce: unit scales.
    zeros = jnp.zeros(granularity_lib.scale_shape(spec.granularity,
                                                  tuple(x.shape)), jnp.float32)
    return (None if spec.symmetric else zeros), zeros
  spec.granularity.block_shape(tuple(x.shape))  # Raises if it does not fit.
  return _compute_range_compiled(x, spec)


@functools.partial(jax.jit, static_argnames=("spec",))
def _compute_range_compiled(x: jax.Array, spec: QuantSpec
                            ) -> tuple[jax.Array | None, jax.Array]:
  """`compute_range` of a non-empty float ``x``, compiled once per spec and
  shape (as `quantize` is)."""
  blocks = spec.granularity.block_shape(tuple(x.shape))
  x = x.astype(jnp.float32)
  if spec.calibration == "percentile":
    return range_search.percentile_range(x, spec, blocks)
  max_range = _max_range(x, spec, blocks)
  if spec.calibration == "mse":
    return range_search.mse_range(
        x, blocks, max_range, functools.partial(_round_trip, x, spec))
  return max_range


def _max_range(x: jax.Array, spec: QuantSpec, blocks: tuple[int, ...]
               ) -> tuple[jax.Array | None, jax.Array]:
  """The abs-max range of float32 ``x`` (``calibration="max"``)."""
  if spec.symmetric:
    return None, _finite_block_max(x, blocks, spec.negative_reach)
  finite = jnp.isfinite(x)
  amin = granularity_lib.block_reduce(jnp.where(finite, x, 0.0), blocks,
                                      jnp.min)
  amax = granularity_lib.block_reduce(jnp.where(finite, x, 0.0), blocks,
                                      jnp.max)
  return amin, amax


def _round_trip(x: jax.Array, spec: QuantSpec, amax: jax.Array,
                amin: jax.Array | None) -> jax.Array:
  """``x`` fake-quantized with the range ``(amin, amax)`` computed from it:
  what the mse search scores. Rounding is to nearest (a stochastic spec's
  expected grid), so the search needs no key."""
  spec = spec.replace(rounding="nearest")
  scale, zero_point = _scale_from_range(spec, amax, amin)
  return _fake_quant_values(x, spec, scale, zero_point, None)


def scale_from_range(spec: QuantSpec, amax: jax.Array,
                     amin: jax.Array | None = None, *,
                     range_from_data: bool = False
                     ) -> tuple[jax.Array, jax.Array | None]:
  """Turns a range into ``(scale, zero_point)``.

  Args:
    spec: the quantizer.
    amax: float array; the symmetric range (``max |x|``, see
      `compute_range`) or max x (affine).
    amin: min x, affine only.
    range_from_data: True when the range was computed from the data it
      will quantize (e.g. a weight's own range), so a range of 0 everywhere
      means the data is 0 and gives a finite scale. False (a static range):
      a range of 0 everywhere is refused (see `jaxq.check_range`).

  Returns:
    ``scale`` as float32 (already rounded to a power of two for MX) and
    ``zero_point`` in ``fmt.zero_point_dtype`` (int8 for int4 and int8,
    uint8 for uint8), or None when symmetric. Finite and positive
    for every valid range; zero entries of a range get ``scale = 1``
    (``2**-126`` for MX).

  Raises:
    ValueError: for a concrete invalid range (see `jaxq.check_range`). A traced
      invalid range gives a NaN scale instead.
  """
  if not spec.symmetric and amin is None:
    raise ValueError("scale_from_range: an affine spec needs amin as well as "
                     "amax.")
  if not range_checks.is_traced(amax, amin):
    range_checks.raise_range_problem(spec, "scale_from_range", amax,
                         None if spec.symmetric else amin,
                         range_from_data=range_from_data)
  elif not range_from_data:
    amax = range_checks.nan_if_zero(spec, amax, amin)
  return _scale_from_range(spec, amax, amin)


def _reciprocal(levels: float) -> np.float32:
  """``1 / levels`` rounded to float32.

  Scales multiply by it rather than divide by ``levels``: compiling a
  function, XLA turns a division by a constant into exactly this
  multiplication, while an eager division (the constant passed as an
  operand) is correctly rounded, one ulp apart in about one case in ten.
  Multiplying in both makes eager and ``jit`` scales, and so their ties,
  identical.
  """
  return np.float32(1.0 / levels)


def _scale_from_range(spec: QuantSpec, amax: jax.Array,
                      amin: jax.Array | None
                      ) -> tuple[jax.Array, jax.Array | None]:
  """`scale_from_range` without the eager check; invalid ranges give NaN."""
  fmt = spec.fmt
  amax = jnp.asarray(amax, jnp.float32)
  tiny = jnp.finfo(jnp.float32).tiny
  valid = jnp.isfinite(amax)
  if spec.is_mx:
    # Zero amax gives exponent -127 - emax, which pow2 clamps to e8m0's
    # smallest normal scale, 2**-126.
    exponent = formats_lib.floor_log2(jnp.where(amax > 0, amax, 0.0))
    scale = formats_lib.pow2(exponent - fmt.emax)
    return jnp.where(valid & (amax >= 0), scale, jnp.nan), None
  if spec.symmetric:
    if spec.double_quant is not None:
      # A zero range takes its block's smallest code: its block of values
      # is zero, and a scale of 1 would coarsen the other scales' step.
      scale = jnp.where(amax > 0, amax * _reciprocal(fmt.amax_level), 0.0)
      scale = jnp.where(valid & (amax >= 0), scale, jnp.nan)
      return formats_lib.double_quantized(scale, spec.double_quant), None
    scale = jnp.maximum(
        jnp.where(amax > 0, amax * _reciprocal(fmt.amax_level), 1.0), tiny)
    return jnp.where(valid & (amax >= 0), scale, jnp.nan), None
  amin = jnp.asarray(amin, jnp.float32)
  valid = valid & jnp.isfinite(amin) & (amin <= amax)
  amin = jnp.minimum(amin, 0.0)
  amax = jnp.maximum(amax, 0.0)
  per_level_factor = _reciprocal(fmt.qmax - fmt.qmin)
  span = amax - amin
  # A span beyond the float32 max (e.g. [-2e38, 2e38]) is divided end by
  # end; both ends are within the float32 range, so their quotients are.
  per_level = jnp.where(jnp.isfinite(span), span * per_level_factor,
                        amax * per_level_factor - amin * per_level_factor)
  scale = jnp.maximum(jnp.where(span > 0, per_level, 1.0), tiny)
  scale = jnp.where(valid, scale, jnp.nan)
  zero_point = jnp.clip(jnp.round(fmt.qmin - amin / scale), fmt.qmin, fmt.qmax)
  # A NaN zero point would cast to an arbitrary integer: 0 instead (the
  # NaN scale already poisons every output).
  zero_point = jnp.where(valid, zero_point, 0.0)
  return scale, zero_point.astype(fmt.zero_point_dtype)


def _checked_range(x: jax.Array, spec: QuantSpec, amax, amin,
                   range_from_data: bool, what: str
                   ) -> tuple[jax.Array | None, jax.Array | None]:
  """The given range broadcast to the scale shape and, when concrete,
  checked now (`jaxq.check_range`); ``(None, None)`` to compute it from ``x``
  (`compute_range`, whose calibration ``what``, the caller, must allow).
  Raises for a granularity that does not fit ``x``."""
  shape = tuple(x.shape)
  expected = granularity_lib.scale_shape(spec.granularity, shape)
  if amax is None:
    if amin is not None:
      raise ValueError("amin was given without amax.")
    range_search.check_array_calibration(spec, what)
    return None, None
  amax = _check_range_shape("amax", amax, expected, spec, shape)
  if spec.symmetric:
    amin = None
  elif amin is None:
    raise ValueError("An affine spec (symmetric=False) needs amin as well "
                     "as amax.")
  else:
    amin = _check_range_shape("amin", amin, expected, spec, shape)
  if not range_checks.is_traced(amax, amin):
    range_checks.raise_range_problem(spec, "", amax, amin,
                         range_from_data=range_from_data)
  return amin, amax


def _resolve_scale(x: jax.Array, spec: QuantSpec, amax, amin,
                   range_from_data: bool
                   ) -> tuple[jax.Array, jax.Array | None]:
  """Scale and zero point from a range `_checked_range` passed, or from
  ``x`` itself."""
  if amax is None:
    # The range is a constant of the step, as a given one is.
    amin, amax = compute_range(jax.lax.stop_gradient(x), spec)
  elif not range_from_data:
    # A traced static range of 0 gives NaN (a concrete one raised already).
    amax = range_checks.nan_if_zero(spec, amax, amin)
  return _scale_from_range(spec, jax.lax.stop_gradient(amax),
                          None if amin is None else jax.lax.stop_gradient(amin))


def _quantize_values(x: jax.Array, spec: QuantSpec, scale: jax.Array,
                     zero_point: jax.Array | None, key: jax.Array | None
                     ) -> jax.Array:
  blocks = spec.granularity.block_shape(tuple(x.shape))
  scaled = (granularity_lib.split_blocks(x.astype(jnp.float32), blocks) /
            granularity_lib.split_scale(scale, x.shape, blocks))
  if zero_point is not None:
    zero = granularity_lib.split_scale(zero_point, x.shape, blocks)
    # Round first and add the integer zero point after, so it stays exact;
    # NaN maps to the zero point, i.e. to 0.0.
    rounded = formats_lib.round_to_integer(scaled, spec.rounding, key)
    values = jnp.clip(rounded + zero, spec.fmt.qmin, spec.fmt.qmax)
    values = jnp.where(jnp.isnan(scaled), zero, values).astype(spec.fmt.dtype)
  else:
    values = formats_lib.cast(scaled, spec.fmt, rounding=spec.rounding,
                              key=key)
  return granularity_lib.merge_blocks(values, x.shape)


def _dequantize_values(values: jax.Array, scale: jax.Array,
                       zero_point: jax.Array | None, spec: QuantSpec,
                       dtype) -> jax.Array:
  blocks = spec.granularity.block_shape(tuple(values.shape))
  v = granularity_lib.split_blocks(formats_lib.decode(values, spec.fmt),
                                   blocks)
  if zero_point is not None:
    v = v - granularity_lib.split_scale(zero_point, values.shape,
                                        blocks).astype(jnp.float32)
  out = v * granularity_lib.split_scale(scale.astype(jnp.float32),
                                        values.shape, blocks)
  if zero_point is not None:
    out = _clip_to_float32(out)
  return granularity_lib.merge_blocks(out, values.shape).astype(dtype)


def _clip_to_float32(x: jax.Array) -> jax.Array:
  """Clips affine results to the finite float32 range.

  The rounded zero point lets the grid reach half a step beyond the range,
  which overflows when the range ends near the float32 max. Elsewhere a
  no-op.
  """
  limit = float(jnp.finfo(jnp.float32).max)
  return jnp.clip(x, -limit, limit)


def quantize(x: jax.Array, spec: QuantSpec, *, amax: jax.Array | None = None,
             amin: jax.Array | None = None, key: jax.Array | None = None,
             range_from_data: bool = False) -> QArray:
  """Quantizes ``x`` with ``spec``.

  Args:
    x: float array of any shape.
    spec: the quantizer.
    amax: optional static range (e.g. from calibration) of the scale shape,
      or broadcastable to it. When omitted, `compute_range` computes it from
      ``x`` as ``spec.calibration`` asks (abs-max, a percentile, or the mse
      clipping search; ``"entropy"`` raises). Values outside the range
      saturate.
    amin: the range's lower end, for affine specs with a static range.
    key: PRNG key, required when ``spec.rounding == "stochastic"``.
    range_from_data: True when ``amax``/``amin`` were computed from ``x``
      itself (e.g. a weight's clipped range), so a range of 0 everywhere
      is ``x`` being 0 and quantizes to zeros. False: the range is static
      and must not be 0 everywhere (see `jaxq.check_range`).

  Returns:
    A `QArray` with ``values`` in ``spec.fmt.dtype`` and the scale (e8m0 for
    MX, float32 otherwise).

  Raises:
    ValueError: for integer input, when the granularity does not fit
      ``x.shape`` (axis out of range, an MX block size not dividing the
      axis; a group or block size that does not divide leaves a shorter
      last group, see `jaxq.granularity`), for ``calibration="entropy"``
      without ``amax``, or for
      an invalid concrete range (`jaxq.check_range`; a static range of 0
      everywhere raises a `ZeroRangeError`). Traced invalid ranges give
      NaN.
  """
  x = jnp.asarray(x)
  _check_float(x, "quantize")
  amin, amax = _checked_range(x, spec, amax, amin, range_from_data,
                              "quantize")
  return _quantize_compiled(x, spec, amax, amin, key, range_from_data)


# The arithmetic of `quantize` and `fake_quant` (after the checks) is one
# compiled program per spec and shape: called eagerly, as `jaxq.convert`
# does for every weight, op-by-op dispatch would compile each of its dozens
# of operations separately. Under an outer `jit` it is inlined.
@functools.partial(jax.jit, static_argnames=("spec", "range_from_data"))
def _quantize_compiled(x: jax.Array, spec: QuantSpec,
                       amax: jax.Array | None, amin: jax.Array | None,
                       key: jax.Array | None,
                       range_from_data: bool) -> QArray:
  scale, zero_point = _resolve_scale(x, spec, amax, amin, range_from_data)
  values = _quantize_values(x, spec, scale, zero_point, key)
  if spec.is_mx:
    scale = scale.astype(formats_lib.E8M0_DTYPE)
  return QArray(values=values, scale=scale, zero_point=zero_point, spec=spec,
                dtype=np.dtype(x.dtype))


def dequantize(qa: QArray | PackedQArray) -> jax.Array:
  """``(values - zero_point) * scale`` in the original float dtype (a
  `PackedQArray` unpacked first).

  Raises:
    TypeError: unless ``qa`` is a `QArray` or a `PackedQArray`.
    ValueError: when ``qa`` does not match its spec (`check_qarray`).
  """
  if isinstance(qa, PackedQArray):
    qa = qa.unpack()
  check_qarray(qa, "dequantize", "qa")
  return _dequantize_compiled(qa.values, qa.scale, qa.zero_point, qa.spec,
                              qa.dtype)


# One compiled program per spec and shape, as `quantize` is.
_dequantize_compiled = jax.jit(_dequantize_values,
                               static_argnames=("spec", "dtype"))


def _fake_quant_values(x: jax.Array, spec: QuantSpec, scale: jax.Array,
                       zero_point: jax.Array | None, key: jax.Array | None
                       ) -> jax.Array:
  """``dequantize(quantize(x))`` with the given scale and zero point.

  Integer formats skip the storage dtype: the rounded, saturated values are
  small integers, exact in float32, so the round trip through int8 (or
  int4) is the identity and only costs two conversions per element.
  """
  if spec.fmt.kind != "int":
    values = _quantize_values(x, spec, scale, zero_point, key)
    return _dequantize_values(values, scale, zero_point, spec, x.dtype)
  fmt = spec.fmt
  blocks = spec.granularity.block_shape(tuple(x.shape))
  s = granularity_lib.split_scale(scale, x.shape, blocks)
  scaled = granularity_lib.split_blocks(x.astype(jnp.float32), blocks) / s
  rounded = formats_lib.round_to_integer(scaled, spec.rounding, key)
  if zero_point is None:
    # NaN becomes 0, as formats.cast stores it.
    q = jnp.where(jnp.isnan(scaled), 0.0,
                  jnp.clip(rounded, fmt.qmin, fmt.qmax))
  else:
    zero = granularity_lib.split_scale(zero_point, x.shape,
                                       blocks).astype(jnp.float32)
    q = jnp.where(jnp.isnan(scaled), 0.0,
                  jnp.clip(rounded + zero, fmt.qmin, fmt.qmax) - zero)
    return granularity_lib.merge_blocks(_clip_to_float32(q * s),
                                        x.shape).astype(x.dtype)
  return granularity_lib.merge_blocks(q * s, x.shape).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def _fake_quant(spec: QuantSpec, x: jax.Array, scale: jax.Array,
                zero_point: jax.Array | None, key: jax.Array | None,
                contains_x: bool) -> jax.Array:
  return _fake_quant_values(x, spec, scale, zero_point, key)


def _fake_quant_fwd(spec, x, scale, zero_point, key, contains_x):
  out = _fake_quant(spec, x, scale, zero_point, key, contains_x)
  if spec.ste == "identity" or contains_x:
    return out, None  # The gradient passes unchanged: keep no residuals.
  return out, (x, scale, zero_point)


def _fake_quant_bwd(spec, contains_x, residuals, g):
  if spec.ste == "identity" or contains_x:
    return g, None, None, None
  x, scale, zero_point = residuals
  fmt = spec.fmt
  blocks = spec.granularity.block_shape(tuple(x.shape))
  s = granularity_lib.split_scale(scale, x.shape, blocks)
  zero = 0.0 if zero_point is None else granularity_lib.split_scale(
      zero_point, x.shape, blocks).astype(jnp.float32)
  xs = granularity_lib.split_blocks(x.astype(jnp.float32), blocks)
  inside = (xs >= (fmt.qmin - zero) * s) & (xs <= (fmt.qmax - zero) * s)
  mask = granularity_lib.merge_blocks(inside, x.shape)
  return jnp.where(mask, g, jnp.zeros_like(g)), None, None, None


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(x: jax.Array, spec: QuantSpec, *,
               amax: jax.Array | None = None, amin: jax.Array | None = None,
               key: jax.Array | None = None,
               range_from_data: bool = False) -> jax.Array:
  """``dequantize(quantize(x, spec))`` with a straight-through gradient.

  The forward pass equals ``dequantize(quantize(x, spec, ...))`` exactly and
  keeps ``x``'s dtype. The gradient with respect to ``x`` is, for
  ``spec.ste == "clipped"``, the incoming gradient where ``x`` lies inside
  the representable range ``[(qmin - zero_point) * scale,
  (qmax - zero_point) * scale]`` and zero outside; for ``"identity"`` it is
  the incoming gradient unchanged. The range itself receives no gradient
  (learned ranges are separate quantizers, see `jaxq.learned`).

  An abs-max range computed from ``x`` itself (no ``amax``,
  ``calibration="max"``; not MX, whose power-of-two scales saturate by
  design) contains every finite element, so there the
  clipped estimator is the identity and is applied as such: no mask is
  computed and no residual kept (elements at the range's ends pass the
  gradient even when ``qmax * scale`` rounds an ulp below ``amax``, or,
  in the full integer range, lies half a step below it: those elements
  round to ``qmax`` within half a step, as any element inside does).
  A static ``amax`` in the full range masks by the representable range
  itself: the gradient stops above ``qmax * scale``, half a step below
  ``amax``, and passes down to ``qmin * scale``, half a step beyond
  ``-amax``.

  Args: as for `quantize`.
  """
  x = jnp.asarray(x)
  _check_float(x, "fake_quant")
  amin, amax = _checked_range(x, spec, amax, amin, range_from_data,
                              "fake_quant")
  return _fake_quant_compiled(x, spec, amax, amin, key, range_from_data)


@functools.partial(jax.jit, static_argnames=("spec", "range_from_data"))
def _fake_quant_compiled(x: jax.Array, spec: QuantSpec,
                         amax: jax.Array | None, amin: jax.Array | None,
                         key: jax.Array | None,
                         range_from_data: bool) -> jax.Array:
  """`fake_quant` after its checks, compiled as `_quantize_compiled` is."""
  # Only the abs-max range holds every element (a clipped one does not).
  contains_x = amax is None and not spec.is_mx and spec.calibration == "max"
  scale, zero_point = _resolve_scale(x, spec, amax, amin, range_from_data)
  return _fake_quant(spec, x, scale, zero_point, key, contains_x)
