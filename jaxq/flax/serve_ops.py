"""The ops of serve mode: flax's own op on floats, jaxq's low-bit op on QArrays.

A quantized layer in serve mode hands its matmul or convolution QArrays
(`jaxq.flax.core.transform_weight` / ``transform_act``); the functions here
have the signatures of the ops flax layers call (``lax.dot_general``,
``jnp.einsum``, ``lax.conv_general_dilated``) and run `jaxq.dot_general`,
`jaxq.einsum` or `jaxq.conv` as soon as one operand is a `QArray` (the
layer's float op otherwise, e.g. a weight-only layer's float input times a
float bias-free operand). ``ConvTranspose`` takes no op
(``lax.conv_transpose``), so `serve_conv_transpose` computes the whole layer:
``(*batch, *window, in)`` inputs to ``(*batch, *out_window, out)`` outputs.

Serve runs every layer QAT trains. Where the operands' scales or formats
rule out one low-bit op (a conv input with per-token scales, kernel scales
along a summed axis, an fp8 activation with an int8 weight), the quantized
activation is dequantized (equal to QAT's fake-quantized one) and multiplied
by the low-bit weight as a weight-only op: the fallback, whose reason
`conv_fallback_reason` / `format_fallback_reason` give. Outputs keep the
layer's dtype (`computing_in`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import linear as linen_linear
from jax import lax

from jaxq import granularity as granularity_lib
from jaxq import ops
from jaxq.quantize import dequantize
from jaxq.spec import QArray


# The ops of serve mode: the layer's own op when both operands are float,
# jaxq's low-bit op as soon as one is a QArray.


def _is_quantized(*operands: Any) -> bool:
  return any(isinstance(x, QArray) for x in operands)


def computing_in(w: QArray, dtype: Any) -> QArray:
  """``w`` dequantizing to ``dtype``, the layer's computation dtype.

  Flax promotes a float kernel to the layer's ``dtype`` before its op; a
  converted `QArray` kernel keeps its parameter's dtype, so without this a
  ``Dense(dtype=bfloat16)`` with float32 params would serve float32 outputs
  (the low-bit ops return the promoted dtype of their operands).
  """
  return dataclasses.replace(w, dtype=np.dtype(dtype))


# Mixed formats: an integer format multiplies only with an integer one (int32
# accumulation), a float format (fp8) with a float one. A rule that pairs an
# fp8 activation with an int8 weight (or the reverse) trains in QAT, so serve
# runs it by the fallback: the activation dequantized, the weight low-bit.


def format_fallback_reason(act_format: str | None, act_kind: str | None,
                           weight_format: str | None, weight_kind: str | None
                           ) -> str | None:
  """Why a quantized activation and weight cannot share one low-bit op (an
  integer and a float format), or None."""
  if act_kind is None or weight_kind is None or act_kind == weight_kind:
    return None
  return (f"the activation format {act_format} ({act_kind}) and the weight "
          f"format {weight_format} ({weight_kind}) cannot share a low-bit "
          f"op: an integer format needs an integer partner and a float "
          f"format a float one")


def _mixed_formats(lhs: Any, rhs: Any) -> bool:
  return (isinstance(lhs, QArray) and isinstance(rhs, QArray) and
          lhs.spec.fmt.kind != rhs.spec.fmt.kind)


def _fallback(lhs: Any, rhs: Any) -> tuple[Any, Any]:
  """Dequantizes ``lhs`` when the two QArrays' formats cannot share an op."""
  return (dequantize(lhs) if _mixed_formats(lhs, rhs) else lhs), rhs


def serve_dot_general(lhs, rhs, dimension_numbers, precision=None,
                      preferred_element_type=None, **kwargs) -> jax.Array:
  """``lax.dot_general``'s signature; `jaxq.dot_general` on QArrays.

  ``precision`` does not apply to the integer path and is ignored there.
  """
  lhs, rhs = _fallback(lhs, rhs)
  if not _is_quantized(lhs, rhs):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type,
                           **kwargs)
  return ops.dot_general(lhs, rhs, dimension_numbers,
                         preferred_element_type=preferred_element_type)


def serve_einsum(subscripts: str, lhs, rhs, precision=None,
                 preferred_element_type=None, **kwargs) -> jax.Array:
  """``jnp.einsum``'s two-operand signature; `jaxq.einsum` on QArrays."""
  lhs, rhs = _fallback(lhs, rhs)
  if not _is_quantized(lhs, rhs):
    return jnp.einsum(subscripts, lhs, rhs, precision=precision,
                      preferred_element_type=preferred_element_type, **kwargs)
  return ops.einsum(subscripts, lhs, rhs,
                    preferred_element_type=preferred_element_type)


# Convolutions: an integer convolution sums over the input channels and the
# window, so the input's scales may vary only per example and the kernel's
# only per output channel. Other scales (a catch-all PerToken() rule that
# also matched a conv) serve by the fallback: the quantized input is
# dequantized (it equals QAT's fake-quantized input) and multiplied by the
# low-bit kernel as a weight-only op, so serve still equals QAT.


def _varies_off(shape: Sequence[int], kept_axis: int) -> bool:
  return any(size != 1 for axis, size in enumerate(shape)
             if axis != kept_axis % len(shape))


def conv_fallback_reason(x_scale_shape: Sequence[int] | None,
                         w_scale_shape: Sequence[int] | None,
                         batch_axis: int, out_axis: int) -> str | None:
  """Why a convolution of a quantized input cannot be an integer op, or None.

  Args:
    x_scale_shape: the keepdims scale shape of the quantized input, or None
      for a float input (weight-only layers never fall back).
    w_scale_shape: the kernel's scale shape, or None for a float kernel.
    batch_axis, out_axis: the input's example axis and the kernel's output
      channel axis.
  """
  if x_scale_shape is None:
    return None
  if _varies_off(x_scale_shape, batch_axis):
    return (f"the input's scales (shape {tuple(x_scale_shape)}) vary along "
            f"an axis the convolution sums over; an integer convolution "
            f"needs them per tensor or per example")
  if w_scale_shape is not None and _varies_off(w_scale_shape, out_axis):
    return (f"the kernel's scales (shape {tuple(w_scale_shape)}) vary along "
            f"an axis the convolution sums over; an integer convolution "
            f"needs them per tensor or per output channel, "
            f"PerChannel(axis={out_axis})")
  return None


def layer_fallback_reason(act: Any, weight: Any, *,
                          conv_kernel_shape: Sequence[int] | None = None,
                          transposed: bool = False,
                          feature_group_count: int = 1) -> str | None:
  """Why serve runs a layer by the fallback, from its specs alone, or None.

  The same decision for linen and nnx (nnx decides at quantize time, before
  any input is seen): the formats (`format_fallback_reason`), then for a
  convolution (``conv_kernel_shape`` given) the scales its specs give an
  input of the kernel's rank with more than one example and position
  (`conv_fallback_reason`). An input of one example and one position serves
  as an integer op even where this names a reason.

  Args:
    act, weight: the layer's `QuantSpec`s (None when not quantized).
    conv_kernel_shape: a convolution's kernel shape, ``(*window, in, out)``
      (``(*window, out, in)`` when ``transposed``); None for other layers.
    transposed: a ``transpose_kernel=True`` ConvTranspose kernel.
    feature_group_count: the convolution's groups (the input has
      ``in * feature_group_count`` channels).
  """
  if act is None:
    return None
  reason = format_fallback_reason(
      act.fmt.name, act.fmt.kind, *((None, None) if weight is None else
                                    (weight.fmt.name, weight.fmt.kind)))
  if reason is not None or conv_kernel_shape is None:
    return reason
  w_shape = tuple(conv_kernel_shape)
  in_features = w_shape[-1 if transposed else -2] * feature_group_count
  x_shape = (2,) * (len(w_shape) - 1) + (in_features,)
  try:
    x_scale = granularity_lib.scale_shape(act.granularity, x_shape)
    w_scale = (None if weight is None else
               granularity_lib.scale_shape(weight.granularity, w_shape))
  except ValueError:
    return None  # The spec does not apply; the layer's own checks raise.
  reason = conv_fallback_reason(x_scale, w_scale, 0,
                                -2 if transposed else -1)
  if reason is not None and reason.startswith("the input's"):
    # Name the granularity, not the scale shape of a stand-in input.
    reason = (f"the input's scales ({act.granularity!r}) vary along an "
              f"axis the convolution sums over; an integer convolution "
              f"needs them per tensor or per example")
  return reason


def _scale_shape(x: Any) -> tuple[int, ...] | None:
  if not isinstance(x, QArray):
    return None
  if x.zero_point is not None and x.zero_point.ndim:
    return tuple(max(a, b) for a, b in zip(x.scale.shape, x.zero_point.shape))
  return tuple(x.scale.shape)


def serve_conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
               rhs_dilation=None, dimension_numbers=None,
               feature_group_count=1, batch_group_count=1, precision=None,
               preferred_element_type=None, **kwargs) -> jax.Array:
  """``lax.conv_general_dilated``'s signature; `jaxq.conv` on QArrays.

  A quantized input whose scales rule out an integer convolution (see
  `conv_fallback_reason`) is dequantized first: the fallback path.
  """
  lhs, rhs = _fallback(lhs, rhs)
  if isinstance(lhs, QArray):
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if conv_fallback_reason(_scale_shape(lhs), _scale_shape(rhs),
                            dn.lhs_spec[0], dn.rhs_spec[0]):
      lhs = dequantize(lhs)
  if not _is_quantized(lhs, rhs):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type, **kwargs)
  if batch_group_count != 1:
    raise ValueError("jaxq.conv: batch_group_count != 1 is not supported on "
                     "quantized operands.")
  return ops.conv(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                  rhs_dilation=rhs_dilation,
                  dimension_numbers=dimension_numbers,
                  feature_group_count=feature_group_count,
                  preferred_element_type=preferred_element_type)


# Transposed convolutions: flax's ConvTranspose calls lax.conv_transpose,
# which takes no injectable op, so serve mode computes the layer itself.


def _per_dim(value: int | Sequence[int] | None, rank: int) -> tuple[int, ...]:
  """Flax's broadcast of a stride or dilation (None means 1)."""
  if value is None:
    value = 1
  if isinstance(value, int):
    return (value,) * rank
  return tuple(value)


@dataclasses.dataclass(frozen=True)
class ConvTransposeConfig:
  """The settings of a linen or nnx ``ConvTranspose`` (they share them).

  Attributes:
    kernel_size: the window, ``(*window,)``; the kernel is ``(*window, in,
      out)``, or ``(*window, out, in)`` with ``transpose_kernel``.
    strides: the fractional strides (the input's dilation), per window axis.
    padding: ``"SAME"``, ``"VALID"`` or ``"CIRCULAR"`` (the forward
      convolution's), or ``(low, high)`` pairs of the transposed one.
    kernel_dilation: the kernel's dilation, per window axis.
    transpose_kernel: flip the window and swap the kernel's channel axes
      (TensorFlow's ``Conv2DTranspose``).
    precision: for float operands only (the low-bit ops ignore it).
    preferred_element_type: the output dtype, if not the promoted one.
    mask: multiplies the float kernel before it is quantized, or None (a
      `QArray` kernel from `jaxq.convert` holds ``kernel * mask`` already).
  """

  kernel_size: tuple[int, ...]
  strides: tuple[int, ...]
  padding: str | tuple[tuple[int, int], ...]
  kernel_dilation: tuple[int, ...]
  transpose_kernel: bool
  precision: Any = None
  preferred_element_type: Any = None
  mask: jax.Array | None = dataclasses.field(default=None, compare=False)

  @classmethod
  def of(cls, layer: Any) -> "ConvTransposeConfig":
    """The settings of a linen or an nnx ``ConvTranspose``."""
    kernel_size = _per_dim(layer.kernel_size, 1)
    rank = len(kernel_size)
    padding = linen_linear.canonicalize_padding(layer.padding, rank)
    if not isinstance(padding, str):
      padding = tuple(tuple(pair) for pair in padding)
    return cls(kernel_size=kernel_size,
               strides=_per_dim(layer.strides, rank),
               padding=padding,
               kernel_dilation=_per_dim(layer.kernel_dilation, rank),
               transpose_kernel=bool(layer.transpose_kernel),
               precision=layer.precision,
               preferred_element_type=layer.preferred_element_type,
               mask=layer.mask)

  def kernel_shape(self, in_features: int, features: int) -> tuple[int, ...]:
    """The kernel's shape for ``in_features`` in, ``features`` out."""
    channels = ((features, in_features) if self.transpose_kernel
                else (in_features, features))
    return self.kernel_size + channels

  def dimension_numbers(self) -> lax.ConvDimensionNumbers:
    """Channels-last input and output; the kernel's output channel is its
    last axis, or its second to last with ``transpose_kernel`` (the swap of
    ``lax.conv_transpose``, read in place instead of transposing)."""
    rank = len(self.kernel_size)
    window = tuple(range(rank))
    out_axis, in_axis = ((rank, rank + 1) if self.transpose_kernel
                         else (rank + 1, rank))
    activations = (0, rank + 1) + tuple(range(1, rank + 1))
    return lax.ConvDimensionNumbers(lhs_spec=activations,
                                    rhs_spec=(out_axis, in_axis) + window,
                                    out_spec=activations)

  def conv_padding(self) -> str | tuple[tuple[int, int], ...]:
    """The padding of the ``conv_general_dilated`` that ``lax.conv_transpose``
    runs: ``"SAME"``/``"VALID"`` name the forward convolution's, whose
    transpose pads each side of the dilated input (jax's
    ``_conv_transpose_padding``); explicit pairs pass through."""
    padding = "VALID" if self.padding == "CIRCULAR" else self.padding
    if padding not in ("SAME", "VALID"):
      return padding
    pads = []
    for size, stride, dilation in zip(self.kernel_size, self.strides,
                                      self.kernel_dilation):
      k = (size - 1) * dilation + 1  # The dilated window.
      if padding == "SAME":
        total = k + stride - 2
        low = k - 1 if stride > k - 1 else -(-total // 2)
      else:
        total = k + stride - 2 + max(k - stride, 0)
        low = k - 1
      pads.append((low, total - low))
    return tuple(pads)


def _flip_window(w: jax.Array | QArray, rank: int) -> jax.Array | QArray:
  """Reverses the window axes of a kernel, its scales and zero points too.

  Blocks that divide their window axis stay whole when reversed; a ragged
  last block along one would come first, off the grid its scale shape
  describes, so such a kernel is reversed dequantized (weight-only).
  """
  window = tuple(range(rank))
  if not isinstance(w, QArray):
    return jnp.flip(w, window)
  blocks = w.spec.granularity.block_shape(w.shape)
  if any(w.shape[a] % blocks[a] for a in window if blocks[a]):
    return jnp.flip(dequantize(w), window)
  flip = lambda a: None if a is None else jnp.flip(a, window)
  return dataclasses.replace(w, values=flip(w.values), scale=flip(w.scale),
                             zero_point=flip(w.zero_point))


def _wrap_circular(y: jax.Array, periods: Sequence[int],
                   transpose_kernel: bool) -> jax.Array:
  """Flax's CIRCULAR padding: pads each window axis of ``y`` (N, *window, C)
  to whole periods and sums the periods (the output wraps around)."""
  rank = len(periods)
  size_diffs = [-(size - period) % (2 * period)
                for size, period in zip(y.shape[1:-1], periods)]
  # Flax puts the odd element on the right for transposed kernels.
  pads = [(d // 2, (d + 1) // 2) if transpose_kernel else ((d + 1) // 2, d // 2)
          for d in size_diffs]
  y = jnp.pad(y, [(0, 0)] + pads + [(0, 0)])
  split = [n for size, period in zip(y.shape[1:-1], periods)
           for n in (size // period, period)]
  y = y.reshape((y.shape[0], *split, y.shape[-1]))
  return jnp.sum(y, axis=tuple(range(1, 2 * rank, 2)))


def serve_conv_transpose(
    path: str, config: ConvTransposeConfig, inputs: jax.Array,
    kernel: jax.Array | QArray, bias: jax.Array | None,
    promote: Callable[[jax.Array, jax.Array | QArray, jax.Array | None],
                      tuple[Any, Any, Any]],
    conv: Callable[..., jax.Array] = serve_conv) -> jax.Array:
  """A ``ConvTranspose`` layer's ``__call__`` with `jaxq.conv` (serve mode).

  ``lax.conv_transpose`` is ``lax.conv_general_dilated`` with the input
  dilated by the strides, unit window strides, the padding of
  `ConvTransposeConfig.conv_padding` and, with ``transpose_kernel``, the
  window flipped and the channel axes swapped. The swap is read from the
  dimension numbers, so a kernel keeps its layout and scales: its output
  channel is axis -1, or -2 with ``transpose_kernel``, which is where an
  integer kernel's per-channel scales must lie (``PerChannel(axis=-2)`` for
  transposed kernels). A masked layer's float kernel is masked before it is
  quantized, as in QAT; its `QArray` from `jaxq.convert` is masked already.

  Args:
    path: the layer's path (for error messages).
    config: the layer's settings.
    inputs: ``(*batch, *window, in)``; extra batch axes are flattened into
      one around the convolution, as flax does.
    kernel: the float kernel (multiplied by ``config.mask`` here, before
      ``promote`` quantizes it), or its `QArray` from `jaxq.convert`, which
      holds the masked kernel already.
    bias: ``(out,)``, or None.
    promote: ``(inputs, kernel, bias) -> (x, w, bias)``, the layer's dtype
      promotion that also quantizes ``x`` and ``w`` (as for every layer).
    conv: ``lax.conv_general_dilated``'s signature: `serve_conv`, or a
      switchable layer's op (`jaxq.flax.layer_variables.SwitchedOp`), which
      gets the float operands from ``promote`` and quantizes them itself.

  Returns:
    ``(*batch, *out_window, out)``, as the float layer returns.

  A kernel whose scales vary along a summed axis (other than the output
  channel) serves by `serve_conv`'s fallback: the input dequantized, the
  kernel low-bit (weight-only).
  """
  del path  # Kept for callers' error messages; the fallback needs no error.
  rank = len(config.kernel_size)
  batch_shape = inputs.shape[:inputs.ndim - rank - 1]
  inputs = jnp.reshape(inputs, (-1, *inputs.shape[len(batch_shape):]))
  if config.mask is not None and not isinstance(kernel, QArray):
    # A QArray kernel is jaxq.convert's, which quantized kernel * mask.
    kernel = kernel * config.mask
  x, w, bias = promote(inputs, kernel, bias)
  dimension_numbers = config.dimension_numbers()
  if config.transpose_kernel:
    w = _flip_window(w, rank)
  y = conv(x, w, (1,) * rank, config.conv_padding(),
                 lhs_dilation=config.strides,
                 rhs_dilation=config.kernel_dilation,
                 dimension_numbers=dimension_numbers,
                 precision=config.precision,
                 preferred_element_type=config.preferred_element_type)
  if config.padding == "CIRCULAR":
    periods = [size * stride for size, stride in
               zip(inputs.shape[1:-1], config.strides)]
    y = _wrap_circular(y, periods, config.transpose_kernel)
  if bias is not None:
    y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  return jnp.reshape(y, (*batch_shape, *y.shape[1:]))
