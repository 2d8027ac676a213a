"""Quantized nnx models, by module-graph surgery.

``qmodel = jaxq.quantize_model(model, rules, mode)`` copies ``model`` (with
``nnx.clone``; the original is left untouched) and, in the copy, turns every
matched ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv``,
``nnx.ConvTranspose`` and ``nnx.Embed`` into an instance of a quantized
subclass of its own class (``QuantizedLinear`` for ``nnx.Linear``, and so on)
by swapping its class in place: it keeps the very same attributes and
``nnx.Param`` variables, and every path to it (shared layers). Paths do not
change, so ``nnx.state(model)`` loads into ``qmodel`` with ``nnx.update`` and
``nnx.state(qmodel, nnx.Param)`` has the original's tree.

This module owns the surgery and the queries on its result (`layers`,
`unmatched_rules`, `act_ranges`). What a quantized layer runs per call is
`jaxq.flax.nnx_layers`; the variables it carries (`QuantStat`,
`QuantRange`, `QuantFixed`, `QuantEnabled`, learned ranges) are
`jaxq.flax.nnx_variables`.

Shared layers: a layer reachable by several paths (``self.b = self.a``, the
same layer twice in a list) is one quantized layer, quantized at every use,
as linen quantizes every call of a shared submodule. Its class is swapped
in place, so every path reaches it; `layers` lists it once, at its first
path in nnx's traversal order (sorted attribute names: ``dec`` before
``enc``), the path where ``nnx.state`` keeps its parameters and
`jaxq.convert` stores its QArray; calibration records every call into its
one observer state. Rules that would treat its paths differently raise a
ValueError naming both paths.

Scan over layers (Flax's way of stacking ``L`` blocks: created by
``nnx.vmap`` over split rngs, run by ``nnx.scan`` over the stacked state):
a layer whose stored weight is ``(L, *shape)``, ``shape`` the one its
configuration gives (``in_features``..., ``kernel_shape``), is a stack of
``L`` layers; its `LayerInfo` has ``weight_shape = shape`` and ``stacked =
L``. Each iteration of the scan runs one slice, so the quantized class
sees one layer's weight, and the variables it creates inside the scan
(`QuantStat`, learned ranges) come out stacked ``(L, ...)``, like the
`QuantRange`, `QuantFixed` and `QuantEnabled` variables it reads (a
switchable stack holds ``(L,)`` flags, set together for its path);
`jaxq.convert` quantizes the stacked weight slice by slice. A weight with
more leading axes (nested stacks) raises naming the layer. This needs
``nnx.scan``'s default graph updates, which hand out the new variables.

Checks: `quantize_model` refuses a quantized weight holding NaN or inf
(naming the layer and parameter), and so does an eager serve call that
quantizes float weights on the fly; a static range read in an eager call
is checked (finite, ``amax >= 0``, ``amin <= amax``, `jaxq.flax.checks`).
Under ``jit`` both are traced and not checked on every step: ranges are
checked where they are made or loaded through jaxq (`act_ranges`,
`jaxq.convert`, `jaxq.calibrate`'s ranges), and QAT on NaN weights gives a
NaN output and loss.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import jax.numpy as jnp
from flax import nnx

from jaxq.flax import checks
from jaxq.flax import core
from jaxq.flax import int8_qat
from jaxq.flax import kv_cache
from jaxq.flax import rules as rules_lib
from jaxq.flax import serve_ops
from jaxq.flax.nnx_layers import is_quantized
from jaxq.flax.nnx_layers import quantized_class
from jaxq.flax.nnx_layers import weight_name
from jaxq.flax.nnx_variables import ENABLED_ATTR
from jaxq.flax.nnx_variables import QuantEnabled
from jaxq.flax.nnx_variables import QuantRange

_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv,
           nnx.ConvTranspose, nnx.Embed)
_MASKED = (nnx.Conv, nnx.ConvTranspose)  # Their kernel is ``kernel * mask``.
_RULES_ATTR = "jaxq_rules"


def _path(path: tuple[Any, ...]) -> str:
  return "/".join(str(p) for p in path)


def _layer_weight_shape(module: nnx.Module) -> tuple[int, ...]:
  """The weight shape one layer of ``module`` uses, from its configuration
  (``nnx.vmap`` over layers stacks the stored weight; the layer's own
  attributes keep one layer's sizes)."""
  if isinstance(module, nnx.Embed):
    return (module.num_embeddings, module.features)
  if isinstance(module, nnx.Linear):
    return (module.in_features, module.out_features)
  if isinstance(module, nnx.LinearGeneral):
    return (*module.batch_axis.values(), *module.in_features,
            *module.out_features)
  return tuple(module.kernel_shape)  # Einsum, Conv, ConvTranspose.


def _stacked(path: str, module: nnx.Module, stored: tuple[int, ...]
             ) -> tuple[tuple[int, ...], int | None]:
  """``(one layer's weight shape, stack size or None)``: a weight stored
  ``(L, *shape)`` belongs to ``L`` layers made by ``nnx.vmap`` and run by
  ``nnx.scan`` over layers, which hands each iteration one slice."""
  shape = _layer_weight_shape(module)
  if stored == shape:
    return shape, None
  if len(stored) == len(shape) + 1 and stored[1:] == shape:
    return shape, stored[0]
  raise ValueError(
      f"quantize_model: the nnx layer {path!r} ({type(module).__name__}) "
      f"stores its {weight_name(module)!r} with shape {stored}, but one "
      f"layer's is {shape}. jaxq supports one stack axis in front (layers "
      f"made with nnx.vmap and run with nnx.scan over layers, weight "
      f"(L, *{shape})); nested stacks are not supported: stack the layers "
      f"along one axis, or skip the layer with a Rule(..., skip=True).")


def _paths_of_layers(root: nnx.Module) -> dict[int, list[tuple[Any, ...]]]:
  """``id(layer) -> every path`` by which the graph reaches each layer of
  `_LAYERS` (``nnx.iter_graph`` yields a shared node once, at its first)."""
  paths: dict[int, list[tuple[Any, ...]]] = {}

  def visit(node: Any, path: tuple[Any, ...], ancestors: frozenset[int]
            ) -> None:
    if id(node) in ancestors or not nnx.graph.is_node(node):
      return
    if isinstance(node, _LAYERS):
      paths.setdefault(id(node), []).append(path)
    children = nnx.graph.get_node_impl(node).node_dict(node)
    for key, child in children.items():
      if not (isinstance(key, str) and key.startswith("_pytree__")):
        visit(child, path + (key,), ancestors | {id(node)})

  visit(root, (), frozenset())
  return paths


# Attention modules a rule's kv_cache applies to.
_ATTENTION = (nnx.MultiHeadAttention, kv_cache.NnxKVCacheAttention)


def _check_aliases(rules: Sequence[rules_lib.Rule], path: str,
                   aliases: Sequence[str], module: nnx.Module,
                   rule: rules_lib.Rule | None) -> None:
  """Raises unless the rules give every path of a shared layer ``rule``."""
  for alias in aliases:
    other = rules_lib.match(rules, alias, module)
    if other is not rule:
      raise ValueError(
          f"quantize_model: the nnx layer {path!r} is also reachable as "
          f"{alias!r} (one {type(module).__name__} shared by both paths), "
          f"and the rules treat the paths differently ({rule} at {path!r}, "
          f"{other} at {alias!r}). A shared layer is quantized the same way "
          f"at every use and listed once, at {path!r}: make the rules agree "
          f"on both paths.")


def quantize_nnx(model: nnx.Module, rules: Sequence[rules_lib.Rule],
                 mode: core.Mode, on_nonfinite: core.OnNonfinite,
                 observer_for: core.ObserverFor,
                 int8_forward: bool = False, backward: str = "ste",
                 rngs: nnx.Rngs | None = None,
                 switchable: bool = False) -> nnx.Module:
  """See `jaxq.quantize_model`: a quantized copy of an nnx module.

  ``switchable`` (qat or serve mode): each quantized layer also holds a
  `QuantEnabled` flag ``jaxq_enabled`` (on), read on every call, and
  computes in float while it is off (see `jaxq.flax.core.LayerQuant`;
  serve mode needs float weights and selects the op by ``lax.cond``).
  """
  core.check_switchable(switchable, mode, int8_forward)
  qmodel = nnx.clone(model)
  all_paths = _paths_of_layers(qmodel)
  infos, kv_rules = [], []
  for path, module in list(nnx.iter_graph(qmodel)):
    if isinstance(module, _ATTENTION):
      rule = rules_lib.match_kv_cache(rules, _path(path), module)
      if rule is not None and not rule.skip:
        kv_cache.use_nnx_cache(module, rule.kv_cache, mode)
        kv_rules.append(rule)
      continue
    if is_quantized(module):
      raise ValueError(f"quantize_model: {_path(path)!r} is already quantized; "
                       f"quantize the original float model instead.")
    if not isinstance(module, _LAYERS):
      continue
    weight = getattr(module, weight_name(module)).get_value()
    path_str = _path(path)
    shape, stacked = _stacked(path_str, module, tuple(weight.shape))
    rule = rules_lib.match(rules, path_str, module)
    if rule is not None and not rule.skip and rule.weight is not None:
      checks.check_finite_weight("quantize_model", path_str,
                                 weight_name(module), weight)
    _check_aliases(rules, path_str,
                   [_path(p) for p in all_paths.get(id(module), ())
                    if tuple(p) != tuple(path)], module, rule)
    quant = core.layer_quant(
        path_str, module, rule, shape, is_embed=isinstance(module, nnx.Embed),
        mode=mode, on_nonfinite=on_nonfinite, observer_for=observer_for,
        int8_forward=int8_forward, backward=backward,
        switchable=switchable)
    info = rules_lib.LayerInfo(
        path=path_str, module_type=type(module).__name__, rule=rule,
        weight_shape=shape, weight_name=weight_name(module),
        weight=quant and quant.weight, act=quant and quant.act,
        mask=module.mask if isinstance(module, _MASKED) else None,
        serve_fallback=None if quant is None or isinstance(
            module, nnx.Embed) else serve_ops.layer_fallback_reason(
            quant.act, quant.weight,
            conv_kernel_shape=shape if isinstance(module, _MASKED) else None,
            transposed=getattr(module, "transpose_kernel", False),
            feature_group_count=getattr(module, "feature_group_count", 1)),
        stacked=stacked)
    infos.append(info)
    # The layer becomes its quantized subclass in place (the model is a
    # clone), so that every path reaching a shared layer reaches the
    # quantized one, as every call of a shared linen module is intercepted.
    object.__setattr__(module, "__class__", quantized_class(type(module)))
    object.__setattr__(module, "jaxq_layer", quant)
    object.__setattr__(module, "jaxq_info", info)
    if rngs is not None and int8_qat.uses_qat_op(quant):
      setattr(module, "jaxq_rngs", rngs)  # One stream shared by the layers.
    if quant is not None and switchable:
      # A stacked layer: one flag per layer, as nnx.scan slices it.
      setattr(module, ENABLED_ATTR, QuantEnabled(
          jnp.full(() if stacked is None else (stacked,), True)))
  object.__setattr__(qmodel, _RULES_ATTR, tuple(rules))
  rules_lib.warn_unmatched(rules, infos, kv_rules)
  return qmodel


def _quantized_layers(qmodel: nnx.Module
                      ) -> Iterator[tuple[tuple[Any, ...], nnx.Module]]:
  for path, module in nnx.iter_graph(qmodel):
    if is_quantized(module):
      yield path, module


def layers(qmodel: nnx.Module) -> dict[str, rules_lib.LayerInfo]:
  """Path -> `LayerInfo` of every quantizable layer of a quantized model."""
  return {m.jaxq_info.path: m.jaxq_info for _, m in _quantized_layers(qmodel)}


def unmatched_rules(qmodel: nnx.Module) -> tuple[rules_lib.Rule, ...]:
  """The rules that matched no layer."""
  if not hasattr(qmodel, _RULES_ATTR):
    raise ValueError("unmatched_rules: expected a model returned by "
                     "jaxq.quantize_model.")
  rules = getattr(qmodel, _RULES_ATTR)
  kv_rules = [rules_lib.match_kv_cache(rules, _path(path), module)
              for path, module in nnx.iter_graph(qmodel)
              if isinstance(module, _ATTENTION)]
  return rules_lib.unmatched(rules, layers(qmodel).values(),
                             [r for r in kv_rules if r is not None])


def _flat_values(state: nnx.State) -> dict[tuple[Any, ...], Any]:
  return {tuple(path): var.get_value() if hasattr(var, "get_value") else var
          for path, var in nnx.to_flat_state(state)}


def act_ranges(qmodel: nnx.Module, stats: nnx.State) -> nnx.State:
  """`QuantRange` variables finalized from ``nnx.state(model, QuantStat)``."""
  flat_stats = _flat_values(stats)
  ranges = {}
  for path, module in _quantized_layers(qmodel):
    quant = module.jaxq_layer
    if quant is None or not quant.static_act:
      continue
    state = flat_stats.get(tuple(path) + ("jaxq_act_stats",))
    if state is None and quant.act.learn is not None:
      continue  # A learned range may start from its first batch instead.
    if state is None:
      hint = "" if module.jaxq_info.stacked is None else (
          f" It is a stack of {module.jaxq_info.stacked} layers (nnx.scan "
          f"over layers): a scan with graph_updates=False (or graph=False) "
          f"drops the statistics its layers create; use nnx.scan's default "
          f"graph updates.")
      raise ValueError(f"jaxq: no activation statistics for {quant.path!r}, "
                       f"which has a static act spec; run it in calibrate "
                       f"mode on at least one batch.{hint}")
    ranges[tuple(path) + ("jaxq_act_range",)] = QuantRange(
        core.finalize_range(quant.observer_for(quant.act), state,
                            quant.path))
  return nnx.from_flat_state(ranges)


def state_entry(variables: nnx.State, key: tuple[Any, ...]) -> Any | None:
  """The entry of ``variables`` at ``key``, or None; read through the nested
  state each time (no cache: a state mutated in place between reads, or
  read from several threads, is read as it is now), O(depth)."""
  node: Any = variables
  for part in key:
    try:
      node = node[part]
    except (KeyError, TypeError, IndexError):
      return None
  return node


def state_key(path: str) -> tuple[Any, ...]:
  """The state key of a "/"-joined path (list indices as ints)."""
  return tuple(int(p) if p.isdigit() else p for p in path.split("/")
               ) if path else ()
