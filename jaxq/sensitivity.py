"""Sensitivity analysis: which layers lose accuracy when quantized.

``table = jaxq.sensitivity(model, variables, rules, eval_fn, data)``
quantizes one layer at a time, as ``rules`` would quantize it, with every
other layer in float, and ranks the layers by how much the eval metric drops
(the method of the PTQ literature, e.g. Wu et al. 2020, "Integer
Quantization for Deep Learning Inference"). ``jaxq.partial_quantize`` then
leaves the most sensitive layers in float, one at a time, until a metric
target is met.

Conventions (the same for flax.linen and flax.nnx models):

* ``eval_fn(apply_fn, variables) -> float`` scores a model; higher is better
  (accuracy, cosine similarity) unless ``higher_is_better=False`` (a loss).
  ``eval_fn`` brings its own evaluation data and calls ``apply_fn(variables,
  *args, **kwargs)``, jit-compiled, which runs the model being scored:
  linen's ``apply`` with ``variables`` the float variables plus, for static
  activation specs, the calibrated ``"quant_ranges"`` collection; for nnx,
  ``nnx.merge(graphdef, variables)(*args, **kwargs)`` with ``variables``
  that model's ``nnx.State`` (its ``Param``s and, for static act specs, its
  `jaxq.flax.QuantRange`s). So ``logits = apply_fn(variables, x)`` works for
  both.
* ``variables``, the float model's: linen's ``{"params": ...}``; nnx, as
  for `jaxq.calibrate`, an ``nnx.State`` loaded into a copy of the model
  (e.g. ``nnx.state(model)``) or None for the model's own. The model passed
  in is never modified; nnx models from `jaxq.quantize_model` are refused
  (pass the float model and the rules).
* ``data`` is an iterable of calibration batches in the convention of
  every workflow (`jaxq.flax.batch`: an array, a tuple of positional
  arguments, a mapping of keyword arguments, or a `jaxq.flax.Batch`). It
  calibrates static activation ranges (one `jaxq.calibrate` pass with the
  full ``rules``, shared by every
  configuration: calibrate mode computes in float, so skipping layers never
  changes another layer's range; `jaxq.act_ranges` gives each scored model
  its layers' ranges) and measures the cheap signal below.
* The cheap signal: the SQNR and MSE of each layer's quantized OUTPUT
  against its float output, on ``data``. One float pass records, for every
  quantized layer, the arguments and result of each of its calls (linen: a
  ``flax.linen.intercept_methods`` interceptor; nnx: an
  ``nnx.clone`` whose quantized layers are swapped for recording subclasses
  of their classes; see `jaxq.flax.capture`); the layer's quantized output
  is the layer's output in the model with only that layer quantized
  (everything upstream is float), recorded by the same capture pass of the
  switchable model (see Cost). A module called several times (shared
  weights) is instead run ALONE, quantized,
  on exactly its float inputs (linen: an unbound copy of the module with
  its own variables; nnx: the layer of the model quantized with only that
  layer's rule, split off with ``nnx.split``), call by call, so the number
  is the layer's own error, not compounded through its earlier calls.
  ``sqnr_db = 10 log10(sum y^2 / sum (y_q - y)^2)`` and ``mse = mean
  (y_q - y)^2`` over all output elements of all calls on all batches.
* Layers are listed in the order the model first calls them (nnx: found by
  tracing the capture pass; layers the model never calls are left out).

Cost: one calibration pass, one float evaluation and one float capture
pass; then, in either mode, ONE compilation of the model for every
configuration: the model is quantized by all the rules with an on/off flag
per layer held in its variables (`jaxq.flax.ModelAdapter.quantize(...,
switchable=True)`, `set_enabled`). In qat mode a layer that is off hands
its op the float operands; in serve mode its flag selects, by
``lax.cond`` (only one branch runs), the low-bit op on the quantized
operands (weights quantized on the fly from the float variables, as
`jaxq.convert` would store them) or the layer's float op. So each
configuration computes exactly what the model quantized (served) by that
configuration's rules alone computes, and ``eval_fn``'s ``apply_fn`` is the
same jitted function every time (an ``eval_fn`` that calls it directly
never recompiles; ``partial_quantize``'s greedy loop reuses it too). The
SQNR of a layer called once comes from one capture pass of that switchable
model with only the layer on (its input is then the float one, as if it
ran alone on it), compiled once for all layers; a shared layer is still run
alone per call (one small compilation each). In serve mode a layer's
operands are quantized inside its low-bit branch, so a layer that is off
costs only its float op.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import tqdm
from flax import nnx

from jaxq import analysis
from jaxq.analysis import Calibrated
from jaxq.flax.adapter import ModelAdapter
from jaxq.flax.batch import check_batches
from jaxq.flax.capture import Captured
from jaxq.flax.capture import LayerCall
from jaxq.flax.rules import LayerInfo
from jaxq.flax.rules import Rule
from jaxq.flax import rules as rules_lib

Batch = Any  # See `jaxq.flax.batch`: an array, a tuple, a mapping, a Batch.
ApplyFn = Callable[..., Any]
EvalFn = Callable[[ApplyFn, Any], float]
EvalMode = Literal["qat", "serve"]



# --------------------------------------------------------------------------
# Sensitivity.


@dataclasses.dataclass(frozen=True)
class LayerSensitivity:
  """One layer quantized alone.

  Attributes:
    path: the "/"-joined module path.
    module_type: the module's class name.
    metric: ``eval_fn``'s value with only this layer quantized.
    drop: how much worse than float that is, positive when worse:
      ``float - metric`` (higher is better) or ``metric - float``.
    sqnr_db: SQNR (dB) of the layer's quantized output against its float
      output on the calibration data.
    mse: mean squared error of that output.
  """

  path: str
  module_type: str
  metric: float
  drop: float
  sqnr_db: float
  mse: float


@dataclasses.dataclass(frozen=True)
class SensitivityTable:
  """Layers ranked by sensitivity, most sensitive first.

  Attributes:
    rows: one `LayerSensitivity` per quantized layer, sorted by ``drop``
      (descending), ties by ``sqnr_db`` (ascending).
    float_metric: ``eval_fn`` on the float model.
    higher_is_better: the metric's direction.
    stats: the calibration stats the static ranges came from (linen: the
      ``"quant_stats"`` collection; nnx: a ``State`` of `QuantStat`s),
      which `partial_quantize` and `jaxq.report` can reuse (``stats=``)
      instead of calibrating again.
  """

  rows: tuple[LayerSensitivity, ...]
  float_metric: float
  higher_is_better: bool = True
  stats: Any = dataclasses.field(default=None, compare=False, repr=False)

  @property
  def paths(self) -> tuple[str, ...]:
    """The layer paths, most sensitive first."""
    return tuple(row.path for row in self.rows)

  def __len__(self) -> int:
    return len(self.rows)

  def __str__(self) -> str:
    width = max([len("layer")] + [len(r.path) for r in self.rows])
    kind = max([len("type")] + [len(r.module_type) for r in self.rows])
    lines = [f"float metric {self.float_metric:.6g} ("
             f"{'higher' if self.higher_is_better else 'lower'} is better); "
             f"one layer quantized at a time, most sensitive first",
             f"{'#':>3s}  {'layer':{width}s}  {'type':{kind}s}  "
             f"{'metric':>10s}  {'drop':>10s}  {'SQNR dB':>8s}  {'MSE':>9s}"]
    for i, r in enumerate(self.rows):
      lines.append(f"{i:3d}  {r.path:{width}s}  {r.module_type:{kind}s}  "
                   f"{r.metric:10.6g}  {r.drop:10.3g}  {r.sqnr_db:8.2f}  "
                   f"{r.mse:9.3g}")
    return "\n".join(lines)


def _check_eval_mode(mode: str, what: str) -> None:
  if mode not in ("qat", "serve"):
    raise ValueError(f"{what}: mode must be 'qat' (fake-quant) or 'serve' "
                     f"(low-bit ops), got {mode!r}.")


def _evaluate(eval_fn: EvalFn, apply_fn: ApplyFn, variables: Any,
              what: str) -> float:
  value = eval_fn(apply_fn, variables)
  try:
    return float(value) + 0.0  # + 0.0 turns -0.0 into 0.0 for printing.
  except (TypeError, ValueError):
    raise ValueError(f"{what}: eval_fn must return a scalar float, got "
                     f"{value!r}.") from None


def _switched(model: ModelAdapter, rules: Sequence[Rule],
              calibrated: Calibrated, mode: EvalMode
              ) -> analysis.Switched | None:
  """The model that scores every subset of layers from one compilation (the
  benchmark replaces this with None to measure the per-subset path)."""
  return analysis.switched(model, rules, calibrated, mode)


def _switched_error_sums(switched: analysis.Switched, capture: Any,
                         path: str, batches: Sequence[Batch],
                         captured: Sequence[Captured]) -> np.ndarray:
  """`_layer_error_sums` of a layer called once, from the switchable model
  with only that layer on (so its input is the float one): one compilation
  of the capture pass serves every layer."""
  _, variables = switched.scored([path])
  sums = np.zeros(3)
  for batch, batch_calls in zip(batches, captured):
    (_, reference), = batch_calls[path]
    (_, output), = capture(variables, batch)[path]
    sums += np.asarray(analysis.error_sums(jax.tree.leaves(reference),
                                           jax.tree.leaves(output)),
                       np.float64)
  return sums


def _layer_error_sums(model: ModelAdapter, info: LayerInfo,
                      calibrated: Calibrated, mode: EvalMode,
                      calls: Sequence[LayerCall],
                      captured: Sequence[Captured]) -> np.ndarray:
  """``(signal, noise, count)`` of the layer run alone, quantized, on each
  captured float input, against its captured float output."""
  sums = np.zeros(3)
  for i, call in enumerate(calls):
    run = analysis.run_alone(model, info, calibrated, mode, call)
    for batch_calls in captured:
      arrays, reference = batch_calls[info.path][i]
      sums += np.asarray(analysis.error_sums(jax.tree.leaves(reference),
                                    jax.tree.leaves(run(arrays))),
                         np.float64)
  return sums


def sensitivity(model: nn.Module | nnx.Module,
                variables: Mapping[str, Any] | nnx.State | None,
                rules: Sequence[Rule] | Rule, eval_fn: EvalFn,
                data: Iterable[Batch], *, higher_is_better: bool = True,
                mode: EvalMode = "qat", stats: Any | None = None,
                progress: bool = True) -> SensitivityTable:
  """Ranks the layers ``rules`` quantizes by the metric drop each causes alone.

  Args:
    model: the float model, a flax.linen or flax.nnx Module.
    variables: linen: its variables (``{"params": ...}`` and any other
      collections); nnx: an ``nnx.State`` to load into a copy of the model
      (e.g. ``nnx.state(model)``), or None for the model's own.
    rules: the `Rule`s of the full quantization; each layer they quantize is
      quantized alone with the spec they give it.
    eval_fn: ``(apply_fn, variables) -> float`` (see the module docstring).
    data: calibration batches (static ranges and the output SQNR/MSE).
    higher_is_better: the metric's direction (False for a loss).
    mode: ``"qat"`` scores the fake-quant model, ``"serve"`` the low-bit ops
      (same numbers up to float accumulation order).
    stats: what an earlier calibration pass with the same rules recorded
      (linen: the ``"quant_stats"`` collection; nnx: the ``State`` of
      `jaxq.flax.QuantStat`s, e.g. a table's ``stats``), to skip
      calibrating again.
    progress: show a tqdm bar over the layers.

  Returns:
    A `SensitivityTable`, most sensitive layer first.

  Raises:
    ValueError: for a model that is not a float linen or nnx Module (e.g.
      one from `jaxq.quantize_model`), variables or stats of the wrong kind,
      no batches, rules that quantize no layer, or an ``eval_fn`` that does
      not return a scalar.
  """
  what = "jaxq.sensitivity"
  model = analysis.analysed(model, variables, what)
  _check_eval_mode(mode, what)
  rules = rules_lib.check_rules(rules)
  batches = check_batches(data, what)
  calibrated = analysis.calibrate_layers(model, rules, batches, stats,
                                        what=what)
  layers = calibrated.quantized
  if not layers:
    raise ValueError(f"{what}: the rules quantize none of the model's layers "
                     f"{sorted(calibrated.layers)}.")
  float_metric = _evaluate(
      eval_fn, *analysis.scored(model, None, calibrated, mode), what)
  float_capture = model.capture(layers)
  float_calls = [float_capture(model.variables, batch) for batch in batches]
  switched = _switched(model, rules, calibrated, mode)
  switched_capture = switched and switched.adapter.capture(layers)

  rows = []
  for path, info in tqdm.tqdm(layers.items(), desc="sensitivity",
                              unit="layer", disable=not progress):
    scored = (switched.scored([path]) if switched else analysis.scored(
        model, analysis.single_layer_rules(info), calibrated, mode))
    metric = _evaluate(eval_fn, *scored, what)
    # A stacked layer (scan over layers) switches the whole stack: its
    # later layers would see quantized inputs, so it runs alone instead.
    if switched and len(float_capture.calls[path]) == 1 and not info.stacked:
      signal, noise, count = _switched_error_sums(
          switched, switched_capture, path, batches, float_calls)
    else:
      signal, noise, count = _layer_error_sums(
          model, info, calibrated, mode, float_capture.calls[path],
          float_calls)
    drop = float_metric - metric if higher_is_better else metric - float_metric
    rows.append(LayerSensitivity(
        path=path, module_type=info.module_type, metric=metric, drop=drop,
        sqnr_db=analysis.sqnr_db(signal, noise),
        mse=float(noise / max(count, 1.0))))
  rows.sort(key=lambda r: (-r.drop, r.sqnr_db))
  return SensitivityTable(rows=tuple(rows), float_metric=float_metric,
                          higher_is_better=higher_is_better,
                          stats=calibrated.stats)


# --------------------------------------------------------------------------
# Partial quantization.


@dataclasses.dataclass(frozen=True)
class PartialQuantization:
  """What `partial_quantize` chose.

  Attributes:
    rules: the rules to use: a skip rule per layer left in float, then the
      original rules.
    skipped: the paths left in float, most sensitive first.
    metric: ``eval_fn`` on the model quantized with ``rules``.
    float_metric: ``eval_fn`` on the float model.
    target: the metric the result had to reach (at least, or at most when
      lower is better).
    history: the metric with 0, 1, 2, ... layers left in float, as tried.
    table: the sensitivity ranking the layers were skipped in.
  """

  rules: tuple[Rule, ...]
  skipped: tuple[str, ...]
  metric: float
  float_metric: float
  target: float
  history: tuple[float, ...]
  table: SensitivityTable

  def __str__(self) -> str:
    lines = [f"float {self.float_metric:.6g}, target {self.target:.6g}: "
             f"{len(self.skipped)} of {len(self.table)} layers left in float"
             f", metric {self.metric:.6g}",
             f"  all quantized  -> {self.history[0]:.6g}"]
    lines += [f"  skip {path}  -> {value:.6g}" for path, value in
              zip(self.skipped, self.history[1:])]
    return "\n".join(lines)


def metric_target(float_metric: float, max_drop: float, relative: bool,
                  higher_is_better: bool) -> float:
  """The worst acceptable metric: float minus (or plus) the allowed drop."""
  if not max_drop >= 0.0:
    raise ValueError(f"partial_quantize: max_drop must be >= 0, got "
                     f"{max_drop}.")
  allowed = max_drop * abs(float_metric) if relative else max_drop
  return float_metric - allowed if higher_is_better else float_metric + allowed


def skip_rules(paths: Sequence[str], rules: Sequence[Rule]
               ) -> tuple[Rule, ...]:
  """``rules`` with the layers at ``paths`` left in float (skip rules first)."""
  return tuple(Rule(re.escape(p), skip=True) for p in paths) + tuple(rules)


def partial_quantize(model: nn.Module | nnx.Module,
                     variables: Mapping[str, Any] | nnx.State | None,
                     rules: Sequence[Rule] | Rule, eval_fn: EvalFn,
                     data: Iterable[Batch], *, max_drop: float = 0.01,
                     relative: bool = True, higher_is_better: bool = True,
                     table: SensitivityTable | None = None,
                     max_skipped: int | None = None, mode: EvalMode = "qat",
                     progress: bool = True) -> PartialQuantization:
  """Leaves the most sensitive layers in float until a metric target is met.

  Greedy, in sensitivity order: evaluates the model quantized with
  ``rules``; while the metric misses the target, adds a skip rule for the
  next most sensitive layer and evaluates again. The target is the float
  metric minus ``max_drop`` (``relative``: times ``|float metric|``, so
  ``max_drop=0.01`` means within 1% of float), plus instead of minus when
  lower is better.

  Args:
    model, variables, rules, eval_fn, data, higher_is_better, mode: as for
      `sensitivity`.
    max_drop: the allowed drop from the float metric (>= 0).
    relative: ``max_drop`` is a fraction of the float metric (True) or an
      absolute amount (False).
    table: a `sensitivity` table of the same model, rules, eval_fn and data
      (its ``stats`` give the static ranges); made here when None.
    max_skipped: the most layers that may stay in float; None for no limit.
    progress: progress bars.

  Returns:
    A `PartialQuantization` with the rules, the skipped layers and the
    metric reached (for either API, ``jaxq.quantize_model(model,
    result.rules)`` with the ranges ``jaxq.act_ranges(qmodel,
    result.table.stats)`` is the model that reached it). When only the float
    model meets the target (every layer skipped), that is the result, with
    a `UserWarning` saying so.

  Raises:
    ValueError: when the target is still missed with ``max_skipped``
      layers in float (naming the best metric reached), or as `sensitivity`.
  """
  what = "jaxq.partial_quantize"
  analysed = analysis.analysed(model, variables, what)
  _check_eval_mode(mode, what)
  rules = rules_lib.check_rules(rules)
  batches = check_batches(data, what)
  if table is None:
    table = sensitivity(model, variables, rules, eval_fn, batches,
                        higher_is_better=higher_is_better, mode=mode,
                        progress=progress)
  elif table.higher_is_better != higher_is_better:
    raise ValueError(f"{what}: the table was made with higher_is_better="
                     f"{table.higher_is_better}, but higher_is_better="
                     f"{higher_is_better} was passed.")
  if max_skipped is not None and max_skipped < 0:
    raise ValueError(f"{what}: max_skipped must be >= 0 or None, got "
                     f"{max_skipped}.")
  calibrated = analysis.calibrate_layers(analysed, rules, batches,
                                        table.stats, what=what)
  target = metric_target(table.float_metric, max_drop, relative,
                         higher_is_better)
  meets = ((lambda m: m >= target) if higher_is_better
           else (lambda m: m <= target))
  order = table.paths
  limit = len(order) if max_skipped is None else min(max_skipped, len(order))
  switched = _switched(analysed, rules, calibrated, mode)
  history: list[float] = []
  with tqdm.tqdm(total=limit + 1, desc="partial quantize", unit="model",
                 disable=not progress) as bar:
    for k in range(limit + 1):
      candidate = skip_rules(order[:k], rules)
      if k == len(order):  # Everything in float: the float model itself.
        metric = table.float_metric
      else:
        scored = (switched.scored(set(switched.paths) - set(order[:k]))
                  if switched else analysis.scored(analysed, candidate,
                                                   calibrated, mode))
        metric = _evaluate(eval_fn, *scored, what)
      history.append(metric)
      bar.update(1)
      if meets(metric):
        if k == len(order):
          warnings.warn(f"{what}: the target {target:.6g} is met only with "
                        f"every quantized layer ({k}) left in float.",
                        UserWarning, stacklevel=2)
        return PartialQuantization(
            rules=candidate, skipped=tuple(order[:k]), metric=metric,
            float_metric=table.float_metric, target=target,
            history=tuple(history), table=table)
  best = max(history) if higher_is_better else min(history)
  raise ValueError(
      f"{what}: the target {target:.6g} (float {table.float_metric:.6g}, "
      f"max_drop {max_drop}{' relative' if relative else ''}) is not met "
      f"with up to {limit} of {len(order)} layers left in float; the best "
      f"metric reached was {best:.6g} (history {history}). Allow more "
      f"skipped layers or a larger max_drop.")
