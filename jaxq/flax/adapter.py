"""`ModelAdapter`: one interface to a linen or an nnx model, for workflows.

``adapter = jaxq.flax.adapt(model, variables)`` wraps a float model or a
model from `jaxq.quantize_model` (linen: a module or `QuantizedLinen` with
its variables ``{"params": ...}``; nnx: a module with an ``nnx.State`` or
None for its own state) and owns everything that differs between the two
Flax APIs. Workflows (`jaxq.calibrate`, `jaxq.convert`, `jaxq.sensitivity`,
`jaxq.report`, GPTQ/AWQ/SmoothQuant...) are written once against it and
never test which API they hold. Like optax's ``GradientTransformation``,
an adapter is a small value with pure methods: none modifies the model or
the variables given to it; methods that change variables return new ones.

Paths are the "/"-joined module paths of `jaxq.flax.layers`
(``"Encoder_0/Dense_1"``; nnx ``"blocks/0/linear"``). ``variables`` is the
API's own container: linen a dict of collections, nnx an ``nnx.State``.
Every method taking ``variables`` defaults to the adapter's own.

Batches follow `jaxq.flax.batch` (array: one positional argument; tuple or
list: the positional arguments; mapping: keyword arguments; `Batch`: both,
plus a padding mask that the model never sees).

The methods, with shapes (a Dense/Linear layer with kernel ``(in, out)``
called on ``x`` of shape ``(*lead, in)``):

* ``layers() -> dict[str, LayerInfo]``: path -> module type, rule, weight
  shape and specs, in the order the model first calls them (linen: the
  layers traced so far; a float model has none until `quantize`).
* ``quantize(rules, mode, switchable=False) -> ModelAdapter``: the model
  quantized by ``rules`` in ``mode``, with the same variables (nnx: a
  quantized copy). ``switchable`` (qat or serve mode): every quantized layer
  reads an on/off flag from the variables and computes in float while it is
  off, so one compiled ``apply_fn`` runs any subset of the layers quantized
  (serve mode: by ``lax.cond`` between the low-bit and the float op, on
  float weights).
* ``set_enabled(enabled, variables=None) -> variables``: new variables with
  the flags of the switchable layers at the paths of ``enabled`` (path ->
  bool) set; the others keep theirs (on unless set). Flags are boolean
  arrays, so changing them does not recompile ``apply_fn``.
* ``apply(batch, variables=None) -> output``: the model on one batch.
* ``apply_fn() -> ApplyFn``: ``apply_fn(variables, *args, **kwargs)``,
  jit-compiled: linen ``apply``, nnx ``nnx.merge(graphdef, variables)(...)``.
  In calibrate mode both give the output alone (the observer states are
  dropped, and with them their NaN/inf check).
* ``capture_inputs(batches, paths, variables=None) -> LayerInputs``: the
  inputs each layer at ``paths`` receives over ``batches``, recorded in one
  jitted float (or quantized-mode) pass per batch under ``variables``
  (NaN/inf pass through unchecked: the caller checks them, padding out):
  ``inputs[path][call][b]`` is the ``(*lead, in)`` input of call ``call``
  (0 unless the layer is shared) on batch ``b``; ``outputs`` likewise,
  ``(*lead, out)``; ``masks[b]`` the batch's padding mask or None.
* ``capture(paths) -> LinenCapture | NnxCapture``: the lower-level pass of
  `jaxq.flax.capture`, with every argument of every call.
* ``run_module(path, call, paths) -> ModulePass``: the module at ``path``
  (a block of layers, say) alone, on the arguments of one of its recorded
  calls (a `LayerCall` of a `capture` pass at ``path``), with this model's
  quantization of its layers, recording the calls of the layers at
  ``paths`` inside it: a jitted ``(variables, arrays) -> (output,
  captured)`` over the whole model's variables, so a workflow walks a deep
  model block by block (`jaxq.ptq.blocks`) without running it whole.
* ``get_weight(path, variables=None) -> (kernel, bias)``: the layer's float
  weight (``kernel`` ``(in, out)``; ``embedding`` ``(vocab, features)``
  for embeddings) and bias ``(out,)`` or None.
* ``set_kernel(path, kernel, variables=None) -> variables``: new
  variables with the layer's weight replaced by ``kernel`` (same shape and
  dtype); linen a new dict, nnx a new ``nnx.State``. Unknown paths and wrong
  shapes raise a ValueError naming the path. The sequential pattern::

      for path in paths:          # in model order
        inputs = adapter.capture_inputs(batches, [path], variables)
        kernel, bias = adapter.get_weight(path, variables)
        kernel = new_kernel(kernel, inputs.inputs[path])
        variables = adapter.set_kernel(path, kernel, variables)

* ``settings() -> LayerSettings``: the quantized model's mode,
  ``on_nonfinite`` and ``observer_for``.
* ``calibration_pass(batch, forward, observer_for) -> CalibrationPass``:
  the jitted calibration step over the API's statistics container.
* ``act_states(stats) -> dict[str, state]`` and ``ranges_from(ranges)``:
  per-path observer states out of, and per-path ranges into, the API's
  containers; ``act_ranges(stats)`` finalizes them by each rule;
  ``input_moments(stats)``: per-path `InputMoment` of the ``"mse"``
  weights, for their data-aware range (`jaxq.flax.core`).
* ``read(path, name, variables=None)`` / ``write(values, variables=None)``:
  any variable of a layer by name (``"kernel"``, ``"bias"``,
  ``"embedding"``, the learned ``"weight_scale"``...), the storage behind
  `get_weight`/`set_kernel` and `jaxq.convert`.
* ``serving(variables, stats, ranges)``, ``without_stats(variables)``:
  `jaxq.convert`'s ranges and statistics in the API's containers.
* ``init_learned(*args, **kwargs)``: `jaxq.qat.init_learned`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Collection, Mapping, Protocol, Sequence

import jax

from jaxq.algorithms.stats import InputMoment
from jaxq.flax import batch as batch_lib
from jaxq.flax import core
from jaxq.flax import rules as rules_lib
from jaxq.flax.rules import LayerInfo

ApplyFn = Callable[..., Any]
Forward = Callable[[Any, Any], Any]
# The names of a layer's learned-range parameters (`jaxq.flax.core`).
LEARNED_NAMES = ("weight_scale", "act_scale", "weight_clip", "act_clip")


@dataclasses.dataclass(frozen=True)
class LayerInputs:
  """What `ModelAdapter.capture_inputs` recorded.

  Attributes:
    inputs: path -> one tuple per call of the layer (call order; one call
      unless the layer is shared) of one array per batch: the layer's input
      activation, ``(*lead, in_features)`` for a Dense/Linear layer.
    outputs: the same for the layer's outputs, ``(*lead, out_features)``.
    masks: per batch, its `jaxq.flax.Batch` padding mask, or None.
  """

  inputs: Mapping[str, tuple[tuple[jax.Array, ...], ...]]
  outputs: Mapping[str, tuple[tuple[Any, ...], ...]]
  masks: tuple[jax.Array | None, ...]


@dataclasses.dataclass(frozen=True)
class LayerSettings:
  """The settings `jaxq.quantize_model` gave a model's layers."""

  mode: core.Mode
  on_nonfinite: core.OnNonfinite
  observer_for: core.ObserverFor
  int8_forward: bool = False


@dataclasses.dataclass(frozen=True)
class CalibrationPass:
  """One model's calibration pass as pure functions over its stats.

  Attributes:
    step: jitted ``(stats, batch) -> (stats, nonfinite)``, ``nonfinite`` the
      int32 counts of the act states in ``act_paths`` order.
    stats: the stats the first batch creates, abstract (the observer
      states' shapes, ``jax.ShapeDtypeStruct`` leaves, from
      ``jax.eval_shape``): linen a ``"quant_stats"`` collection, nnx a
      ``State`` of `QuantStat` variables. The workflow fills them with
      empty observer states.
    act_paths: the module paths of the static act layers, in model order.
  """

  step: Callable[[Any, Any], tuple[Any, jax.Array]]
  stats: Any
  act_paths: tuple[str, ...]


class ModelAdapter(Protocol):
  """A linen or nnx model and its variables; see the module docstring.

  Implemented by `jaxq.flax.linen_adapter.LinenAdapter` and
  `jaxq.flax.nnx_adapter.NnxAdapter`; obtained with `jaxq.flax.adapt`.
  """

  variables: Any

  # The model.

  @property
  def quantized(self) -> bool:
    """Whether the model comes from `jaxq.quantize_model`."""

  @property
  def handle(self) -> Any:
    """The model as the user holds it (`QuantizedLinen`, module)."""

  def layers(self) -> dict[str, LayerInfo]:
    """Path -> `LayerInfo` of the quantizable layers known so far."""

  def ordered_layers(self, batch: Any) -> dict[str, LayerInfo]:
    """`layers` in first-call order, tracing ``batch`` abstractly."""

  def unmatched_rules(self) -> tuple[rules_lib.Rule, ...]:
    """The rules that matched no layer."""

  def quantize(self, rules: Sequence[rules_lib.Rule], mode: core.Mode,
               switchable: bool = False) -> "ModelAdapter":
    """The model quantized by ``rules`` in ``mode``, same variables;
    ``switchable``: each layer's quantization has an on/off flag."""

  def set_enabled(self, enabled: Mapping[str, bool],
                  variables: Any | None = None) -> Any:
    """New variables with the on/off flags of switchable layers set."""

  def float_model(self, what: str) -> tuple[Any, tuple[rules_lib.Rule, ...]]:
    """``(float model, rules)`` of a quantized model (raises for nnx)."""

  def with_variables(self, variables: Any) -> "ModelAdapter":
    """The same model with other variables."""

  def with_ranges(self, ranges: Mapping[str, core.ActRange]
                  ) -> "ModelAdapter":
    """The model with path -> act range loaded for its static act layers."""

  def require_variables(self, what: str) -> None:
    """Raises a ValueError naming ``what`` for missing or wrong variables."""

  # Running and capturing.

  def apply(self, batch: Any, variables: Any | None = None) -> Any:
    """The model's output on one batch (`jaxq.flax.batch` convention)."""

  def apply_fn(self) -> ApplyFn:
    """Jitted ``apply_fn(variables, *args, **kwargs)``."""

  def capture(self, paths: Collection[str]) -> Any:
    """The `jaxq.flax.capture` pass of the layers at ``paths``."""

  def capture_inputs(self, batches: Sequence[Any], paths: Collection[str],
                     variables: Any | None = None, *, capture: Any = None
                     ) -> LayerInputs:
    """Inputs and outputs of the layers at ``paths``, per call and batch;
    ``capture``, a pass of ``capture(paths)`` to reuse: one compilation for
    every call with variables of the same structure (a sequential loop)."""

  def replay(self, path: str, call: Any, mode: core.Mode,
             rule: rules_lib.Rule) -> Callable[[Sequence[jax.Array]], Any]:
    """``arrays -> output``: the layer at ``path`` alone on a captured
    call (a `jaxq.flax.capture.LayerCall`)."""

  def run_module(self, path: str, call: Any, paths: Collection[str]
                 ) -> Any:
    """The module at ``path`` alone on ``call``'s arguments, recording the
    layers at ``paths`` inside it (a `jaxq.flax.capture.ModulePass`)."""

  # Weights and other variables.

  def get_weight(self, path: str, variables: Any | None = None
                 ) -> tuple[jax.Array, jax.Array | None]:
    """``(kernel, bias or None)`` of the layer at ``path``."""

  def set_kernel(self, path: str, kernel: jax.Array,
                 variables: Any | None = None) -> Any:
    """New variables with the layer's kernel replaced (same shape)."""

  def read(self, path: str, name: str, variables: Any | None = None
           ) -> Any | None:
    """The layer's variable ``name`` (kernel, bias, learned...), or None."""

  def write(self, values: Mapping[tuple[str, str], Any],
            variables: Any | None = None) -> Any:
    """New variables with ``{(path, name): value}`` written; a fixed
    variable (`jaxq.flax.core.FIXED_NAMES`) given None is removed."""

  def mask(self, path: str, variables: Any | None = None) -> Any:
    """The kernel mask of a masked convolution, or None."""

  # Statistics and ranges.

  def settings(self) -> LayerSettings:
    """The quantized model's mode, on_nonfinite and observer_for."""

  def calibration_pass(self, batch: Any, forward: Forward,
                       observer_for: core.ObserverFor) -> CalibrationPass:
    """The jitted calibration step (stats abstract, see `CalibrationPass`)."""

  def check_stats(self, stats: Any, what: str) -> None:
    """Raises a ValueError unless ``stats`` is None or the API's kind."""

  def act_states(self, stats: Any) -> dict[str, Any]:
    """Path -> act observer state of a stats container."""

  def input_moments(self, stats: Any) -> dict[str, InputMoment]:
    """Path -> the `InputMoment` calibrate mode recorded for an ``"mse"``
    weight (`jaxq.flax.core.INPUT_MOMENT`); {} for None."""

  def act_ranges(self, stats: Any) -> Any:
    """The ranges container, finalized by each layer's rule (and the
    static KV cache ranges, by max)."""

  def with_kv_ranges(self, ranges: Any, stats: Any) -> Any:
    """``ranges`` with the static KV cache ranges finalized from
    ``stats`` (`jaxq.flax.kv_cache`)."""

  def ranges_from(self, ranges: Mapping[str, core.ActRange]) -> Any:
    """A ranges container from path -> act range."""

  def ranges_by_path(self, ranges: Any) -> dict[str, core.ActRange]:
    """Path -> act range of a ranges container (no KV cache ranges)."""

  def without_stats(self, variables: Any) -> Any:
    """``variables`` without observer states."""

  def serving(self, variables: Any, stats: Any | None, ranges: Any | None
              ) -> Any:
    """`jaxq.convert`'s variables: stats dropped, act ranges attached."""

  def check_convertible(self, variables: Any) -> None:
    """Raises a ValueError unless `jaxq.convert` can read ``variables``."""

  def init_learned(self, *args: Any, **kwargs: Any) -> Any:
    """`jaxq.qat.init_learned`: creates the learned ranges."""


def capture_inputs(adapter: ModelAdapter, batches: Sequence[Any],
                   paths: Collection[str], variables: Any, *,
                   capture: Any = None) -> LayerInputs:
  """`ModelAdapter.capture_inputs` from the adapter's `capture` pass (shared
  by both APIs: the passes return the same ``Captured``)."""
  known = adapter.layers()
  unknown = sorted(set(paths) - set(known)) if known else []
  if unknown:
    raise ValueError(f"capture_inputs: no layer at {unknown}; the model's "
                     f"layers are {sorted(known)}.")
  if capture is None:
    capture = adapter.capture(paths)
  captured = [capture(variables, batch) for batch in batches]
  return collect_inputs(capture.calls, captured, paths,
                        tuple(batch_lib.batch_mask(b) for b in batches))


def collect_inputs(calls: Mapping[str, Sequence[Any]],
                   captured: Sequence[Mapping[str, Any]],
                   paths: Collection[str],
                   masks: tuple[jax.Array | None, ...]) -> LayerInputs:
  """`LayerInputs` of the layers at ``paths`` from one `Captured` per batch
  and the passes' ``calls`` (`jaxq.flax.capture.LayerCall`s by path): each
  call's input activation (its first argument) and output."""
  inputs: dict[str, list[list[jax.Array]]] = {}
  outputs: dict[str, list[list[Any]]] = {}
  for one in captured:
    for path in paths:
      for i, (call, (arrays, out)) in enumerate(zip(calls.get(path, ()),
                                                    one.get(path, ()))):
        args, kwargs = call.arguments(arrays)
        x = args[0] if args else next(iter(kwargs.values()))
        calls_in = inputs.setdefault(path, [])
        calls_out = outputs.setdefault(path, [])
        if i == len(calls_in):  # The first batch: one list per call.
          calls_in.append([])
          calls_out.append([])
        inputs[path][i].append(x)
        outputs[path][i].append(out)
  missing = sorted(set(paths) - set(inputs))
  if missing:
    raise ValueError(f"capture_inputs: the model never called {missing} on "
                     f"these batches.")
  return LayerInputs(
      inputs={p: tuple(map(tuple, c)) for p, c in inputs.items()},
      outputs={p: tuple(map(tuple, c)) for p, c in outputs.items()},
      masks=masks)


def unknown_layer(path: str, known: Collection[str], what: str) -> ValueError:
  """The error for a path that names no layer."""
  return ValueError(f"{what}: no layer {path!r}; the model's layers are "
                    f"{sorted(known)}.")


def set_kernel(adapter: ModelAdapter, path: str, kernel: jax.Array,
               variables: Any | None) -> Any:
  """`ModelAdapter.set_kernel` from its `get_weight`, `read` and `write`
  (shared by both APIs): the layer's weight, by the name its `LayerInfo`
  gives (a float model's: ``kernel``, else ``embedding``), replaced."""
  old, _ = adapter.get_weight(path, variables)
  check_same_shape(path, old, kernel)
  info = adapter.layers().get(path)
  name = info.weight_name if info else (
      "embedding" if adapter.read(path, "kernel", variables) is None
      else "kernel")
  return adapter.write({(path, name): kernel}, variables)


def check_same_shape(path: str, old: jax.Array, new: jax.Array) -> None:
  """Raises a ValueError naming the layer when a new weight's shape differs."""
  if tuple(old.shape) != tuple(new.shape):
    raise ValueError(f"set_kernel: the new kernel of {path!r} has shape "
                     f"{tuple(new.shape)}, but the layer's is "
                     f"{tuple(old.shape)}.")


def replay(apply: ApplyFn, call: Any, variables: Any
           ) -> Callable[[Sequence[jax.Array]], Any]:
  """``arrays -> apply(variables, *args, **kwargs)``, jitted, on the
  arguments of ``call`` (a `jaxq.flax.capture.LayerCall`) rebuilt from a
  captured call's ``arrays``."""

  @jax.jit
  def run(variables: Any, arrays: Sequence[jax.Array]) -> Any:
    args, kwargs = call.arguments(arrays)
    return apply(variables, *args, **kwargs)

  return lambda arrays: run(variables, arrays)


def stacked_apply(apply: ApplyFn) -> ApplyFn:
  """``apply`` of one layer, vmapped over a stack of layers (``nn.scan`` or
  ``nnx.scan`` over layers): the variables and the captured array arguments
  lead with ``L``, each slice runs one layer; other arguments are static."""

  def run(variables: Any, *args: Any, **kwargs: Any) -> Any:
    leaves, treedef = jax.tree.flatten((args, kwargs))
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]

    def one(layer_variables: Any, arrays: Sequence[jax.Array]) -> Any:
      filled = list(leaves)
      for i, array in zip(where, arrays):
        filled[i] = array
      one_args, one_kwargs = treedef.unflatten(filled)
      return apply(layer_variables, *one_args, **one_kwargs)

    return jax.vmap(one)(variables, [leaves[i] for i in where])

  return run
