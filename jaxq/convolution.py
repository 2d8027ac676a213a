"""`jaxq.conv`: ``lax.conv_general_dilated`` on `QArray` operands.

The input (lhs) may have a per-tensor or per-example scale (size 1 on every
axis but the batch axis) and an optional zero point; the kernel (rhs) a
per-tensor or per-output-channel scale and no zero point. The convolution
runs on the stored values (int8 x int8 -> int32, fp8 -> float32); the input's
zero point is corrected by convolving a one-example all-ones input (it
zero-pads exactly as the dequantized input does), and both scales multiply
the output on its batch and feature axes. A float operand makes the op
weight-only (see `jaxq.operand`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxq.operand import _accumulation_dtype
from jaxq.operand import _Operand
from jaxq.operand import _operand
from jaxq.operand import _output_dtype
from jaxq.operand import _resolve_kinds
from jaxq.operand import Operand

Array = jax.Array


def _conv_scale(op: str, side: str, operand: _Operand, kept_axis: int,
                what: str) -> None:
  """Checks that a conv scale varies along ``kept_axis`` at most."""
  for tensor, label in ((operand.scale, "scale"),
                        (operand.zero_point, "zero point")):
    if tensor is None:
      continue
    if any(s != 1 for a, s in enumerate(tensor.shape) if a != kept_axis):
      raise ValueError(
          f"{op}: the {side} {label} has shape {tuple(tensor.shape)} for "
          f"values of shape {tuple(operand.values.shape)}; a low-bit "
          f"convolution needs it per tensor or per {what} (axis "
          f"{kept_axis}).")


def _to_conv_output(x: Array, axis: int, out_axis: int, out_ndim: int
                    ) -> Array:
  """Places a per-axis scale (size 1 or the axis' size, 1 on every other
  axis: `_conv_scale`) on ``out_axis``."""
  shape = [1] * out_ndim
  shape[out_axis] = x.shape[axis]
  return x.reshape(shape)


def conv(lhs: Operand, rhs: Operand, window_strides: Sequence[int],
         padding: str | Sequence[tuple[int, int]],
         lhs_dilation: Sequence[int] | None = None,
         rhs_dilation: Sequence[int] | None = None,
         dimension_numbers=None, feature_group_count: int = 1,
         preferred_element_type=None) -> Array:
  """``lax.conv_general_dilated`` on QArrays (or floats).

  Args:
    lhs: the input: a `QArray` with a per-tensor (or per-example) scale and
      optional zero point, or a float array (weight-only).
    rhs: the kernel: a `QArray` with per-output-channel or per-tensor
      scales, or a float array.
    window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count: as for ``jax.lax.conv_general_dilated``;
      depthwise convolutions set ``feature_group_count`` to the input
      features.
    preferred_element_type: the float output dtype (defaults as for
      `dot_general`).

  Integer operands accumulate in int32 (fp8 in float32); a zero point on
  the input is corrected with the convolution of a one-example all-ones
  input, which zero-pads exactly as the dequantized input does. Weight-only
  kernels with other scales are dequantized.

  Raises:
    ValueError: for scales that vary along an axis the convolution sums
      over, integer-by-float formats or a zero point on the kernel.
  """
  op = "jaxq.conv"
  out_dtype = _output_dtype(op, lhs, rhs, preferred_element_type)
  lop, rop = _operand(op, "lhs", lhs), _operand(op, "rhs", rhs)
  dn = lax.conv_dimension_numbers(lop.values.shape, rop.values.shape,
                                  dimension_numbers)
  lhs_batch, rhs_out = dn.lhs_spec[0], dn.rhs_spec[0]
  lop, rop = _resolve_kinds(
      op, lop, rop, [a for a in range(lop.values.ndim) if a != lhs_batch],
      [a for a in range(rop.values.ndim) if a != rhs_out])
  if rop.zero_point is not None:
    raise ValueError(f"{op}: the kernel ({rop.name}) must be symmetric; got "
                     f"a zero point of shape {tuple(rop.zero_point.shape)}.")
  _conv_scale(op, "lhs", lop, lhs_batch, "example")
  _conv_scale(op, "rhs", rop, rhs_out, "output channel")

  def convolve(x: Array, accumulation: np.dtype) -> Array:
    return lax.conv_general_dilated(
        x, rop.values, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dn,
        feature_group_count=feature_group_count,
        preferred_element_type=accumulation)

  accumulation = _accumulation_dtype(lop.kind)
  acc = convolve(lop.values, accumulation)
  out_ndim, out_batch, out_feature = acc.ndim, dn.out_spec[0], dn.out_spec[1]
  if lop.zero_point is not None:
    ones_shape = list(lop.values.shape)
    ones_shape[lhs_batch] = 1
    window_sums = convolve(jnp.ones(ones_shape, lop.values.dtype),
                           accumulation)
    zero_point = _to_conv_output(lop.zero_point, lhs_batch, out_batch,
                                 out_ndim)
    acc = acc - zero_point * window_sums
  out = acc.astype(jnp.float32)
  if lop.scale is not None:
    out = out * _to_conv_output(lop.scale, lhs_batch, out_batch, out_ndim)
  if rop.scale is not None:
    out = out * _to_conv_output(rop.scale, rhs_out, out_feature, out_ndim)
  return out.astype(out_dtype)
