"""The variables of quantized linen layers, in jaxq's own collections.

A quantized linen layer keeps everything jaxq adds beside the model's
``params`` in collections of its module scope (see `jaxq.flax.linen` for
when each exists): ``quant_stats`` (observer states, calibrate mode),
``quant_ranges`` (static activation ranges), ``quant_fixed`` (the PTQ
algorithms' weight ranges and smoothing factors), ``quant_enabled``
(switchable layers' on/off flags) and learned ranges under
``params/<layer>/jaxq``. `ScopeVariables` reads and writes them for one call
of one layer; `act_ranges` and `with_enabled` build whole collections.
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxq.flax import capture
from jaxq.flax import checks
from jaxq.flax import core
from jaxq.flax import layer_variables
from jaxq.flax import int8_qat
from jaxq.quantize import compute_range
from jaxq.spec import QArray

STATS = "quant_stats"
RANGES = "quant_ranges"
ENABLED = "quant_enabled"  # Switchable layers' on/off flags (`with_enabled`).
FIXED = "quant_fixed"
LEARNED = "jaxq"
# What ``nn.scan`` (or ``nn.vmap``) over layers adds to its ``variable_axes``
# so that jaxq's collections are stacked per layer like the params:
# ``nn.scan(Block, variable_axes={"params": 0, **jaxq.flax.SCAN_AXES}, ...)``.
# Every per-layer collection: observer states, static ranges, the PTQ
# algorithms' fixed variables and the inputs a capture pass records (which
# the PTQ algorithms and jaxq.sensitivity read layer by layer). Learned
# ranges live under ``params`` and are stacked with it. Switchable layers'
# flags (``quant_enabled``) are not scanned: one flag per path switches the
# whole stack, read from the outer call (`ScopeVariables.get_enabled`).
SCAN_AXES = {STATS: 0, RANGES: 0, FIXED: 0, capture.CAPTURE: 0}


@dataclasses.dataclass(frozen=True)
class CallContext:
  """What the outer ``init``/``apply`` call was given, for the errors of
  layers inside lifted transforms (whose scopes see only the collections
  the transform passes on)."""

  stats_mutable: bool
  ranges: Any
  # The other collections a layer reads (FIXED, ENABLED), by name.
  collections: Mapping[str, Any] = dataclasses.field(default_factory=dict)


CURRENT_CALL: contextvars.ContextVar[CallContext | None] = (
    contextvars.ContextVar("jaxq_linen_call", default=None))


def _lifted_error(path: str, collection: str) -> ValueError:
  return ValueError(
      f"jaxq: {path!r} runs inside a lifted transform (nn.scan or nn.vmap "
      f"over layers) whose variable_axes lack jaxq's {collection!r} "
      f"collection, so the layer cannot see it. Add jaxq's collections to "
      f"the transform: variable_axes={{'params': 0, "
      f"**jaxq.flax.SCAN_AXES}} (SCAN_AXES = {SCAN_AXES}).")


class ScopeVariables(layer_variables.LayerVariables):
  """One call of one matched layer; variables in the module's scope."""

  def __init__(self, module: nn.Module, quant: core.LayerQuant):
    super().__init__(quant)
    self.module = module
    self.scope = module.scope
    self.initializing = module.is_initializing()

  def get_stats(self, name: str) -> Any | None:
    if self.scope.has_variable(STATS, name):
      return self.scope.get_variable(STATS, name)
    return None

  def put_stats(self, name: str, state: Any) -> None:
    if not self.scope.is_mutable_collection(STATS):
      call = CURRENT_CALL.get()
      if call is not None and call.stats_mutable:
        raise _lifted_error(self.quant.path, STATS)
      raise ValueError(
          f"jaxq calibrate: {self.quant.path!r} records observer states in "
          f"the {STATS!r} collection; call apply(..., mutable=[{STATS!r}]).")
    self.scope.put_variable(STATS, name, state)

  def get_range(self) -> core.ActRange | None:
    if self.scope.has_variable(RANGES, core.ACT_STATS):
      act_range = self.scope.get_variable(RANGES, core.ACT_STATS)
      # Concrete (eager apply) ranges only; traced ones were checked where
      # they were made (act_ranges, convert).
      checks.check_act_range("jaxq", self.quant.path, act_range,
                             self.quant.act)
      return act_range
    call = CURRENT_CALL.get()
    outer = lookup(call.ranges, self.quant.path) if call else None
    if isinstance(outer, Mapping) and core.ACT_STATS in outer:
      # The call holds this layer's range, but its scope cannot see it.
      raise _lifted_error(self.quant.path, RANGES)
    return None

  def _outer(self, collection: str, name: str) -> None:
    """Raises when the call holds this layer's variable ``name`` of
    ``collection`` but the layer's scope cannot see it (a lifted transform
    without jaxq's collections): the layer would silently go without."""
    call = CURRENT_CALL.get()
    held = call and call.collections.get(collection)
    node = lookup(held, self.quant.path) if held else None
    if isinstance(node, Mapping) and name in node:
      raise _lifted_error(self.quant.path, collection)

  def get_fixed(self, name: str) -> Any | None:
    if self.scope.has_variable(FIXED, name):
      return self.scope.get_variable(FIXED, name)
    self._outer(FIXED, name)
    return None

  def recording(self) -> bool:
    return not self.initializing  # Init data is not calibration data.

  def backward_key(self) -> jax.Array | None:
    """backward="int8"'s key: the ``"jaxq"`` rng of ``apply``, made for
    this layer (``make_rng`` folds in its path and call count); None
    without one (a forward needs none: init, evaluation)."""
    if not self.module.has_rng(int8_qat.RNG_NAME):
      return None
    return self.module.make_rng(int8_qat.RNG_NAME)

  def missing_key_error(self) -> ValueError:
    """What a gradient through the layer raises without a key."""
    return ValueError(
        f"jaxq qat backward='int8': {self.quant.path!r} "
        f"({self.quant.module_type}) rounds its gradient stochastically "
        f"and needs a PRNG key; pass rngs={{{int8_qat.RNG_NAME!r}: key}} "
        f"to apply (a new key per step).")

  def get_enabled(self) -> jax.Array | None:
    """The layer's flag; inside a lifted transform (``nn.scan`` over
    layers), whose scope does not see ``quant_enabled``, the outer call's
    flag at the layer's path: one boolean for every layer of the stack."""
    if self.scope.has_variable(ENABLED, core.ENABLED):
      return self.scope.get_variable(ENABLED, core.ENABLED)
    call = CURRENT_CALL.get()
    flags = call and call.collections.get(ENABLED)
    node = lookup(flags, self.quant.path) if flags else None
    if isinstance(node, Mapping) and core.ENABLED in node:
      return node[core.ENABLED]
    return None

  def range_for(self, x: jax.Array) -> core.ActRange | None:
    """The loaded static range; while initialising without one, ``x``'s:
    ``init`` (e.g. under jax.eval_shape, to trace the layers before
    calibrating) runs before any range exists."""
    act_range = self.get_range()
    quant = self.quant
    if (act_range is None and self.initializing and quant.static_act and
        quant.act.learn is None and quant.mode != "calibrate"):
      # A placeholder: x's abs-max, whatever the spec's calibration.
      amin, amax = compute_range(x, quant.act.replace(calibration="max"))
      # A static range may not be 0 everywhere (init often runs on zeros):
      # where x's range is 0, x is 0, which a range of 1 keeps 0 as well.
      zero = (amax == 0) if amin is None else (amax == 0) & (amin == 0)
      amax = jnp.where(zero, 1.0, amax)
      act_range = {"amax": amax} if amin is None else {"amin": amin,
                                                        "amax": amax}
    return act_range

  def act(self, x: jax.Array) -> jax.Array | QArray:
    quant = self.quant
    if (self.initializing and quant.mode != "calibrate" and quant.static_act
        and quant.act.learn is None and self.get_range() is None):
      x = self.smoothed(x)
      return core.transform_act(quant, x, self.range_for(x))
    return super().act(x)

  def get_learned(self, name: str) -> jax.Array | None:
    if self.scope.has_variable("params", LEARNED):
      return self.scope.get_variable("params", LEARNED).get(name)
    return None

  def put_learned(self, name: str, value: jax.Array) -> None:
    if not self.scope.is_mutable_collection("params"):
      raise ValueError(
          f"jaxq: {self.quant.path!r} has a learned range but the params lack "
          f"'{self.quant.path}/{LEARNED}/{name}'; create the learned "
          f"parameters with qmodel.init or jaxq.qat.init_learned(qmodel, "
          f"variables, *inputs).")
    learned = {}
    if self.scope.has_variable("params", LEARNED):
      learned = dict(self.scope.get_variable("params", LEARNED))
    self.scope.put_variable("params", LEARNED, {**learned, name: value})


def with_enabled(variables: Mapping[str, Any], enabled: Mapping[str, Any]
                 ) -> dict[str, Any]:
  """``variables`` with a ``quant_enabled`` collection of path -> flag (a
  boolean scalar; layers left out keep their flag, on by default; a path
  scanned over a stack of layers switches the whole stack)."""
  def copy(tree: Mapping[str, Any]) -> dict[str, Any]:  # No aliasing.
    return {k: copy(v) if isinstance(v, Mapping) else v
            for k, v in tree.items()}

  flags = copy(variables.get(ENABLED, {}))
  for path, on in enabled.items():
    node = flags
    for name in path.split("/") if path else []:
      node = node.setdefault(name, {})
    node[core.ENABLED] = jnp.asarray(on, jnp.bool_)
  return {**variables, ENABLED: flags}


def lookup(tree: Any, path: str) -> Any:
  """The node of a nested dict at a "/"-joined ``path``, or None."""
  for name in path.split("/") if path else []:
    if not isinstance(tree, Mapping) or name not in tree:
      return None
    tree = tree[name]
  return tree


def mutable_node(tree: dict, path: str) -> dict:
  """The dict at ``path``, copying the dicts on the way (no aliasing)."""
  node = tree
  for name in path.split("/") if path else []:
    node[name] = dict(node.get(name, {}))
    node = node[name]
  return node


def without_empty(tree: dict) -> dict:
  """``tree`` without the dicts that (recursively) hold nothing."""
  pruned = {}
  for name, node in tree.items():
    if isinstance(node, Mapping):
      node = without_empty(dict(node))
      if not node:
        continue
    pruned[name] = node
  return pruned
