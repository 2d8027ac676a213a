"""What the analyses (`jaxq.sensitivity`, `jaxq.report`) share.

* `analysed`: the `jaxq.flax.ModelAdapter` of a float model, refusing a
  model from `jaxq.quantize_model` and variables of the wrong kind;
* `calibrate_layers`: one `jaxq.calibrate` pass of the model quantized by
  the rules in calibrate mode (or given ``stats``), its layers in call
  order and the static act ranges each rule finalizes (`Calibrated`);
* `scored`, `run_alone`: the ``(apply_fn, variables)`` of the model quantized
  by some rules with those ranges, and one layer run alone on its captured
  float inputs;
* `switched`: the same for any subset of the quantized layers, in qat or
  serve mode, from one compilation (each layer's quantization switched on
  or off by a flag in the variables, `jaxq.flax.ModelAdapter.set_enabled`);
* `error_sums`, `sqnr_db`: the SQNR arithmetic of both.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Collection, Sequence

import jax
import jax.numpy as jnp

from jaxq import flax as jaxq_flax
from jaxq.ptq import calibration_pass
from jaxq.flax import core
from jaxq.flax.adapter import ModelAdapter
from jaxq.flax.capture import LayerCall
from jaxq.flax.rules import LayerInfo
from jaxq.flax.rules import Rule

ApplyFn = Callable[..., Any]
LayerRun = Callable[[Sequence[jax.Array]], Any]


@jax.jit
def error_sums(reference: Sequence[jax.Array], approx: Sequence[jax.Array]
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(sum ref^2, sum (approx - ref)^2, element count)`` over paired arrays."""
  signal = sum(jnp.sum(jnp.square(r.astype(jnp.float32))) for r in reference)
  noise = sum(jnp.sum(jnp.square(a.astype(jnp.float32) - r.astype(jnp.float32)))
              for r, a in zip(reference, approx))
  count = sum(r.size for r in reference)
  return signal, noise, jnp.asarray(count, jnp.float32)


def sqnr_db(signal: float, noise: float) -> float:
  """``10 log10(signal / noise)`` in dB; inf for exact, -inf for no signal."""
  if noise == 0.0:
    return math.inf
  if signal == 0.0:
    return -math.inf
  return 10.0 * math.log10(signal / noise)


@dataclasses.dataclass(frozen=True)
class Calibrated:
  """What every analysis of one model and rule set shares.

  Attributes:
    layers: path -> `LayerInfo` of every quantizable layer the model calls,
      in the order of their first call (float ones included;
      ``info.quantized`` tells them apart).
    stats: what `jaxq.calibrate` records: linen's ``"quant_stats"``
      collection, nnx's ``State`` of `jaxq.flax.QuantStat` variables.
    ranges: what `jaxq.act_ranges` makes of them: linen's
      ``"quant_ranges"`` collection, nnx's ``State`` of `QuantRange`s
      (empty without static act specs).
    act_ranges: path -> ``{"amax": ...[, "amin": ...]}`` of each layer with
      a static act spec: ``ranges`` by layer, for either API.
  """

  layers: dict[str, LayerInfo]
  stats: Any
  ranges: Any
  act_ranges: dict[str, core.ActRange]

  @property
  def quantized(self) -> dict[str, LayerInfo]:
    """The layers a non-skip rule quantizes."""
    return {p: info for p, info in self.layers.items() if info.quantized}


def analysed(model: Any, variables: Any, what: str) -> ModelAdapter:
  """The adapter of a float linen or nnx model and its variables; raises a
  ValueError for anything else (a quantized model, wrong variables)."""
  adapter = jaxq_flax.adapt(model, variables, what=what)
  adapter.require_variables(what)
  if adapter.quantized:
    raise ValueError(f"{what}: pass the float model and the rules, not a "
                     f"model from jaxq.quantize_model.")
  return adapter


def calibrate_layers(adapter: ModelAdapter, rules: Sequence[Rule],
                     batches: Sequence[Any], stats: Any | None = None, *,
                     what: str) -> Calibrated:
  """The model quantized by ``rules``, calibrated: its static act ranges.

  One `jaxq.calibrate` pass over ``batches`` (skipped when ``stats``, in the
  API's container, is given); the ranges are finalized with each rule's own
  calibration method (`jaxq.act_ranges`), and the layers listed in the order
  the model first calls them (traced, abstractly, on the first batch).
  ``what`` names the caller in errors.
  """
  adapter.check_stats(stats, what)
  calibrating = adapter.quantize(rules, "calibrate")
  if stats is None:
    stats = calibration_pass.calibrate_adapter(calibrating, batches,
                                               progress=False).stats
  layers = calibrating.ordered_layers(batches[0])
  ranges = calibrating.act_ranges(stats)
  return Calibrated(layers=layers, stats=stats, ranges=ranges,
                    act_ranges=calibrating.ranges_by_path(ranges))


def single_layer_rules(info: LayerInfo) -> tuple[Rule, ...]:
  """The rule of ``info`` restricted to that layer alone."""
  # Only this layer matches; layers no rule matches stay in float.
  return (dataclasses.replace(info.rule, path_regex=re.escape(info.path)),)


def scored(adapter: ModelAdapter, rules: Sequence[Rule] | None,
           calibrated: Calibrated, mode: str) -> tuple[ApplyFn, Any]:
  """``(apply_fn, variables)`` for an ``eval_fn``: the float model (``rules``
  None) or the model quantized by ``rules`` with the calibrated ranges."""
  if rules is None:
    return adapter.apply_fn(), adapter.variables
  quantized = adapter.quantize(rules, mode).with_ranges(calibrated.act_ranges)
  return quantized.apply_fn(), quantized.variables


@dataclasses.dataclass(frozen=True)
class Switched:
  """The model quantized by all the rules, each layer's quantization on or
  off by a flag in its variables: one ``apply_fn`` (one compilation) scores
  any subset of the layers quantized.

  Attributes:
    adapter: the switchable quantized model with the calibrated ranges.
    apply_fn: its jitted ``apply_fn``, shared by every subset.
    paths: the quantized layers, in call order.
  """

  adapter: ModelAdapter
  apply_fn: ApplyFn
  paths: tuple[str, ...]

  def scored(self, quantized: Collection[str]) -> tuple[ApplyFn, Any]:
    """``(apply_fn, variables)`` with the layers at ``quantized`` quantized
    (by the rules' specs and ranges) and every other layer in float."""
    on = set(quantized)
    return self.apply_fn, self.adapter.set_enabled(
        {path: path in on for path in self.paths})


def switched(adapter: ModelAdapter, rules: Sequence[Rule],
             calibrated: Calibrated, mode: str = "qat") -> Switched:
  """The `Switched` model of ``adapter`` quantized by ``rules`` in ``mode``.

  Quantizing only the layers at a subset ``S`` this way computes what
  ``scored`` computes for rules that quantize ``S`` alone (each layer of
  ``S`` gets the spec of the rule ``rules`` give it; a layer that is off
  hands its op the float operands in qat mode, and runs its float op
  instead of the low-bit one in serve mode, where the weights of the layers
  that are on are quantized on the fly from the float variables, as
  ``scored`` quantizes them), without compiling the model per subset.
  """
  quantized = adapter.quantize(rules, mode, switchable=True).with_ranges(
      calibrated.act_ranges)
  return Switched(adapter=quantized, apply_fn=quantized.apply_fn(),
                  paths=tuple(calibrated.quantized))


def run_alone(adapter: ModelAdapter, info: LayerInfo,
              calibrated: Calibrated, mode: str, call: LayerCall) -> LayerRun:
  """``arrays -> output`` of the layer at ``info.path`` run alone, quantized
  by its rule with its calibrated range, on ``call``'s arguments."""
  quantized = adapter.quantize(single_layer_rules(info), mode).with_ranges(
      calibrated.act_ranges)
  return quantized.replay(info.path, call, mode, info.rule)
