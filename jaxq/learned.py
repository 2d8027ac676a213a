"""Learned ranges for QAT: LSQ step sizes and PACT clipping values.

Both are fake-quantizers whose range is an input, differentiated as such
(``custom_vjp``); `jaxq.fake_quant`'s range, by contrast, gets no gradient.

Shapes: ``x`` has any shape ``S``; the learned parameter (``scale`` for LSQ,
``clip`` for PACT) has the keepdims scale shape of ``spec.granularity`` for
``S`` (see `jaxq.granularity`) or any shape that broadcasts to it, e.g.
``(C,)`` for `PerChannel(axis=-1)` activations of shape ``(..., C)``; its
gradient comes back in its own shape (summed over the broadcast).

Forward (both): with ``s`` the scale (``clip / qmax`` for PACT),
``x_hat = clip(round(x / s), qmin, qmax) * s`` exactly as `jaxq.fake_quant`
with that scale computes it, in ``x``'s dtype. The parameter's magnitude is
used (``|s|``, at least the smallest positive float32), with the gradient of
``|s|``: an optimizer step that overshoots zero mirrors the scale instead of
collapsing its block to zero.

Gradients, elementwise with ``v = x / s`` and ``q = clip(round(v), qmin,
qmax)``, summed over the elements that share a scale:

* ``x``: the straight-through estimator of ``spec.ste``: the incoming
  gradient where ``qmin <= v <= qmax`` (zero outside) for ``"clipped"``,
  everywhere for ``"identity"``.
* LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020):
  ``d x_hat / d s = q - v`` inside the range (``-v + round(v)``) and ``qmin``
  or ``qmax`` outside, times the gradient scale
  ``g = 1 / sqrt(numel_per_scale * qmax)``.
* PACT (Choi et al., 2018), with the clip ``alpha = s * qmax``:
  ``d x_hat / d alpha = 1`` where ``v > qmax`` (``x >= alpha``),
  ``qmin / qmax`` where ``v < qmin`` (``-1`` for the narrow signed range,
  i.e. ``x <= -alpha``) and ``0`` inside (the straight-through estimator
  ignores the rounding grid's dependence on ``alpha``).

Starting from a range (`init_param`), both take the scale of
`jaxq.scale_from_range`, so training starts from `jaxq.fake_quant` with
that range: ``amax / qmax`` in the narrow integer range, ``amax / (qmax +
0.5)`` in the full range (int4's default). PACT's clip is the largest level
``s * qmax`` either way: ``amax`` in the narrow range, half a step below it
in the full range.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import granularity as granularity_lib
# Not ``from jaxq import quantize``: the package exports the function of that
# name, which shadows the module.
from jaxq.quantize import _check_float
from jaxq.quantize import _dequantize_values
from jaxq.quantize import _quantize_values
from jaxq.quantize import scale_from_range
from jaxq.spec import QArray, QuantSpec


def _keepdims_param(x: jax.Array, param: jax.Array, spec: QuantSpec,
                    name: str) -> jax.Array:
  """``param`` broadcast to the keepdims scale shape of ``x`` (float32)."""
  shape = tuple(x.shape)
  expected = granularity_lib.scale_shape(spec.granularity, shape)
  param = jnp.asarray(param)
  try:
    target = jnp.broadcast_shapes(tuple(param.shape), expected)
  except ValueError:
    target = None
  if target != expected:
    raise ValueError(
        f"{name} has shape {tuple(param.shape)} but {spec.granularity} on an "
        f"array of shape {shape} needs scale shape {expected} (or a shape "
        f"that broadcasts to it).")
  return jnp.broadcast_to(param.astype(jnp.float32), expected)


def _positive(scale: jax.Array) -> jax.Array:
  return jnp.maximum(jnp.abs(scale), jnp.finfo(jnp.float32).tiny)


def _sign(param: jax.Array) -> jax.Array:
  """d|param| / d param, taking 1 at 0."""
  return jnp.where(param < 0, -1.0, 1.0)


def _scaled(x: jax.Array, scale: jax.Array, spec: QuantSpec
            ) -> tuple[jax.Array, jax.Array]:
  """``(v, q)``: ``x / s`` and its rounded, saturated value, split in blocks."""
  blocks = spec.granularity.block_shape(tuple(x.shape))
  v = (granularity_lib.split_blocks(x.astype(jnp.float32), blocks) /
       granularity_lib.split_scale(scale, x.shape, blocks))
  q = jnp.clip(jnp.round(v), spec.fmt.qmin, spec.fmt.qmax)
  return v, q


def _forward(spec: QuantSpec, x: jax.Array, scale: jax.Array) -> jax.Array:
  # The very code of jaxq.fake_quant, so serving reproduces QAT exactly.
  values = _quantize_values(x, spec, scale, None, None)
  return _dequantize_values(values, scale, None, spec, x.dtype)


def _x_grad(spec: QuantSpec, x: jax.Array, v: jax.Array, g: jax.Array
            ) -> jax.Array:
  if spec.ste == "identity":
    return g
  inside = (v >= spec.fmt.qmin) & (v <= spec.fmt.qmax)
  mask = granularity_lib.merge_blocks(inside, x.shape)
  return jnp.where(mask, g, jnp.zeros_like(g))


def _reduce_to_scale(spec: QuantSpec, shape: tuple[int, ...],
                     per_element: jax.Array) -> jax.Array:
  blocks = spec.granularity.block_shape(shape)
  return granularity_lib.block_reduce(
      granularity_lib.merge_blocks(per_element, shape), blocks, jnp.sum,
      fill=0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _lsq(spec: QuantSpec, x: jax.Array, scale: jax.Array, grad_scale: float
         ) -> jax.Array:
  return _forward(spec, x, _positive(scale))


def _lsq_fwd(spec, x, param, grad_scale):
  scale = _positive(param)
  return _forward(spec, x, scale), (x, scale, _sign(param))


def _lsq_bwd(spec, grad_scale, residuals, g):
  x, scale, sign = residuals
  v, q = _scaled(x, scale, spec)
  inside = (v >= spec.fmt.qmin) & (v <= spec.fmt.qmax)
  blocks = spec.granularity.block_shape(tuple(x.shape))
  g32 = granularity_lib.split_blocks(g.astype(jnp.float32), blocks)
  d_scale = jnp.where(inside, q - v, q) * g32
  d_scale = _reduce_to_scale(spec, tuple(x.shape), d_scale) * grad_scale
  return _x_grad(spec, x, v, g), d_scale * sign


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pact(spec: QuantSpec, x: jax.Array, clip: jax.Array) -> jax.Array:
  return _forward(spec, x, _positive(clip / spec.fmt.qmax))


def _pact_fwd(spec, x, clip):
  scale = _positive(clip / spec.fmt.qmax)
  return _forward(spec, x, scale), (x, scale, _sign(clip))


def _pact_bwd(spec, residuals, g):
  x, scale, sign = residuals
  v, _ = _scaled(x, scale, spec)
  fmt = spec.fmt
  blocks = spec.granularity.block_shape(tuple(x.shape))
  g32 = granularity_lib.split_blocks(g.astype(jnp.float32), blocks)
  d_clip = jnp.where(v > fmt.qmax, 1.0,
                     jnp.where(v < fmt.qmin, fmt.qmin / fmt.qmax, 0.0)) * g32
  return _x_grad(spec, x, v, g), _reduce_to_scale(
      spec, tuple(x.shape), d_clip) * sign


_pact.defvjp(_pact_fwd, _pact_bwd)


def _check(x: jax.Array, spec: QuantSpec, fn: str) -> jax.Array:
  x = jnp.asarray(x)
  _check_float(x, fn)
  if spec.learn is None:
    spec.replace(learn="lsq")  # Validates: symmetric integer, nearest.
  return x


def numel_per_scale(spec: QuantSpec, shape: tuple[int, ...]) -> int:
  """How many elements of an array of ``shape`` share one scale (a whole
  block; a ragged last block holds fewer)."""
  return math.prod(spec.granularity.block_shape(tuple(shape)))


def lsq_grad_scale(spec: QuantSpec, shape: tuple[int, ...]) -> float:
  """LSQ's gradient scale ``1 / sqrt(numel_per_scale * qmax)``."""
  return 1.0 / math.sqrt(numel_per_scale(spec, shape) * spec.fmt.qmax)


def lsq_fake_quant(x: jax.Array, scale: jax.Array, spec: QuantSpec, *,
                   grad_scale: float | None = None) -> jax.Array:
  """Fake-quantizes ``x`` with a learned step size ``scale`` (LSQ).

  Args:
    x: float array of any shape.
    scale: the step size, float, in (or broadcasting to) the keepdims scale
      shape of ``spec.granularity`` for ``x.shape``.
    spec: a symmetric integer spec with round-to-nearest (``spec.learn`` may
      be None or anything valid: this function always applies LSQ).
    grad_scale: the factor on the scale's gradient; by default LSQ's
      `lsq_grad_scale` ``1 / sqrt(numel_per_scale * qmax)``.

  Returns:
    ``x_hat`` of ``x``'s shape and dtype; gradients as in the module doc.
  """
  x = _check(x, spec, "lsq_fake_quant")
  if grad_scale is None:
    grad_scale = lsq_grad_scale(spec, tuple(x.shape))
  return _lsq(spec, x, _keepdims_param(x, scale, spec, "scale"),
              float(grad_scale))


def pact_fake_quant(x: jax.Array, clip: jax.Array, spec: QuantSpec
                    ) -> jax.Array:
  """Fake-quantizes ``x`` clipped at a learned ``clip`` value (PACT).

  The scale is ``clip / qmax``, so values saturate at ``+-clip`` (at
  ``qmin * clip / qmax`` below for the full signed range).

  Args:
    x: float array of any shape.
    clip: the clipping value ``alpha``, in (or broadcasting to) the keepdims
      scale shape of ``spec.granularity`` for ``x.shape``.
    spec: a symmetric integer spec with round-to-nearest.

  Returns:
    ``x_hat`` of ``x``'s shape and dtype; gradients as in the module doc.
  """
  x = _check(x, spec, "pact_fake_quant")
  return _pact(spec, x, _keepdims_param(x, clip, spec, "clip"))


def learned_fake_quant(x: jax.Array, param: jax.Array, spec: QuantSpec
                       ) -> jax.Array:
  """`lsq_fake_quant` or `pact_fake_quant`, as ``spec.learn`` says."""
  if spec.learn == "pact":
    return pact_fake_quant(x, param, spec)
  if spec.learn == "lsq":
    return lsq_fake_quant(x, param, spec)
  raise ValueError(f"learned_fake_quant: the spec has learn={spec.learn!r}; "
                   f"expected 'lsq' or 'pact'.")


def scale_of(param: jax.Array, spec: QuantSpec) -> jax.Array:
  """The scale a learned parameter stands for: its magnitude (LSQ) or its
  magnitude over qmax (PACT), at least the smallest positive float32."""
  param = jnp.asarray(param, jnp.float32)
  return _positive(param / spec.fmt.qmax if spec.learn == "pact" else param)


def init_param(spec: QuantSpec, amax: jax.Array) -> jax.Array:
  """The learned parameter that starts from the range ``amax``, float32.

  LSQ: the scale `jaxq.scale_from_range` gives (``amax / qmax``, or
  ``amax / (qmax + 0.5)`` in the full integer range). PACT: the clip
  ``scale * qmax`` (``amax`` in the narrow range, half a step below it in
  the full range).
  """
  scale, _ = scale_from_range(spec, amax, range_from_data=True)
  return scale if spec.learn == "lsq" else scale * spec.fmt.qmax


def quantize_with_scale(x: jax.Array, scale: jax.Array, spec: QuantSpec
                        ) -> QArray:
  """`jaxq.quantize` with a given (learned) ``scale``: the QArray whose
  `jaxq.dequantize` equals `lsq_fake_quant` (and `pact_fake_quant` with
  ``clip = scale * qmax``) of ``x`` exactly."""
  x = _check(x, spec, "quantize_with_scale")
  scale = _positive(_keepdims_param(x, scale, spec, "scale"))
  values = _quantize_values(x, spec, scale, None, None)
  return QArray(values=values, scale=scale, zero_point=None, spec=spec,
                dtype=np.dtype(x.dtype))
