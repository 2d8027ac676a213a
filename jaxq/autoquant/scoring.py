"""Scoring every (group, candidate) from one compiled program.

The selector is data. A weight-only candidate changes nothing but the
layer's kernel, so the float model's own jitted ``apply_fn`` computes the
model with any layers in any candidate formats when their kernels in the
variables are replaced by the candidates' effective kernels
(`jaxq.autoquant.candidates.LayerWeight.effective`: the dequantized weight,
divided by AWQ's factors): kernels of the same shape and dtype, so no
recompilation. That is exactly what the model quantized by the candidate's
rule computes in qat mode (fake-quant weights on the stored range), and the
serve mode up to float accumulation order. For candidates with an activation
spec (W8A8), the model is quantized once by act-only rules with
``switchable=True`` (`jaxq.flax.ModelAdapter.quantize`): each layer's flag,
also data, turns its activation quantization on. So one configuration of
the whole model is one value of the variables, and one compilation scores
them all: the (layer -> candidate) choice is an integer per layer realised
as data, never as program structure.

Two proxies of the loss increase a group's candidate causes
(``Scorer.measure`` and ``fisher_scores``):

* ``"loss"``: measured. The calibration loss ``loss_fn(output, reference,
  batch)`` (``reference`` the float model's output on the batch) with only
  that group in the candidate format, minus the float model's. It sees
  everything the format does (activation quantization, interactions inside
  the group, non-linear effects), costs one forward pass over the
  calibration batches per (group, candidate), and is the default.
* ``"fisher"``: second order. With ``g_b`` the gradient of batch ``b``'s loss
  with respect to a kernel (one compiled backward pass per batch, all
  kernels at once), the empirical Fisher diagonal ``F = sum_b g_b^2``
  and the candidate's weight error ``dW``, ``score = 1/2 sum F dW^2``.
  Justification: to second order the loss changes by ``g^T dW + 1/2 dW^T H
  dW``; at a (locally) trained model the mean gradient is small, ``H`` is
  approximated by the Fisher ``E[g g^T]``, and rounding errors that are
  zero-mean and uncorrelated across weights leave only its diagonal in
  expectation. It costs one backward pass per batch in all, whatever the
  number of candidates, so it is the choice for large models (SmolLM2's 210
  layers x 5 candidates: 840 forward passes for ``"loss"``), but it sees
  weights only (activation specs raise) and needs a loss whose gradient is
  informative (a next-token NLL, not a distance to the float output, whose
  gradient at the float model is zero).

Both are additive over groups by construction (each group is scored alone),
which makes the choice a knapsack (`jaxq.autoquant.knapsack`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.flax import batch as batch_lib
from jaxq.flax.adapter import ModelAdapter

LossFn = Callable[[Any, Any, Any], jax.Array]


def _loss_of(apply_fn: Callable[..., Any], loss_fn: LossFn,
             counter: list[int]) -> Callable[[Any, Any, Any], jax.Array]:
  """``(variables, batch, reference) -> loss``, jitted; ``counter[0]``
  counts its traces (compilations)."""

  def run(variables: Any, batch: Any, reference: Any) -> jax.Array:
    counter[0] += 1
    args, kwargs = batch_lib.batch_arguments(batch)
    return jnp.asarray(loss_fn(apply_fn(variables, *args, **kwargs),
                               reference, batch), jnp.float32)

  return jax.jit(run)


@dataclasses.dataclass
class Scorer:
  """The model to score configurations on, compiled once.

  Attributes:
    adapter: the model the variables run in: the float model, or the model
      quantized by act-only switchable rules (W8A8 candidates).
    base: its variables with every layer in float (flags off).
    batches, references: the calibration batches and the float model's
      output on each.
    loss: the jitted ``(variables, batch, reference) -> loss``.
    counter: ``[compilations of loss]``.
    apply_fn: the adapter's jitted ``apply_fn``, shared by ``loss`` and
      every ``eval_fn`` call (so neither recompiles per configuration).
    switchable: the layers whose activation quantization has a flag.
  """

  adapter: ModelAdapter
  base: Any
  batches: Sequence[Any]
  references: Sequence[Any]
  loss: Callable[[Any, Any, Any], jax.Array]
  counter: list[int]
  apply_fn: Callable[..., Any]
  switchable: tuple[str, ...] = ()

  @classmethod
  def create(cls, adapter: ModelAdapter, loss_fn: LossFn,
             batches: Sequence[Any], references: Sequence[Any],
             switchable: tuple[str, ...] = ()) -> "Scorer":
    base = adapter.variables
    if switchable:
      base = adapter.set_enabled({p: False for p in switchable})
    counter = [0]
    apply_fn = adapter.apply_fn()  # One jitted function for every use.
    return cls(adapter, base, batches, references,
               _loss_of(apply_fn, loss_fn, counter), counter, apply_fn,
               switchable)

  def variables(self, kernels: Mapping[str, jax.Array],
                act_on: Sequence[str] = ()) -> Any:
    """The base variables with ``kernels`` (path -> kernel) written and the
    activation quantization of the layers at ``act_on`` switched on."""
    variables = self.base
    if act_on:
      variables = self.adapter.set_enabled({p: True for p in act_on},
                                           variables)
    for path, kernel in kernels.items():
      variables = self.adapter.set_kernel(path, kernel, variables)
    return variables

  def measure(self, variables: Any) -> float:
    """The calibration loss, summed over the batches, of ``variables``."""
    total = 0.0
    for batch, reference in zip(self.batches, self.references):
      total += float(self.loss(variables, batch, reference))
    return total

  @property
  def compilations(self) -> int:
    return self.counter[0]


def fisher_diagonals(scorer: Scorer, loss_fn: LossFn, paths: Sequence[str],
                     counter: list[int]) -> dict[str, jax.Array]:
  """``sum_b (d loss_b / d kernel)^2`` per layer at ``paths``, in the
  scorer's model at its base variables, from one compiled backward pass
  per batch (``counter[0]`` counts its traces)."""
  adapter, base, apply_fn = scorer.adapter, scorer.base, scorer.apply_fn
  batches, references = scorer.batches, scorer.references

  def loss(kernels: Mapping[str, jax.Array], batch: Any, reference: Any
           ) -> jax.Array:
    counter[0] += 1
    variables = base
    for path, kernel in kernels.items():
      variables = adapter.set_kernel(path, kernel, variables)
    args, kwargs = batch_lib.batch_arguments(batch)
    return jnp.asarray(loss_fn(apply_fn(variables, *args, **kwargs),
                               reference, batch), jnp.float32)

  @jax.jit
  def squared_grads(kernels, batch, reference):
    grads = jax.grad(loss)(kernels, batch, reference)
    return jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), grads)

  kernels = {p: adapter.get_weight(p, base)[0] for p in paths}
  total = None
  for batch, reference in zip(batches, references):
    squares = squared_grads(kernels, batch, reference)
    total = squares if total is None else jax.tree.map(jnp.add, total,
                                                       squares)
  return total


@jax.jit
def fisher_score(fisher: jax.Array, kernel: jax.Array, approx: jax.Array
                 ) -> jax.Array:
  """``1/2 sum F (approx - kernel)^2`` (float32)."""
  diff = approx.astype(jnp.float32) - kernel.astype(jnp.float32)
  return 0.5 * jnp.sum(fisher * jnp.square(diff))


def evaluate(eval_fn: Callable[[Any, Any], Any], apply_fn: Any,
              variables: Any) -> float:
  value = eval_fn(apply_fn, variables)
  try:
    return float(value)
  except (TypeError, ValueError):
    raise ValueError(f"auto_quantize: eval_fn must return a scalar float, "
                     f"got {value!r}.") from None


def check_finite(value: float, what: str) -> float:
  """``value``, or a ValueError saying what gave NaN/inf."""
  if not math.isfinite(value):
    raise ValueError(f"auto_quantize: the {what} is {value} (NaN or inf); "
                     f"check the loss/metric function and the data.")
  return value


def outputs(adapter: ModelAdapter, batches: Sequence[Any]) -> list[Any]:
  """The float model's output on each batch (the loss's ``reference``)."""
  apply_fn = adapter.apply_fn()
  out = []
  for batch in batches:
    args, kwargs = batch_lib.batch_arguments(batch)
    out.append(jax.tree.map(np.asarray, apply_fn(adapter.variables, *args,
                                                 **kwargs)))
  return out
