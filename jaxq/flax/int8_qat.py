"""The QAT matmul ops: the int8 forward and the backward modes of qat mode.

A qat matmul layer (Dense, DenseGeneral, Einsum; nnx Linear, LinearGeneral,
Einsum) computes ``y = op(x_hat, w_hat)``, ``x_hat``/``w_hat`` the
fake-quantized input ``x`` and weight ``w``. Two independent choices, both
options of `jaxq.quantize_model`:

The forward (``int8_forward``): with ``int8_forward=True`` the layer runs
`qat_dot_general` / `qat_einsum`: both operands are quantized
(`quantize`, the very scales fake-quant uses) and multiplied by
`jaxq.dot_general` / `jaxq.einsum`, int8 x int8 -> int32, which equals the
fake-quant forward up to float32 accumulation order. It needs integer
weight and act specs without ``learn`` (any other spec on a matmul layer
raises a ValueError naming the layer). Scales constant along the
contraction (T/C weights, T/K activations) take one int8 matmul; scales
that vary along it take `jaxq.dot_general`'s grouped int8 path, still equal
to fake-quant: groups, or a `PerToken` that reduces fewer axes than the
layer contracts (an attention output projection contracts (heads,
head_dim) of its (batch, seq, heads, head_dim) input: give it
``PerToken(contraction_axis=(-2, -1))`` for one matmul).

The backward (``backward``, `BACKWARDS`), for a loss gradient ``g`` of
``y``; every mode then passes ``dx_hat`` and ``dw`` through fake-quant's
estimator (the identity for an operand's own abs-max range; clipped for a
static range, a percentile or mse range, or MX; LSQ/PACT's for learned
ones):

* ``"ste"`` (default): the exact straight-through gradient,
  ``dx_hat = g . w_hat^T``, ``dw = x_hat^T . g``: the gradient of the
  fake-quant forward. It needs the quantized operands (the int8 forward
  keeps their int values and scales; fake-quant its dequantized copies).
  The layer's own gradients equal fake-quant's to float32 rounding, but a
  non-smooth op after the layer may take another branch: the integer
  matmul is exact, so an output whose int products cancel is exactly 0
  (common with int4 and a zero bias, at initialisation), where fake-quant's
  float accumulation leaves a few ulps of either sign; ``relu`` then passes
  no gradient at 0 and the whole one at 1e-8. On such models the two
  gradients differ by whole elements (tens of percent in norm on a small
  int4 per-tensor MLP at init) while the losses agree to 1e-7: both are
  correct subgradients.
* ``"float"``: the backward matmuls take the float operands,
  ``dx_hat = g . w^T``, ``dw = x^T . g``, as Qwix's QtProvider and AQT's
  defaults do: no quantized residual, the float step's backward. Its
  gradient differs from the STE one by ``g . (w - w_hat)^T`` and ``(x -
  x_hat)^T . g``, the operands' rounding error: with W8A8 (per-channel
  weights, per-token activations) 0.35-0.46% of the gradient's norm on
  ``benchmarks/qat_overhead.py``'s MLP and transformer block (``grad_err``,
  float32), where the float model's own gradient is 0.7-3.5% away; more
  for fewer bits.
  Applies to fake-quant and int8-forward layers alike.
* ``"int8"``: the backward matmuls themselves int8 x int8 -> int32 (needs
  ``int8_forward=True``). The forward's int values are reused and their
  scales moved onto ``g``: ``dx_hat = (g * s_w) . qw^T`` with ``g * s_w``
  quantized per token (one scale per row of ``g``, over the output
  features), ``dw = qx^T . (g * s_x)`` with ``g * s_x`` quantized per
  output channel (one scale per column, over the tokens); both roundings
  of the gradient are stochastic (``floor(v / s + u)``, ``u ~ U[0, 1)``
  from a counter-based hash of each element's index, seeded by the key),
  so each is unbiased: ``E[dx_hat]`` and ``E[dw]`` are the STE gradient. Its
  distance to the STE gradient is 0.44-0.53% of its norm on the same
  W8A8 models (``grad_err``; the noise averages out over steps). Both
  matmuls contract their left operand's last axis, the layout XLA:CPU's
  int8 kernels take, so a CPU with fast int8 matmuls (AMX, VNNI) gains
  too: on ``benchmarks/qat_overhead.py``'s models the step takes about
  0.5-0.65x the float step's CPU time there. It needs symmetric integer
  specs whose scales are constant along the contraction (T/C weights, T/K
  activations) and no batch dimension in the matmul; other layers raise a
  ValueError naming the layer.
  The rounding noise needs a PRNG key per layer and step. linen: pass
  ``rngs={"jaxq": key}`` to ``apply`` (each layer folds its path in, as
  ``make_rng`` does; a new key per step gives new noise). nnx: give
  ``quantize_model(..., rngs=nnx.Rngs(jaxq=seed))``, a stream the layers
  share and advance on each call (keep the updated state, as for dropout).
  A forward needs no key (evaluation runs without one); a gradient
  without one raises a ValueError naming the layer.

Layers without an int8 forward (convolutions, embeddings, user modules with
their own op) keep fake-quant and its STE backward under ``"int8"``; under
``"float"`` the user modules' ``dot_general`` takes the float operands too,
convolutions and embedding ``attend`` keep the STE.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Protocol, Sequence

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
from jaxq.spec import QuantSpec

BACKWARDS: tuple[str, ...] = ("ste", "float", "int8")
# The name of the linen rng collection of backward="int8".
RNG_NAME = "jaxq"
BilinearOp = Callable[[Any, Any], jax.Array]


class QatLayer(Protocol):
  """What the qat op needs of a layer's variables (`LayerVariables`)."""

  quant: LayerQuant

  def range_for(self, x: jax.Array) -> ActRange | None: ...

  def act(self, x: jax.Array) -> jax.Array: ...

  def smoothed(self, x: jax.Array) -> jax.Array: ...

  def weight(self, w: jax.Array) -> jax.Array: ...

  def backward_key(self) -> jax.Array | None: ...

  def missing_key_error(self) -> ValueError: ...


def check_backward(backward: str, int8_forward: bool) -> None:
  """Raises a ValueError for an unknown mode, or ``"int8"`` without the
  int8 forward."""
  if backward not in BACKWARDS:
    raise ValueError(f"quantize_model: unknown backward {backward!r}; "
                     f"expected one of {BACKWARDS}.")
  if backward == "int8" and not int8_forward:
    raise ValueError("quantize_model: backward='int8' multiplies the int8 "
                     "values of the int8 forward; pass int8_forward=True too.")


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


def uses_qat_op(layer: LayerQuant | None) -> bool:
  """Whether ``layer``'s matmul runs `qat_dot_general` / `qat_einsum`: the
  int8 forward, or fake-quant with a non-STE backward."""
  if layer is None or layer.mode != "qat":
    return False
  return uses_int8_forward(layer) or layer.backward == "float"


def float_backward(op: BilinearOp, x_hat: jax.Array, w_hat: jax.Array,
                   x: jax.Array, w: jax.Array) -> jax.Array:
  """``op(x_hat, w_hat)`` whose cotangents for ``x_hat`` and ``w_hat`` are
  ``op``'s at the float ``(x, w)`` (``x``, ``w`` get none: their gradient
  flows through ``x_hat`` and ``w_hat``'s estimators)."""

  @jax.custom_vjp
  def bilinear(x_hat, w_hat, x, w):
    return op(x_hat, w_hat)

  def fwd(x_hat, w_hat, x, w):
    return op(x_hat, w_hat), (x, w)

  def bwd(residuals, g):
    dx_hat, dw_hat = jax.vjp(op, *residuals)[1](g)
    return dx_hat, dw_hat, None, None

  bilinear.defvjp(fwd, bwd)
  return bilinear(x_hat, w_hat, x, w)


# The int8 backward.


class _Matmul:
  """A batch-free bilinear op as a 2D matmul ``[M, K] x [K, N] -> [M, N]``.

  ``x_free``/``x_contract`` and ``w_contract``/``w_free`` are axes of ``x``
  and ``w`` (the contracting ones paired in order); ``out_perm`` puts the
  op's output axes in (x free, w free) order.
  """

  def __init__(self, x_free: Sequence[int], x_contract: Sequence[int],
               w_contract: Sequence[int], w_free: Sequence[int],
               out_perm: Sequence[int]):
    self.x_perm = (*x_free, *x_contract)
    self.w_perm = (*w_contract, *w_free)
    self.x_free, self.w_free = tuple(x_free), tuple(w_free)
    self.out_perm = tuple(out_perm)

  @classmethod
  def of_dot_general(cls, layer: LayerQuant, x_ndim: int, w_ndim: int,
                     dimension_numbers) -> "_Matmul":
    (x_contract, w_contract), (x_batch, w_batch) = dimension_numbers
    if x_batch or w_batch:
      raise _unsupported(layer, "its matmul has batch dimensions")
    x_free = [a for a in range(x_ndim) if a not in x_contract]
    w_free = [a for a in range(w_ndim) if a not in w_contract]
    out = len(x_free) + len(w_free)
    return cls(x_free, x_contract, w_contract, w_free, range(out))

  @classmethod
  def of_einsum(cls, layer: LayerQuant, subscripts: str) -> "_Matmul":
    inputs, _, out = subscripts.replace(" ", "").partition("->")
    lhs, _, rhs = inputs.partition(",")
    letters = lhs + rhs + out
    if ("." in letters or not out or len(set(lhs)) < len(lhs) or
        len(set(rhs)) < len(rhs)):
      raise _unsupported(layer, f"einsum {subscripts!r} is not a plain "
                                f"two-operand contraction")
    if set(lhs) & set(rhs) & set(out):
      raise _unsupported(layer, f"einsum {subscripts!r} has batch letters")
    if (set(lhs) ^ set(rhs)) - set(out):
      raise _unsupported(layer, f"einsum {subscripts!r} sums an operand's "
                                f"own axis")
    contract = [c for c in lhs if c in rhs]
    x_free = [c for c in lhs if c not in rhs]
    w_free = [c for c in rhs if c not in lhs]
    return cls([lhs.index(c) for c in x_free],
               [lhs.index(c) for c in contract],
               [rhs.index(c) for c in contract],
               [rhs.index(c) for c in w_free],
               [out.index(c) for c in x_free + w_free])

  def check(self, layer: LayerQuant, qx: QArray, qw: QArray) -> None:
    """Raises a ValueError naming the layer unless both operands are
    symmetric, of at most 8 bits, with scales constant along the
    contraction."""
    for q, free, what in ((qx, self.x_free, "activation"),
                          (qw, self.w_free, "weight")):
      if q.zero_point is not None:
        raise _unsupported(layer, f"its {what} spec is affine")
      if q.spec.fmt.bits > 8:
        raise _unsupported(layer, f"its {what} format has "
                                  f"{q.spec.fmt.bits} bits")
      if any(q.scale.shape[a] != 1 for a in range(q.ndim) if a not in free):
        raise _unsupported(
            layer, f"its {what} scales (shape {tuple(q.scale.shape)}) vary "
                   f"along the contraction of its {what} of shape {q.shape}")

  @staticmethod
  def operand(q: QArray, perm: tuple[int, ...], free: tuple[int, ...],
              leading: int) -> tuple[jax.Array, jax.Array]:
    """``q``'s int8 values as a 2D matrix (axes in ``perm`` order, the first
    ``leading`` of them flattened into rows) and its scale as a vector over
    the ``free`` axes (in ``perm`` order)."""
    shape = [q.shape[a] for a in perm]
    values = jnp.transpose(q.values.astype(jnp.int8), perm).reshape(
        math.prod(shape[:leading]), -1)
    scale_shape = [q.shape[a] if a in free else 1 for a in range(q.ndim)]
    scale = jnp.transpose(jnp.broadcast_to(q.scale.astype(jnp.float32),
                                           scale_shape), perm).reshape(-1)
    return values, scale

  def back(self, grad2: jax.Array, shape: tuple[int, ...],
           perm: tuple[int, ...]) -> jax.Array:
    """A 2D gradient (``perm`` order, free axes first) in ``shape``'s axes."""
    permuted = grad2.reshape([shape[a] for a in perm])
    return jnp.transpose(permuted, tuple(perm.index(a)
                                         for a in range(len(shape))))


def _unsupported(layer: LayerQuant, why: str) -> ValueError:
  return ValueError(
      f"jaxq qat backward='int8': {layer.path!r} ({layer.module_type}) "
      f"cannot multiply its gradient in int8: {why}. It needs symmetric "
      f"integer specs with scales constant along the contraction (weights "
      f"PerChannel over the output axes, activations PerToken over the "
      f"contracted axes) and no batch dimensions; quantize this layer with "
      f"another rule or use backward='ste' or 'float'.")


def _uniform_noise(seed: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """Float32 noise in ``[0, 1)`` of a 2D ``shape``, on a 2**-24 grid.

  Counter-based: each element hashes its flat index with the two uint32
  words of ``seed`` (murmur3's 32-bit finalizer, applied twice).
  Elementwise, so XLA fuses it into the rounding that uses it; drawing the
  same noise with ``jax.random.uniform`` (threefry, a loop on the CPU)
  costs more than an int8 matmul of the same size.
  """
  rows = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
  cols = jax.lax.broadcasted_iota(jnp.uint32, shape, 1)
  h = _fmix32((rows * jnp.uint32(shape[1]) + cols) * jnp.uint32(0x9E3779B9)
              + seed[0])
  h = _fmix32(h ^ seed[1])
  return (h >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24)


def _fmix32(h: jax.Array) -> jax.Array:
  """murmur3's finalizer: every input bit flips each output bit with
  probability about 1/2 (uint32 arithmetic wraps)."""
  h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _int8_scale(v: jax.Array, axis: int) -> jax.Array:
  """The symmetric int8 scale of ``v`` (2D) along ``axis`` (kept)."""
  amax = jnp.max(jnp.abs(v), axis=axis, keepdims=True)
  return jnp.where(amax > 0, amax / 127.0, 1.0)


def _round_int8(v: jax.Array, scale: jax.Array, seed: jax.Array
                ) -> jax.Array:
  """``floor(v / scale + u)`` saturated to int8, ``u ~ U[0, 1)``: unbiased,
  ``E[values * scale] = v`` (up to the noise's 2**-24 grid)."""
  noise = _uniform_noise(seed, v.shape)
  return jnp.clip(jnp.floor(v / scale + noise), -127, 127).astype(jnp.int8)


def _stochastic_int8(v: jax.Array, axis: int, key: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
  """``v`` (float32, 2D) as int8 values and a scale along ``axis`` (kept),
  rounded stochastically so that ``E[values * scale] = v``."""
  scale = _int8_scale(v, axis)
  return _round_int8(v, scale, jax.random.bits(key, (2,), jnp.uint32)), scale


def _transposed(a: jax.Array, positive: jax.Array) -> jax.Array:
  """``a.T`` (2D) as a row-major copy, for the left operand of a dot.

  XLA folds a plain transpose into the dot that consumes it, which then
  contracts its left operand's first axis: XLA:CPU widens such an int8 dot
  to int32 and runs it about 100x slower. Read through a dynamic slice at
  an offset XLA cannot prove is zero (``positive < 0``: never, for a
  positive scalar), the transpose stays a copy of the small int8 operand.
  """
  zero = (positive < 0).astype(jnp.int32)
  padded = jnp.pad(a.T, ((0, 1), (0, 0)))
  return jax.lax.dynamic_slice(padded, (zero, 0), a.T.shape)


def _int8_backward(matmul: _Matmul, qx: QArray,
                   qw: QArray, g: jax.Array, key: jax.Array
                   ) -> tuple[jax.Array, jax.Array]:
  """``(dx_hat, dw)`` from int8 x int8 -> int32 matmuls (module docstring).

  Both matmuls contract the last axis of their left operand, the layout
  XLA:CPU's fast int8 kernels take (one contracting the first axis is
  widened to int32 and runs about 100x slower): ``dx_hat`` contracts the
  output features of ``g`` and of ``qw``; ``dw = qx^T . (g * s_x)`` takes
  a row-major copy of ``qx^T`` (`_transposed`).
  """
  x_values, x_scale = matmul.operand(qx, matmul.x_perm, matmul.x_free,
                                     len(matmul.x_free))
  w_values, w_scale = matmul.operand(qw, matmul.w_perm, matmul.w_free,
                                     len(matmul.w_perm) - len(matmul.w_free))
  rows, cols = x_values.shape[0], w_values.shape[1]
  g2 = jnp.transpose(g, matmul.out_perm).reshape(rows, cols).astype(
      jnp.float32)
  # One draw from the key seeds both roundings.
  seed_dx, seed_dw = jax.random.bits(key, (2, 2), jnp.uint32)
  # dx_hat = g . (qw * s_w)^T = (g * s_w) . qw^T: one scale per row of g.
  g_dx = g2 * w_scale[None, :]
  s_dx = _int8_scale(g_dx, 1)
  dx2 = jax.lax.dot_general(_round_int8(g_dx, s_dx, seed_dx), w_values,
                            (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.int32)
  # dw = (qx * s_x)^T . g = qx^T . (g * s_x): one scale per column of g.
  g_dw = g2 * x_scale[:, None]
  s_dw = _int8_scale(g_dw, 0)
  dw2 = jax.lax.dot_general(_transposed(x_values, s_dw[0, 0]),
                            _round_int8(g_dw, s_dw, seed_dw),
                            (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.int32)
  dx_hat = matmul.back(dx2.astype(jnp.float32) * s_dx, qx.shape,
                       matmul.x_perm)
  dw = matmul.back(dw2.astype(jnp.float32) * s_dw, qw.shape, matmul.w_perm)
  return dx_hat, dw


# The int8 forward and its backward modes.


def _clips(spec: QuantSpec, amax: jax.Array | None) -> bool:
  """Whether fake-quant's clipped estimator can stop some of an operand's
  gradient: unless its range is its own abs-max (`jaxq.fake_quant`)."""
  return amax is not None or spec.is_mx or spec.calibration != "max"


def _int8_qat(quant_op: BilinearOp, float_op: BilinearOp,
              matmul: Callable[[], _Matmul], layer: LayerQuant,
              x: jax.Array, w: jax.Array, act_range: ActRange | None,
              key: jax.Array | None,
              missing_key: ValueError | None = None) -> jax.Array:
  """``quant_op(quantize(x), quantize(w))``, a bilinear low-bit op, with
  ``layer.backward``'s gradient (module docstring); ``missing_key``, raised
  by the ``"int8"`` backward when ``key`` is None (a forward needs none)."""
  amin, amax = static_range(layer, act_range, x.shape)
  backward = layer.backward
  x_dtype, w_dtype = x.dtype, w.dtype
  if backward == "int8":
    matmul_2d = matmul()  # Raises for a layer the int8 backward cannot do.

  # The range and key are arguments, not closures, so that custom_vjp sees
  # them.
  @jax.custom_vjp
  def op(x, w, amin, amax, key):
    return fwd(x, w, amin, amax, key)[0]

  def fwd(x, w, amin, amax, key):
    qx = quantize(x, layer.act, amax=amax, amin=amin)
    qw = quantize(w, layer.weight)
    if backward == "int8":
      matmul_2d.check(layer, qx, qw)
    # "float" keeps the float operands, the others the int values and
    # scales, plus x and w where the range may not hold them (the clipped
    # estimator's mask needs them).
    operands = (x, w) if backward == "float" else (qx, qw)
    masked_x = x if _clips(layer.act, amax) else None
    masked_w = w if _clips(layer.weight, None) else None
    return quant_op(qx, qw), (operands, masked_x, masked_w, amin, amax, key)

  def bwd(residuals, g):
    (a, b), x, w, amin, amax, key = residuals
    if backward == "float":
      dx_hat, dw = jax.vjp(float_op, a, b)[1](g)
    elif backward == "int8":
      if key is None:
        raise missing_key
      dx_hat, dw = _int8_backward(matmul_2d, a, b, g, key)
    else:
      # The float op's gradients at the dequantized operands, as the
      # transposes of quant_op with one operand kept quantized: a scale
      # that is constant along the contraction then multiplies g (the
      # output), not a float copy of the operand, and the int values
      # convert on the fly.
      a_like = jax.ShapeDtypeStruct(a.shape, a.dtype)
      b_like = jax.ShapeDtypeStruct(b.shape, b.dtype)
      dx_hat, = jax.linear_transpose(lambda t: quant_op(t, b), a_like)(g)
      dw, = jax.linear_transpose(lambda t: quant_op(a, t), b_like)(g)
    dx_hat, dw = dx_hat.astype(x_dtype), dw.astype(w_dtype)
    # fake_quant's estimator: the identity for an abs-max range of the
    # operand's own, else its clipped vjp at the operand.
    if x is not None:
      dx_hat = jax.vjp(lambda x: fake_quant(x, layer.act, amax=amax,
                                            amin=amin), x)[1](dx_hat)[0]
    if w is not None:
      dw = jax.vjp(lambda w: fake_quant(w, layer.weight), w)[1](dw)[0]
    return dx_hat, dw, *jax.tree.map(jnp.zeros_like, (amin, amax)), None

  op.defvjp(fwd, bwd)
  return op(x, w, amin, amax, key)


def _qat_op(layer_vars: QatLayer, x: jax.Array, w: jax.Array,
            preferred_element_type, quant_op: Callable[..., jax.Array],
            float_op: BilinearOp, matmul: Callable[[], _Matmul]
            ) -> jax.Array:
  """A qat layer's op: the int8 forward (``quant_op``) with its backward
  mode, or fake-quant's ``float_op`` with the float backward."""
  layer = layer_vars.quant
  if not uses_int8_forward(layer):
    # Fake-quant with backward="float" (uses_qat_op).
    return float_backward(float_op, layer_vars.act(x), layer_vars.weight(w),
                          layer_vars.smoothed(x), w)
  x = layer_vars.smoothed(x)  # SmoothQuant's input scaling, if any.
  check_spec(layer, layer.act, x.shape, "activation")
  check_spec(layer, layer.weight, w.shape, "weight")
  out_dtype = preferred_element_type or jnp.result_type(x.dtype, w.dtype)
  act_range = layer_vars.range_for(x) if layer.static_act else None
  key = layer_vars.backward_key() if layer.backward == "int8" else None
  return _int8_qat(
      functools.partial(quant_op, preferred_element_type=out_dtype),
      functools.partial(float_op, preferred_element_type=out_dtype),
      matmul, layer, x, w, act_range, key,
      layer_vars.missing_key_error() if layer.backward == "int8" and
      key is None else None)


def qat_dot_general(layer_vars: QatLayer, x: jax.Array, w: jax.Array,
                    dimension_numbers, precision=None,
                    preferred_element_type=None, **kwargs) -> jax.Array:
  """``lax.dot_general(x, w, ...)`` of a qat layer that `uses_qat_op`.

  ``x`` is the float input and ``w`` the float weight, as the layer hands
  them to its op. On the int8 path ``precision`` and ``kwargs``
  (``out_sharding``) do not apply to the integer matmul and are ignored;
  the output has ``x``'s dtype (or ``preferred_element_type``).
  """
  layer = layer_vars.quant
  if not uses_int8_forward(layer):
    return _qat_op(layer_vars, x, w, None, None,
                   functools.partial(jax.lax.dot_general,
                                     dimension_numbers=dimension_numbers,
                                     precision=precision,
                                     preferred_element_type=
                                     preferred_element_type, **kwargs), None)
  return _qat_op(
      layer_vars, x, w, preferred_element_type,
      functools.partial(ops.dot_general, dimension_numbers=dimension_numbers),
      functools.partial(jax.lax.dot_general,
                        dimension_numbers=dimension_numbers),
      lambda: _Matmul.of_dot_general(layer, x.ndim, w.ndim,
                                     dimension_numbers))


def qat_einsum(layer_vars: QatLayer, subscripts: str, x: jax.Array,
               w: jax.Array, precision=None, preferred_element_type=None,
               **kwargs) -> jax.Array:
  """``jnp.einsum(subscripts, x, w)`` of a qat layer that `uses_qat_op` (as
  `qat_dot_general`)."""
  layer = layer_vars.quant
  if not uses_int8_forward(layer):
    return _qat_op(layer_vars, x, w, None, None,
                   functools.partial(jnp.einsum, subscripts,
                                     precision=precision,
                                     preferred_element_type=
                                     preferred_element_type, **kwargs), None)
  return _qat_op(layer_vars, x, w, preferred_element_type,
                 functools.partial(ops.einsum, subscripts),
                 functools.partial(jnp.einsum, subscripts),
                 lambda: _Matmul.of_einsum(layer, subscripts))
