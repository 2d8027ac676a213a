"""The quantized nnx layer classes: what a quantized layer runs per call.

`jaxq.flax.nnx.quantize_nnx` swaps each matched layer's class for
`quantized_class` of it, a subclass of its own class with this module's
``__call__`` (and ``attend`` for embeddings). The quantized layers run the
original ``__call__`` with a quantizing ``promote_dtype`` and, in serve
mode, `jaxq.dot_general` / `jaxq.einsum` / `jaxq.conv` as their
``dot_general`` / ``einsum_op`` / ``conv_general_dilated`` (in qat mode with
``int8_forward=True`` or a non-STE ``backward``, the Linear/LinearGeneral/
Einsum ops are the qat ops of `jaxq.flax.int8_qat`); ``nnx.ConvTranspose``,
whose ``lax.conv_transpose`` takes no op, serves through
`jaxq.flax.serve_ops.serve_conv_transpose` (its ``__call__`` with `jaxq.conv`,
shared with linen); embeddings look up quantized rows
(`jaxq.flax.core.embed_lookup`) and ``attend`` multiplies by the quantized
table. Everything works under ``nnx.jit``, ``nnx.grad``
and any method of the model.

Serving weights: after `jaxq.convert`, a quantized layer's ``kernel`` (or
``embedding``) ``Param`` holds a `QArray`; float weights are quantized on the
fly. A masked ``Conv``/``ConvTranspose`` kernel is quantized as
``kernel * mask`` (in QAT and by `jaxq.convert`), so serve mode does not
multiply a `QArray` kernel by the mask again. A ``transpose_kernel=True``
ConvTranspose kernel is ``(*window, out, in)``: its integer path needs
scales per output channel, ``PerChannel(axis=-2)``, or per tensor.

Threads: a qat or serve call never changes the layer's attributes. The
per-call hooks (the quantizing ``promote_dtype``, the serve ops, the
QArray kernel) live in a `contextvars.ContextVar` keyed by the layer, and
the quantized classes read those attribute names through it, so one model
may be called from several threads at once. Calibrate mode writes its
`QuantStat` variables, and the first qat call of a learned spec creates its
parameters, in place, as nnx modules do: run those from one thread.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from jaxq.flax import checks
from jaxq.flax import int8_qat
from jaxq.flax import layer_variables
from jaxq.flax import serve_ops
from jaxq.flax.nnx_variables import ModuleVariables
from jaxq.spec import QArray

_OPS = {nnx.Conv: ("conv_general_dilated", serve_ops.serve_conv),
        nnx.Einsum: ("einsum_op", serve_ops.serve_einsum),
        nnx.Linear: ("dot_general", serve_ops.serve_dot_general),
        nnx.LinearGeneral: ("dot_general", serve_ops.serve_dot_general)}
_QAT_OPS = {nnx.Einsum: ("einsum_op", int8_qat.qat_einsum),
            nnx.Linear: ("dot_general", int8_qat.qat_dot_general),
            nnx.LinearGeneral: ("dot_general", int8_qat.qat_dot_general)}


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


def weight_name(module: nnx.Module) -> str:
  """The name of the layer's weight ``Param``."""
  return "embedding" if isinstance(module, nnx.Embed) else "kernel"


class _QuantizedLayer:
  """Mixin of the quantized subclasses: runs the layer with quantizing hooks."""

  __slots__ = ()  # The same layout as the layer's: its class is swapped.

  def __call__(self, inputs, *args, **kwargs):
    if self.jaxq_layer is None:
      return self.jaxq_float_class.__call__(self, inputs, *args, **kwargs)
    layer = ModuleVariables(self)
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
    return ModuleVariables(self).embed(table, inputs).astype(dtype)

  def attend(self, query, *args, **kwargs):
    if self.jaxq_layer is None or self.jaxq_layer.weight is None:
      return self.jaxq_float_class.attend(self, query, *args, **kwargs)
    layer = ModuleVariables(self)
    table = self.embedding.get_value()
    dtype = self.dtype or table.dtype
    return layer.attend(query, table, dtype)


@functools.lru_cache(maxsize=None)
def quantized_class(cls: type) -> type:
  """The quantized subclass of an nnx layer class (cached, so jit-stable)."""
  mixin = _QuantizedEmbed if issubclass(cls, nnx.Embed) else _QuantizedLayer
  # The layer's class comes first, so that the layout is the layer's and an
  # instance's class can be swapped in place (see
  # `jaxq.flax.nnx.quantize_nnx`); the mixin's methods are copied in so that
  # they still take precedence.
  namespace = {"__module__": __name__, "__slots__": (),
               "__qualname__": f"Quantized{cls.__name__}",
               "jaxq_float_class": cls, "__call__": mixin.__call__}
  if mixin is _QuantizedEmbed:
    namespace["attend"] = mixin.attend
  else:
    namespace.update({name: _hooked(name) for name in _HOOKED})
  return type(f"Quantized{cls.__name__}", (cls, mixin), namespace)


def is_quantized(module: Any) -> bool:
  """Whether ``module`` is a layer of a quantized class (`quantized_class`)."""
  return isinstance(module, (_QuantizedLayer, _QuantizedEmbed))
