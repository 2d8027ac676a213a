"""Number formats: what a low-bit number is, and how floats are cast into it.

A `Format` is a frozen description of a storage type: its dtype, the range of
values it can hold (``qmin``, ``qmax``) in *scaled* units, and, for float
formats, the exponent and mantissa widths needed for Microscaling and for
stochastic rounding.

Supported names (the jnp dtypes themselves are accepted too):

==================  =========  ======================  =====================
name                kind       range                   notes
==================  =========  ======================  =====================
``int8``            int        [-127, 127]             narrow by default;
                                                       full [-128, 127]
``int4``            int        [-8, 7]                 full by default;
                                                       narrow [-7, 7]
``uint8``           int        [0, 255]                affine only
``float8_e4m3fn``   float      [-448, 448]             saturating cast
``float8_e5m2``     float      [-57344, 57344]         saturating cast
``float4_e2m1fn``   float      [-6, 6]                 saturating cast
``nf4``             lut        [-1, 1]                 16 NormalFloat levels
                                                       (QLoRA), stored as
                                                       uint4 codes
==================  =========  ======================  =====================

``nf4`` is a *lookup* format (kind ``"lut"``): its 16 levels (`NF4_LEVELS`,
Dettmers et al., 2023) are the quantiles of a standard normal scaled into
[-1, 1], with an exact 0; a value divided by its scale is stored as the
code (0..15, uint4) of the nearest level, and `decode` turns codes back
into levels. Symmetric, round-to-nearest only; its ``amax_level`` is 1, so
the scale of a block is its abs-max (QLoRA's absmax blocks of 64 are
``QuantSpec("nf4", PerGroup(axis=0, size=64))`` on a (in, out) kernel).

Signed integers of at most 4 bits default to the full two's complement
range, wider ones to the narrow range (`default_narrow_range`). Symmetric
quantization maps ``amax`` to `Format.amax_level`: ``qmax`` in the narrow
range, where ``+-amax`` land on ``+-qmax``; ``qmax + 0.5`` in the full
range ``[-qmax - 1, qmax]``, where ``+amax`` saturates to ``qmax`` and
``-amax`` rounds to ``qmin`` (off its tie by a float32 margin): every
element of the range still ends within half a step, and the step is finer
by a factor ``(qmax + 0.5) / qmax`` (1 + 1/14 for int4; 1 + 1/254 for
int8, too little to leave the TensorRT/TFLite convention). As the full grid
reaches one step further below zero than above, a range computed from data
counts a negative value at ``(qmax + 0.5) / (qmax + 1.5)`` of its size
(`Format.negative_reach`, `range_magnitude`): ``amax = max(max x, -min x *
7.5 / 8.5)`` for int4, the smallest range that holds both ends of ``x``
within half a step, so the step is finer whenever one sign dominates.

``float8_e8m0fnu`` (e8m0) is not an element format: it is the power-of-two
scale type of Microscaling, see `to_e8m0`.

Casting (`cast`) takes values that are already divided by their scale, rounds
them (nearest-even by default, or stochastically with an explicit PRNG key),
saturates them to ``[qmin, qmax]`` and stores them in the storage dtype.
Non-finite inputs have a fixed, documented behaviour: ``+inf`` saturates to
``qmax`` and ``-inf`` to ``qmin`` in every format; NaN becomes 0 in the
formats that cannot hold it (the integer formats and e2m1) and stays NaN in
the fp8 formats.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

Rounding = Literal["nearest", "stochastic"]
ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic")

# Relative margin that moves a full-range ``-amax`` off its rounding tie,
# well above float32's rounding of the scale and division (< 2**-22).
FULL_RANGE_NUDGE = 2.0 ** -20


@dataclasses.dataclass(frozen=True)
class Format:
  """A low-bit storage format.

  Attributes:
    name: canonical name, equal to the storage dtype's name.
    dtype: the numpy/ml_dtypes storage dtype.
    kind: ``"int"``, ``"float"`` or ``"lut"`` (values are codes of the
      ``levels`` table, e.g. NF4).
    qmin: the smallest representable value, in scaled units.
    qmax: the largest representable value, in scaled units.
    emax: exponent of the largest power of two not above ``qmax``
      (``floor(log2(qmax))``); Microscaling uses it to pick shared exponents.
    mantissa_bits: explicit mantissa bits (0 for integers).
    min_normal_exponent: exponent of the smallest normal (floats only).
    has_nan: whether the storage dtype can represent NaN.
  """

  name: str
  dtype: np.dtype
  kind: Literal["int", "float", "lut"]
  qmin: float
  qmax: float
  emax: int
  mantissa_bits: int = 0
  min_normal_exponent: int = 0
  has_nan: bool = False
  levels: tuple[float, ...] | None = None

  @property
  def bits(self) -> int:
    """Bits per stored element."""
    return int(ml_dtypes.iinfo(self.dtype).bits if self.kind in ("int", "lut")
               else ml_dtypes.finfo(self.dtype).bits)

  @property
  def is_signed(self) -> bool:
    return self.qmin < 0

  @property
  def zero_point_dtype(self) -> np.dtype:
    """The dtype an affine zero point is stored in: the narrowest integer
    dtype holding ``[qmin, qmax]`` (zero points are clipped to it), so int4
    g32 pays 1 byte per group for its zero point, not 4."""
    for dtype in (np.int8, np.uint8, np.int16, np.uint16):
      info = np.iinfo(dtype)
      if info.min <= self.qmin and self.qmax <= info.max:
        return np.dtype(dtype)
    return np.dtype(np.int32)

  @property
  def is_full_range(self) -> bool:
    """Whether a signed integer format spans all of two's complement,
    ``[-qmax - 1, qmax]``."""
    return self.kind == "int" and self.qmin == -self.qmax - 1

  @property
  def amax_level(self) -> float:
    """The scaled value a symmetric range's ``amax`` maps to.

    A symmetric scale is ``amax / amax_level``: ``qmax`` for floats and the
    narrow signed integer range; ``qmax + 0.5`` for the full range
    ``[-qmax - 1, qmax]``, so that ``+amax`` saturates to ``qmax`` and
    ``-amax`` rounds to ``qmin``, each half a step away, and no element of
    the range ends further from its value. That level is raised by a
    relative ``FULL_RANGE_NUDGE`` (2**-20): exactly at ``qmax + 0.5``,
    ``-amax`` would sit on a rounding tie that the float32 rounding of the
    scale decides (to ``qmin + 1`` for most ranges), so results would hang
    on the order of float operations (GPTQ's block size, a device's
    division).
    """
    if self.is_full_range:
      return (self.qmax + 0.5) * (1.0 + FULL_RANGE_NUDGE)
    return self.qmax

  @property
  def negative_reach(self) -> float:
    """How far below zero a symmetric range holds values within half a
    step, relative to its ``amax``: 1, except in the full integer range,
    whose ``qmin`` is one step beyond ``-qmax``: ``(qmax + 1.5) / (qmax +
    0.5)`` (8.5 / 7.5 for int4)."""
    if self.is_full_range:
      return (self.qmax + 1.5) / (self.qmax + 0.5)
    return 1.0


_INT_DTYPES = {
    "int8": np.dtype(np.int8),
    "int4": np.dtype(ml_dtypes.int4),
    "uint8": np.dtype(np.uint8),
}
_FLOAT_DTYPES = {
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float4_e2m1fn": np.dtype(ml_dtypes.float4_e2m1fn),
}
# The 16 NF4 levels of QLoRA (Dettmers et al., 2023, appendix E): 8
# positive and 7 negative quantiles of N(0, 1) at evenly spaced
# probabilities from 0.5 to 0.9677, each half normalised to end at +-1,
# and 0. `tests/test_formats.py` rebuilds them from that definition.
NF4_LEVELS: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0)
_LUT_LEVELS = {"nf4": NF4_LEVELS}
FORMAT_NAMES: tuple[str, ...] = (tuple(_INT_DTYPES) + tuple(_FLOAT_DTYPES) +
                                 tuple(_LUT_LEVELS))

E8M0_DTYPE = np.dtype(ml_dtypes.float8_e8m0fnu)
# e8m0 itself spans 2**-127 .. 2**127; we stop at 2**-126 so that the scale
# stays a normal float32 (XLA on CPU flushes subnormals to zero).
E8M0_MIN_EXPONENT = -126
E8M0_MAX_EXPONENT = 127


def canonical_name(fmt: str | np.dtype | type) -> str:
  """Returns the canonical format name for a name or dtype, or raises.

  Raises:
    ValueError: if ``fmt`` names no supported format.
  """
  if isinstance(fmt, str):
    name = fmt
  else:
    try:
      name = np.dtype(fmt).name
    except TypeError:
      name = repr(fmt)
  if name not in FORMAT_NAMES:
    raise ValueError(
        f"Unknown quantization format {fmt!r}; expected one of "
        f"{', '.join(FORMAT_NAMES)} (or the matching jnp dtype).")
  return name


def default_narrow_range(fmt: str | np.dtype | type) -> bool:
  """The default ``narrow_range`` of a format.

  False (the full range) for signed integers of at most 4 bits, where the
  finer step of `Format.amax_level` is worth a few percent of error; True
  for wider signed integers (int8 keeps [-127, 127], the TensorRT/TFLite
  convention) and for every other format, which ignores it.
  """
  name = canonical_name(fmt)
  if name not in _INT_DTYPES:
    return True
  info = ml_dtypes.iinfo(_INT_DTYPES[name])
  return not (info.min < 0 and info.bits <= 4)


def get_format(fmt: str | np.dtype | type, *,
               narrow_range: bool | None = None) -> Format:
  """Returns the `Format` for a name or dtype.

  Args:
    fmt: a format name such as ``"int8"`` or a dtype such as ``jnp.int8``.
    narrow_range: for signed integers, use the symmetric range
      ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` (``[-127, 127]`` for int8) when
      True, the full two's complement range when False; None takes
      `default_narrow_range` (narrow for int8, full for int4). Ignored for
      other formats.
  """
  name = canonical_name(fmt)
  if narrow_range is None:
    narrow_range = default_narrow_range(name)
  if name in _LUT_LEVELS:
    levels = _LUT_LEVELS[name]
    return Format(name=name, dtype=np.dtype(ml_dtypes.uint4), kind="lut",
                  qmin=float(levels[0]), qmax=float(levels[-1]), emax=0,
                  levels=levels)
  if name in _INT_DTYPES:
    dtype = _INT_DTYPES[name]
    info = ml_dtypes.iinfo(dtype)
    qmin, qmax = float(info.min), float(info.max)
    if narrow_range and qmin < 0:
      qmin = -qmax
    return Format(name=name, dtype=dtype, kind="int", qmin=qmin, qmax=qmax,
                  emax=int(np.floor(np.log2(qmax))))
  dtype = _FLOAT_DTYPES[name]
  finfo = ml_dtypes.finfo(dtype)
  qmax = float(finfo.max)
  return Format(name=name, dtype=dtype, kind="float", qmin=-qmax, qmax=qmax,
                emax=int(np.floor(np.log2(qmax))),
                mantissa_bits=int(finfo.nmant),
                min_normal_exponent=int(finfo.minexp),
                has_nan=name != "float4_e2m1fn")


def range_magnitude(x: jax.Array, negative_reach: float = 1.0) -> jax.Array:
  """What a symmetric range takes the maximum of: ``|x|``, with negative
  values divided by ``negative_reach`` (`Format.negative_reach`).

  Its maximum over a block is the smallest ``amax`` whose grid holds every
  element of the block within half a step: ``max(max x, -min x /
  negative_reach)``.
  """
  if negative_reach == 1.0:
    return jnp.abs(x)
  return jnp.maximum(x, -x * np.float32(1.0 / negative_reach))


def _stochastic_float_round(x: jax.Array, fmt: Format, key: jax.Array
                            ) -> jax.Array:
  """Rounds ``x`` (f32) to the grid of ``fmt`` stochastically.

  Within a binade [2**e, 2**(e+1)) the grid of ``fmt`` is the multiples of
  ``ulp = 2**(e - mantissa_bits)`` (subnormals share the smallest normal's
  ulp), so ``floor(|x| / ulp + u) * ulp`` with ``u ~ U[0, 1)`` rounds up
  with probability equal to the distance from the lower grid point.
  """
  mag = jnp.abs(x)
  exponent = jnp.maximum(floor_log2(mag), fmt.min_normal_exponent)
  ulp = pow2(exponent - fmt.mantissa_bits)
  noise = jax.random.uniform(key, x.shape, jnp.float32)
  rounded = jnp.floor(mag / ulp + noise) * ulp
  return jnp.where(jnp.isfinite(x), jnp.copysign(rounded, x), x)


def _check_rounding(rounding: str, key: jax.Array | None) -> None:
  if rounding not in ROUNDINGS:
    raise ValueError(f"Unknown rounding {rounding!r}; expected one of "
                     f"{ROUNDINGS}.")
  if rounding == "stochastic" and key is None:
    raise ValueError("Stochastic rounding needs an explicit PRNG key: pass "
                     "key=jax.random.key(...).")


def round_to_integer(x: jax.Array, rounding: Rounding = "nearest",
                     key: jax.Array | None = None) -> jax.Array:
  """Rounds float32 ``x`` to integers (half to even, or stochastically).

  Stochastic rounding is ``floor(x + u)`` with ``u ~ U[0, 1)``: unbiased,
  ``E[round(x)] = x``.
  """
  _check_rounding(rounding, key)
  if rounding == "nearest":
    return jnp.round(x)
  return jnp.floor(x + jax.random.uniform(key, x.shape, jnp.float32))


def cast(x: jax.Array, fmt: Format, *, rounding: Rounding = "nearest",
         key: jax.Array | None = None) -> jax.Array:
  """Rounds and saturates scaled values into ``fmt``'s storage dtype.

  Args:
    x: float array of values already divided by their scale (any shape).
    fmt: the target format.
    rounding: ``"nearest"`` (round half to even) or ``"stochastic"``.
    key: PRNG key, required for stochastic rounding.

  Returns:
    An array of ``x``'s shape in ``fmt.dtype``. ``+inf`` saturates to
    ``qmax``, ``-inf`` to ``qmin``; NaN stays NaN in fp8 and becomes 0
    elsewhere.
  """
  _check_rounding(rounding, key)
  x = x.astype(jnp.float32)
  is_nan = jnp.isnan(x)
  if fmt.kind == "lut":
    if rounding != "nearest":
      raise ValueError(f"{fmt.name} rounds to the nearest level only, not "
                       f"{rounding!r}.")
    return lut_encode(x, fmt)
  if fmt.kind == "int":
    x = jnp.clip(round_to_integer(x, rounding, key), fmt.qmin, fmt.qmax)
    return jnp.where(is_nan, 0.0, x).astype(fmt.dtype)
  # Float formats: saturate first (XLA's casts overflow to NaN/inf), then
  # let the cast round to nearest-even, or pre-round onto the grid.
  x = jnp.clip(x, fmt.qmin, fmt.qmax)
  if rounding == "stochastic":
    x = jnp.clip(_stochastic_float_round(x, fmt, key), fmt.qmin, fmt.qmax)
  if not fmt.has_nan:
    x = jnp.where(is_nan, 0.0, x)
  return x.astype(fmt.dtype)


def lut_encode(x: jax.Array, fmt: Format) -> jax.Array:
  """Codes of the levels of a lookup format nearest to scaled ``x``.

  ``x`` (float32, already divided by its scale) is compared with the 15
  midpoints between consecutive levels: the code is how many midpoints lie
  below it (ties go to the lower level), so values beyond the end levels
  saturate (+-inf included) and NaN, which compares false, is stored as
  the code of the level nearest 0.
  """
  levels = np.asarray(fmt.levels, np.float64)
  midpoints = np.float32((levels[1:] + levels[:-1]) / 2)
  codes = jnp.sum(x[..., None] > midpoints, axis=-1, dtype=jnp.int32)
  zero_code = int(np.argmin(np.abs(levels)))
  codes = jnp.where(jnp.isnan(x), zero_code, codes)
  return codes.astype(jnp.uint8).astype(fmt.dtype)


def decode(values: jax.Array, fmt: Format) -> jax.Array:
  """Stored values as float32 scaled values: the levels of a lookup
  format's codes, the values themselves otherwise."""
  if fmt.kind == "lut":
    table = jnp.asarray(np.asarray(fmt.levels, np.float32))
    return table[values.astype(jnp.int32)]
  return values.astype(jnp.float32)


def double_quantize_scale(scale: jax.Array, block_size: int
                          ) -> tuple[jax.Array, jax.Array]:
  """Double quantization: positive float32 scales as 8-bit codes.

  The scales, flattened in C order, are cut into blocks of ``block_size``
  (the last one shorter); each block shares a power-of-two step ``2**e``,
  the smallest with ``max(block) / 2**e <= 255``, and each scale is stored
  as ``code = clip(round(scale / 2**e), 1, 255)`` (uint8; never 0, so no
  block of values loses its scale). The step is stored as e8m0.

  Because the step is a power of two, ``code * 2**e`` is exact in float32
  and quantizing the dequantized scales again gives the same codes and
  steps: `double_dequantize_scale(*double_quantize_scale(s))` is a fixed
  point, which `jaxq.save` relies on to store only the codes.

  Args:
    scale: float32 scales of any shape, positive (NaN propagates to its
      block).
    block_size: scales per second-level step (QLoRA: 256).

  Returns:
    ``(codes, steps)``: uint8 codes of ``scale.shape`` and e8m0 steps of
    shape ``(ceil(scale.size / block_size),)``.
  """
  flat = jnp.ravel(jnp.asarray(scale, jnp.float32))
  blocks = -(-flat.size // block_size)
  padded = jnp.pad(flat, (0, blocks * block_size - flat.size))
  padded = padded.reshape(blocks, block_size)
  peak = jnp.max(padded, axis=1)
  # The smallest e with peak / 2**e <= 255: ceil(log2(peak / 255)), exact
  # from the float32 exponent (floor_log2 of the next float down, + 1).
  exponent = floor_log2(jnp.nextafter(peak / np.float32(255.0),
                                      np.float32(0.0))) + 1
  exponent = jnp.where(peak > 0, exponent, E8M0_MIN_EXPONENT)
  exponent = jnp.clip(exponent, E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)
  step = pow2(exponent)
  step = jnp.where(jnp.isnan(peak), jnp.nan, step)
  codes = jnp.clip(jnp.round(padded / step[:, None]), 1, 255)
  codes = codes.reshape(-1)[:flat.size].reshape(jnp.shape(scale))
  return codes.astype(jnp.uint8), step.astype(E8M0_DTYPE)


def double_dequantize_scale(codes: jax.Array, steps: jax.Array,
                            block_size: int) -> jax.Array:
  """Inverse of `double_quantize_scale`: float32 scales of ``codes``' shape,
  ``code * step`` of its block (exact)."""
  flat = jnp.ravel(codes).astype(jnp.float32)
  step = jnp.repeat(jnp.asarray(steps).astype(jnp.float32), block_size)
  return (flat * step[:flat.size]).reshape(jnp.shape(codes))


def double_quantized(scale: jax.Array, block_size: int) -> jax.Array:
  """``scale`` on the double-quantization grid (`double_quantize_scale`),
  in float32; NaN entries make their block NaN."""
  codes, steps = double_quantize_scale(scale, block_size)
  out = double_dequantize_scale(codes, steps, block_size)
  bad = jnp.repeat(jnp.isnan(steps.astype(jnp.float32)),
                   block_size)[:out.size].reshape(out.shape)
  return jnp.where(bad, jnp.nan, out)


def floor_log2(x: jax.Array) -> jax.Array:
  """``floor(log2(|x|))`` as int32, read from the float32 exponent bits.

  Exact for every normal float32 (a float32 ``log2`` rounds up to the next
  integer just below a power of two). Zero and subnormals give -127, below
  any exponent jaxq uses, so callers clamp; inf and NaN give 128.
  """
  bits = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.int32)
  return ((bits >> 23) & 0xFF) - 127


def pow2(exponent: jax.Array) -> jax.Array:
  """Exactly ``2**exponent`` in float32, for integer-valued exponents.

  Exponents are clamped to [-126, 127], the normal float32 range. The power
  is built from its bits: XLA's ``exp2`` is an approximation that is off by
  a few ulps for most integer arguments and flushes ``2**-126`` to zero.
  """
  exponent = jnp.clip(jnp.asarray(exponent).astype(jnp.int32),
                      E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)
  return jax.lax.bitcast_convert_type((exponent + 127) << 23, jnp.float32)


def to_e8m0(exponent: jax.Array) -> jax.Array:
  """Stores integer-valued exponents as e8m0 scales ``2**exponent``.

  Exponents are clamped to [-126, 127] (e8m0's range less its one subnormal
  float32 value), so the result is always a finite, normal power of two.
  """
  return pow2(exponent).astype(E8M0_DTYPE)


def storage_bytes(fmt: Format, num_elements: int) -> int:
  """Bytes needed to store ``num_elements`` values, sub-byte types packed."""
  return (num_elements * fmt.bits + 7) // 8


# 4-bit storage dtypes, which `pack_nibbles` stores two per byte.
NIBBLE_DTYPES: tuple[np.dtype, ...] = (
    np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4),
    np.dtype(ml_dtypes.float4_e2m1fn))


def pack_nibbles(values: jax.Array) -> jax.Array:
  """Packs 4-bit ``values`` (int4, uint4, fp4) two per byte, last axis.

  ``(..., 2n)`` -> ``(..., n)`` uint8, element ``2i`` in the low nibble of
  byte ``i`` (the order `jaxq.save` stores). A bitcast: no arithmetic,
  works under ``jit``.

  Raises:
    ValueError: if ``values`` is not 4-bit or its last axis is odd.
  """
  if np.dtype(values.dtype) not in NIBBLE_DTYPES or values.shape[-1] % 2:
    raise ValueError(f"pack_nibbles: expected 4-bit values with an even "
                     f"last axis, got dtype {values.dtype} and shape "
                     f"{tuple(values.shape)}.")
  pairs = values.reshape(*values.shape[:-1], values.shape[-1] // 2, 2)
  return jax.lax.bitcast_convert_type(pairs, jnp.uint8)


def unpack_nibbles(packed: jax.Array, dtype: Any = jnp.int4) -> jax.Array:
  """Inverse of `pack_nibbles`: ``(..., n)`` uint8 -> ``(..., 2n)`` of the
  4-bit ``dtype``."""
  if np.dtype(packed.dtype) != np.uint8 or np.dtype(dtype) not in (
      NIBBLE_DTYPES):
    raise ValueError(f"unpack_nibbles: expected uint8 bytes and a 4-bit "
                     f"dtype, got {packed.dtype} and {np.dtype(dtype)}.")
  pairs = jax.lax.bitcast_convert_type(packed, dtype)
  return pairs.reshape(*packed.shape[:-1], packed.shape[-1] * 2)
