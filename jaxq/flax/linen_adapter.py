"""`LinenAdapter`: the `jaxq.flax.adapter.ModelAdapter` of a linen model.

Variables are linen's collections: ``params`` (a layer's weight at
``params/<path>/kernel``, its learned ranges at ``params/<path>/jaxq/...``),
``quant_stats`` (observer states, ``{<path>: {"weight": s, "act": s}}``)
and ``quant_ranges`` (``{<path>: {"act": {"amax": a}}}``); see
`jaxq.flax.linen`. Methods that change variables return new dicts (the
dicts on the changed paths are copied, the arrays shared).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Collection, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax import traverse_util

from jaxq import calibration
from jaxq.algorithms.stats import InputMoment
from jaxq.flax import adapter as adapter_lib
from jaxq.flax import batch as batch_lib
from jaxq.flax import calibration_mask
from jaxq.flax import checks
from jaxq.flax import core
from jaxq.flax import kv_ranges
from jaxq.flax import linen as linen_lib
from jaxq.flax import rules as rules_lib
from jaxq.flax.batch import call_model
from jaxq.flax.capture import LinenCapture
from jaxq.flax.capture import LayerCall
from jaxq.flax.capture import ModulePass
from jaxq.flax.capture import traced_pass
from jaxq.flax.linen_variables import FIXED
from jaxq.flax.linen_variables import LEARNED
from jaxq.flax.linen_variables import RANGES
from jaxq.flax.linen_variables import STATS
from jaxq.flax.linen_variables import lookup
from jaxq.flax.linen_variables import mutable_node
from jaxq.flax.linen_variables import with_enabled
from jaxq.flax.linen_variables import without_empty
from jaxq.flax.rules import LayerInfo

_WHAT = "jaxq"


def check_variables(variables: Any, what: str) -> None:
  """Raises unless ``variables`` is a mapping with a ``params`` collection."""
  if (not isinstance(variables, Mapping) or isinstance(variables, nnx.State)
      or "params" not in variables):
    got = (f"collections {sorted(variables)}"
           if isinstance(variables, Mapping) else type(variables).__name__)
    raise ValueError(f"{what}: a linen model needs its variables "
                     f"{{'params': ...}}, got {got}.")


def _layer_states(stats: Any, name: str, kinds: tuple[type, ...]
                  ) -> dict[str, Any]:
  """"/"-joined path -> the state ``name`` (of a type in ``kinds``) of each
  layer of a ``quant_stats`` tree."""
  found = {}

  def visit(node: Any, path: tuple[str, ...]) -> None:
    for key, child in node.items():
      if key == name and isinstance(child, kinds):
        found["/".join(path)] = child
      elif isinstance(child, Mapping):
        visit(child, path + (key,))

  visit(stats, ())
  return found


def _act_states(stats: Any) -> dict[str, Any]:
  """"/"-joined path -> act observer state of a ``quant_stats`` tree."""
  return _layer_states(stats, core.ACT_STATS,
                       (calibration.MaxState, calibration.HistogramState))


def _nonfinite_counts(stats: Any, paths: Sequence[str]) -> jax.Array:
  states = _act_states(stats)
  # jnp.sum: a state stacked by nn.scan counts per layer.
  return jnp.asarray([jnp.sum(calibration.nonfinite_count(states[p]))
                      for p in paths],
                     jnp.int32).reshape(len(paths))


def _counting(qmodel: linen_lib.QuantizedLinen,
              observer_for: core.ObserverFor | None = None
              ) -> linen_lib.QuantizedLinen:
  """``qmodel`` with observers that count NaN/inf instead of raising
  (sharing its layer record, so the user's model learns the layers).

  For the passes that check the data themselves (the calibration pass: per
  layer, padding left out) or drop the observer states (the capture pass,
  a calibrate-mode forward): the layers' own check runs from inside
  ``jit``, as a host callback that cannot see the padding mask.
  """
  return dataclasses.replace(
      qmodel, on_nonfinite="count",
      observer_for=observer_for or qmodel.observer_for,
      # pylint: disable-next=protected-access
      _layers=qmodel._layers, _kv_caches=qmodel._kv_caches,
      _warned=qmodel._warned)


class _Host(nn.Module):
  """Runs ``inner`` (an unbound copy of a submodule) as the submodule at
  path ``names`` of a root: its layers keep their paths in the whole model
  (so rules match and `Captured` keys read the same), and its variables are
  the whole model's, restricted to that path."""

  inner: nn.Module
  names: tuple[str, ...]

  @nn.compact
  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    first, *rest = self.names
    if not rest:
      return self.inner.clone(parent=self, name=first)(*args, **kwargs)
    return _Host(self.inner, tuple(rest), name=first)(*args, **kwargs)


def _subtree(variables: Mapping[str, Any], path: str, nest: str
             ) -> dict[str, Any]:
  """Each collection of ``variables`` restricted to the module at ``path``,
  nested under the names of ``nest`` (``path``, or the path of an identical
  module whose compiled pass it borrows)."""
  out = {}
  for collection, tree in variables.items():
    node = lookup(tree, path)
    if node is None:
      continue
    for name in reversed(nest.split("/")):
      node = {name: node}
    out[collection] = node
  return out


@dataclasses.dataclass(frozen=True)
class LinenAdapter:
  """A linen module (float, or its `QuantizedLinen`) and its variables.

  Attributes:
    model: the float module.
    variables: its variables, ``{"params": ..., ...}``.
    qmodel: the `QuantizedLinen` of ``model``, or None for the float model.
  """

  model: nn.Module
  variables: Mapping[str, Any]
  qmodel: linen_lib.QuantizedLinen | None = None
  # `run_module`'s compiled passes, by what makes two blocks' programs
  # equal (see `_module_key`): path and jitted ``(variables, arrays)``.
  _module_passes: dict[Any, tuple[str, Any, LinenCapture]] = (
      dataclasses.field(default_factory=dict, compare=False, repr=False))

  @property
  def quantized(self) -> bool:
    return self.qmodel is not None

  @property
  def handle(self) -> Any:
    """The model as `jaxq.quantize_model` returns it (or the float one)."""
    return self.model if self.qmodel is None else self.qmodel

  def float_model(self, what: str) -> tuple[nn.Module, tuple[Any, ...]]:
    """``(float module, rules)`` of a `QuantizedLinen`."""
    del what
    return self.model, self.qmodel.rules

  def require_variables(self, what: str) -> None:
    """Raises a ValueError unless the adapter holds ``{"params": ...}``."""
    check_variables(self.variables, what)

  @property
  def _runner(self) -> Any:
    return self.model if self.qmodel is None else self.qmodel

  # Layers and running.

  def layers(self) -> dict[str, LayerInfo]:
    return {} if self.qmodel is None else self.qmodel.layers()

  def unmatched_rules(self) -> tuple[rules_lib.Rule, ...]:
    return () if self.qmodel is None else self.qmodel.unmatched_rules()

  def ordered_layers(self, batch: Any) -> dict[str, LayerInfo]:
    """`layers` after tracing ``batch`` (abstractly), in call order."""
    jax.eval_shape(lambda v: call_model(
        lambda *a, **k: self._runner.apply(
            v, *a, mutable=[STATS], **k), batch),
                   self.without_stats(self.variables))
    return self.layers()

  def quantize(self, rules: Sequence[rules_lib.Rule], mode: core.Mode,
               switchable: bool = False) -> "LinenAdapter":
    qmodel = linen_lib.quantize_linen(self.model, tuple(rules), mode, "raise",
                                      calibration.observer_for,
                                      switchable=switchable)
    return dataclasses.replace(self, qmodel=qmodel, _module_passes={})

  def set_enabled(self, enabled: Mapping[str, bool],
                  variables: Any | None = None) -> dict[str, Any]:
    """New variables with the flags of switchable layers (``quant_enabled``)."""
    if self.qmodel is None or not self.qmodel.switchable:
      raise ValueError("set_enabled: the model was not quantized with "
                       "switchable=True.")
    known = {p for p, info in self.layers().items() if info.quantized}
    unknown = sorted(set(enabled) - known) if self.layers() else []
    if unknown:
      raise ValueError(f"set_enabled: no quantized layer at {unknown}; the "
                       f"model's quantized layers are {sorted(known)}.")
    return with_enabled(
        self.variables if variables is None else variables, enabled)

  def with_variables(self, variables: Any) -> "LinenAdapter":
    return dataclasses.replace(self, variables=variables)

  def with_ranges(self, ranges: Mapping[str, core.ActRange]
                  ) -> "LinenAdapter":
    """The adapter with ``ranges`` (path -> act range) loaded."""
    variables = self.without_stats(self.variables)
    if ranges:
      variables[RANGES] = self.ranges_from(ranges)
    return self.with_variables(variables)

  def apply(self, batch: Any, variables: Any | None = None) -> Any:
    variables = self.variables if variables is None else variables
    apply = self._output_apply()
    return call_model(lambda *a, **k: apply(variables, *a, **k), batch)

  def apply_fn(self) -> adapter_lib.ApplyFn:
    return jax.jit(self._output_apply())

  def _output_apply(self) -> adapter_lib.ApplyFn:
    """``apply(variables, *args, **kwargs) -> output`` in every mode: in
    calibrate mode the float output, the observer states dropped."""
    if self.qmodel is None or self.qmodel.mode != "calibrate":
      return self._runner.apply
    counting = _counting(self.qmodel)

    def apply(variables: Any, *args: Any, **kwargs: Any) -> Any:
      return counting.apply(variables, *args, mutable=[STATS],
                            **kwargs)[0]

    return apply

  # Capture.

  def capture(self, paths: Collection[str]) -> LinenCapture:
    # The pass drops the observer states: its caller checks the inputs.
    runner = self._runner if self.qmodel is None else _counting(self.qmodel)
    return LinenCapture(runner.apply, paths)

  def capture_inputs(self, batches: Sequence[Any], paths: Collection[str],
                     variables: Any | None = None, *, capture: Any = None
                     ) -> adapter_lib.LayerInputs:
    return adapter_lib.capture_inputs(
        self, batches, paths, self.variables if variables is None
        else variables, capture=capture)

  def replay(self, path: str, call: LayerCall, mode: core.Mode,
             rule: rules_lib.Rule) -> adapter_lib.ApplyFn:
    """``arrays -> output``: the layer at ``path`` alone, quantized by
    ``rule`` in ``mode``, on ``call``'s arguments (from `capture`)."""
    rule = dataclasses.replace(rule, path_regex="")  # The root module.
    layer = linen_lib.quantize_linen(call.module, (rule,), mode, "raise",
                                     calibration.observer_for)
    variables = {}
    for collection, tree in self.variables.items():
      node = lookup(tree, path) if path else tree
      if node is not None:
        variables[collection] = node
    if call.stacked_in(variables.get("params")):
      # Inside nn.scan over layers: the layer saw one slice of its params.
      return adapter_lib.replay(adapter_lib.stacked_apply(layer.apply), call,
                                variables)
    return adapter_lib.replay(layer.apply, call, variables)

  def run_module(self, path: str, call: LayerCall, paths: Collection[str]
                 ) -> ModulePass:
    """The module at ``path`` (``call.module``, an unbound copy) alone, as
    the same submodule of a root (`_Host`), quantized as this model is.

    Identical blocks (`_module_key`: the same module, call structure and
    layers with the same rules) share one compiled pass: a later block runs
    under the first one's path, on its own variables."""
    if not path:
      raise ValueError("run_module: the root module is the whole model.")
    key = self._module_key(path, call, paths)
    if key is None or key not in self._module_passes:
      host = _Host(call.module, tuple(path.split("/")))
      # Its own layer record: the host's params would mark the model's
      # other layers as not stacked.
      runner = host if self.qmodel is None else dataclasses.replace(
          self.qmodel, model=host, _layers={}, _warned=[True])
      capture = LinenCapture(runner.apply, paths)
      first, run = path, traced_pass(capture, call)
      if key is not None:
        self._module_passes[key] = (first, run, capture)
    else:
      first, run, capture = self._module_passes[key]
    renamed = ("", "") if first == path else (f"{first}/", f"{path}/")
    return ModulePass(
        lambda variables, *rest: run(_subtree(variables, path, first), *rest),
        capture, renamed)

  def _module_key(self, path: str, call: LayerCall, paths: Collection[str]
                  ) -> Any:
    """What makes the passes of two modules compile to one program: the
    module (name aside), the call's structure and static arguments, and
    each layer inside it by relative path, with its rule and specs; None
    (no sharing) when unhashable or a layer holds a mask."""
    prefix = f"{path}/"
    inside = {p[len(prefix):]: info for p, info in self.layers().items()
              if p.startswith(prefix)}
    if any(info.mask is not None for info in inside.values()) or not all(
        p.startswith(prefix) for p in paths):
      return None
    key = (call.module.clone(parent=None, name="block"), call.treedef,
           call.static, repr(call.param_shapes),
           tuple(sorted(p[len(prefix):] for p in paths)),
           tuple(sorted(
               (rel, info.module_type, info.weight_shape, info.weight_name,
                info.rule, info.weight, info.act, info.stacked)
               for rel, info in inside.items())))
    try:
      hash(key)
    except TypeError:
      return None
    return key

  # Weights and other variables of a layer.

  def _known(self, path: str, variables: Any) -> None:
    layers = self.layers()
    if path not in layers and lookup(variables.get("params", {}),
                                      path) is None:
      raise adapter_lib.unknown_layer(path, layers or sorted(
          "/".join(k[:-1]) for k in traverse_util.flatten_dict(
              dict(variables.get("params", {})))), _WHAT)

  def read(self, path: str, name: str, variables: Any | None = None
           ) -> Any | None:
    variables = self.variables if variables is None else variables
    self._known(path, variables)
    if name in core.FIXED_NAMES:  # The PTQ algorithms' fixed variables.
      node = lookup(variables.get(FIXED, {}), path)
      return node.get(name) if isinstance(node, Mapping) else None
    node = lookup(variables.get("params", {}), path)
    if not isinstance(node, Mapping):
      return None
    if name in node:
      return node[name]
    return node.get(LEARNED, {}).get(name)

  def get_weight(self, path: str, variables: Any | None = None
                 ) -> tuple[jax.Array, jax.Array | None]:
    variables = self.variables if variables is None else variables
    info = self.layers().get(path)
    name = info.weight_name if info else (
        "embedding" if self.read(path, "kernel", variables) is None and
        self.read(path, "embedding", variables) is not None else "kernel")
    weight = self.read(path, name, variables)
    if weight is None:
      shape = f" of shape {info.weight_shape}" if info else ""
      raise ValueError(f"{_WHAT}: the params lack {path}/{name}{shape}.")
    return weight, self.read(path, "bias", variables)

  def write(self, values: Mapping[tuple[str, str], Any],
            variables: Any | None = None) -> dict[str, Any]:
    variables = self.variables if variables is None else variables
    params = dict(variables["params"])
    fixed = dict(variables.get(FIXED, {}))
    for (path, name), value in values.items():
      self._known(path, variables)
      if name in core.FIXED_NAMES:
        node = mutable_node(fixed, path)
        if value is None:
          node.pop(name, None)
        else:
          node[name] = value
        continue
      node = mutable_node(params, path)
      if name not in node and name in adapter_lib.LEARNED_NAMES:
        node[LEARNED] = dict(node.get(LEARNED, {}))
        node = node[LEARNED]
      node[name] = value
    fixed = without_empty(fixed)
    rest = {k: v for k, v in variables.items() if k != FIXED}
    if fixed:
      return {**rest, "params": params, FIXED: fixed}
    return {**rest, "params": params}

  def set_kernel(self, path: str, kernel: jax.Array,
                 variables: Any | None = None) -> dict[str, Any]:
    return adapter_lib.set_kernel(
        self, path, kernel, self.variables if variables is None else variables)

  # Statistics and ranges.

  def settings(self) -> adapter_lib.LayerSettings:
    if self.qmodel is None:
      raise ValueError(f"{_WHAT}: expected a model from jaxq.quantize_model, "
                       f"got the float module {type(self.model).__name__}.")
    return adapter_lib.LayerSettings(self.qmodel.mode,
                                     self.qmodel.on_nonfinite,
                                     self.qmodel.observer_for,
                                     self.qmodel.int8_forward)

  def check_stats(self, stats: Any, what: str) -> None:
    if stats is not None and (not isinstance(stats, Mapping)
                              or isinstance(stats, nnx.State)):
      raise ValueError(f"{what}: for a linen model, stats must be the "
                       f"{STATS!r} collection (e.g. a sensitivity "
                       f"table's stats), got {type(stats).__name__}.")

  def without_stats(self, variables: Any) -> dict[str, Any]:
    return {k: v for k, v in variables.items() if k != STATS}

  def calibration_pass(self, batch: Any, forward: adapter_lib.Forward,
                       observer_for: core.ObserverFor
                       ) -> adapter_lib.CalibrationPass:
    check_variables(self.variables, "calibrate")
    qmodel = self.qmodel
    # The step returns the NaN/inf counts; `jaxq.calibrate` raises on them.
    model = _counting(qmodel, observer_for)
    variables = {k: v for k, v in self.variables.items()
                 if k not in (STATS, RANGES)}

    def run(variables: Any, stats: Any, batch: Any) -> Any:
      current = [stats]

      def apply(*args, **kwargs):
        out, updated = model.apply({**variables, STATS: current[0]},
                                   *args, mutable=[STATS], **kwargs)
        current[0] = updated[STATS]
        return out

      # The batch's padding mask reaches the layers' act observers.
      with calibration_mask.masking(batch_lib.batch_mask(batch)):
        forward(apply, batch)
      return current[0]

    stats = jax.eval_shape(run, variables, {}, batch)
    # In the order the model calls its layers, so errors list them that way.
    order = {p: i for i, p in enumerate(qmodel.layers())}
    paths = tuple(sorted(_act_states(stats),
                         key=lambda p: order.get(p, len(order))))

    @jax.jit
    def step(variables: Any, stats: Any, batch: Any):
      stats = run(variables, stats, batch)
      return stats, _nonfinite_counts(stats, paths)

    return adapter_lib.CalibrationPass(
        step=lambda stats, batch: step(variables, stats, batch), stats=stats,
        act_paths=paths)

  def act_states(self, stats: Any) -> dict[str, Any]:
    return _act_states(stats)

  def input_moments(self, stats: Any) -> dict[str, InputMoment]:
    return _layer_states(stats or {}, core.INPUT_MOMENT, (InputMoment,))

  def _check_ranges(self, what: str,
                    ranges: Mapping[str, core.ActRange]) -> None:
    checks.check_act_ranges(what, ranges, self.layers())

  def ranges_from(self, ranges: Mapping[str, core.ActRange]
                  ) -> dict[str, Any]:
    """A ``quant_ranges`` collection from path -> act range."""
    self._check_ranges(_WHAT, ranges)
    out: dict[str, Any] = {}
    for path, act_range in ranges.items():
      node = out
      for name in path.split("/") if path else []:
        node = node.setdefault(name, {})
      node[core.ACT_STATS] = act_range
    return out

  def ranges_by_path(self, ranges: Any) -> dict[str, core.ActRange]:
    """Path -> act range of a ``quant_ranges`` collection (no KV's)."""
    flat = traverse_util.flatten_dict(dict(ranges or {}))
    out: dict[str, core.ActRange] = {}
    for key, value in flat.items():  # (*path, "act", "amax")
      if key[-2] != kv_ranges.LINEN_NAME:
        out.setdefault("/".join(key[:-2]), {})[key[-1]] = value
    return out

  def with_kv_ranges(self, ranges: Any, stats: Any) -> dict[str, Any]:
    return kv_ranges.with_linen_ranges(ranges, self.qmodel.kv_specs(), stats)

  def act_ranges(self, stats: Any) -> dict[str, Any]:
    """The ``quant_ranges`` finalized from ``stats``; raises when the model
    has not traced the layers the stats hold (it would find no range)."""
    untraced = sorted(set(_act_states(stats or {})) - set(self.layers()))
    if untraced:
      raise ValueError(
          f"act_ranges: the linen model has not traced the layers "
          f"{untraced} of these statistics, so jaxq does not know their "
          f"rules yet: trace the quantized model first, e.g. "
          f"jax.eval_shape(qmodel.init, jax.random.key(0), x) (no ranges "
          f"needed), or run qmodel.init / qmodel.apply once.")
    ranges = linen_lib.act_ranges(self.qmodel, stats)
    self._check_ranges("act_ranges", self.ranges_by_path(ranges))
    return self.with_kv_ranges(ranges, stats)

  def serving(self, variables: Any, stats: Any | None, ranges: Any | None
              ) -> dict[str, Any]:
    """``variables`` without ``quant_stats``, with the act ranges: ``ranges``,
    else finalized from ``stats``, else the ``quant_ranges`` they hold."""
    serving = self.without_stats(variables)
    if ranges is None and stats is None and RANGES in variables:
      ranges = variables[RANGES]  # Finalized already (e.g. QAT's).
    elif ranges is None:
      ranges = self.act_ranges(stats or {})
    elif stats is not None:
      ranges = self.with_kv_ranges(ranges, stats)
    if ranges:
      self._check_ranges("convert", self.ranges_by_path(ranges))
      serving[RANGES] = ranges
    return serving

  def check_convertible(self, variables: Any) -> None:
    if not self.layers():
      raise ValueError("convert: the linen model has not been traced yet; "
                       "run qmodel.init or qmodel.apply once (jax.eval_shape "
                       "is enough) so that jaxq knows its layers.")
    if "params" not in variables:
      raise ValueError(f"convert: expected linen variables with a 'params' "
                       f"collection, got collections {sorted(variables)}.")

  def mask(self, path: str, variables: Any | None = None) -> Any:
    del variables  # A linen mask is a module attribute, not a variable.
    return self.layers()[path].mask

  def init_learned(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``qmodel.apply(variables, *inputs, mutable=["params"])``'s variables."""
    if self.qmodel is None or self.qmodel.mode != "qat":
      mode = "float" if self.qmodel is None else self.qmodel.mode
      raise ValueError(f"init_learned: expected a qat-mode model, got mode "
                       f"{mode!r}; use qmodel.with_mode('qat').")
    if not args:
      raise ValueError("init_learned: for linen, pass the variables and the "
                       "model's inputs, as to qmodel.apply.")
    variables, *inputs = args
    _, updated = self.qmodel.apply(variables, *inputs, mutable=["params"],
                                   **kwargs)
    return {**variables, "params": updated["params"]}
