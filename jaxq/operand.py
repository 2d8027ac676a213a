"""One side of a low-bit op: a `QArray` or a float array, ready to multiply.

`_operand` turns an op's argument into an `_Operand`: its values in the dtype
the matmul runs on (int4 as int8, fp4 as ``float8_e4m3fn``, uint8 recentred
to int8 with its zero point moved by 128, all exact), a float32 scale of the
values' rank (size 1 along an axis means constant along it), an int32 zero
point of the scale's shape, and its kind (``"int"``, ``"fp8"`` or
``"float"``). `_resolve_kinds` pairs two operands: int with int (int32
accumulation), fp8 with fp8 (float32), and a float array with a QArray as
weight-only (the QArray's values cast to float with its scale kept for
after the matmul when the scale is constant along the contraction,
dequantized otherwise); int with fp8 is refused. `_output_dtype` picks the
float output dtype. Shared by `jaxq.ops` (dot_general, einsum),
`jaxq.grouped_dot` and `jaxq.convolution`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from jaxq import formats as formats_lib
from jaxq.spec import QArray, check_qarray

Array = jax.Array
Operand = QArray | Array


# Element dtypes the matmuls run on, per stored dtype (exact conversions).
_COMPUTE_DTYPE = {
    np.dtype(ml_dtypes.int4): np.dtype(np.int8),
    np.dtype(ml_dtypes.float4_e2m1fn): np.dtype(ml_dtypes.float8_e4m3fn),
}
_UINT8_SHIFT = 128


@dataclasses.dataclass(frozen=True)
class _Operand:
  """One side of an op, ready for the matmul.

  Attributes:
    values: int8 (``kind == "int"``), fp8 (``"fp8"``) or a float array
      (``"float"``, unquantized or weight-only).
    scale: float32 of the values' rank, or None for a unit scale.
    zero_point: int32 of the scale's shape, or None (integer kinds only).
    kind: ``"int"``, ``"fp8"`` or ``"float"``.
    name: the format, for error messages.
    blocks: the block shape of the scale (`jaxq.granularity`): along an
      axis where the scale varies, entry ``j`` covers elements ``[j * b,
      (j + 1) * b)``, the last block cut short at the axis' end. None
      without a scale.
  """

  values: Array
  scale: Array | None
  zero_point: Array | None
  kind: str
  name: str
  blocks: tuple[int, ...] | None


def _operand(op: str, side: str, x: Operand) -> _Operand:
  """Converts a QArray or a float array into an `_Operand`."""
  if isinstance(x, QArray):
    check_qarray(x, op, side)
    if x.zero_point is not None and not jnp.issubdtype(x.zero_point.dtype,
                                                       jnp.integer):
      # An offset off the integer grid (GGUF Q4_1's minimum) has no integer
      # path: the operand is its dequantized weight, weight-only.
      shape = tuple(x.values.shape)
      blocks = x.spec.granularity.block_shape(shape)
      values = ((x.values.astype(jnp.float32) -
                 _broadcast_blocks(x.zero_point, blocks, shape)) *
                _broadcast_blocks(x.scale.astype(jnp.float32), blocks, shape))
      return _Operand(values, None, None, "float", x.spec.format, None)
    values = x.values
    zero_point = (None if x.zero_point is None
                  else x.zero_point.astype(jnp.int32))
    if values.dtype == np.uint8:
      # [0, 255] -> [-128, 127], exactly: (a - z) == (a - 128) - (z - 128).
      values = (values.astype(jnp.int16) - _UINT8_SHIFT).astype(jnp.int8)
      zero_point = zero_point - _UINT8_SHIFT
    values = values.astype(_COMPUTE_DTYPE.get(np.dtype(values.dtype),
                                              values.dtype))
    if x.spec.fmt.kind == "lut":
      # Levels (NF4) multiply as floats: decoded, the scale kept for after.
      values = formats_lib.decode(x.values, x.spec.fmt)
    kind = {"int": "int", "float": "fp8", "lut": "lut"}[x.spec.fmt.kind]
    return _Operand(values, x.scale.astype(jnp.float32), zero_point, kind,
                    x.spec.format,
                    x.spec.granularity.block_shape(tuple(x.shape)))
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"{op}: {side} must be a QArray or a floating-point array, got dtype "
        f"{x.dtype} with shape {tuple(x.shape)}; quantize integer data with "
        f"jaxq.quantize first.")
  return _Operand(x, None, None, "float", str(x.dtype), None)


def _as_float(qa: _Operand, dtype: np.dtype, constant_axes: Sequence[int]
              ) -> _Operand:
  """The weight-only form of a quantized operand, in float ``dtype``.

  When the scale is constant along ``constant_axes`` (the contraction) the
  integer values (less the zero point) are exact in ``dtype`` and the scale
  is kept for after the matmul; otherwise the operand is dequantized.
  """
  if all(qa.scale.shape[a] == 1 for a in constant_axes):
    values = qa.values
    if qa.zero_point is not None:
      # |values - zero_point| <= 255 is exact in every float dtype.
      values = (values.astype(jnp.int32) -
                _broadcast_blocks(qa.zero_point, qa.blocks, values.shape))
    return _Operand(values.astype(dtype), qa.scale, None, "float", qa.name,
                    qa.blocks)
  shape = tuple(qa.values.shape)
  values = qa.values.astype(jnp.float32)
  if qa.zero_point is not None:
    values = values - _broadcast_blocks(qa.zero_point, qa.blocks,
                                        shape).astype(jnp.float32)
  values = values * _broadcast_blocks(qa.scale, qa.blocks, shape)
  return _Operand(values.astype(dtype), None, None, "float", qa.name, None)


def _broadcast_blocks(x: Array, blocks: Sequence[int], shape: Sequence[int]
                      ) -> Array:
  """Repeats a keepdims scale (or zero point) to ``shape``.

  Along each axis where ``x`` varies (size neither 1 nor the target's),
  each entry is repeated ``blocks[axis]`` times and the result cut at the
  target size, which drops the padding of a ragged last block.
  """
  for axis, (size, block, target) in enumerate(zip(x.shape, blocks, shape)):
    if size not in (1, target):
      x = jnp.repeat(x, block, axis=axis)
      if x.shape[axis] != target:
        x = lax.slice_in_dim(x, 0, target, axis=axis)
  return x


def _resolve_kinds(op: str, lhs: _Operand, rhs: _Operand,
                   lhs_constant: Sequence[int], rhs_constant: Sequence[int]
                   ) -> tuple[_Operand, _Operand]:
  """Makes the two operands computable together; refuses int x fp8."""
  if "float" in (lhs.kind, rhs.kind) or "lut" in (lhs.kind, rhs.kind):
    # A lookup format (NF4) has no low-bit partner: its decoded levels
    # multiply in float, as a weight-only operand does.
    dtype = functools.reduce(jnp.promote_types, [
        o.values.dtype for o in (lhs, rhs) if o.kind == "float"] or
        [np.dtype(np.float32)])
    lhs = _as_float(lhs, dtype, lhs_constant) if lhs.kind != "float" else lhs
    rhs = _as_float(rhs, dtype, rhs_constant) if rhs.kind != "float" else rhs
    return (dataclasses.replace(lhs, values=lhs.values.astype(dtype)),
            dataclasses.replace(rhs, values=rhs.values.astype(dtype)))
  if lhs.kind != rhs.kind:
    raise ValueError(
        f"{op}: cannot multiply {lhs.name} (lhs) by {rhs.name} (rhs): an "
        f"integer format needs an integer partner (int32 accumulation) and a "
        f"float format a float partner (float32 accumulation). Quantize both "
        f"operands to integer formats or both to float formats.")
  return lhs, rhs


def _output_dtype(op: str, lhs: Operand, rhs: Operand, preferred_element_type
                  ) -> np.dtype:
  if preferred_element_type is not None:
    dtype = np.dtype(preferred_element_type)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f"{op}: preferred_element_type must be a float dtype (the output is "
          f"rescaled), got {dtype}; integer accumulation is internal.")
    return dtype
  floats = [jnp.asarray(x).dtype for x in (lhs, rhs)
            if not isinstance(x, QArray)] or [lhs.dtype, rhs.dtype]
  return np.dtype(functools.reduce(jnp.promote_types, floats))


def _accumulation_dtype(kind: str) -> np.dtype:
  return np.dtype(jnp.int32 if kind == "int" else jnp.float32)

