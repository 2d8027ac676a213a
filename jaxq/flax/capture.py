"""Recording the calls of chosen layers: their array arguments and outputs.

``capture = LinenCapture(apply, paths)`` (linen: a
``flax.linen.intercept_methods`` interceptor around ``apply``) or
``NnxCapture(model, paths)`` (nnx: an ``nnx.clone`` whose layers at
``paths`` are swapped for recording subclasses of their classes) is a
jitted pass ``capture(variables, batch) -> Captured``:

``Captured`` maps each path to ``((arrays, output), ...)``, one entry per
call of that module's ``__call__`` in call order (a shared layer, called
``n`` times, has ``n`` entries), ``arrays`` the call's array arguments (the
layer's input activation first: ``arrays[0]`` is ``x`` of shape
``(*lead, in_features)`` for Dense/Linear layers) and ``output`` its result.
``capture.calls[path][i]`` (a `LayerCall`, recorded while tracing)
rebuilds call ``i``'s ``(args, kwargs)`` from its arrays, so the layer can
be replayed alone on exactly the inputs it saw in the model. Under a
quantized model the outputs are the quantized layer's, the arguments always
what the caller passed (activation quantization happens inside the layer).
Batches follow `jaxq.flax.batch`; a `Batch`'s mask is not passed.
A layer inside a scan over layers (linen ``nn.scan`` with
``jaxq.flax.SCAN_AXES``, which holds the capture collection; nnx
``nnx.scan``, which stacks the recording variable) is one call whose
arrays and output lead with the stack size ``L``.

Most callers want `jaxq.flax.adapt(...).capture_inputs`, built on this.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Collection, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax import traverse_util

from jaxq.flax.batch import batch_arguments

CAPTURE = "jaxq_capture"
STATS = "quant_stats"  # `jaxq.flax.linen.STATS` (linen imports this module).
ApplyFn = Callable[..., Any]

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
  # linen: the shapes of the params the layer saw in this call (one slice
  # of the stored ones inside nn.scan over layers), or None.
  param_shapes: Any = None

  @classmethod
  def of(cls, module: nn.Module | None, args: tuple[Any, ...],
         kwargs: Mapping[str, Any], param_shapes: Any = None
         ) -> tuple[LayerCall, tuple[jax.Array, ...]]:
    """The call of ``module(*args, **kwargs)`` and its array arguments."""
    leaves, treedef = jax.tree.flatten((args, dict(kwargs)))
    arrays = tuple(x for x in leaves if isinstance(x, jax.Array))
    static = tuple(_ARRAY if isinstance(x, jax.Array) else x for x in leaves)
    return cls(module, treedef, static, param_shapes), arrays

  def arguments(self, arrays: Sequence[jax.Array]
                ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's ``(args, kwargs)`` with ``arrays`` put back in place."""
    it = iter(arrays)
    leaves = [next(it) if leaf is _ARRAY else leaf for leaf in self.static]
    return self.treedef.unflatten(leaves)


Captured = dict[str, tuple[tuple[tuple[jax.Array, ...], Any], ...]]


class LinenCapture:
  """A jitted pass of a linen ``apply`` that records the calls of layers.

  ``captured = LinenCapture(model.apply, paths)(variables, batch)`` maps each
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

  def __call__(self, variables: Any, batch: Any) -> Captured:
    return self._run(variables, batch)

  def _trace(self, variables: Any, batch: Any) -> Captured:
    self.calls.clear()  # Filled again by this trace, in call order.

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      module = context.module
      path = "/".join(module.path)
      if context.method_name == "__call__" and path in self.paths:
        call, arrays = LayerCall.of(
            module.clone(parent=None), args, kwargs,
            jax.tree.map(jnp.shape, dict(module.variables.get("params", {}))))
        self.calls.setdefault(path, []).append(call)
        module.sow(CAPTURE, "calls", (arrays, out))
      return out

    args, kwargs = batch_arguments(batch)
    with nn.intercept_methods(interceptor):
      # A calibrate-mode model records its observer states: let it (they
      # are dropped), so that its layers' inputs can be captured too.
      _, state = self._apply(variables, *args, mutable=[CAPTURE, STATS],
                             **kwargs)
    flat = traverse_util.flatten_dict(dict(state.get(CAPTURE, {})))
    captured = {"/".join(key[:-1]): calls for key, calls in flat.items()}
    for path, calls in self.calls.items():
      # nn.scan traces its body twice (shapes, then the loop) but keeps one
      # sow per call: one call, its arrays stacked per layer.
      del calls[len(captured.get(path, calls)):]
    return captured


class _Captured(nnx.Variable):
  """A recording layer's calls so far, ``((arrays, output), ...)``: a
  variable, so that ``nnx.scan`` over layers hands it out stacked per layer
  like the layer's other variables (a value kept elsewhere would leak the
  scan's tracers)."""


class _Recording:
  """Mixin of `NnxCapture`'s layers: hands each call to the capture pass."""

  __slots__ = ()

  def __call__(self, *args, **kwargs):
    out = self.jaxq_recorded_class.__call__(self, *args, **kwargs)
    arrays = self.jaxq_capture_sink(self.jaxq_capture_path, args, kwargs)
    held = getattr(self, "jaxq_captured", None)
    calls = () if held is None else held.get_value()
    setattr(self, "jaxq_captured", _Captured(calls + ((arrays, out),)))
    return out


@functools.lru_cache(maxsize=None)
def _recording_class(cls: type) -> type:
  """The recording subclass of an nnx layer class (cached: one per class).

  The layer's class comes first so that the layout is the layer's and an
  instance's class can be swapped in place (every path to a shared layer
  then records); the mixin's ``__call__`` is copied in to take precedence.
  """
  return type(f"Recording{cls.__name__}", (cls, _Recording),
              {"__module__": __name__, "__slots__": (),
               "__qualname__": f"Recording{cls.__name__}",
               "jaxq_recorded_class": cls, "__call__": _Recording.__call__})


def nnx_modules(model: nnx.Module) -> dict[str, nnx.Module]:
  """"/"-joined path -> module, for every module of an nnx graph."""
  return {"/".join(map(str, path)): node
          for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Module)}


class NnxCapture:
  """`LinenCapture` for nnx: ``NnxCapture(model, paths)(state, batch)``.

  The same ``Captured`` and ``calls`` as `LinenCapture`, from an ``nnx.clone``
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
      # The same surgery as `jaxq.quantize_model`'s: the class is swapped
      # in place, so a layer shared by several paths records every call.
      object.__setattr__(module, "__class__",
                         _recording_class(type(module)))
      object.__setattr__(module, "jaxq_capture_path", name)
    self._graphdef = nnx.graphdef(recording)
    self._run = jax.jit(self._trace)

  def __call__(self, state: nnx.State, batch: Any) -> Captured:
    return self._run(state, batch)

  def _trace(self, state: nnx.State, batch: Any) -> Captured:
    self.calls.clear()  # Filled again by this trace, in call order.

    def sink(path: str, args: tuple[Any, ...], kwargs: dict[str, Any]
             ) -> tuple[jax.Array, ...]:
      call, arrays = LayerCall.of(None, args, kwargs)
      self.calls.setdefault(path, []).append(call)
      return arrays

    model = nnx.merge(self._graphdef, state)
    recording = [m for m in nnx_modules(model).values()
                 if isinstance(m, _Recording)]
    for module in recording:
      # Set on this trace's copy only, so the graphdef never holds it.
      object.__setattr__(module, "jaxq_capture_sink", sink)
    args, kwargs = batch_arguments(batch)
    model(*args, **kwargs)
    captured = {}
    for module in recording:
      held = getattr(module, "jaxq_captured", None)
      if held is not None:
        captured[module.jaxq_capture_path] = tuple(held.get_value())
    for path, calls in self.calls.items():
      del calls[len(captured.get(path, calls)):]  # As `LinenCapture`.
    return captured
