"""`NnxAdapter`: the `jaxq.flax.adapter.ModelAdapter` of an nnx model.

The adapter holds a private ``nnx.clone`` of the model (the user's model is
never modified) and its ``nnx.State``, the variables. A layer's weight is
the ``Param`` at ``(*path, "kernel")`` (``"embedding"`` for embeddings), its
learned ranges ``(*path, "jaxq_weight_scale")``..., its observer states
`QuantStat` variables ``(*path, "jaxq_act_stats")`` and its static range a
`QuantRange` ``(*path, "jaxq_act_range")``; see `jaxq.flax.nnx_variables`.
Methods that change variables return a new ``State`` (``nnx.update`` it
into a model, or pass it back to the adapter).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Collection, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxq import calibration
from jaxq.algorithms.stats import InputMoment
from jaxq.flax import adapter as adapter_lib
from jaxq.flax import batch as batch_lib
from jaxq.flax import calibration_mask
from jaxq.flax import checks
from jaxq.flax import core
from jaxq.flax import kv_ranges
from jaxq.flax import nnx as nnx_lib
from jaxq.flax import rules as rules_lib
from jaxq.flax.batch import call_model
from jaxq.flax.capture import LayerCall
from jaxq.flax.capture import ModulePass
from jaxq.flax.capture import NnxCapture
from jaxq.flax.capture import nnx_modules
from jaxq.flax.capture import traced_pass
from jaxq.flax.nnx_variables import ENABLED_ATTR
from jaxq.flax.nnx_variables import QuantEnabled
from jaxq.flax.nnx_variables import QuantFixed
from jaxq.flax.nnx_variables import QuantRange
from jaxq.flax.nnx_variables import QuantStat
from jaxq.flax.rules import LayerInfo

_WHAT = "jaxq"
_ACT_STATS = f"jaxq_{core.ACT_STATS}_stats"
_INPUT_MOMENT = f"jaxq_{core.INPUT_MOMENT}_stats"
_ACT_RANGE = "jaxq_act_range"


def check_variables(variables: Any, what: str) -> None:
  """Raises unless ``variables`` is an ``nnx.State`` or None."""
  if variables is not None and not isinstance(variables, nnx.State):
    raise ValueError(f"{what}: for an nnx model, variables must be an "
                     f"nnx.State (e.g. nnx.state(model)) or None for the "
                     f"model's own, got {type(variables).__name__}.")


def _quantized_layers(model: nnx.Module) -> Iterator[nnx.Module]:
  for _, module in nnx.iter_graph(model):
    if isinstance(getattr(module, "jaxq_layer", None), core.LayerQuant):
      yield module


def _counting(model: nnx.Module,
              observer_for: core.ObserverFor | None = None) -> nnx.Module:
  """A clone of ``model`` whose observers count NaN/inf instead of raising.

  For the passes that check the data themselves (the calibration pass: per
  layer, padding left out) or drop the observer states (the capture pass,
  a calibrate-mode forward): the layers' own check runs from inside
  ``jit``, as a host callback that cannot see the padding mask.
  """
  model = nnx.clone(model)
  for module in _quantized_layers(model):
    layer = module.jaxq_layer
    object.__setattr__(module, "jaxq_layer", dataclasses.replace(
        layer, on_nonfinite="count",
        observer_for=observer_for or layer.observer_for))
  return model


def _layer_states(stats: nnx.State, attribute: str) -> dict[str, Any]:
  """"/"-joined path -> the `QuantStat` ``attribute`` of each layer."""
  return {"/".join(map(str, path[:-1])): var.get_value()
          for path, var in nnx.to_flat_state(stats) if path[-1] == attribute}


def _act_states(stats: nnx.State) -> dict[str, Any]:
  return _layer_states(stats, _ACT_STATS)


def _nonfinite_counts(stats: nnx.State, paths: Sequence[str]) -> jax.Array:
  states = _act_states(stats)
  # jnp.sum: a state stacked by nnx.scan over layers counts per layer.
  return jnp.asarray([jnp.sum(calibration.nonfinite_count(states[p]))
                      for p in paths], jnp.int32).reshape(len(paths))


@dataclasses.dataclass(frozen=True)
class NnxAdapter:
  """An nnx module (float, or from `jaxq.quantize_model`) and its state.

  No method modifies ``model`` (runs merge it from ``variables``; what the
  calibrate and qat modes create lands in copies), except `init_learned`,
  which creates the learned ranges in place as the nnx API does.

  Attributes:
    model: the user's model, or a clone with the given variables loaded.
    variables: its ``nnx.State``.
  """

  model: nnx.Module
  variables: nnx.State
  # `run_module`'s compiled passes, by what makes two blocks' programs
  # equal (see `_module_key`).
  _module_passes: dict[Any, tuple[Any, NnxCapture]] = dataclasses.field(
      default_factory=dict, compare=False, repr=False)

  @functools.cached_property
  def _modules(self) -> dict[str, nnx.Module]:
    return nnx_modules(self.model)

  @classmethod
  def of(cls, model: nnx.Module, variables: nnx.State | None,
         what: str = _WHAT) -> "NnxAdapter":
    """The adapter of ``model`` with ``variables`` (None: its own) loaded
    into a clone of it."""
    check_variables(variables, what)
    if variables is not None:  # Loaded into a copy: the model is the user's.
      model = nnx.clone(model)
      nnx.update(model, variables)
    return cls(model, nnx.state(model))

  @property
  def handle(self) -> nnx.Module:
    """The model (the user's, or the clone holding the given variables)."""
    return self.model

  def float_model(self, what: str) -> tuple[nnx.Module, tuple[Any, ...]]:
    """Raises: a quantized nnx model holds no float layers any more."""
    raise ValueError(f"{what}: pass the float nnx model and the rules, not "
                     f"a model from jaxq.quantize_model (its float layers are "
                     f"replaced).")

  def require_variables(self, what: str) -> None:
    del what  # An nnx model always holds its variables.

  @property
  def quantized(self) -> bool:
    return bool(self.layers())

  # Layers and running.

  @functools.cached_property
  def _layers(self) -> dict[str, LayerInfo]:
    # Fixed once quantize_model has swapped the layers in.
    return nnx_lib.layers(self.model)

  def layers(self) -> dict[str, LayerInfo]:
    return dict(self._layers)

  def unmatched_rules(self) -> tuple[rules_lib.Rule, ...]:
    return nnx_lib.unmatched_rules(self.model)

  def ordered_layers(self, batch: Any) -> dict[str, LayerInfo]:
    """`layers` in the order the model first calls them on ``batch`` (found
    by tracing a capture pass), dropping layers it never calls."""
    every = self.layers()
    order = self.capture(every)
    jax.eval_shape(order, self.variables, batch)
    return {path: every[path] for path in order.calls}

  def quantize(self, rules: Sequence[rules_lib.Rule], mode: core.Mode,
               switchable: bool = False) -> "NnxAdapter":
    qmodel = nnx_lib.quantize_nnx(self.model, tuple(rules), mode, "raise",
                                  calibration.observer_for,
                                  switchable=switchable)
    return NnxAdapter(qmodel, nnx.state(qmodel))

  def set_enabled(self, enabled: Mapping[str, bool],
                  variables: Any | None = None) -> nnx.State:
    """A new ``State`` with the `QuantEnabled` flags of switchable layers."""
    variables = self.variables if variables is None else variables
    flat = dict(nnx.to_flat_state(variables))
    keys = {path: nnx_lib.state_key(path) + (ENABLED_ATTR,) for path in enabled}
    unknown = sorted(p for p, k in keys.items() if k not in flat)
    if unknown:
      switchable = sorted(p for p, m in self._modules.items()
                          if hasattr(m, ENABLED_ATTR))
      raise ValueError(f"set_enabled: no switchable layer at {unknown}; the "
                       f"model's are {switchable} (quantize it with "
                       f"switchable=True).")
    for path, on in enabled.items():
      # A stacked layer (nnx.scan over layers) holds one flag per layer:
      # the path switches the whole stack.
      flat[keys[path]] = QuantEnabled(jnp.broadcast_to(
          jnp.asarray(on, jnp.bool_), jnp.shape(flat[keys[path]].get_value())))
    return nnx.from_flat_state(flat)

  def with_variables(self, variables: Any) -> "NnxAdapter":
    return NnxAdapter.of(self.model, variables)

  def with_ranges(self, ranges: Mapping[str, core.ActRange]) -> "NnxAdapter":
    """The adapter with the ranges of its static act layers loaded."""
    model = nnx.clone(self.model)
    static = {m.jaxq_layer.path for m in _quantized_layers(model)
              if m.jaxq_layer.static_act}
    mine = {p: r for p, r in ranges.items() if p in static}
    if mine:
      nnx.update(model, self.ranges_from(mine))
    return NnxAdapter(model, nnx.state(model))

  @property
  def _runner(self) -> nnx.Module:
    """The model to run: in calibrate mode one whose observers only count
    NaN/inf (the runs that use it drop the observer states)."""
    if self.quantized and self.settings().mode == "calibrate":
      return _counting(self.model)
    return self.model

  def apply(self, batch: Any, variables: Any | None = None) -> Any:
    variables = self.variables if variables is None else variables
    return call_model(nnx.merge(nnx.graphdef(self._runner), variables), batch)

  def apply_fn(self) -> adapter_lib.ApplyFn:
    graphdef = nnx.graphdef(self._runner)

    @jax.jit
    def apply(state: nnx.State, *args: Any, **kwargs: Any) -> Any:
      return nnx.merge(graphdef, state)(*args, **kwargs)

    return apply

  # Capture.

  def capture(self, paths: Collection[str]) -> NnxCapture:
    # The pass drops the observer states: its caller checks the inputs.
    return NnxCapture(self._runner, paths)

  def capture_inputs(self, batches: Sequence[Any], paths: Collection[str],
                     variables: Any | None = None, *, capture: Any = None
                     ) -> adapter_lib.LayerInputs:
    return adapter_lib.capture_inputs(
        self, batches, paths, self.variables if variables is None
        else variables, capture=capture)

  def replay(self, path: str, call: LayerCall, mode: core.Mode,
             rule: rules_lib.Rule) -> adapter_lib.ApplyFn:
    """``arrays -> output``: the layer at ``path`` as this (quantized) model
    holds it, run alone on ``call``'s arguments; ``mode`` and ``rule`` are
    the model's already."""
    del mode, rule
    graphdef, state = nnx.split(self._modules[path])
    apply = lambda s, *a, **k: nnx.merge(graphdef, s)(*a, **k)
    info = self._layers.get(path)
    if info is not None and info.stacked:  # Inside nnx.scan over layers.
      apply = adapter_lib.stacked_apply(apply)
    return adapter_lib.replay(apply, call, state)

  def run_module(self, path: str, call: LayerCall, paths: Collection[str]
                 ) -> ModulePass:
    """The module object at ``path``, called alone on its part of the
    state (paths inside it are relative to it while it runs).

    Identical blocks (`_module_key`: the same graph, layers' paths aside,
    and call structure) share one compiled pass, run on each one's state."""
    prefix = f"{path}/"
    outside = sorted(p for p in paths if not p.startswith(prefix))
    if outside:
      raise ValueError(f"run_module: {outside} are not inside {path!r}.")
    relative = [p[len(prefix):] for p in paths]
    key = self._module_key(path, call, relative)
    if key is None or key not in self._module_passes:
      capture = NnxCapture(self._module(path), relative)
      run = traced_pass(capture, call)
      if key is not None:
        self._module_passes[key] = (run, capture)
    else:
      run, capture = self._module_passes[key]
    state_key = nnx_lib.state_key(path)
    return ModulePass(
        lambda variables, *rest: run(
            nnx_lib.state_entry(variables, state_key), *rest),
        capture, ("", prefix))

  def _module_key(self, path: str, call: LayerCall, relative: Sequence[str]
                  ) -> Any:
    """What makes the passes of two modules compile to one program: the
    module's graph with its layers' paths blanked (their `LayerQuant` and
    `LayerInfo` otherwise equal), the call's structure and static
    arguments, and the recorded layers; None (no sharing) when unhashable.
    A shared pass names the first block's layers in its error messages."""
    blank = nnx.clone(self._module(path))
    for module in _quantized_layers(blank):
      for name in ("jaxq_layer", "jaxq_info"):  # `jaxq.flax.nnx`'s records.
        if hasattr(module, name):
          object.__setattr__(module, name, dataclasses.replace(
              getattr(module, name), path=""))
    key = (nnx.graphdef(blank), call.treedef, call.static,
           tuple(sorted(relative)))
    try:
      hash(key)
    except TypeError:
      return None
    return key

  # Weights and other variables of a layer.

  def _module(self, path: str) -> nnx.Module:
    modules = self._modules
    if path not in modules:
      raise adapter_lib.unknown_layer(
          path, self.layers() or [p for p, m in modules.items()
                                  if hasattr(m, "kernel")], _WHAT)
    return modules[path]

  def read(self, path: str, name: str, variables: Any | None = None
           ) -> Any | None:
    self._module(path)
    variables = self.variables if variables is None else variables
    key = nnx_lib.state_key(path)
    held = nnx_lib.state_entry(variables, key + (name,))
    if held is None:
      held = nnx_lib.state_entry(variables, key + (f"jaxq_{name}",))
    if held is None:
      return None
    return held.get_value() if hasattr(held, "get_value") else held

  def get_weight(self, path: str, variables: Any | None = None
                 ) -> tuple[jax.Array, jax.Array | None]:
    info = self.layers().get(path)
    name = info.weight_name if info else (
        "embedding" if self.read(path, "kernel", variables) is None and
        self.read(path, "embedding", variables) is not None else "kernel")
    weight = self.read(path, name, variables)
    if weight is None:
      raise ValueError(f"{_WHAT}: {path!r} has no weight {name!r}.")
    return weight, self.read(path, "bias", variables)

  def write(self, values: Mapping[tuple[str, str], Any],
            variables: Any | None = None) -> nnx.State:
    variables = self.variables if variables is None else variables
    flat = dict(nnx.to_flat_state(variables))
    for (path, name), value in values.items():
      self._module(path)
      module_key = nnx_lib.state_key(path)
      key, jaxq_key = module_key + (name,), module_key + (f"jaxq_{name}",)
      if name in core.FIXED_NAMES:  # The PTQ algorithms' fixed variables.
        flat.pop(jaxq_key, None)  # None removes it.
        if value is not None:
          flat[jaxq_key] = QuantFixed(value)
        continue
      if key not in flat and name in adapter_lib.LEARNED_NAMES:
        key = jaxq_key
      if key in flat:
        flat[key] = flat[key].replace(value)
      else:
        flat[key] = nnx.Param(value)
    return nnx.from_flat_state(flat)

  def set_kernel(self, path: str, kernel: jax.Array,
                 variables: Any | None = None) -> nnx.State:
    return adapter_lib.set_kernel(self, path, kernel, variables)

  # Statistics and ranges.

  def settings(self) -> adapter_lib.LayerSettings:
    layers = [m.jaxq_layer for m in _quantized_layers(self.model)]
    if not layers:
      return adapter_lib.LayerSettings("calibrate", "raise",
                                       calibration.observer_for)
    return adapter_lib.LayerSettings(layers[0].mode, layers[0].on_nonfinite,
                                     layers[0].observer_for,
                                     layers[0].int8_forward)

  def check_stats(self, stats: Any, what: str) -> None:
    if stats is not None and not isinstance(stats, nnx.State):
      raise ValueError(f"{what}: for an nnx model, stats must be an "
                       f"nnx.State of jaxq.flax.QuantStat variables (e.g. a "
                       f"sensitivity table's stats), got "
                       f"{type(stats).__name__}.")

  def without_stats(self, variables: Any) -> nnx.State:
    return nnx.from_flat_state({
        p: v for p, v in nnx.to_flat_state(variables)
        if not isinstance(v, QuantStat)})

  def calibration_pass(self, batch: Any, forward: adapter_lib.Forward,
                       observer_for: core.ObserverFor
                       ) -> adapter_lib.CalibrationPass:
    # The step returns the NaN/inf counts; `jaxq.calibrate` raises on them.
    model = _counting(self.model, observer_for)

    def record(module: nnx.Module, batch: Any) -> nnx.Module:
      # The batch's padding mask reaches the layers' act observers.
      with calibration_mask.masking(batch_lib.batch_mask(batch)):
        forward(module, batch)
      return module

    # The abstract model has the QuantStat variables the first batch creates.
    graphdef, stats, _ = nnx.split(nnx.eval_shape(record, model, batch),
                                   QuantStat, ...)
    rest = nnx.state(model, nnx.Not(QuantStat))
    paths = tuple(_act_states(stats))

    @jax.jit
    def step(rest: nnx.State, stats: nnx.State, batch: Any):
      module = record(nnx.merge(graphdef, stats, rest), batch)
      stats = nnx.state(module, QuantStat)
      return stats, _nonfinite_counts(stats, paths)

    return adapter_lib.CalibrationPass(
        step=lambda stats, batch: step(rest, stats, batch), stats=stats,
        act_paths=paths)

  def act_states(self, stats: Any) -> dict[str, Any]:
    return _act_states(stats)

  def input_moments(self, stats: Any) -> dict[str, InputMoment]:
    return {} if stats is None else _layer_states(stats, _INPUT_MOMENT)

  def _check_ranges(self, what: str,
                    ranges: Mapping[str, core.ActRange]) -> None:
    checks.check_act_ranges(what, ranges, self._layers)

  def ranges_from(self, ranges: Mapping[str, core.ActRange]) -> nnx.State:
    """A ``State`` of `QuantRange` variables from path -> act range."""
    self._check_ranges(_WHAT, ranges)
    return nnx.from_flat_state({
        nnx_lib.state_key(path) + (_ACT_RANGE,): QuantRange(act_range)
        for path, act_range in ranges.items()})

  def ranges_by_path(self, ranges: Any) -> dict[str, core.ActRange]:
    return {"/".join(map(str, path[:-1])): var.get_value()
            for path, var in nnx.to_flat_state(ranges)
            if isinstance(var, QuantRange)}

  def with_kv_ranges(self, ranges: Any, stats: Any) -> nnx.State:
    return kv_ranges.with_nnx_ranges(ranges, self.model, stats)

  def act_ranges(self, stats: Any) -> nnx.State:
    ranges = nnx_lib.act_ranges(self.model, stats)
    self._check_ranges("act_ranges", self.ranges_by_path(ranges))
    return self.with_kv_ranges(ranges, stats)

  def serving(self, variables: Any, stats: Any | None, ranges: Any | None
              ) -> nnx.State:
    """``variables`` without `QuantStat`s, with the act ranges: ``ranges``,
    else finalized from ``stats``, else the `QuantRange`s they hold."""
    flat = dict(nnx.to_flat_state(self.without_stats(variables)))
    if ranges is None and stats is not None:
      ranges = self.act_ranges(stats)
    elif stats is not None:
      ranges = self.with_kv_ranges(ranges, stats)
    if ranges is not None:
      flat.update(nnx.to_flat_state(ranges))
    self._check_ranges("convert", {
        "/".join(map(str, p[:-1])): v.get_value() for p, v in flat.items()
        if isinstance(v, QuantRange)})
    return nnx.from_flat_state(flat)

  def check_convertible(self, variables: Any) -> None:
    """Raises unless ``variables`` has exactly the model's ``Param``s."""
    if not isinstance(variables, nnx.State):
      raise ValueError(f"convert: for an nnx model, variables must be an "
                       f"nnx.State (e.g. nnx.state(model)), got "
                       f"{type(variables).__name__}.")
    flat = dict(nnx.to_flat_state(variables))
    expected = dict(nnx.to_flat_state(nnx.state(self.model, nnx.Param)))
    params = {p: v for p, v in flat.items() if isinstance(v, nnx.Param)}
    # Learned ranges are created by the first QAT call, so the model given
    # may not have them yet.
    is_learned = lambda p: str(p[-1]).startswith("jaxq_")
    missing = sorted(map(str, {p for p in set(expected) - set(params)
                               if not is_learned(p)}))
    extra = sorted(map(str, {p for p in set(params) - set(expected)
                             if not is_learned(p)}))
    shapes = [f"{'/'.join(map(str, p))}: {tuple(v.get_value().shape)} != "
              f"{tuple(expected[p].get_value().shape)}"
              for p, v in params.items() if p in expected and
              tuple(v.get_value().shape) !=
              tuple(expected[p].get_value().shape)]
    if missing or extra or shapes:
      raise ValueError(f"convert: the state does not match the model: "
                       f"missing {missing}, extra {extra}, mismatched shapes "
                       f"{shapes}.")

  def mask(self, path: str, variables: Any | None = None) -> Any:
    """The layer's mask: the state's (a mask is nnx data, a plain array
    leaf), the one the serve model will hold; else the model's."""
    variables = self.variables if variables is None else variables
    held = nnx_lib.state_entry(variables, nnx_lib.state_key(path) + ("mask",))
    if held is None or isinstance(held, nnx.State):
      return self.layers()[path].mask
    return held.get_value() if hasattr(held, "get_value") else held

  def init_learned(self, *args: Any, **kwargs: Any) -> nnx.Module:
    """Calls the model, which creates its learned ranges in place."""
    self.model(*args, **kwargs)
    return self.model
