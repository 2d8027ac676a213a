"""Per call, what a matched linen layer runs: the method interceptor.

`jaxq.flax.linen.QuantizedLinen` runs its model under
``nn.intercept_methods(Interceptor(qmodel))``. Nothing global is patched:
for the duration of one call of a matched layer, the interceptor hands that
module a quantizing ``promote_dtype`` (every Flax layer passes ``(inputs,
kernel, bias)`` through it, so the weight is known to be the module's
parameter) and, in serve mode, `jaxq.dot_general` / `jaxq.conv` as its
``dot_general`` / ``conv_general_dilated`` (in qat mode with
``int8_forward=True`` or a non-STE ``backward``, the qat op of
`jaxq.flax.int8_qat` as the Dense/DenseGeneral/Einsum matmul; in a
switchable serve model, a `SwitchedOp` choosing the low-bit or the float op
by the layer's flag). Two layers take no op, so serve mode runs their
``__call__`` re-implemented with the low-bit op: ``nn.Einsum`` with
`jaxq.einsum`, ``nn.ConvTranspose`` (whose ``lax.conv_transpose`` is a
``conv_general_dilated`` of the dilated input) with `jaxq.conv`, see
`jaxq.flax.serve_ops.serve_conv_transpose`.

Covered layers: ``nn.Dense``, ``nn.DenseGeneral``, ``nn.Einsum``,
``nn.Conv`` (depthwise ``feature_group_count`` included),
``nn.ConvTranspose`` (every padding, dilation and ``transpose_kernel``),
both with a ``mask`` (QAT quantizes ``kernel * mask``, `jaxq.convert`
stores that, and serve mode does not multiply a `QArray` kernel by the mask
again),
``nn.Embed`` (``__call__`` and ``attend``; weight-only, scales per row, see
`jaxq.flax.core.embed_spec`) and any user module with a ``dot_general`` or
``conv_general_dilated`` attribute: when one operand of that op is one of
the module's own parameters (the very array ``self.param`` returned), it is
the weight and the other operand the activation; ops on other operands stay
in float. Attention modules (Flax's ``MultiHeadDotProductAttention`` with
``decode=True``, jaxq's `KVCacheAttention`) get the quantized KV cache their
rule gives (`jaxq.flax.kv_cache`).

The interceptor holds no state of its own: it reads the model's
configuration and records each layer it meets through the model's
`LayerRecord` methods; the layer's variables are read and written through
`jaxq.flax.linen_variables.ScopeVariables`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxq.flax import core
from jaxq.flax import int8_qat
from jaxq.flax import kv_cache
from jaxq.flax import rules as rules_lib
from jaxq.flax import serve_ops
from jaxq.flax.layer_variables import SwitchedOp
from jaxq.flax.linen_variables import ScopeVariables
from jaxq.spec import QArray

_PROMOTING = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.ConvTranspose)
_OP_FIELDS = ("dot_general", "conv_general_dilated")
# Attention modules a rule's kv_cache applies to.
_ATTENTION = (nn.MultiHeadDotProductAttention, kv_cache.KVCacheAttention)


def module_path(module: nn.Module) -> str:
  """A linen module's "/"-joined path, as in the ``params`` tree."""
  return "/".join(module.path)


@contextlib.contextmanager
def _attributes(module: nn.Module, **values: Any) -> Iterator[None]:
  """Sets attributes of a (frozen) module for the duration of one call."""
  saved = {name: getattr(module, name) for name in values}
  for name, value in values.items():
    object.__setattr__(module, name, value)
  try:
    yield
  finally:
    for name, value in saved.items():
      object.__setattr__(module, name, value)


class LayerRecord(Protocol):
  """What the interceptor needs of the quantized model
  (`jaxq.flax.linen.QuantizedLinen`): its configuration, and where it
  records the layers and KV caches it meets."""

  mode: core.Mode
  int8_forward: bool
  backward: str
  switchable: bool

  def record_layer(self, module: nn.Module, weight_shape: tuple[int, ...],
                   weight_name: str = "kernel") -> core.LayerQuant | None:
    """Records the layer; its `LayerQuant`, or None if it stays float."""

  def record_fallback(self, module: nn.Module, quant: core.LayerQuant,
                      w_shape: tuple[int, ...]) -> None:
    """Records why serve mode cannot run the layer as one low-bit op."""

  def record_kv_cache(self, module: nn.Module) -> rules_lib.Rule | None:
    """The rule giving an attention module a KV cache (recorded), or None."""


@dataclasses.dataclass(frozen=True)
class Interceptor:
  """The ``nn.intercept_methods`` interceptor of one quantized model."""

  model: LayerRecord

  def __call__(self, next_fun: Callable[..., Any], args: tuple[Any, ...],
               kwargs: dict[str, Any], context: Any) -> Any:
    """The interceptor of ``nn.intercept_methods``: routes one method call."""
    module = context.module
    if isinstance(module, _ATTENTION) and context.method_name == "__call__":
      return self._kv_cache(module, next_fun, args, kwargs)
    if isinstance(module, nn.Embed):
      if context.method_name in ("__call__", "attend"):
        return self._embed(module, context.method_name, next_fun, *args,
                           **kwargs)
    elif isinstance(module, _PROMOTING):
      if context.method_name == "__call__":
        return self._promoting(module, next_fun, args, kwargs)
    elif any(callable(getattr(module, f, None))
             for f in _OP_FIELDS if f in module.__dataclass_fields__):
      return self._custom(module, next_fun, args, kwargs)
    return next_fun(*args, **kwargs)

  def _kv_cache(self, module: nn.Module, next_fun, args, kwargs) -> Any:
    """An attention module: the KV cache its rule gives (`jaxq.flax.kv_cache`),
    if any; Flax's attention only when it decodes (``decode=True``)."""
    rule = (self.model.record_kv_cache(module)
            if getattr(module, "decode", True) else None)
    if rule is None:
      return next_fun(*args, **kwargs)
    if isinstance(module, kv_cache.KVCacheAttention):
      hooks = dict(spec=rule.kv_cache)
    else:  # Flax's own: its projections, jaxq's cache and attention.
      hooks = dict(decode=False, attention_fn=kv_cache.linen_attention_fn(
          module, rule.kv_cache, self.model.mode))
    with _attributes(module, **hooks), kv_cache.linen_mode(self.model.mode):
      return next_fun(*args, **kwargs)

  def _promoting(self, module: nn.Module, next_fun, args, kwargs) -> Any:
    """Flax layers that pass ``(inputs, kernel, bias)`` to ``promote_dtype``."""
    original = module.promote_dtype
    layer: list[ScopeVariables] = []
    # The qat op: the int8 forward, or a non-STE backward.
    qat_op = ((self.model.int8_forward or self.model.backward != "ste") and
              self.model.mode == "qat" and
              not isinstance(module, (nn.Conv, nn.ConvTranspose)))
    # A switchable serve layer: float operands, a `SwitchedOp` as its op.
    switched_serve = self.model.mode == "serve" and self.model.switchable

    def promote_dtype(inputs, kernel, bias=None, *, dtype=None,
                      inexact=True):
      if isinstance(kernel, QArray):  # Serving weights: promote the rest.
        dtype = dtype or jnp.result_type(
            kernel.dtype, *(a for a in (inputs, bias) if a is not None))
        inputs, _, bias = original(inputs, None, bias, dtype=dtype,
                                   inexact=inexact)
        kernel = serve_ops.computing_in(kernel, inputs.dtype)
      else:
        inputs, kernel, bias = original(inputs, kernel, bias, dtype=dtype,
                                        inexact=inexact)
      quant = self.model.record_layer(module, kernel.shape)
      if quant is None:
        if isinstance(kernel, QArray):
          raise ValueError(f"jaxq: {module_path(module)!r} holds a QArray "
                           f"weight but no rule quantizes it.")
        return inputs, kernel, bias
      layer.append(ScopeVariables(module, quant))
      self.model.record_fallback(module, quant, kernel.shape)
      if switched_serve:
        return inputs, kernel, bias  # The switched op quantizes them.
      if qat_op and int8_qat.uses_qat_op(quant):
        if int8_qat.uses_int8_forward(quant):
          layer[0].check_int8_forward()
        return inputs, kernel, bias  # The qat op quantizes (and smooths).
      return layer[0].act(inputs), layer[0].weight(kernel), bias

    hooks: dict[str, Any] = {"promote_dtype": promote_dtype}
    if qat_op:
      if isinstance(module, nn.Einsum):
        return self._einsum(module, promote_dtype,
                            _QatOp(layer, int8_qat.qat_einsum, jnp.einsum),
                            *args, **kwargs)
      original_op = (module.dot_general_cls() if module.dot_general_cls
                     else module.dot_general or jax.lax.dot_general)
      hooks.update(dot_general=_QatOp(layer, int8_qat.qat_dot_general,
                                      original_op), dot_general_cls=None)
    if switched_serve:
      return self._switched_serve(module, layer, promote_dtype, next_fun,
                                  args, kwargs)
    if self.model.mode == "serve":
      if isinstance(module, nn.ConvTranspose):
        return self._conv_transpose(module, promote_dtype, *args, **kwargs)
      if isinstance(module, nn.Einsum):
        return self._einsum(module, promote_dtype, serve_ops.serve_einsum,
                            *args, **kwargs)
      if isinstance(module, nn.Conv):
        hooks.update(conv_general_dilated=serve_ops.serve_conv,
                     conv_general_dilated_cls=None)
        if _holds_qarray_kernel(module):
          hooks.update(mask=None)  # jaxq.convert quantized kernel * mask.
      else:
        hooks.update(dot_general=serve_ops.serve_dot_general,
                     dot_general_cls=None)
    with _attributes(module, **hooks):
      return next_fun(*args, **kwargs)

  def _switched_serve(self, module: nn.Module, layer: list[ScopeVariables],
                      promote_dtype, next_fun, args, kwargs) -> Any:
    """A promoting layer of a switchable serve model: its op a `SwitchedOp`
    (the low-bit op or the layer's own float op, by the layer's flag) on
    the float operands that ``promote_dtype`` passes through."""
    if isinstance(module, nn.ConvTranspose):
      return self._conv_transpose(
          module, promote_dtype, *args,
          conv=SwitchedOp(layer, serve_ops.serve_conv,
                          jax.lax.conv_general_dilated), **kwargs)
    if isinstance(module, nn.Einsum):
      return self._einsum(
          module, promote_dtype,
          SwitchedOp(layer, serve_ops.serve_einsum, jnp.einsum,
                     subscripts=True), *args, **kwargs)
    field = ("conv_general_dilated" if isinstance(module, nn.Conv)
             else "dot_general")
    own = getattr(module, f"{field}_cls")
    float_op = (own() if own else getattr(module, field) or
                getattr(jax.lax, field))
    low_bit_op = (serve_ops.serve_conv if isinstance(module, nn.Conv)
                  else serve_ops.serve_dot_general)
    hooks = {field: SwitchedOp(layer, low_bit_op, float_op),
             f"{field}_cls": None, "promote_dtype": promote_dtype}
    with _attributes(module, **hooks):
      return next_fun(*args, **kwargs)

  def _einsum(self, module: nn.Einsum, promote_dtype,
              einsum_op: Callable[..., jax.Array], inputs,
              einsum_str: str | None = None) -> jax.Array:
    """``nn.Einsum.__call__`` with ``einsum_op`` (linen's takes no op):
    `jaxq.einsum` to serve, the qat einsum of `jaxq.flax.int8_qat`."""
    einsum_str = nn.merge_param("einsum_str", module.einsum_str, einsum_str)
    einsum_str = einsum_str.replace(" ", "")
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    float_kernel = jax.ShapeDtypeStruct(tuple(kernel.shape), jnp.float32)
    x, w, bias = promote_dtype(inputs, kernel, bias, dtype=module.dtype)
    y = einsum_op(einsum_str, x, w,
                  preferred_element_type=module.preferred_element_type)
    if bias is not None:
      _, bias_shape = module._get_bias_shape(  # pylint: disable=protected-access
          einsum_str, inputs, float_kernel)
      y += jnp.reshape(bias, bias_shape)
    return y

  def _conv_transpose(self, module: nn.ConvTranspose, promote_dtype,
                      inputs: jax.Array,
                      conv: Callable[..., jax.Array] = serve_ops.serve_conv
                      ) -> jax.Array:
    """``nn.ConvTranspose.__call__`` with `jaxq.conv` (linen's calls
    ``lax.conv_transpose``, which takes no op): see
    `jaxq.flax.serve_ops.serve_conv_transpose`."""
    config = serve_ops.ConvTransposeConfig.of(module)
    kernel = module.param(
        "kernel", module.kernel_init,
        config.kernel_shape(inputs.shape[-1], module.features),
        module.param_dtype)
    bias = (module.param("bias", module.bias_init, (module.features,),
                         module.param_dtype) if module.use_bias else None)
    return serve_ops.serve_conv_transpose(
        module_path(module), config, inputs, kernel, bias,
        lambda x, w, b: promote_dtype(x, w, b, dtype=module.dtype), conv)

  def _embed(self, module: nn.Embed, method: str, next_fun,
             query: jax.Array) -> jax.Array:
    """``nn.Embed.__call__`` (a row lookup) and ``attend`` (``q @ table.T``)."""
    table = module.embedding
    quant = self.model.record_layer(module, table.shape, "embedding")
    if quant is None or quant.weight is None:
      if isinstance(table, QArray):
        raise ValueError(f"jaxq: {module_path(module)!r} holds a QArray "
                         f"table but no rule quantizes its weight.")
      return next_fun(query)
    layer = ScopeVariables(module, quant)
    dtype = module.dtype or table.dtype
    if method == "__call__":
      if not jnp.issubdtype(query.dtype, jnp.integer):
        raise ValueError(f"jaxq: {quant.path!r} (Embed) needs integer ids, "
                         f"got dtype {query.dtype}.")
      return layer.embed(table, query).astype(dtype)
    return layer.attend(query, table, dtype)

  def _custom(self, module: nn.Module, next_fun, args, kwargs) -> Any:
    """User modules with a ``dot_general``/``conv_general_dilated`` field."""
    fields = [f for f in _OP_FIELDS if f in module.__dataclass_fields__
              and getattr(module, f) is not None]
    if any(isinstance(getattr(module, f), _WeightOp) for f in fields):
      return next_fun(*args, **kwargs)  # A nested method call: hooked already.
    hooks = {f: _WeightOp(self.model, module, f, getattr(module, f))
             for f in fields}
    with _attributes(module, **hooks):
      return next_fun(*args, **kwargs)


@dataclasses.dataclass(frozen=True, eq=False)
class _QatOp:
  """A matmul layer's op in qat mode with ``int8_forward`` or a non-STE
  ``backward`` (`jaxq.flax.int8_qat`).

  ``layer`` holds the call's `ScopeVariables` once ``promote_dtype`` has
  matched the layer; a float layer (skip rule, or no rule) keeps ``original``.
  """

  layer: list[ScopeVariables]
  qat_op: Callable[..., jax.Array]
  original: Callable[..., jax.Array]

  def __call__(self, *args, **kwargs) -> jax.Array:
    if not self.layer or not int8_qat.uses_qat_op(self.layer[0].quant):
      return self.original(*args, **kwargs)
    return self.qat_op(self.layer[0], *args, **kwargs)


@dataclasses.dataclass(frozen=True)
class _WeightOp:
  """A user module's op, quantizing the operand that is the module's param."""

  model: LayerRecord
  module: nn.Module
  field: str
  original: Callable[..., jax.Array]

  def __call__(self, lhs, rhs, *args, **kwargs) -> jax.Array:
    params = self.module.variables.get("params", {})
    name_of = lambda x: next((k for k, p in params.items() if _same(x, p)),
                             None)
    if name_of(lhs) is None and name_of(rhs) is None:
      return self.original(lhs, rhs, *args, **kwargs)
    weight_is_rhs = name_of(rhs) is not None
    x, w = (lhs, rhs) if weight_is_rhs else (rhs, lhs)
    quant = self.model.record_layer(self.module, w.shape, name_of(w))
    op = self.original
    if quant is not None and quant.mode == "serve" and quant.switchable:
      low_bit_op = (serve_ops.serve_dot_general if self.field == "dot_general"
                    else serve_ops.serve_conv)
      return SwitchedOp([ScopeVariables(self.module, quant)], low_bit_op,
                        self.original, weight_first=not weight_is_rhs)(
                            lhs, rhs, *args, **kwargs)
    if quant is not None:
      layer = ScopeVariables(self.module, quant)
      x_float, w_float = x, w
      x, w = layer.act(x), layer.weight(w)
      if (quant.mode == "qat" and quant.backward == "float" and
          self.field == "dot_general"):
        # The float backward: the cotangents of op at the float operands.
        lhs, rhs = (x, w) if weight_is_rhs else (w, x)
        float_lhs, float_rhs = ((x_float, w_float) if weight_is_rhs
                                else (w_float, x_float))
        return int8_qat.float_backward(
            lambda a, b: self.original(a, b, *args, **kwargs), lhs, rhs,
            float_lhs, float_rhs)
      if quant.mode == "serve":
        op = (serve_ops.serve_dot_general if self.field == "dot_general"
              else serve_ops.serve_conv)
    elif isinstance(w, QArray):
      raise ValueError(f"jaxq: {module_path(self.module)!r} holds a QArray "
                       f"weight but no rule quantizes it.")
    lhs, rhs = (x, w) if weight_is_rhs else (w, x)
    return op(lhs, rhs, *args, **kwargs)


def _holds_qarray_kernel(module: nn.Module) -> bool:
  """Whether the module's ``kernel`` param is a `QArray` (from `convert`)."""
  return (module.has_variable("params", "kernel") and
          isinstance(module.get_variable("params", "kernel"), QArray))


def _same(x: Any, param: Any) -> bool:
  """Whether ``x`` is the parameter ``param`` itself (not a copy or a cast).

  A QArray parameter comes back from the scope as a new pytree node around
  the same arrays, so QArrays compare by their values array.
  """
  if isinstance(x, QArray) and isinstance(param, QArray):
    return x.values is param.values
  return x is param
