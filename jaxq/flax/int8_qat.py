"""The int8 forward of qat mode: the low-bit op forward, the fake-quant
layer's straight-through backward.

The int8 forward (``quantize_model(..., "qat", int8_forward=True)``): the
matmul layers (Dense, DenseGeneral, Einsum; nnx Linear, LinearGeneral,
Einsum) compute the QAT forward with `int8_qat_dot_general` /
`int8_qat_einsum`: both operands are quantized (`quantize`, the very scales
fake-quant uses) and multiplied by `jaxq.dot_general` / `jaxq.einsum`, int8 x
int8 -> int32, which equals the fake-quant forward up to float32
accumulation order. The backward is the fake-quant layer's: the float op's
gradient through `fake_quant`'s straight-through estimator. It needs integer
weight and act specs without ``learn`` (any other spec on a matmul layer
raises a ValueError naming the layer). Scales constant along the
contraction (T/C weights, T/K activations) take one int8 matmul; scales
that vary along it take `jaxq.dot_general`'s grouped int8 path, still equal
to fake-quant: groups, or a `PerToken` that reduces fewer axes than the
layer contracts (an attention output projection contracts (heads,
head_dim) of its (batch, seq, heads, head_dim) input: give it
``PerToken(contraction_axis=(-2, -1))`` for one matmul). Convolutions and
embeddings have no int8 forward and keep fake-quant.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from jaxq import ops
from jaxq.flax.core import ActRange
from jaxq.flax.core import LayerQuant
from jaxq.flax.core import check_spec
from jaxq.flax.core import static_range
from jaxq.quantize import fake_quant
from jaxq.quantize import quantize
from jaxq.spec import QArray


def uses_int8_forward(layer: LayerQuant | None) -> bool:
  """Whether ``layer``'s matmul runs on the int8 path (raising a ValueError
  naming the layer when its specs cannot)."""
  if layer is None or not layer.int8_forward:
    return False
  for what, spec in (("weight", layer.weight), ("activation", layer.act)):
    if spec is None or spec.fmt.kind != "int" or spec.learn is not None:
      raise ValueError(
          f"jaxq qat int8_forward: {layer.path!r} ({layer.module_type}) needs "
          f"an integer {what} spec without learn=..., got {spec}; quantize "
          f"this layer with another rule or drop int8_forward.")
  return True


def _int8_qat(quant_op: Callable[[QArray | jax.Array, QArray | jax.Array],
                                 jax.Array],
              layer: LayerQuant, x: jax.Array, w: jax.Array,
              act_range: ActRange | None) -> jax.Array:
  """``quant_op(quantize(x), quantize(w))``, a bilinear low-bit op, with the
  gradient of the same op on ``fake_quant(x)`` and ``fake_quant(w)``."""
  amin, amax = static_range(layer, act_range, x.shape)

  # The range is an argument, not a closure, so that custom_vjp sees it.
  @jax.custom_vjp
  def op(x, w, amin, amax):
    return fwd(x, w, amin, amax)[0]

  def fwd(x, w, amin, amax):
    qx = quantize(x, layer.act, amax=amax, amin=amin)
    qw = quantize(w, layer.weight)
    # The int values and scales are the residuals, plus x when its range is
    # static (the clipped estimator's mask needs it).
    return quant_op(qx, qw), (qx, qw, None if amax is None else x, amin,
                              amax)

  def bwd(residuals, g):
    qx, qw, x, amin, amax = residuals
    # The float op's gradients at the dequantized operands, as the
    # transposes of quant_op with one operand kept quantized: a scale that
    # is constant along the contraction then multiplies g (the output), not
    # a float copy of the operand, and the int values convert on the fly.
    x_like = jax.ShapeDtypeStruct(qx.shape, qx.dtype)
    w_like = jax.ShapeDtypeStruct(qw.shape, qw.dtype)
    dx_hat, = jax.linear_transpose(lambda a: quant_op(a, qw), x_like)(g)
    dw, = jax.linear_transpose(lambda b: quant_op(qx, b), w_like)(g)
    # fake_quant's estimator: the identity for a range of the operand's own
    # (the weight's; a dynamic act's), else its clipped vjp at x.
    if x is None:
      dx = dx_hat
    else:
      dx = jax.vjp(lambda x: fake_quant(x, layer.act, amax=amax, amin=amin),
                   x)[1](dx_hat)[0]
    return dx, dw, *jax.tree.map(jnp.zeros_like, (amin, amax))

  op.defvjp(fwd, bwd)
  return op(x, w, amin, amax)


def _int8_qat_layer_op(layer: LayerQuant, act_range: ActRange | None,
                       x: jax.Array, w: jax.Array, preferred_element_type,
                       quant_op: Callable[..., jax.Array]) -> jax.Array:
  """`_int8_qat` of ``quant_op(a, b, preferred_element_type=...)`` after
  checking the layer's specs against the operands."""
  check_spec(layer, layer.act, x.shape, "activation")
  check_spec(layer, layer.weight, w.shape, "weight")
  out_dtype = preferred_element_type or jnp.result_type(x.dtype, w.dtype)
  return _int8_qat(
      functools.partial(quant_op, preferred_element_type=out_dtype),
      layer, x, w, act_range)


def int8_qat_dot_general(layer: LayerQuant, act_range: ActRange | None,
                         x: jax.Array, w: jax.Array, dimension_numbers,
                         precision=None, preferred_element_type=None,
                         **kwargs) -> jax.Array:
  """``lax.dot_general(x, w, ...)`` of a qat layer on the int8 path.

  ``x`` is the float input and ``w`` the float weight, as the layer hands
  them to its op; ``precision`` and ``kwargs`` (``out_sharding``) do not
  apply to the integer matmul and are ignored. The output has ``x``'s dtype
  (or ``preferred_element_type``).
  """
  del precision, kwargs
  return _int8_qat_layer_op(
      layer, act_range, x, w, preferred_element_type,
      functools.partial(ops.dot_general,
                        dimension_numbers=dimension_numbers))


def int8_qat_einsum(layer: LayerQuant, act_range: ActRange | None,
                    subscripts: str, x: jax.Array, w: jax.Array,
                    precision=None, preferred_element_type=None,
                    **kwargs) -> jax.Array:
  """``jnp.einsum(subscripts, x, w)`` of a qat layer on the int8 path (as
  `int8_qat_dot_general`)."""
  del precision, kwargs
  return _int8_qat_layer_op(layer, act_range, x, w, preferred_element_type,
                            functools.partial(ops.einsum, subscripts))
