"""Flax integration: `quantize_model` with `Rule`s, for linen and nnx.

```python
rules = [jaxq.Rule(r".*head", skip=True),
         jaxq.Rule(r".*", weight=QuantSpec("int8", PerChannel(axis=-1)),
                   act=QuantSpec("int8", PerToken()))]

# linen: a QuantizedLinen with init/apply taking the model's own variables.
qmodel = jaxq.quantize_model(model, rules, mode="qat")
y = qmodel.apply(variables, x)

# nnx: a copy of the model whose layers are quantized, sharing its state.
qmodel = jaxq.quantize_model(nnx_model, rules, mode="qat")
y = qmodel(x)
```

Modes (see `jaxq.flax.core` for what each does to weights and inputs):

* ``"qat"``: fake-quant with a straight-through gradient on the weights and
  input activations of matched layers; trainable with optax.
* ``"calibrate"``: computes in float and records observer states: linen in
  the ``"quant_stats"`` collection (``apply(..., mutable=["quant_stats"])``),
  nnx in `QuantStat` variables. NaN/inf in a batch raises a ValueError
  naming the layer unless ``on_nonfinite="count"``.
* ``"serve"``: weights are `QArray`s (from `jaxq.convert`, or quantized on the
  fly from float) and matmuls and convolutions run on the low-bit values
  through `jaxq.dot_general`, `jaxq.einsum` and `jaxq.conv`.

Static activation ranges (act specs with ``dynamic=False``) come from
calibration: `act_ranges` finalizes them from the stats with the observers'
``finalize``; `jaxq.convert` includes them in the serving variables. The
docstrings of `jaxq.flax.linen_intercept` and `jaxq.flax.nnx_layers` list
the covered layers, those of `jaxq.flax.linen` and `jaxq.flax.nnx_variables`
the variable collections.

A rule's ``kv_cache`` gives matching attention modules a quantized KV cache
(`jaxq.flax.kv_cache`): Flax's ``MultiHeadDotProductAttention(decode=True)``
in linen, ``nnx.MultiHeadAttention`` decoding in nnx, and jaxq's
`KVCacheAttention` (linen) / `NnxKVCacheAttention` (nnx) for a model's own
attention. Static per-head cache ranges are calibrated with the act ranges
(`jaxq.flax.kv_ranges`).

Workflows reach a model through ``adapt(model, variables)``, a
`ModelAdapter` (`jaxq.flax.adapter`): the one place that tells linen from
nnx. Batches follow one convention (`jaxq.flax.batch`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
from flax import nnx as flax_nnx

from jaxq import calibration
from jaxq.flax import core
from jaxq.flax import int8_qat
from jaxq.flax import linen
from jaxq.flax import linen_adapter
from jaxq.flax import nnx
from jaxq.flax import rules as rules_lib
from jaxq.flax.adapter import ModelAdapter
from jaxq.flax.batch import Batch
from jaxq.flax.core import LayerQuant
from jaxq.flax.core import Mode
from jaxq.flax.kv_cache import KVCacheAttention
from jaxq.flax.kv_cache import NnxKVCacheAttention
from jaxq.flax.linen import QuantizedLinen
from jaxq.flax.linen_adapter import LinenAdapter
from jaxq.flax.linen_variables import SCAN_AXES
from jaxq.flax.nnx_adapter import NnxAdapter
from jaxq.flax.nnx_variables import QuantFixed
from jaxq.flax.nnx_variables import QuantRange
from jaxq.flax.nnx_variables import QuantStat
from jaxq.flax.rules import LayerInfo
from jaxq.flax.rules import Rule


def quantize_model(model: nn.Module | flax_nnx.Module,
                   rules: Sequence[Rule] | Rule, mode: Mode = "qat", *,
                   on_nonfinite: core.OnNonfinite = "raise",
                   observer_for: core.ObserverFor = calibration.observer_for,
                   int8_forward: bool = False, backward: str = "ste",
                   rngs: flax_nnx.Rngs | None = None
                   ) -> QuantizedLinen | flax_nnx.Module:
  """Inserts quantization into a Flax model, by rules.

  Args:
    model: a linen module (unbound) or an nnx module.
    rules: `Rule`s tried in order; the first whose regex fully matches a
      layer's "/"-joined path (and whose ``module_types`` fit) applies.
    mode: ``"qat"``, ``"calibrate"`` or ``"serve"`` (see the module doc).
    on_nonfinite: in calibrate mode, ``"raise"`` on NaN/inf in a batch (a
      ValueError naming the layer; from inside ``jit`` it surfaces as a
      ``JaxRuntimeError`` carrying that message) or ``"count"`` them.
    observer_for: picks the activation observer of a static act spec;
      `jaxq.calibration.observer_for` (from ``spec.calibration``) by default.
    int8_forward: in qat mode, the Dense/DenseGeneral/Einsum (nnx: Linear,
      LinearGeneral, Einsum) forwards multiply int8 values (int8 x int8 ->
      int32, equal to the fake-quant forward up to float32 accumulation)
      with the fake-quant straight-through backward. Needs integer weight
      and act specs (no ``learn``); other specs on those layers raise a
      ValueError naming the layer. Scales constant along the contraction
      (T/C weights, T/K activations) take one int8 matmul, others
      `jaxq.dot_general`'s grouped one (see `jaxq.flax.int8_qat`). Convolutions and
      embeddings keep fake-quant. Kept by ``with_mode`` (linen); ignored
      outside qat mode.
    backward: in qat mode, the matmul layers' backward (see
      `jaxq.flax.int8_qat`): ``"ste"`` (default) the exact straight-through
      gradient; ``"float"`` the backward matmuls take the float operands
      (as Qwix and AQT; fake-quant or int8 forward; convolutions and
      ``Embed.attend`` keep the STE); ``"int8"`` (with ``int8_forward``)
      int8 x int8 -> int32 backward matmuls on the gradient quantized per
      token / per channel with stochastic rounding, whose key comes from
      ``apply(..., rngs={"jaxq": key})`` (linen) or ``rngs`` (nnx). Kept by
      ``with_mode``; ignored outside qat mode.
    rngs: nnx with ``backward="int8"`` only: the ``nnx.Rngs`` whose
      ``jaxq`` stream (or default) the layers draw their rounding keys
      from, advancing on every call.

  Returns:
    linen: a `QuantizedLinen` whose ``init``/``apply`` take the original
    model's variables. nnx: a copy of ``model`` (the original is untouched)
    whose matched layers are quantized and whose state has the original's
    paths, plus jaxq variables (`QuantStat`, `QuantRange`).

  Raises:
    ValueError: for an unknown mode or backward (``"int8"`` without
      ``int8_forward``, nnx without ``rngs``), malformed rules, or (nnx
      here, linen at the first ``init``/``apply``) a spec that cannot apply
      to a layer's weight or backward, naming the layer's path and shapes.
  """
  core.check_mode(mode)
  int8_qat.check_backward(backward, int8_forward)
  core.check_on_nonfinite(on_nonfinite)
  rules = rules_lib.check_rules(rules)
  if isinstance(model, nn.Module):
    if rngs is not None:
      raise ValueError("quantize_model: rngs is for nnx models; a linen "
                       "model takes backward='int8''s key in apply(..., "
                       "rngs={'jaxq': key}).")
    return linen.quantize_linen(model, rules, mode, on_nonfinite, observer_for,
                                int8_forward, backward)
  if isinstance(model, flax_nnx.Module):
    if (rngs is None) != (backward != "int8"):
      raise ValueError(
          f"quantize_model: an nnx model with backward='int8' needs "
          f"rngs=nnx.Rngs(jaxq=seed) for its gradient's stochastic rounding, "
          f"and takes rngs with it only; got backward={backward!r}, "
          f"rngs={rngs!r}.")
    return nnx.quantize_nnx(model, rules, mode, on_nonfinite, observer_for,
                            int8_forward, backward, rngs)
  raise ValueError(f"quantize_model: expected a flax.linen or flax.nnx "
                   f"Module, got {type(model).__name__}.")


def adapt(model: Any, variables: Any = None, *, what: str = "jaxq"
          ) -> ModelAdapter:
  """The `ModelAdapter` of a linen or nnx model and its variables.

  The one place that tells the Flax APIs apart; see `jaxq.flax.adapter`
  for the protocol (layers, capture, weights, statistics and ranges).

  Args:
    model: a float linen module, a `QuantizedLinen`, or an nnx module
      (float or from `quantize_model`).
    variables: linen: ``{"params": ...}`` (may be None where only the layers
      are read); nnx: an ``nnx.State`` loaded into a copy of the model, or
      None for the model's own state.
    what: the caller, named in errors.

  Raises:
    ValueError: for anything else, or variables of the wrong kind.
  """
  if isinstance(model, (QuantizedLinen, nn.Module)):
    if variables is not None:
      linen_adapter.check_variables(variables, what)
    if isinstance(model, QuantizedLinen):
      return LinenAdapter(model.model, variables, model)
    return LinenAdapter(model, variables)
  if isinstance(model, flax_nnx.Module):
    return NnxAdapter.of(model, variables, what)
  raise ValueError(f"{what}: expected a flax.linen or flax.nnx Module, got "
                   f"{type(model).__name__} (pass the model itself, or one "
                   f"from jaxq.quantize_model).")


def pure_variables(variables: Any) -> Any:
  """Variables as nested dicts: an ``nnx.State`` through
  ``nnx.to_pure_dict``, anything else (linen's collections) unchanged."""
  if isinstance(variables, flax_nnx.State):
    return flax_nnx.to_pure_dict(variables)
  return variables


def layers(qmodel: QuantizedLinen | flax_nnx.Module) -> dict[str, LayerInfo]:
  """Path -> `LayerInfo` (module type, rule, weight shape) of every layer.

  For linen, the layers traced so far (run ``init`` or ``apply`` once, e.g.
  under ``jax.eval_shape``); for nnx, every layer of the graph.
  """
  return adapt(qmodel, what="layers").layers()


def unmatched_rules(qmodel: QuantizedLinen | flax_nnx.Module
                    ) -> tuple[Rule, ...]:
  """The rules that matched no layer (see `layers` for linen's timing)."""
  return adapt(qmodel, what="unmatched_rules").unmatched_rules()


def act_ranges(qmodel: QuantizedLinen | flax_nnx.Module, stats: Any) -> Any:
  """Static activation ranges finalized from calibration statistics.

  Args:
    qmodel: a quantized model (any mode; linen must have been traced).
    stats: linen: the ``"quant_stats"`` collection; nnx: the
      ``nnx.state(calibrated, QuantStat)`` state.

  Returns:
    linen: the ``"quant_ranges"`` collection, for
    ``apply({"params": ..., "quant_ranges": ranges}, ...)``. nnx: a state of
    `QuantRange` variables, for ``nnx.update(qmodel, ranges)``.

  Raises:
    ValueError: for a linen model that has not traced the layers the stats
      hold (trace it first: ``jax.eval_shape(qmodel.init, key, x)`` works
      before it has ranges), or naming the layer when a range is invalid
      (non-finite, negative amax, ``amin > amax``, or 0 everywhere: a
      `jaxq.ZeroRangeError`, for a layer whose calibration input was 0).
  """
  return adapt(qmodel, what="act_ranges").act_ranges(stats)


def init_learned(qmodel: QuantizedLinen | flax_nnx.Module, *args: Any,
                 **kwargs: Any) -> Any:
  """See `jaxq.qat.init_learned`."""
  return adapt(qmodel, what="init_learned").init_learned(*args, **kwargs)


__all__ = [
    "Batch", "LayerInfo", "LayerQuant", "LinenAdapter", "Mode", "ModelAdapter",
    "NnxAdapter", "QuantFixed", "QuantRange", "QuantStat", "QuantizedLinen",
    "Rule", "SCAN_AXES",
    "act_ranges", "adapt", "init_learned", "layers", "pure_variables",
    "quantize_model", "unmatched_rules",
]
