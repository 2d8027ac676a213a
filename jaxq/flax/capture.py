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
``LayerCall.sources`` says, for each array argument, which earlier
recorded call handed the very same array on (an argument or an output
leaf of it, the latest such call): the dataflow between the recorded
modules, read off the trace (`jaxq.ptq.blocks` checks with it that a
model's blocks feed each other directly, and that layers share an input).
`run_module` runs one submodule alone on a recorded call's arguments.
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

from jaxq.flax.batch import Batch
from jaxq.flax.batch import batch_arguments

CAPTURE = "jaxq_capture"
STATS = "quant_stats"  # `jaxq.flax.linen_variables.STATS` (which imports this).
ApplyFn = Callable[..., Any]

_ARRAY = object()  # Marks where a captured call argument was an array.


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a recorded call's array argument came from: the very array that
  an earlier recorded call took (``kind="arg"``) or returned (``"out"``),
  its leaf ``index`` among that call's arrays (`LayerCall.arguments`) or
  its output's array leaves; ``call`` counts the calls of ``path``."""

  path: str
  call: int
  kind: str  # "arg" or "out".
  index: int


class _Dataflow:
  """The arrays of the calls recorded during one trace, by identity, so a
  later call's arguments can name their `Source` (the latest call that held
  the same array wins). Holds the arrays until `clear` so ids stay unique."""

  def __init__(self):
    self._seen: dict[int, Source] = {}
    self._alive: list[Any] = []

  def clear(self) -> None:
    self._seen.clear()
    self._alive.clear()

  def sources(self, arrays: Sequence[Any]) -> tuple[Source | None, ...]:
    return tuple(self._seen.get(id(a)) for a in arrays)

  def note(self, path: str, call: int, arrays: Sequence[Any],
           out: Any) -> None:
    outs = [a for a in jax.tree.leaves(out) if isinstance(a, jax.Array)]
    for kind, held in (("arg", arrays), ("out", outs)):
      for i, a in enumerate(held):
        self._seen[id(a)] = Source(path, call, kind, i)
        self._alive.append(a)


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
    param_shapes: linen: the shapes of the params the layer saw in this call
      (one slice of the stored ones inside ``nn.scan`` over layers), or None.
    sources: per array argument, the `Source` it came from, or None.
  """

  module: nn.Module | None
  treedef: Any
  static: tuple[Any, ...]
  param_shapes: Any = None
  sources: tuple[Source | None, ...] = ()

  def stacked_in(self, params: Any) -> bool:
    """Whether the stored ``params`` of the captured layer are this call's
    params stacked along one leading axis (``nn.scan`` over layers)."""
    if not self.param_shapes or params is None:
      return False
    seen = jax.tree.leaves(self.param_shapes,
                           is_leaf=lambda x: isinstance(x, tuple))
    stored = [tuple(jnp.shape(a)) for a in jax.tree.leaves(dict(params))]
    return len(seen) == len(stored) and all(
        len(b) == len(a) + 1 and b[1:] == tuple(a) and b[0] == stored[0][0]
        for a, b in zip(seen, stored))

  @classmethod
  def of(cls, module: nn.Module | None, args: tuple[Any, ...],
         kwargs: Mapping[str, Any], param_shapes: Any = None,
         dataflow: _Dataflow | None = None
         ) -> tuple[LayerCall, tuple[jax.Array, ...]]:
    """The call of ``module(*args, **kwargs)`` and its array arguments
    (their sources looked up in ``dataflow``)."""
    leaves, treedef = jax.tree.flatten((args, dict(kwargs)))
    arrays = tuple(x for x in leaves if isinstance(x, jax.Array))
    static = tuple(_ARRAY if isinstance(x, jax.Array) else x for x in leaves)
    sources = dataflow.sources(arrays) if dataflow is not None else ()
    return cls(module, treedef, static, param_shapes, sources), arrays

  def arguments(self, arrays: Sequence[jax.Array]
                ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The call's ``(args, kwargs)`` with ``arrays`` put back in place."""
    it = iter(arrays)
    leaves = [next(it) if leaf is _ARRAY else leaf for leaf in self.static]
    return self.treedef.unflatten(leaves)


Captured = dict[str, tuple[tuple[tuple[jax.Array, ...], Any], ...]]


@dataclasses.dataclass(frozen=True)
class ModulePass:
  """One submodule of a model run alone on a recorded call's arguments,
  recording the calls of layers inside it (`ModelAdapter.run_module`).

  ``out, captured = module_pass(variables, arrays, want=None, output=True)``:
  ``variables`` the whole model's (the pass reads the submodule's part),
  ``arrays`` the call's array arguments (`LayerCall.arguments`), ``out``
  the submodule's output (None unless ``output``) and ``captured`` the
  `Captured` of its layers, keyed by their full paths (only those in
  ``want``, a frozenset of paths, when given). Jitted per ``(want,
  output)``: XLA drops the part of the submodule that computes nothing
  asked for (the layers after the last one wanted). ``calls`` are the
  layers' `LayerCall`s by full path, after the first run.

  Attributes:
    run: ``(variables, arrays, want, output) -> (output, Captured)`` with
      paths as the capture names them.
    capture: the `LinenCapture` / `NnxCapture` inside it.
    renamed: ``(old, new)``: the capture's paths start with ``old`` where
      the full paths start with ``new`` (nnx: ``("", "<submodule>/")``; a
      pass shared by identical blocks: the first block's path and this
      one's).
  """

  run: Callable[..., tuple[Any, Captured]]
  capture: Any
  renamed: tuple[str, str] = ("", "")

  def __call__(self, variables: Any, arrays: Sequence[jax.Array],
               want: frozenset[str] | None = None, output: bool = True
               ) -> tuple[Any, Captured]:
    old, new = self.renamed
    if want is not None:
      want = frozenset(rename(dict.fromkeys(want), new, old))
    out, captured = self.run(variables, tuple(arrays), want, output)
    return out, rename(captured, old, new)

  @property
  def calls(self) -> dict[str, list[LayerCall]]:
    return rename(self.capture.calls, *self.renamed)


def traced_pass(capture: Any, call: LayerCall) -> Callable[..., Any]:
  """The jitted ``(variables, arrays, want, output) -> (output, Captured)``
  of a `ModulePass`: ``capture.trace`` on ``call``'s arguments rebuilt from
  ``arrays``, keeping what ``want`` and ``output`` ask for."""

  @functools.partial(jax.jit, static_argnames=("want", "output"))
  def run(variables: Any, arrays: tuple[jax.Array, ...],
          want: frozenset[str] | None, output: bool) -> Any:
    args, kwargs = call.arguments(arrays)
    out, captured = capture.trace(variables, Batch(tuple(args), kwargs))
    if want is not None:
      captured = {p: c for p, c in captured.items() if p in want}
    return (out if output else None), captured

  return run


def rename(by_path: Mapping[str, Any], old: str, new: str) -> dict[str, Any]:
  """``by_path`` with the prefix ``old`` of its keys replaced by ``new``."""
  if old == new:
    return dict(by_path)
  return {new + path[len(old):] if path.startswith(old) else path: value
          for path, value in by_path.items()}


class LinenCapture:
  """A jitted pass of a linen ``apply`` that records the calls of modules.

  ``captured = LinenCapture(model.apply, paths)(variables, batch)`` maps each
  path in ``paths`` to ``((arrays, output), ...)``, one entry per call of
  that module's ``__call__`` in call order: the array arguments of the call
  and its result. ``capture.calls[path][i]`` (a `LayerCall`, recorded while
  tracing; ``calls`` lists the paths in the order of their first call)
  rebuilds call ``i``'s arguments from its arrays, so the module can be run
  alone on exactly the inputs it saw in the model. The calls are recorded
  by a ``flax.linen.intercept_methods`` interceptor that sows them into a
  scratch collection; under a quantized model's ``apply`` the outputs are
  the quantized layer's, the arguments always what the caller passed
  (activation quantization happens inside the layer). `trace` is the
  unjitted pass that also returns the model's output.
  """

  def __init__(self, apply: ApplyFn, paths: Collection[str]):
    self.paths = frozenset(paths)
    self.calls: dict[str, list[LayerCall]] = {}
    self._apply = apply
    self._dataflow = _Dataflow()
    # Only the captures leave the jitted pass: XLA drops what follows them.
    self._run = jax.jit(lambda v, b: self.trace(v, b)[1])

  def __call__(self, variables: Any, batch: Any) -> Captured:
    return self._run(variables, batch)

  def trace(self, variables: Any, batch: Any) -> tuple[Any, Captured]:
    """``(model output, captured)`` of one batch, traceable."""
    self.calls.clear()  # Filled again by this trace, in call order.
    self._dataflow.clear()

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      module = context.module
      path = "/".join(module.path)
      if context.method_name == "__call__" and path in self.paths:
        call, arrays = LayerCall.of(
            module.clone(parent=None), args, kwargs,
            jax.tree.map(jnp.shape, dict(module.variables.get("params", {}))),
            self._dataflow)
        calls = self.calls.setdefault(path, [])
        self._dataflow.note(path, len(calls), arrays, out)
        calls.append(call)
        module.sow(CAPTURE, "calls", (arrays, out))
      return out

    args, kwargs = batch_arguments(batch)
    with nn.intercept_methods(interceptor):
      # A calibrate-mode model records its observer states: let it (they
      # are dropped), so that its layers' inputs can be captured too.
      out, state = self._apply(variables, *args, mutable=[CAPTURE, STATS],
                               **kwargs)
    self._dataflow.clear()
    flat = traverse_util.flatten_dict(dict(state.get(CAPTURE, {})))
    captured = {"/".join(key[:-1]): calls for key, calls in flat.items()}
    for path, calls in self.calls.items():
      # nn.scan traces its body twice (shapes, then the loop) but keeps one
      # sow per call: one call, its arrays stacked per layer.
      del calls[len(captured.get(path, calls)):]
    return out, captured


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
    arrays = self.jaxq_capture_sink(self.jaxq_capture_path, args, kwargs,
                                    out)
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

  The same ``Captured``, ``calls`` and `trace` as `LinenCapture`, from an
  ``nnx.clone`` of ``model`` whose modules at ``paths`` are swapped for
  recording subclasses of their own classes (the way `jaxq.quantize_model`
  swaps in quantized ones; the variables and paths are unchanged, so
  ``state`` is ``nnx.state(model)``). While the jitted pass traces, each
  recording module reports its calls to the pass, which returns their
  arrays and outputs.
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
    self._dataflow = _Dataflow()
    # Only the captures leave the jitted pass: XLA drops what follows them.
    self._run = jax.jit(lambda s, b: self.trace(s, b)[1])

  def __call__(self, state: nnx.State, batch: Any) -> Captured:
    return self._run(state, batch)

  def trace(self, state: nnx.State, batch: Any) -> tuple[Any, Captured]:
    """``(model output, captured)`` of one batch, traceable."""
    self.calls.clear()  # Filled again by this trace, in call order.
    self._dataflow.clear()

    def sink(path: str, args: tuple[Any, ...], kwargs: dict[str, Any],
             out: Any) -> tuple[jax.Array, ...]:
      call, arrays = LayerCall.of(None, args, kwargs, dataflow=self._dataflow)
      calls = self.calls.setdefault(path, [])
      self._dataflow.note(path, len(calls), arrays, out)
      calls.append(call)
      return arrays

    model = nnx.merge(self._graphdef, state)
    recording = [m for m in nnx_modules(model).values()
                 if isinstance(m, _Recording)]
    for module in recording:
      # Set on this trace's copy only, so the graphdef never holds it.
      object.__setattr__(module, "jaxq_capture_sink", sink)
    args, kwargs = batch_arguments(batch)
    out = model(*args, **kwargs)
    self._dataflow.clear()
    captured = {}
    for module in recording:
      held = getattr(module, "jaxq_captured", None)
      if held is not None:
        captured[module.jaxq_capture_path] = tuple(held.get_value())
    for path, calls in self.calls.items():
      del calls[len(captured.get(path, calls)):]  # As `LinenCapture`.
    return out, captured
