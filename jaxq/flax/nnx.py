"""Quantized nnx models, by module-graph surgery.

``qmodel = jaxq.quantize_model(model, rules, mode)`` copies ``model`` (with
``nnx.clone``; the original is left untouched) and, in the copy, turns every
matched ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv``,
``nnx.ConvTranspose`` and ``nnx.Embed`` into an instance of a quantized
subclass of its own class (``QuantizedLinear`` for ``nnx.Linear``, and so on)
by swapping its class in place: it keeps the very same attributes and
``nnx.Param`` variables, and every path to it (shared layers). Paths do not
change, so ``nnx.state(model)`` loads into ``qmodel`` with ``nnx.update`` and
``nnx.state(qmodel, nnx.Param)`` has the original's tree. The quantized
layers run the original ``__call__`` with a quantizing ``promote_dtype`` and,
in serve mode, `jaxq.dot_general` / `jaxq.einsum` / `jaxq.conv` as their
``dot_general`` / ``einsum_op`` / ``conv_general_dilated`` (in qat mode with
``int8_forward=True`` or a non-STE ``backward``, the Linear/LinearGeneral/
Einsum ops are the qat ops of `jaxq.flax.int8_qat`); ``nnx.ConvTranspose``,
whose ``lax.conv_transpose`` takes no op, serves through
`jaxq.flax.serve_ops.serve_conv_transpose` (its ``__call__`` with `jaxq.conv`,
shared with linen); embeddings look
up quantized rows (`jaxq.flax.core.embed_lookup`) and ``attend`` multiplies
by the quantized table. Everything works under ``nnx.jit``, ``nnx.grad``
and any method of the model.

Each quantized layer also carries:

* ``jaxq_layer``: its `LayerQuant` (static), or None when a skip rule or no
  rule applies; ``jaxq_info``: its `LayerInfo`, whose ``serve_fallback`` is
  decided at quantize time from the specs and the kernel shape, as linen
  decides it (`jaxq.flax.serve_ops.layer_fallback_reason`).
* ``jaxq_rngs``: with ``backward="int8"``, the ``nnx.Rngs`` given to
  `quantize_model` (one object shared by the layers), whose key rounds the
  gradient.
* ``jaxq_weight_stats``, ``jaxq_act_stats``, ``jaxq_input_moment_stats``:
  `QuantStat` variables holding observer states (the last an "mse"
  weight's `InputMoment`, see `jaxq.flax.core`), created by the first
  calibrate-mode call (``nnx.state(qmodel, QuantStat)`` collects them).
* ``jaxq_act_range``: a `QuantRange` variable ``{"amax": ...}`` for a static
  act spec, loaded with ``nnx.update(qmodel, jaxq.flax.act_ranges(...))`` or
  from `jaxq.convert`'s state.
* ``jaxq_weight_range``, ``jaxq_act_smooth``: `QuantFixed` variables, what
  the PTQ algorithms (`jaxq.gptq`, `jaxq.awq`, `jaxq.smoothquant`) fixed
  (see `jaxq.flax.core.FIXED_NAMES`), never trained.
* ``jaxq_weight_scale``, ``jaxq_act_scale`` (``jaxq_weight_clip``,
  ``jaxq_act_clip`` for PACT): ``nnx.Param`` learned ranges of specs with
  ``learn`` set (see `jaxq.flax.core`), created by the first qat-mode call
  (run the model once, e.g. `jaxq.qat.init_learned`, before building the
  optimizer so that it sees them), an activation's from ``jaxq_act_range``
  when loaded. `jaxq.convert`'s state carries them to the serve model.

Serving weights: after `jaxq.convert`, a quantized layer's ``kernel`` (or
``embedding``) ``Param`` holds a `QArray`; float weights are quantized on the
fly. A masked ``Conv``/``ConvTranspose`` kernel is quantized as
``kernel * mask`` (in QAT and by `jaxq.convert`), so serve mode does not
multiply a `QArray` kernel by the mask again. A ``transpose_kernel=True``
ConvTranspose kernel is ``(*window, out, in)``: its integer path needs
scales per output channel, ``PerChannel(axis=-2)``, or per tensor.

Shared layers: a layer reachable by several paths (``self.b = self.a``, the
same layer twice in a list) is one quantized layer, quantized at every use,
as linen quantizes every call of a shared submodule. Its class is swapped
in place, so every path reaches it; `layers` lists it once, at its first
path in nnx's traversal order (sorted attribute names: ``dec`` before
``enc``), the path where ``nnx.state`` keeps its parameters and
`jaxq.convert` stores its QArray; calibration records every call into its one observer
state. Rules that would treat its paths differently raise a ValueError
naming both paths.

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

Threads: a qat or serve call never changes the layer's attributes. The
per-call hooks (the quantizing ``promote_dtype``, the serve ops, the
QArray kernel) live in a `contextvars.ContextVar` keyed by the layer, and
the quantized classes read those attribute names through it, so one model
may be called from several threads at once. Calibrate mode writes its
`QuantStat` variables, and the first qat call of a learned spec creates its
parameters, in place, as nnx modules do: run those from one thread.

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

import contextlib
import contextvars
import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxq.flax import checks
from jaxq.flax import core
from jaxq.flax import layer_variables
from jaxq.flax import int8_qat
from jaxq.flax import kv_cache
from jaxq.flax import rules as rules_lib
from jaxq.flax import serve_ops
from jaxq.spec import QArray

_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv,
           nnx.ConvTranspose, nnx.Embed)
_OPS = {nnx.Conv: ("conv_general_dilated", serve_ops.serve_conv),
        nnx.Einsum: ("einsum_op", serve_ops.serve_einsum),
        nnx.Linear: ("dot_general", serve_ops.serve_dot_general),
        nnx.LinearGeneral: ("dot_general", serve_ops.serve_dot_general)}
_QAT_OPS = {nnx.Einsum: ("einsum_op", int8_qat.qat_einsum),
            nnx.Linear: ("dot_general", int8_qat.qat_dot_general),
            nnx.LinearGeneral: ("dot_general", int8_qat.qat_dot_general)}
_MASKED = (nnx.Conv, nnx.ConvTranspose)  # Their kernel is ``kernel * mask``.
_RULES_ATTR = "jaxq_rules"
ENABLED_ATTR = "jaxq_enabled"  # A `QuantEnabled` of switchable layers.


class QuantStat(nnx.Variable):
  """An observer state recorded by calibrate mode."""


class QuantRange(nnx.Variable):
  """A static activation range ``{"amax": ...[, "amin": ...]}``."""


class QuantEnabled(nnx.Variable):
  """A switchable layer's on/off flag, a boolean scalar (``switchable``)."""


class QuantFixed(nnx.Variable):
  """A PTQ algorithm's fixed per-layer variable: a weight range
  ``{"amax": ...[, "amin": ...]}`` or input smoothing factors."""


class _Held:
  """Stands in for a weight ``Param`` whose value is a QArray for one call.

  The nnx layers read ``self.kernel[...]``, which indexes the value; a QArray
  is a pytree, not an array, so the quantized layer hands over this holder.
  """

  def __init__(self, value: QArray):
    self.value = value

  def __getitem__(self, index: Any) -> QArray:
    del index  # Always ``...``: the whole weight.
    return self.value


# The hooks of the quantized layers being called in this thread (or task):
# ``{id(module): {attribute: value}}``. A call never sets attributes of the
# shared module (another thread may be calling it: it would see this call's
# hooks, and restore them as the originals); the quantized classes read
# these names through `_hooked`, which prefers the calling context's value.
_HOOKS: contextvars.ContextVar[dict[int, dict[str, Any]]] = (
    contextvars.ContextVar("jaxq_nnx_hooks", default={}))
# The attributes a quantized layer may replace for one call.
_HOOKED = ("promote_dtype", "dot_general", "dot_general_cls", "einsum_op",
           "conv_general_dilated", "kernel", "mask")


def _hooked(name: str) -> property:
  """The attribute ``name``: this context's hook for the module, else the
  module's own value (stored, as before, in its ``__dict__``)."""

  def get(self: nnx.Module) -> Any:
    hooks = _HOOKS.get().get(id(self))
    if hooks is not None and name in hooks:
      return hooks[name]
    try:
      return vars(self)[name]
    except KeyError:
      raise AttributeError(
          f"{type(self).__name__!r} object has no attribute {name!r}"
      ) from None

  def set_(self: nnx.Module, value: Any) -> None:
    vars(self)[name] = value

  return property(get, set_)


@contextlib.contextmanager
def _hooks(module: nnx.Module, hooks: dict[str, Any]) -> Iterator[None]:
  """Makes ``module`` see ``hooks`` in place of its attributes, in this
  thread's (task's) context only, for the duration of one call."""
  token = _HOOKS.set({**_HOOKS.get(), id(module): hooks})
  try:
    yield
  finally:
    _HOOKS.reset(token)


class _Layer(layer_variables.LayerVariables):
  """A quantized nnx layer's variables, kept as its attributes."""

  def __init__(self, module: nnx.Module):
    super().__init__(module.jaxq_layer)
    self.module = module

  def get_stats(self, name: str) -> Any | None:
    stat = getattr(self.module, f"jaxq_{name}_stats", None)
    return None if stat is None else stat.get_value()

  def put_stats(self, name: str, state: Any) -> None:
    attr = f"jaxq_{name}_stats"
    if getattr(self.module, attr, None) is None:
      setattr(self.module, attr, QuantStat(state))
    else:
      getattr(self.module, attr).set_value(state)

  def get_range(self) -> core.ActRange | None:
    held = getattr(self.module, "jaxq_act_range", None)
    if held is None:
      return None
    act_range = held.get_value()
    # Concrete (an eager call) ranges are checked here; under jit they are
    # traced and were checked where they were made (act_ranges, convert).
    checks.check_act_range("jaxq", self.quant.path, act_range,
                           self.quant.act)
    return act_range

  def get_enabled(self) -> jax.Array | None:
    flag = getattr(self.module, ENABLED_ATTR, None)
    return None if flag is None else flag.get_value()

  def get_fixed(self, name: str) -> Any | None:
    held = getattr(self.module, f"jaxq_{name}", None)
    return None if held is None else held.get_value()

  def get_learned(self, name: str) -> jax.Array | None:
    param = getattr(self.module, f"jaxq_{name}", None)
    return None if param is None else param.get_value()

  def backward_key(self) -> jax.Array | None:
    """backward="int8"'s key: the next from the layer's ``jaxq_rngs`` (the
    ``rngs`` given to `quantize_model`), its ``"jaxq"`` stream or default;
    None without one (a forward needs none)."""
    rngs = getattr(self.module, "jaxq_rngs", None)
    return None if rngs is None else rngs.jaxq()

  def missing_key_error(self) -> ValueError:
    """What a gradient through the layer raises without a key."""
    return ValueError(
        f"jaxq qat backward='int8': {self.quant.path!r} "
        f"({self.quant.module_type}) rounds its gradient stochastically "
        f"and needs a PRNG key; pass rngs=nnx.Rngs({int8_qat.RNG_NAME}=seed)"
        f" to quantize_model.")

  def put_learned(self, name: str, value: jax.Array) -> None:
    if self.quant.mode != "qat":
      raise ValueError(
          f"jaxq {self.quant.mode}: {self.quant.path!r} has a learned range "
          f"but no 'jaxq_{name}' parameter; load the trained state from "
          f"jaxq.convert (nnx.update(qmodel, serving)).")
    setattr(self.module, f"jaxq_{name}", nnx.Param(value))


def _weight_name(module: nnx.Module) -> str:
  return "embedding" if isinstance(module, nnx.Embed) else "kernel"


class _QuantizedLayer:
  """Mixin of the quantized subclasses: runs the layer with quantizing hooks."""

  __slots__ = ()  # The same layout as the layer's: its class is swapped.

  def __call__(self, inputs, *args, **kwargs):
    if self.jaxq_layer is None:
      return self.jaxq_float_class.__call__(self, inputs, *args, **kwargs)
    layer = _Layer(self)
    original = self.promote_dtype
    qat_kind = next((c for c in _QAT_OPS if isinstance(self, c)), None)
    qat_op = qat_kind is not None and int8_qat.uses_qat_op(layer.quant)
    # A switchable serve layer: float operands, a `SwitchedOp` as its op.
    switched_serve = layer.quant.mode == "serve" and layer.quant.switchable

    def promote_dtype(arrays, /, *, dtype=None, inexact=True):
      x, w, bias = arrays
      if isinstance(w, QArray):  # Serving weights: promote the rest.
        dtype = dtype or jnp.result_type(
            w.dtype, *(a for a in (x, bias) if a is not None))
        x, _, bias = original((x, None, bias), dtype=dtype, inexact=inexact)
        w = serve_ops.computing_in(w, x.dtype)
      else:
        x, w, bias = original((x, w, bias), dtype=dtype, inexact=inexact)
      if switched_serve:
        return x, w, bias  # The switched op quantizes them.
      if qat_op:
        if int8_qat.uses_int8_forward(layer.quant):
          layer.check_int8_forward()
        return x, w, bias  # The qat op quantizes (and smooths) them.
      return layer.act(x), layer.weight(w), bias

    hooks: dict[str, Any] = {"promote_dtype": promote_dtype}
    if qat_op:
      name, op = _QAT_OPS[qat_kind]
      hooks[name] = functools.partial(op, layer)
      if qat_kind is not nnx.Einsum:
        hooks["dot_general_cls"] = None
    if layer.quant.mode == "serve" and isinstance(self, nnx.ConvTranspose):
      # Its __call__ runs lax.conv_transpose, which takes no op.
      bias = None if self.bias is None else self.bias.get_value()
      return serve_ops.serve_conv_transpose(
          layer.quant.path, serve_ops.ConvTransposeConfig.of(self), inputs,
          self.kernel.get_value(), bias,
          lambda x, w, b: promote_dtype((x, w, b), dtype=self.dtype),
          layer_variables.SwitchedOp([layer], serve_ops.serve_conv,
                                     jax.lax.conv_general_dilated)
          if switched_serve else serve_ops.serve_conv)
    if layer.quant.mode == "serve":
      kind = next((c for c in _OPS if isinstance(self, c)), None)
      if kind is None:
        raise ValueError(
            f"jaxq serve: {layer.quant.path!r} is a {layer.quant.module_type}"
            f", which takes no injectable op; skip it with a Rule(..., "
            f"skip=True).")
      name, op = _OPS[kind]
      if switched_serve:  # The low-bit op or the layer's own, by its flag.
        own = (self.dot_general_cls() if name == "dot_general" and
               getattr(self, "dot_general_cls", None) else getattr(self, name))
        op = layer_variables.SwitchedOp([layer], op, own,
                                        subscripts=kind is nnx.Einsum)
      hooks[name] = op
      if kind in (nnx.Linear, nnx.LinearGeneral):
        hooks["dot_general_cls"] = None
      kernel = self.kernel.get_value()
      if layer.quant.weight is not None:  # Quantized on the fly (eager).
        checks.check_finite_weight("jaxq serve", layer.quant.path, "kernel",
                                   kernel)
      if isinstance(kernel, QArray):
        hooks["kernel"] = _Held(kernel)
        hooks["mask"] = None  # jaxq.convert quantized kernel * mask.
    with _hooks(self, {k: v for k, v in hooks.items() if k in vars(self)}), \
        jax.named_scope(layer.quant.path):  # For op names (jaxq.inspect).
      return self.jaxq_float_class.__call__(self, inputs, *args, **kwargs)


class _QuantizedEmbed:
  """Mixin of the quantized ``nnx.Embed``: row lookups and ``attend``."""

  __slots__ = ()

  def __call__(self, inputs, *args, **kwargs):
    if self.jaxq_layer is None or self.jaxq_layer.weight is None:
      return self.jaxq_float_class.__call__(self, inputs, *args, **kwargs)
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f"jaxq: {self.jaxq_layer.path!r} (Embed) needs integer "
                       f"ids, got dtype {inputs.dtype}.")
    table = self.embedding.get_value()
    dtype = self.dtype or table.dtype
    return _Layer(self).embed(table, inputs).astype(dtype)

  def attend(self, query, *args, **kwargs):
    if self.jaxq_layer is None or self.jaxq_layer.weight is None:
      return self.jaxq_float_class.attend(self, query, *args, **kwargs)
    layer = _Layer(self)
    table = self.embedding.get_value()
    dtype = self.dtype or table.dtype
    return layer.attend(query, table, dtype)


@functools.lru_cache(maxsize=None)
def quantized_class(cls: type) -> type:
  """The quantized subclass of an nnx layer class (cached, so jit-stable)."""
  mixin = _QuantizedEmbed if issubclass(cls, nnx.Embed) else _QuantizedLayer
  # The layer's class comes first, so that the layout is the layer's and an
  # instance's class can be swapped in place (see `quantize_nnx`); the
  # mixin's methods are copied in so that they still take precedence.
  namespace = {"__module__": __name__, "__slots__": (),
               "__qualname__": f"Quantized{cls.__name__}",
               "jaxq_float_class": cls, "__call__": mixin.__call__}
  if mixin is _QuantizedEmbed:
    namespace["attend"] = mixin.attend
  else:
    namespace.update({name: _hooked(name) for name in _HOOKED})
  return type(f"Quantized{cls.__name__}", (cls, mixin), namespace)


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
      f"stores its {_weight_name(module)!r} with shape {stored}, but one "
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
        kv_cache.use_nnx_cache(module, rule.kv_cache)
        kv_rules.append(rule)
      continue
    if isinstance(module, (_QuantizedLayer, _QuantizedEmbed)):
      raise ValueError(f"quantize_model: {_path(path)!r} is already quantized; "
                       f"quantize the original float model instead.")
    if not isinstance(module, _LAYERS):
      continue
    weight = getattr(module, _weight_name(module)).get_value()
    path_str = _path(path)
    shape, stacked = _stacked(path_str, module, tuple(weight.shape))
    rule = rules_lib.match(rules, path_str, module)
    if rule is not None and not rule.skip and rule.weight is not None:
      checks.check_finite_weight("quantize_model", path_str,
                                 _weight_name(module), weight)
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
        weight_shape=shape, weight_name=_weight_name(module),
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
    if isinstance(module, (_QuantizedLayer, _QuantizedEmbed)):
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
