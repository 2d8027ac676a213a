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
* ``data`` is an iterable of calibration batches, each the positional
  arguments of the model's call (an array, or a tuple of arrays) or a
  mapping of keyword arguments. It calibrates static activation ranges (one
  `jaxq.calibrate` pass with the full ``rules``, shared by every
  configuration: calibrate mode computes in float, so skipping layers never
  changes another layer's range; `jaxq.act_ranges` gives each scored model
  its layers' ranges) and measures the cheap signal below.
* The cheap signal: the SQNR and MSE of each layer's quantized OUTPUT
  against its float output, on ``data``. One float pass records, for every
  quantized layer, the arguments and result of each of its calls (linen: a
  ``flax.linen.intercept_methods`` interceptor, see `Capture`; nnx: an
  ``nnx.clone`` whose quantized layers are swapped for recording subclasses
  of their classes, see `NnxCapture`); each layer is then run ALONE,
  quantized, on exactly those float inputs (linen: an unbound copy of the
  module with its own variables; nnx: the layer of the model quantized with
  only that layer's rule, split off with ``nnx.split``). That is the
  layer's output in the model with only that layer quantized (everything
  upstream is float), for the price of compiling one layer instead of the
  model; a module called several times (shared weights) is measured call by
  call, each on its float input, so the number is the layer's own error,
  not compounded through its earlier calls. ``sqnr_db = 10 log10(sum y^2 /
  sum (y_q - y)^2)`` and ``mse = mean (y_q - y)^2`` over all output
  elements of all calls on all batches.
* Layers are listed in the order the model first calls them (nnx: found by
  tracing the capture pass; layers the model never calls are left out).

Cost: one float evaluation and one float capture pass, then per layer one
compile of the model for ``eval_fn`` (jit caches it per configuration) and
one of the layer alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import warnings
from typing import (Any, Callable, Collection, Iterable, Literal, Mapping,
                    Sequence)

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from flax import traverse_util

from jaxq import flax as jaxq_flax
from jaxq import ptq
from jaxq.flax import core
from jaxq.flax import linen as linen_lib
from jaxq.flax import nnx as nnx_lib
from jaxq.flax import rules as rules_lib
from jaxq.flax.linen import QuantizedLinen
from jaxq.flax.rules import LayerInfo
from jaxq.flax.rules import Rule

Batch = Any  # An array, a tuple of positional arguments, or a kwargs mapping.
ApplyFn = Callable[..., Any]
EvalFn = Callable[[ApplyFn, Any], float]
EvalMode = Literal["qat", "serve"]

CAPTURE = "jaxq_capture"


# --------------------------------------------------------------------------
# Shared machinery (also used by `jaxq.report`).


def batch_arguments(batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
  """The ``(args, kwargs)`` of ``apply(variables, *args, **kwargs)``."""
  if isinstance(batch, Mapping):
    return (), dict(batch)
  if isinstance(batch, (tuple, list)):
    return tuple(batch), {}
  return (batch,), {}


def run_batch(model: Callable[..., Any], batch: Batch) -> Any:
  """``model(*args, **kwargs)`` of one batch: linen's bound ``apply`` or an
  nnx module (`jaxq.calibrate`'s ``forward``)."""
  args, kwargs = batch_arguments(batch)
  return model(*args, **kwargs)


def check_batches(data: Iterable[Batch], what: str) -> list[Batch]:
  """``data`` as a list (it is read several times); raises if empty."""
  batches = list(data)
  if not batches:
    raise ValueError(f"{what}: data holds no batches; pass at least one "
                     f"calibration batch (an array, a tuple of arrays or a "
                     f"mapping of keyword arguments).")
  return batches


_ARRAY = object()  # Marks where a captured call argument was an array.


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One call of a captured layer, replayable on the layer alone.

  Attributes:
    module: linen: an unbound copy of the layer (``module.clone(parent=
      None)``), a root module whose variables are the model's variables at
      its path; nnx: None (the layer is taken from the model by path).
    treedef: the structure of the call's ``(args, kwargs)``.
    static: their leaves, with `_ARRAY` where the leaf was an array (the
      arrays themselves come back from the capture pass).
  """

  module: nn.Module | None
  treedef: Any
  static: tuple[Any, ...]

  @classmethod
  def of(cls, module: nn.Module | None, args: tuple[Any, ...],
         kwargs: Mapping[str, Any]) -> tuple[LayerCall, tuple[jax.Array, ...]]:
    """The call of ``module(*args, **kwargs)`` and its array arguments."""
    leaves, treedef = jax.tree.flatten((args, dict(kwargs)))
    arrays = tuple(x for x in leaves if isinstance(x, jax.Array))
    static = tuple(_ARRAY if isinstance(x, jax.Array) else x for x in leaves)
    return cls(module, treedef, static), arrays

  def arguments(self, arrays: Sequence[jax.Array]
                ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's ``(args, kwargs)`` with ``arrays`` put back in place."""
    it = iter(arrays)
    leaves = [next(it) if leaf is _ARRAY else leaf for leaf in self.static]
    return self.treedef.unflatten(leaves)


Captured = dict[str, tuple[tuple[tuple[jax.Array, ...], Any], ...]]


class Capture:
  """A jitted pass of a linen ``apply`` that records the calls of layers.

  ``captured = Capture(model.apply, paths)(variables, batch)`` maps each
  path in ``paths`` to ``((arrays, output), ...)``, one entry per call of
  that module's ``__call__`` in call order: the array arguments of the call
  and its result. ``capture.calls[path][i]`` (a `LayerCall`, recorded while
  tracing; ``calls`` lists the paths in the order of their first call)
  rebuilds call ``i``'s arguments from its arrays, so the layer can be run
  alone on exactly the inputs it saw in the model. The calls are recorded
  by a ``flax.linen.intercept_methods`` interceptor that sows them into a
  scratch collection; under a quantized model's ``apply`` the outputs are
  the quantized layer's, the arguments always what the caller passed
  (activation quantization happens inside the layer).
  """

  def __init__(self, apply: ApplyFn, paths: Collection[str]):
    self.paths = frozenset(paths)
    self.calls: dict[str, list[LayerCall]] = {}
    self._apply = apply
    self._run = jax.jit(self._trace)

  def __call__(self, variables: Any, batch: Batch) -> Captured:
    return self._run(variables, batch)

  def _trace(self, variables: Any, batch: Batch) -> Captured:
    self.calls.clear()  # Filled again by this trace, in call order.

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      module = context.module
      path = "/".join(module.path)
      if context.method_name == "__call__" and path in self.paths:
        call, arrays = LayerCall.of(module.clone(parent=None), args, kwargs)
        self.calls.setdefault(path, []).append(call)
        module.sow(CAPTURE, "calls", (arrays, out))
      return out

    args, kwargs = batch_arguments(batch)
    with nn.intercept_methods(interceptor):
      _, state = self._apply(variables, *args, mutable=[CAPTURE], **kwargs)
    flat = traverse_util.flatten_dict(dict(state.get(CAPTURE, {})))
    return {"/".join(key[:-1]): calls for key, calls in flat.items()}


class _Recording:
  """Mixin of `NnxCapture`'s layers: hands each call to the capture pass."""

  def __call__(self, *args, **kwargs):
    out = super().__call__(*args, **kwargs)
    self.jaxq_capture_sink(self.jaxq_capture_path, args, kwargs, out)
    return out


@functools.lru_cache(maxsize=None)
def _recording_class(cls: type) -> type:
  """The recording subclass of an nnx layer class (cached: one per class)."""
  return type(f"Recording{cls.__name__}", (_Recording, cls),
              {"__module__": __name__,
               "__qualname__": f"Recording{cls.__name__}"})


def _nnx_modules(model: nnx.Module) -> dict[str, nnx.Module]:
  """"/"-joined path -> module, for every module of an nnx graph."""
  return {"/".join(map(str, path)): node
          for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Module)}


class NnxCapture:
  """`Capture` for an nnx model: ``NnxCapture(model, paths)(state, batch)``.

  The same ``Captured`` and ``calls`` as `Capture`, from an ``nnx.clone``
  of ``model`` whose layers at ``paths`` are swapped for recording
  subclasses of their own classes (the way `jaxq.quantize_model` swaps in
  quantized ones; the variables and paths are unchanged, so ``state`` is
  ``nnx.state(model)``). While the jitted pass traces, each recording layer
  reports its calls to the pass, which returns their arrays and outputs.
  """

  def __init__(self, model: nnx.Module, paths: Collection[str]):
    self.paths = frozenset(paths)
    self.calls: dict[str, list[LayerCall]] = {}
    recording = nnx.clone(model)
    for path, module in list(nnx.iter_graph(recording)):
      name = "/".join(map(str, path))
      if not isinstance(module, nnx.Module) or name not in self.paths:
        continue
      new = object.__new__(_recording_class(type(module)))
      vars(new).update(vars(module))
      object.__setattr__(new, "jaxq_capture_path", name)
      if path:
        # The same surgery as `jaxq.quantize_model`'s.
        # pylint: disable-next=protected-access
        nnx_lib._replace(recording, path, new)
      else:
        recording = new
    self._graphdef = nnx.graphdef(recording)
    self._run = jax.jit(self._trace)

  def __call__(self, state: nnx.State, batch: Batch) -> Captured:
    return self._run(state, batch)

  def _trace(self, state: nnx.State, batch: Batch) -> Captured:
    self.calls.clear()  # Filled again by this trace, in call order.
    captured: dict[str, list[Any]] = {}

    def sink(path: str, args: tuple[Any, ...], kwargs: dict[str, Any],
             out: Any) -> None:
      call, arrays = LayerCall.of(None, args, kwargs)
      self.calls.setdefault(path, []).append(call)
      captured.setdefault(path, []).append((arrays, out))

    model = nnx.merge(self._graphdef, state)
    for module in _nnx_modules(model).values():
      if isinstance(module, _Recording):
        # Set on this trace's copy only, so the graphdef never holds it.
        object.__setattr__(module, "jaxq_capture_sink", sink)
    run_batch(model, batch)
    return {path: tuple(calls) for path, calls in captured.items()}


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


def _single_layer_rules(info: LayerInfo) -> tuple[Rule, ...]:
  # Only this layer matches; layers no rule matches stay in float.
  return (dataclasses.replace(info.rule, path_regex=re.escape(info.path)),)


def _replay(apply: ApplyFn, call: LayerCall) -> ApplyFn:
  """Jitted ``(variables, arrays) -> apply(variables, *args, **kwargs)`` on
  ``call``'s arguments."""

  def run(variables: Any, arrays: Sequence[jax.Array]) -> Any:
    args, kwargs = call.arguments(arrays)
    return apply(variables, *args, **kwargs)

  return jax.jit(run)


LayerRun = Callable[[Sequence[jax.Array]], Any]


@dataclasses.dataclass(frozen=True)
class LinenSubject:
  """A float linen model and its variables, as the analyses see it."""

  model: nn.Module
  variables: Mapping[str, Any]

  def calibrate(self, rules: Sequence[Rule], batches: Sequence[Batch],
                stats: Any | None = None, *, what: str) -> Calibrated:
    """Traces the model under ``rules`` and calibrates its static act ranges.

    One `jaxq.calibrate` pass over ``batches`` (skipped when ``stats``, a
    ``"quant_stats"`` collection, is given: the model is then only traced,
    with ``jax.eval_shape``); the ranges are finalized with each rule's own
    calibration method (`jaxq.act_ranges`). ``what`` names the caller in
    errors.
    """
    if stats is not None and (not isinstance(stats, Mapping)
                              or isinstance(stats, nnx.State)):
      raise ValueError(f"{what}: for a linen model, stats must be the "
                       f"{linen_lib.STATS!r} collection (e.g. a sensitivity "
                       f"table's stats), got {type(stats).__name__}.")
    qmodel = jaxq_flax.quantize_model(self.model, rules, mode="calibrate")
    params = {k: v for k, v in self.variables.items()
              if k != linen_lib.STATS}
    if stats is None:
      stats = ptq.calibrate(qmodel, params, batches, progress=False,
                            forward=run_batch).stats
    else:
      args, kwargs = batch_arguments(batches[0])
      jax.eval_shape(lambda v: qmodel.apply(
          v, *args, mutable=[linen_lib.STATS], **kwargs), params)
    ranges = jaxq_flax.act_ranges(qmodel, stats)
    flat = traverse_util.flatten_dict(ranges)  # (*path, "act", "amax")
    act_ranges: dict[str, core.ActRange] = {}
    for key, value in flat.items():
      act_ranges.setdefault("/".join(key[:-2]), {})[key[-1]] = value
    return Calibrated(layers=qmodel.layers(), stats=stats, ranges=ranges,
                      act_ranges=act_ranges)

  def scored(self, rules: Sequence[Rule] | None,
             calibrated: Calibrated | None, mode: EvalMode
             ) -> tuple[ApplyFn, Any]:
    """``(apply_fn, variables)`` for ``eval_fn``: the float model (``rules``
    None) or the model quantized by ``rules`` with the calibrated ranges."""
    if rules is None:
      return jax.jit(self.model.apply), self.variables
    qmodel = jaxq_flax.quantize_model(self.model, rules, mode=mode)
    return jax.jit(qmodel.apply), self._with_ranges(calibrated)

  def capture(self, paths: Collection[str]) -> Capture:
    """The float model's capture pass of the layers at ``paths``."""
    return Capture(self.model.apply, paths)

  def alone(self, info: LayerInfo, calibrated: Calibrated, mode: EvalMode,
            call: LayerCall) -> LayerRun:
    """``arrays -> output`` of the layer at ``info.path`` run alone,
    quantized by its rule, on ``call``'s arguments."""
    rule = dataclasses.replace(info.rule, path_regex="")  # The root module.
    layer = jaxq_flax.quantize_model(call.module, (rule,), mode=mode)
    variables = {}
    for collection, tree in self._with_ranges(calibrated).items():
      for name in info.path.split("/") if info.path else []:
        if not isinstance(tree, Mapping) or name not in tree:
          break
        tree = tree[name]
      else:
        variables[collection] = tree
    return functools.partial(_replay(layer.apply, call), variables)

  def weight(self, info: LayerInfo, what: str) -> jax.Array:
    """The layer's float weight (``kernel`` or ``embedding``)."""
    tree = self.variables.get("params", {})
    try:
      for name in info.path.split("/") if info.path else []:
        tree = tree[name]
      return tree[info.weight_name]
    except (KeyError, TypeError):
      raise ValueError(f"{what}: the params lack {info.path}/"
                       f"{info.weight_name} of shape {info.weight_shape}."
                       ) from None

  def _with_ranges(self, calibrated: Calibrated) -> dict[str, Any]:
    """The variables plus the ``"quant_ranges"`` collection (if non-empty)."""
    out = {k: v for k, v in self.variables.items() if k != linen_lib.STATS}
    if calibrated.ranges:
      out[linen_lib.RANGES] = calibrated.ranges
    return out


def _nnx_apply(model: nnx.Module) -> tuple[ApplyFn, nnx.State]:
  """``(apply_fn, state)``: ``apply_fn(state, *args, **kwargs)`` runs
  ``nnx.merge(graphdef, state)(*args, **kwargs)``, jit-compiled."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def apply(state: nnx.State, *args: Any, **kwargs: Any) -> Any:
    return nnx.merge(graphdef, state)(*args, **kwargs)

  return apply, state


@dataclasses.dataclass(frozen=True)
class NnxSubject:
  """A float nnx model, as the analyses see it.

  Attributes:
    model: a private ``nnx.clone`` of the user's model with the given
      variables loaded (the user's model is never modified).
    variables: its ``nnx.State``, what ``eval_fn`` gets for the float model.
  """

  model: nnx.Module
  variables: nnx.State

  def calibrate(self, rules: Sequence[Rule], batches: Sequence[Batch],
                stats: nnx.State | None = None, *, what: str) -> Calibrated:
    """As `LinenSubject.calibrate`: one `jaxq.calibrate` pass of the model
    quantized in calibrate mode (``stats``, a ``State`` of `QuantStat`s,
    skips it), and the layers ordered by a traced capture pass."""
    if stats is not None and not isinstance(stats, nnx.State):
      raise ValueError(f"{what}: for an nnx model, stats must be an "
                       f"nnx.State of jaxq.flax.QuantStat variables (e.g. a "
                       f"sensitivity table's stats), got "
                       f"{type(stats).__name__}.")
    qmodel = jaxq_flax.quantize_model(self.model, rules, mode="calibrate")
    if stats is None:
      stats = ptq.calibrate(qmodel, None, batches, progress=False,
                            forward=run_batch).stats
    # nnx lists layers in graph order; trace the float model to list them
    # in call order instead (as linen does), dropping layers never called.
    every = jaxq_flax.layers(qmodel)
    order = self.capture(every)
    jax.eval_shape(order, self.variables, batches[0])
    ranges = jaxq_flax.act_ranges(qmodel, stats)
    return Calibrated(
        layers={path: every[path] for path in order.calls}, stats=stats,
        ranges=ranges,
        act_ranges={"/".join(map(str, path[:-1])): var.get_value()
                    for path, var in nnx.to_flat_state(ranges)})

  def scored(self, rules: Sequence[Rule] | None,
             calibrated: Calibrated | None, mode: EvalMode
             ) -> tuple[ApplyFn, nnx.State]:
    """As `LinenSubject.scored`; the variables are the scored model's
    ``nnx.State``."""
    if rules is None:
      return _nnx_apply(self.model)
    return _nnx_apply(self._quantized(rules, calibrated, mode))

  def capture(self, paths: Collection[str]) -> NnxCapture:
    """The float model's capture pass of the layers at ``paths``."""
    return NnxCapture(self.model, paths)

  def alone(self, info: LayerInfo, calibrated: Calibrated, mode: EvalMode,
            call: LayerCall) -> LayerRun:
    """As `LinenSubject.alone`: the layer as the model quantized with its
    single-layer rule holds it (its act range loaded), run on its own."""
    qmodel = self._quantized(_single_layer_rules(info), calibrated, mode)
    graphdef, state = nnx.split(_nnx_modules(qmodel)[info.path])
    run = _replay(lambda s, *a, **k: nnx.merge(graphdef, s)(*a, **k), call)
    return functools.partial(run, state)

  def weight(self, info: LayerInfo, what: str) -> jax.Array:
    """The layer's float weight (``kernel`` or ``embedding``)."""
    del what  # The layer is in the graph the info came from.
    return getattr(_nnx_modules(self.model)[info.path],
                   info.weight_name).get_value()

  def _quantized(self, rules: Sequence[Rule], calibrated: Calibrated,
                 mode: EvalMode) -> nnx.Module:
    qmodel = jaxq_flax.quantize_model(self.model, rules, mode=mode)
    # The ranges of exactly this model's static act layers (`act_ranges`
    # finalizes them from the stats of the full rules).
    nnx.update(qmodel, jaxq_flax.act_ranges(qmodel, calibrated.stats))
    return qmodel


Subject = LinenSubject | NnxSubject


def subject(model: Any, variables: Any, what: str) -> Subject:
  """The `Subject` of a float linen or nnx model; raises a ValueError for
  anything else (a quantized model, variables of the wrong kind)."""
  if isinstance(model, QuantizedLinen):
    raise ValueError(f"{what}: pass the float model and the rules, not a "
                     f"model from jaxq.quantize_model.")
  if isinstance(model, nn.Module):
    if (not isinstance(variables, Mapping) or isinstance(variables, nnx.State)
        or "params" not in variables):
      got = (f"collections {sorted(variables)}"
             if isinstance(variables, dict) else type(variables).__name__)
      raise ValueError(f"{what}: a linen model needs its variables "
                       f"{{'params': ...}}, got {got}.")
    return LinenSubject(model, variables)
  if isinstance(model, nnx.Module):
    if jaxq_flax.layers(model):
      raise ValueError(f"{what}: pass the float nnx model and the rules, not "
                       f"a model from jaxq.quantize_model.")
    if variables is not None and not isinstance(variables, nnx.State):
      raise ValueError(f"{what}: for an nnx model, variables must be an "
                       f"nnx.State (e.g. nnx.state(model)) or None for the "
                       f"model's own, got {type(variables).__name__}.")
    model = nnx.clone(model)
    if variables is not None:
      nnx.update(model, variables)
    return NnxSubject(model, nnx.state(model))
  raise ValueError(f"{what}: expected a flax.linen or flax.nnx Module, got "
                   f"{type(model).__name__}.")


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


def _layer_error_sums(model: Subject, info: LayerInfo,
                      calibrated: Calibrated, mode: EvalMode,
                      calls: Sequence[LayerCall],
                      captured: Sequence[Captured]) -> np.ndarray:
  """``(signal, noise, count)`` of the layer run alone, quantized, on each
  captured float input, against its captured float output."""
  sums = np.zeros(3)
  for i, call in enumerate(calls):
    run = model.alone(info, calibrated, mode, call)
    for batch_calls in captured:
      arrays, reference = batch_calls[info.path][i]
      sums += np.asarray(error_sums(jax.tree.leaves(reference),
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
  model = subject(model, variables, what)
  _check_eval_mode(mode, what)
  rules = rules_lib.check_rules(rules)
  batches = check_batches(data, what)
  calibrated = model.calibrate(rules, batches, stats, what=what)
  layers = calibrated.quantized
  if not layers:
    raise ValueError(f"{what}: the rules quantize none of the model's layers "
                     f"{sorted(calibrated.layers)}.")
  float_metric = _evaluate(eval_fn, *model.scored(None, calibrated, mode),
                           what)
  float_capture = model.capture(layers)
  float_calls = [float_capture(model.variables, batch) for batch in batches]

  rows = []
  for path, info in tqdm.tqdm(layers.items(), desc="sensitivity",
                              unit="layer", disable=not progress):
    metric = _evaluate(eval_fn, *model.scored(_single_layer_rules(info),
                                              calibrated, mode), what)
    signal, noise, count = _layer_error_sums(
        model, info, calibrated, mode, float_capture.calls[path],
        float_calls)
    drop = float_metric - metric if higher_is_better else metric - float_metric
    rows.append(LayerSensitivity(
        path=path, module_type=info.module_type, metric=metric, drop=drop,
        sqnr_db=sqnr_db(signal, noise),
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
  analysed = subject(model, variables, what)
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
  calibrated = analysed.calibrate(rules, batches, table.stats, what=what)
  target = metric_target(table.float_metric, max_drop, relative,
                         higher_is_better)
  meets = ((lambda m: m >= target) if higher_is_better
           else (lambda m: m <= target))
  order = table.paths
  limit = len(order) if max_skipped is None else min(max_skipped, len(order))
  history: list[float] = []
  with tqdm.tqdm(total=limit + 1, desc="partial quantize", unit="model",
                 disable=not progress) as bar:
    for k in range(limit + 1):
      candidate = skip_rules(order[:k], rules)
      if k == len(order):  # Everything in float: the float model itself.
        metric = table.float_metric
      else:
        metric = _evaluate(eval_fn, *analysed.scored(candidate, calibrated,
                                                     mode), what)
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
