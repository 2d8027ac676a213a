"""`QuantSpec`, the description of a quantizer, and `QArray`, its output.

A `QuantSpec` is a frozen, hashable value (usable as a static ``jit``
argument) that says what a low-bit number is (``format``), which elements
share a scale (``granularity``), whether a zero point is used
(``symmetric``), how a static range is chosen (``calibration``) and how
values are rounded (``rounding``) and differentiated (``ste``).

A `QArray` is a pytree holding the quantized ``values`` in the storage dtype,
the ``scale`` (same rank as ``values``; see `jaxq.granularity`) and the
``zero_point`` (None when symmetric). The spec and the original float dtype
are static aux data, so QArrays pass through ``jit``, ``vmap`` and
``tree_map`` like any other pytree.

A QArray is not checked when it is built (pytree transformations rebuild
it around arbitrary leaves); `check_qarray` checks a QArray against its
spec (storage dtype, scale and zero-point shapes, and for concrete values
the format's range), and `jaxq.dequantize` and the ops call it, so a
hand-built QArray that does not match its spec raises instead of being
used as it is.

A `PackedQArray` holds a 4-bit QArray's values two per byte, the form a
frozen weight takes in memory (`PackedQArray.of`, `PackedQArray.unpack`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import numpy as np

from jaxq import formats as formats_lib
from jaxq import granularity as granularity_lib

CALIBRATIONS: tuple[str, ...] = ("max", "percentile", "entropy", "mse")
STES: tuple[str, ...] = ("clipped", "identity")
LEARNS: tuple[str, ...] = ("lsq", "pact")
DEFAULT_PERCENTILE = 99.99


@functools.lru_cache(maxsize=None)
def _format(name: str, narrow_range: bool) -> formats_lib.Format:
  return formats_lib.get_format(name, narrow_range=narrow_range)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """What a quantizer does.

  Attributes:
    format: element format name (``"int8"``, ``"int4"``, ``"uint8"``,
      ``"float8_e4m3fn"``, ``"float8_e5m2"``, ``"float4_e2m1fn"``) or the jnp
      dtype; stored as the canonical name.
    granularity: which elements share a scale (`PerTensor`, `PerChannel`,
      `PerToken`, `PerGroup`, `PerBlock`, `MX`).
    symmetric: scale only (True) or scale and zero point (False, "affine").
      ``uint8`` is affine only; float formats and MX are symmetric only.
    calibration: how a static range is chosen from observed data: ``"max"``,
      ``"percentile"`` (at ``percentile``), ``"entropy"`` (KL) or ``"mse"``.
    percentile: the percentile used when ``calibration == "percentile"``;
      another value with another calibration raises (it would be ignored).
    narrow_range: signed integers use [-qmax, qmax] (e.g. [-127, 127]) when
      True, the full two's complement range [-qmax - 1, qmax] when False.
      None (the default) resolves per format when the spec is built
      (`jaxq.formats.default_narrow_range`): full for signed integers of at
      most 4 bits (int4: [-8, 7]), narrow for wider ones (int8: [-127,
      127]); other formats ignore it. A symmetric full-range scale is
      ``amax / (qmax + 0.5)`` (int4: ``amax / 7.5``; see
      `jaxq.formats.Format.amax_level`): ``+amax`` saturates to ``qmax``
      and ``-amax`` rounds to ``-qmax - 1``, each within half a step, on a
      finer grid than the narrow range's ``amax / qmax``.
      `replace` with a new ``format`` resolves a default (None) again for
      the new format, and keeps an explicit True or False.
    rounding: ``"nearest"`` (half to even) or ``"stochastic"`` (needs a key).
    ste: gradient of `fake_quant`: ``"clipped"`` (identity inside the
      representable range, zero outside) or ``"identity"``.
    dynamic: for activations, compute the range from each batch at run time
      (True) or use calibrated, static ranges (False). Weights always use
      their own range.
    learn: None for a range computed from data (or calibrated), or a range
      that is a trainable parameter in QAT (see `jaxq.learned`): ``"lsq"``
      learns the step size (scale) with the LSQ gradient (Esser et al.,
      2020), ``"pact"`` learns the clipping value ``scale * qmax`` with the
      PACT gradient (Choi et al., 2018). Symmetric integer formats with
      round-to-nearest only. A learned range is a parameter, so ``dynamic``
      does not apply: a learned activation range starts from calibration
      (or from the first batch) and is then trained.
    double_quant: None keeps the scales in float32; an integer ``n``
      *double-quantizes* them (QLoRA): every scale is rounded to an 8-bit
      code times a power-of-two step shared by ``n`` consecutive scales
      (flattened in C order; QLoRA's 256), `jaxq.formats.double_quantize_scale`.
      The QArray's ``scale`` holds those dequantized float32 scales, so
      every op uses them unchanged; `QArray.nbytes` and `jaxq.save` count
      and store one byte per scale plus one per block. Symmetric, non-MX
      specs without ``learn`` only (it rounds a computed scale).
  """

  format: str | np.dtype | type = "int8"
  granularity: granularity_lib.GranularityLike = granularity_lib.PerTensor()
  symmetric: bool = True
  calibration: str = "max"
  percentile: float = DEFAULT_PERCENTILE
  narrow_range: bool | None = None
  rounding: formats_lib.Rounding = "nearest"
  ste: Literal["clipped", "identity"] = "clipped"
  dynamic: bool = True
  learn: Literal["lsq", "pact"] | None = None
  double_quant: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "format", formats_lib.canonical_name(self.format))
    # Not a field: equal specs quantize alike whether the range was given
    # or defaulted; only `replace` with a new format tells them apart.
    object.__setattr__(self, "_narrow_range_given",
                       self.narrow_range is not None)
    if self.narrow_range is None:
      object.__setattr__(self, "narrow_range",
                         formats_lib.default_narrow_range(self.format))
    elif not isinstance(self.narrow_range, (bool, np.bool_)):
      raise ValueError(f"QuantSpec: narrow_range must be True, False or None "
                       f"(the format's default), got {self.narrow_range!r}.")
    else:
      object.__setattr__(self, "narrow_range", bool(self.narrow_range))
    if not isinstance(self.granularity, granularity_lib.Granularity):
      raise ValueError(f"QuantSpec: granularity must be a jaxq granularity "
                       f"(PerTensor, PerChannel, ...), got {self.granularity!r}.")
    fmt = self.fmt
    is_mx = isinstance(self.granularity, granularity_lib.MX)
    if not self.symmetric and fmt.kind != "int":
      raise ValueError(f"QuantSpec: affine (symmetric=False) quantization is "
                       f"for integer formats, not {self.format}.")
    if self.symmetric and not fmt.is_signed:
      raise ValueError(f"QuantSpec: {self.format} is unsigned and needs "
                       f"symmetric=False (affine, with a zero point).")
    if is_mx and not self.symmetric:
      raise ValueError("QuantSpec: MX scales are symmetric powers of two; "
                       "symmetric=False is not supported.")
    if self.calibration not in CALIBRATIONS:
      raise ValueError(f"QuantSpec: unknown calibration {self.calibration!r}; "
                       f"expected one of {CALIBRATIONS}.")
    if not 0.0 < self.percentile <= 100.0:
      raise ValueError(f"QuantSpec: percentile must be in (0, 100], got "
                       f"{self.percentile}.")
    if (self.percentile != DEFAULT_PERCENTILE and
        self.calibration != "percentile"):
      raise ValueError(f"QuantSpec: percentile={self.percentile} applies to "
                       f"calibration='percentile' only, but calibration is "
                       f"{self.calibration!r}.")
    if self.rounding not in formats_lib.ROUNDINGS:
      raise ValueError(f"QuantSpec: unknown rounding {self.rounding!r}; "
                       f"expected one of {formats_lib.ROUNDINGS}.")
    if self.ste not in STES:
      raise ValueError(f"QuantSpec: unknown ste {self.ste!r}; expected one of "
                       f"{STES}.")
    if fmt.kind == "lut":
      if is_mx:
        raise ValueError(f"QuantSpec: {self.format} has no MX form; use "
                         f"PerGroup (QLoRA: PerGroup(axis=0, size=64)).")
      if self.rounding != "nearest":
        raise ValueError(f"QuantSpec: {self.format} rounds to the nearest of "
                         f"its levels; rounding={self.rounding!r} is not "
                         f"supported.")
      if self.calibration == "entropy":
        raise ValueError(f"QuantSpec: calibration='entropy' scores integer "
                         f"and float grids, not the levels of "
                         f"{self.format}; use 'max', 'percentile' or 'mse'.")
    if self.double_quant is not None:
      if (isinstance(self.double_quant, bool) or
          not isinstance(self.double_quant, (int, np.integer)) or
          self.double_quant < 1):
        raise ValueError(f"QuantSpec: double_quant must be None or a "
                         f"positive block size (QLoRA: 256), got "
                         f"{self.double_quant!r}.")
      object.__setattr__(self, "double_quant", int(self.double_quant))
      if is_mx or not self.symmetric or self.learn is not None:
        raise ValueError(f"QuantSpec: double_quant={self.double_quant} "
                         f"rounds a symmetric float32 scale; it does not "
                         f"apply with granularity {self.granularity}, "
                         f"symmetric={self.symmetric}, learn={self.learn!r}.")
    if self.learn is not None:
      if self.learn not in LEARNS:
        raise ValueError(f"QuantSpec: unknown learn {self.learn!r}; expected "
                         f"None or one of {LEARNS}.")
      if fmt.kind != "int" or is_mx or not self.symmetric:
        raise ValueError(f"QuantSpec: learn={self.learn!r} learns a symmetric "
                         f"integer scale; it needs a signed integer format "
                         f"with symmetric=True and no MX granularity, got "
                         f"format {self.format}, symmetric={self.symmetric}, "
                         f"granularity {self.granularity}.")
      if self.rounding != "nearest":
        raise ValueError(f"QuantSpec: learn={self.learn!r} needs "
                         f"rounding='nearest', got {self.rounding!r}.")

  @property
  def fmt(self) -> formats_lib.Format:
    """The `jaxq.formats.Format` of the elements."""
    return _format(self.format, self.narrow_range)

  @property
  def is_mx(self) -> bool:
    return isinstance(self.granularity, granularity_lib.MX)

  @property
  def negative_reach(self) -> float:
    """`jaxq.formats.Format.negative_reach` of a symmetric, non-MX spec (1
    otherwise): a range computed from data is the block maximum of
    ``jaxq.formats.range_magnitude(x, negative_reach)``."""
    if not self.symmetric or self.is_mx:
      return 1.0
    return self.fmt.negative_reach

  def replace(self, **changes) -> "QuantSpec":
    """Returns a copy with ``changes`` applied (validated again).

    A new ``format`` without ``narrow_range`` takes the new format's default
    range when this spec's range was a default, and keeps it when it was
    given explicitly. A ``calibration`` other than ``"percentile"`` without
    ``percentile`` resets the percentile to its default.
    """
    if "narrow_range" not in changes and not self._narrow_range_given:
      changes["narrow_range"] = None  # Stays a default, for a later format.
    if (changes.get("calibration", "percentile") != "percentile" and
        "percentile" not in changes):
      changes["percentile"] = DEFAULT_PERCENTILE
    return dataclasses.replace(self, **changes)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["values", "scale", "zero_point"],
    meta_fields=["spec", "dtype"])
@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized array: ``dequantize = (values - zero_point) * scale``.

  Attributes:
    values: the quantized elements, shape ``shape``, in ``spec.fmt.dtype``.
    scale: float32 (e8m0 for MX) of the keepdims scale shape of
      ``spec.granularity`` for ``shape``.
    zero_point: integers of the scale's shape (in the format's
      ``zero_point_dtype``, int8 for int4/int8, when `quantize` made them;
      any integer dtype is accepted), or None when symmetric. A
      float32 zero point holds an offset that is not on the integer grid
      (GGUF ``Q4_1``'s per-group minimum ``m``: ``values = q - 8``,
      ``zero_point = -m / scale - 8``, see `jaxq.io.gguf`); such a weight
      dequantizes as usual and serves weight-only (dequantized before the
      matmul).
    spec: the `QuantSpec` that produced it (static).
    dtype: the float dtype that `dequantize` returns (static).
  """

  values: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None
  spec: QuantSpec
  dtype: np.dtype

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.values.shape)

  @property
  def ndim(self) -> int:
    return len(self.values.shape)

  @property
  def nbytes(self) -> int:
    """Bytes of values (sub-byte formats packed), scales and zero points."""
    return _stored_bytes(self.spec, self.shape, self.scale, self.zero_point)


def _stored_bytes(spec: QuantSpec, shape: tuple[int, ...], scale: jax.Array,
                  zero_point: jax.Array | None) -> int:
  total = formats_lib.storage_bytes(spec.fmt, math.prod(shape))
  num_scales = math.prod(scale.shape)
  if spec.double_quant is not None:  # uint8 codes + e8m0 steps.
    total += num_scales + -(-num_scales // spec.double_quant)
  else:
    total += num_scales * np.dtype(scale.dtype).itemsize
  if zero_point is not None:
    total += (math.prod(zero_point.shape) *
              np.dtype(zero_point.dtype).itemsize)
  return total


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["packed", "scale", "zero_point"],
    meta_fields=["spec", "dtype"])
@dataclasses.dataclass(frozen=True)
class PackedQArray:
  """A 4-bit `QArray` held two values per byte in memory.

  XLA keeps an int4 / uint4 / fp4 array one byte per element on some
  backends (the CPU); a frozen weight that is only ever dequantized (a
  LoRA base) takes half the memory this way, at the cost of a bitcast per
  use. `jaxq.dequantize` and `jaxq.save` take it as its `unpack`ed QArray
  (`jaxq.load` gives the QArray back).

  Attributes:
    packed: ``(..., n / 2)`` uint8, `jaxq.formats.pack_nibbles` of the
      values ``(..., n)``.
    scale, zero_point, spec, dtype: the QArray's.
  """

  packed: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None
  spec: QuantSpec
  dtype: np.dtype

  @classmethod
  def of(cls, qa: QArray) -> PackedQArray:
    """``qa`` packed; raises unless its values are 4-bit with an even last
    axis (see `packable`)."""
    if not packable(qa):
      raise ValueError(f"PackedQArray.of: expected 4-bit values with an "
                       f"even last axis, got {qa.values.dtype} of shape "
                       f"{qa.shape}.")
    return cls(formats_lib.pack_nibbles(qa.values), qa.scale, qa.zero_point,
               qa.spec, qa.dtype)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.packed.shape[:-1]) + (2 * self.packed.shape[-1],)

  @property
  def nbytes(self) -> int:
    """`QArray.nbytes`: what it stores (and now holds in memory)."""
    return _stored_bytes(self.spec, self.shape, self.scale, self.zero_point)

  def unpack(self) -> QArray:
    """The `QArray` (values one per element), a bitcast."""
    values = formats_lib.unpack_nibbles(self.packed, self.spec.fmt.dtype)
    return QArray(values, self.scale, self.zero_point, self.spec, self.dtype)


def packable(qa: QArray) -> bool:
  """Whether `PackedQArray.of` takes ``qa``: 4-bit values (int4, nf4's
  uint4 codes, fp4), an even last axis."""
  return (np.dtype(qa.values.dtype) in formats_lib.NIBBLE_DTYPES and
          qa.ndim > 0 and qa.shape[-1] % 2 == 0)


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer) and hasattr(x, "dtype")


def check_qarray(qa: QArray, op: str, name: str = "qa") -> None:
  """Raises unless ``qa`` is a `QArray` that matches its own spec.

  Checks, naming ``op`` and the argument ``name``: the values' dtype is the
  spec's storage dtype; the scale has the keepdims scale shape of the
  spec's granularity for the values' shape and a float dtype; the zero
  point is present exactly when the spec is affine, with the scale's shape
  and an integer dtype; and, for concrete (not traced) integer values, every
  value lies in the format's ``[qmin, qmax]``. Shapes and dtypes are static,
  so these checks cost nothing under ``jit``.

  Raises:
    TypeError: if ``qa`` is not a `QArray`.
    ValueError: naming what does not match, with the expected and actual
      dtype, shape or value.
  """
  if not isinstance(qa, QArray):
    shape = getattr(qa, "shape", None)
    raise TypeError(
        f"{op}: {name} must be a jaxq.QArray (from jaxq.quantize), got "
        f"{type(qa).__module__}.{type(qa).__name__}"
        f"{'' if shape is None else f' of shape {tuple(shape)}'}; a plain "
        f"array holds no scale to dequantize with.")
  spec, fmt = qa.spec, qa.spec.fmt
  where = f"{op}: {name} (a QArray under {spec.format}, {spec.granularity})"
  values_dtype = np.dtype(qa.values.dtype)
  if values_dtype != fmt.dtype:
    raise ValueError(f"{where} has values of dtype {values_dtype}, but the "
                     f"spec's format stores {fmt.dtype}; quantize with "
                     f"jaxq.quantize rather than building the QArray by hand.")
  shape = tuple(qa.values.shape)
  expected = granularity_lib.scale_shape(spec.granularity, shape)
  scale_shape = tuple(qa.scale.shape)
  if scale_shape != expected:
    raise ValueError(f"{where} has a scale of shape {scale_shape}, but "
                     f"{spec.granularity} on values of shape {shape} needs a "
                     f"scale of shape {expected}.")
  if not np.issubdtype(np.dtype(qa.scale.dtype), np.floating) and (
      np.dtype(qa.scale.dtype) != formats_lib.E8M0_DTYPE):
    raise ValueError(f"{where} has a scale of dtype {qa.scale.dtype}; "
                     f"scales are float32 (e8m0 for MX).")
  if spec.symmetric != (qa.zero_point is None):
    raise ValueError(
        f"{where} is {'symmetric' if spec.symmetric else 'affine'} but its "
        f"zero_point is "
        f"{'None' if qa.zero_point is None else 'an array'}; a zero_point is "
        f"present exactly when the spec is affine (symmetric=False).")
  if qa.zero_point is not None:
    zero_shape = tuple(qa.zero_point.shape)
    if zero_shape != expected:
      raise ValueError(f"{where} has a zero_point of shape {zero_shape}, but "
                       f"its scale shape is {expected}.")
    zero_dtype = np.dtype(qa.zero_point.dtype)
    if not (np.issubdtype(zero_dtype, np.integer) or
            zero_dtype == np.float32):
      raise ValueError(f"{where} has a zero_point of dtype "
                       f"{qa.zero_point.dtype}; zero points are integers "
                       f"(or float32 offsets off the integer grid).")
  if fmt.kind == "int" and _is_concrete(qa.values) and qa.values.size:
    values = np.asarray(qa.values).astype(np.int32)
    low, high = int(values.min()), int(values.max())
    if low < fmt.qmin or high > fmt.qmax:
      bad = low if low < fmt.qmin else high
      narrow = " (narrow_range=True)" if (spec.narrow_range and
                                          fmt.is_signed) else ""
      raise ValueError(f"{where} holds the value {bad} outside the format's "
                       f"range [{int(fmt.qmin)}, {int(fmt.qmax)}]{narrow}.")
