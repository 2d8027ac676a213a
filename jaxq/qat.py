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
"""

from __future__ import annotations

import math
from typing import Any, Callable

import optax
from flax import nnx

from jaxq.flax import linen as linen_lib


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


def init_learned(qmodel: linen_lib.QuantizedLinen | nnx.Module, *args: Any,
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
  if isinstance(qmodel, linen_lib.QuantizedLinen):
    if qmodel.mode != "qat":
      raise ValueError(f"init_learned: expected a qat-mode model, got mode "
                       f"{qmodel.mode!r}; use qmodel.with_mode('qat').")
    if not args:
      raise ValueError("init_learned: for linen, pass the variables and the "
                       "model's inputs, as to qmodel.apply.")
    variables, *inputs = args
    _, updated = qmodel.apply(variables, *inputs, mutable=["params"],
                              **kwargs)
    return {**variables, "params": updated["params"]}
  if isinstance(qmodel, nnx.Module):
    qmodel(*args, **kwargs)
    return qmodel
  raise ValueError(f"init_learned: expected a model from jaxq.quantize_model, "
                   f"got {type(qmodel).__name__}.")
