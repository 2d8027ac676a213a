"""Quantization-aware training: the fine-tuning recipe and learned ranges.

The recipe of the literature (e.g. Krishnamoorthi 2018; Nagel et al. 2021,
"A White Paper on Neural Network Quantization"; Esser et al. 2020):

1. start from the trained float model, calibrated as for PTQ;
2. fine-tune it in QAT mode for about 10% of the original schedule, from
   about 1% of the original learning rate, with cosine decay;
3. `jaxq.convert` it to serve: the serving outputs equal the QAT model's.

```python
cal = jaxq.quantize_model(model, rules, "calibrate")
_, stats = cal.apply(variables, x_cal, mutable=["quant_stats"])
variables = {**variables,
             "quant_ranges": jaxq.act_ranges(cal, stats["quant_stats"])}
qat = cal.with_mode("qat")
variables = jaxq.qat.init_learned(qat, variables, x_cal)  # learn=... specs
tx = jaxq.qat.recipe(base_lr=1e-3, original_steps=10_000)
opt_state = tx.init(variables["params"])
for _ in range(jaxq.qat.finetune_steps(10_000)):
  grads = jax.grad(loss)(variables["params"], ...)   # qat.apply inside
  updates, opt_state = tx.update(grads, opt_state, variables["params"])
  variables = {**variables,
               "params": optax.apply_updates(variables["params"], updates)}
serving, _ = jaxq.convert(qat, variables, ranges=variables["quant_ranges"])
y = qat.with_mode("serve").apply(serving, x)
```

Learned ranges (``QuantSpec(..., learn="lsq")`` or ``"pact"``) are entries
of the params tree (linen) or ``nnx.Param`` attributes (nnx) of the quantized
layers, so the optimizer above trains them with the weights; see
`jaxq.learned` for their gradients and `jaxq.flax.core` for their names.

`int8_dot_general` is a drop-in ``dot_general`` for a layer's
``dot_general`` field whose forward multiplies int8 values (int8 x int8 ->
int32) and whose backward is the straight-through estimator in float: the
QAT step with the forward on the integer path, for accelerators where int8
matmuls outrun float ones. ``jaxq.quantize_model(model, rules, "qat",
int8_forward=True)`` does the same by rules, with the rules' specs and
ranges (see `jaxq.flax.int8_qat`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxq import flax as jaxq_flax

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]],
                         tuple[Sequence[int], Sequence[int]]]
INT8_QMAX = 127.0


def finetune_steps(original_steps: int, fraction: float = 0.1) -> int:
  """``ceil(fraction * original_steps)``, at least 1: the QAT schedule."""
  if original_steps <= 0:
    raise ValueError(f"finetune_steps: original_steps must be positive, got "
                     f"{original_steps}.")
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"finetune_steps: fraction must be in (0, 1], got "
                     f"{fraction}.")
  return max(1, math.ceil(fraction * original_steps))


def schedule(base_lr: float, original_steps: int, *,
             lr_fraction: float = 0.01, steps_fraction: float = 0.1,
             final_fraction: float = 0.0) -> optax.Schedule:
  """Cosine decay from ``lr_fraction * base_lr`` over the QAT schedule.

  Args:
    base_lr: the initial learning rate of the original (float) training.
    original_steps: the number of steps of the original training.
    lr_fraction: the QAT learning rate relative to ``base_lr``.
    steps_fraction: the QAT schedule relative to ``original_steps``
      (see `finetune_steps`).
    final_fraction: the final learning rate relative to the QAT initial one.
  """
  if base_lr <= 0 or not 0.0 < lr_fraction <= 1.0:
    raise ValueError(f"schedule: need base_lr > 0 and lr_fraction in (0, 1], "
                     f"got base_lr={base_lr}, lr_fraction={lr_fraction}.")
  if not 0.0 <= final_fraction <= 1.0:
    raise ValueError(f"schedule: final_fraction must be in [0, 1], got "
                     f"{final_fraction}.")
  return optax.cosine_decay_schedule(
      init_value=lr_fraction * base_lr,
      decay_steps=finetune_steps(original_steps, steps_fraction),
      alpha=final_fraction)


def recipe(base_lr: float, original_steps: int, *,
           optimizer: Callable[..., optax.GradientTransformation] = optax.adam,
           lr_fraction: float = 0.01, steps_fraction: float = 0.1,
           final_fraction: float = 0.0, **optimizer_kwargs: Any
           ) -> optax.GradientTransformation:
  """The QAT optimizer: ``optimizer(learning_rate=schedule(...))``.

  Args:
    base_lr, original_steps, lr_fraction, steps_fraction, final_fraction:
      as for `schedule`.
    optimizer: an optax optimizer factory taking ``learning_rate`` (the one
      the float model was trained with, usually).
    **optimizer_kwargs: passed on to ``optimizer`` (e.g. ``weight_decay``).

  Returns:
    An ``optax.GradientTransformation``; run it for
    ``finetune_steps(original_steps, steps_fraction)`` steps.
  """
  return optimizer(learning_rate=schedule(
      base_lr, original_steps, lr_fraction=lr_fraction,
      steps_fraction=steps_fraction, final_fraction=final_fraction),
                   **optimizer_kwargs)


def init_learned(qmodel: Any, *args: Any,
                 **kwargs: Any) -> Any:
  """Creates the learned ranges of a QAT model, called like the model.

  Learned weight ranges start from the weight's own max; learned activation
  ranges from the calibrated ranges when the model has them (linen:
  ``variables["quant_ranges"]``; nnx: ``QuantRange`` variables), else from
  this batch's range. Parameters that exist already are kept.

  linen: ``init_learned(qat, variables, x)`` runs ``qat.apply(variables, x,
  mutable=["params"])`` and returns the variables with the learned entries
  added to ``params``. nnx: ``init_learned(qat, x)`` calls ``qat(x)``, which
  adds ``nnx.Param`` attributes in place, and returns ``qat``; build the
  optimizer afterwards.
  """
  return jaxq_flax.init_learned(qmodel, *args, **kwargs)


def _int8_rows(x: jax.Array, contracting: Sequence[int]
               ) -> tuple[jax.Array, jax.Array]:
  """Symmetric narrow int8 with one scale per slice over ``contracting``:
  ``(values int8, scale float32 keepdims)``."""
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=tuple(contracting), keepdims=True)
  scale = jnp.where(amax > 0, amax / INT8_QMAX, 1.0)
  values = jnp.clip(jnp.round(x / scale), -INT8_QMAX, INT8_QMAX)
  return values.astype(jnp.int8), scale


def _output_scale(lhs_scale: jax.Array, rhs_scale: jax.Array,
                  dims: DimensionNumbers) -> jax.Array:
  """The product of the operands' scales, laid out like dot_general's output
  (batch axes, lhs free axes, rhs free axes)."""
  (lhs_c, rhs_c), (lhs_b, rhs_b) = dims
  lhs_free = [a for a in range(lhs_scale.ndim) if a not in (*lhs_c, *lhs_b)]
  rhs_free = [a for a in range(rhs_scale.ndim) if a not in (*rhs_c, *rhs_b)]
  lhs = jnp.transpose(lhs_scale, (*lhs_b, *lhs_free, *lhs_c))
  rhs = jnp.transpose(rhs_scale, (*rhs_b, *rhs_free, *rhs_c))
  lhs = lhs.reshape(lhs.shape[:len(lhs_b) + len(lhs_free)] +
                    (1,) * len(rhs_free))
  rhs = rhs.reshape(rhs.shape[:len(rhs_b)] + (1,) * len(lhs_free) +
                    rhs.shape[len(rhs_b):len(rhs_b) + len(rhs_free)])
  return lhs * rhs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _int8_dot(dims: DimensionNumbers, lhs: jax.Array, rhs: jax.Array
              ) -> jax.Array:
  return _int8_dot_fwd(dims, lhs, rhs)[0]


def _int8_dot_fwd(dims, lhs, rhs):
  (lhs_c, rhs_c), _ = dims
  lhs_q, lhs_scale = _int8_rows(lhs, lhs_c)
  rhs_q, rhs_scale = _int8_rows(rhs, rhs_c)
  acc = jax.lax.dot_general(lhs_q, rhs_q, dims,
                            preferred_element_type=jnp.int32)
  out = acc.astype(jnp.float32) * _output_scale(lhs_scale, rhs_scale, dims)
  dtype = jnp.result_type(lhs.dtype, rhs.dtype)
  # The int8 values and scales are the residuals: a quarter of the floats.
  return out.astype(dtype), (lhs_q, lhs_scale, rhs_q, rhs_scale)


def _int8_dot_bwd(dims, residuals, g):
  lhs_q, lhs_scale, rhs_q, rhs_scale = residuals
  dtype = g.dtype  # The operands' result type.
  lhs_hat = (lhs_q.astype(jnp.float32) * lhs_scale).astype(dtype)
  rhs_hat = (rhs_q.astype(jnp.float32) * rhs_scale).astype(dtype)
  # The ranges are the operands' own, so the clipped straight-through
  # estimator is the identity: the float matmul's gradient at the
  # dequantized operands, as for fake_quant.
  _, vjp = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dims), lhs_hat,
                   rhs_hat)
  return vjp(g)


_int8_dot.defvjp(_int8_dot_fwd, _int8_dot_bwd)


def int8_dot_general(lhs: jax.Array, rhs: jax.Array,
                     dimension_numbers: DimensionNumbers,
                     precision: Any = None,
                     preferred_element_type: Any = None) -> jax.Array:
  """``lax.dot_general`` for QAT with an int8 forward and an STE backward.

  Both operands are quantized to symmetric narrow-range int8 with dynamic
  scales, one per slice over the contracting axes: per token for the
  activation (lhs) and per output channel for the weight (rhs), i.e. W8A8
  K-C, the scales of `jaxq.fake_quant` with `PerToken` and `PerChannel`.
  The forward multiplies the int8 values with int32 accumulation and
  rescales; it equals the float matmul of the fake-quantized operands up to
  float accumulation order. The backward is the float matmul's gradient at
  the dequantized operands (the straight-through estimator; the ranges are
  the operands' own, so no element is clipped).

  Use it as a layer's op, e.g. ``nn.Dense(..., dot_general=
  jaxq.qat.int8_dot_general)``. ``precision`` does not apply to the integer
  matmul and is ignored; the output has the operands' float dtype, or
  ``preferred_element_type``.
  """
  del precision
  dims = tuple(tuple(tuple(int(a) for a in axes) for axes in pair)
               for pair in dimension_numbers)
  out = _int8_dot(dims, lhs, rhs)
  return out if preferred_element_type is None else out.astype(
      preferred_element_type)
