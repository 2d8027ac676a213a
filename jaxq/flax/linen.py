"""Quantized linen models, built on ``flax.linen.intercept_methods``.

``qmodel = jaxq.quantize_model(model, rules, mode)`` returns a
`QuantizedLinen` whose ``init`` and ``apply`` mirror the module's and run it
under a method interceptor. Nothing global is patched: for the duration of
one call of a matched layer, the interceptor hands that module a quantizing
``promote_dtype`` (every Flax layer passes ``(inputs, kernel, bias)``
through it, so the weight is known to be the module's parameter) and, in
serve mode, `jaxq.dot_general` / `jaxq.conv` as its ``dot_general`` /
``conv_general_dilated`` (in qat mode with ``int8_forward=True`` or a
non-STE ``backward``, the qat op of `jaxq.flax.int8_qat` as the
Dense/DenseGeneral/Einsum matmul). Two
layers take no op, so serve mode runs their ``__call__`` re-implemented
with the low-bit op: ``nn.Einsum`` with `jaxq.einsum`, ``nn.ConvTranspose``
(whose ``lax.conv_transpose`` is a ``conv_general_dilated`` of the dilated
input) with `jaxq.conv`, see `jaxq.flax.serve_ops.serve_conv_transpose`.

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
in float.

Variables (the model's own ``params`` are never renamed or restructured, so
the original model's variables work unchanged in qat and calibrate mode):

* ``params``: the float parameters; after `jaxq.convert`, each quantized
  weight leaf is a `QArray` (serve mode also accepts float weights and
  quantizes them on the fly).
* ``quant_stats`` (calibrate mode, ``mutable=["quant_stats"]``): per layer,
  ``{"weight": max-observer state, "act": act-observer state,
  "input_moment": InputMoment}`` (``act`` only for static act specs,
  ``input_moment`` only for ``calibration="mse"`` weights, see
  `jaxq.flax.core`). Created by the first calibrated batch, never by
  ``init``.
* ``quant_ranges`` (read in qat and serve mode for static act specs): per
  layer, ``{"act": {"amax": a}}`` (plus ``"amin"`` for affine specs), as
  made by `jaxq.flax.act_ranges` or `jaxq.convert`.
* ``quant_fixed`` (read in every mode): per layer, what the PTQ algorithms
  (`jaxq.gptq`, `jaxq.awq`, `jaxq.smoothquant`) fixed, never trained:
  ``{"weight_range": {"amax": a[, "amin": b]}, "act_smooth": s}`` (see
  `jaxq.flax.core.FIXED_NAMES`).
* learned ranges (specs with ``learn="lsq"``/``"pact"``): trainable entries
  of ``params`` beside the layer's own, ``params/<layer>/jaxq/weight_scale``
  and ``.../act_scale`` (``weight_clip``/``act_clip`` for PACT; see
  `jaxq.flax.core`), so an optimizer over ``params`` trains them with the
  weights. ``init`` creates them, and so does ``apply`` with
  ``mutable=["params"]`` (what `jaxq.qat.init_learned` runs on float
  variables), starting an activation's from ``quant_ranges`` when given.

Scanned layers (``nn.scan`` over a stack of ``L`` blocks, the way large
models are written): the stored kernel is ``(L, *kernel)`` and each
iteration's layer sees one slice. The scan must carry jaxq's collections
like the params: ``nn.scan(Block, variable_axes={"params": 0,
**jaxq.flax.SCAN_AXES}, split_rngs={"params": True}, length=L)``
(``SCAN_AXES`` names jaxq's per-layer collections: ``quant_stats``,
``quant_ranges``, ``quant_fixed`` and the capture pass's ``jaxq_capture``;
learned ranges live under ``params`` and are stacked with them; a
switchable layer's ``quant_enabled`` flag is read from the outer call, one
flag per path for the whole stack). Observer states, act ranges, the PTQ
algorithms' fixed variables and learned ranges then gain the leading ``L``
axis (one per layer;
`jaxq.flax.core.finalize_range` finalizes stacked states per layer),
`jaxq.convert` quantizes a stacked kernel slice by slice (a `QArray` whose
values and scales lead with ``L``, sliced by the scan in serve mode), and
`LayerInfo` keeps the per-layer ``weight_shape`` with ``stacked = L``. A
layer inside a scan without these axes raises a ValueError saying what to
add to ``variable_axes``. ``nn.remat`` passes every collection through and
needs nothing.

Paths are the "/"-joined linen module names (``"Encoder_0/Dense_1"``), as in
the ``params`` tree. A ``transpose_kernel=True`` ConvTranspose kernel is
``(*window, out, in)``: serving it on integer inputs needs its scales per
tensor or per output channel, ``PerChannel(axis=-2)`` (other scales serve
by the fallback below).

Serve runs what QAT trained. A convolution whose quantized input has scales
that vary along a summed axis (a catch-all ``PerToken()`` act rule also
matches convs) cannot be an integer convolution; it serves by the fallback
of `jaxq.flax.serve_ops.serve_conv`: the quantized input is dequantized
(equal to QAT's fake-quantized input) and multiplied by the low-bit kernel
(weight-only), so serve still equals QAT; so does any layer whose act and
weight formats are an integer and a float one (fp8 x int8), which share no
low-bit op. ``jaxq.layers(qmodel)[path]
.serve_fallback`` names the reason for each such layer (None for layers
that serve as integer ops).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxq import calibration
from jaxq.flax import core
from jaxq.flax import int8_qat
from jaxq.flax import kv_cache
from jaxq.flax import rules as rules_lib
from jaxq.flax import serve_ops
from jaxq.flax.linen_variables import CURRENT_CALL
from jaxq.flax.linen_variables import CallContext
from jaxq.flax.linen_variables import ENABLED
from jaxq.flax.linen_variables import FIXED
from jaxq.flax.linen_variables import LEARNED
from jaxq.flax.linen_variables import RANGES
from jaxq.flax.linen_variables import SCAN_AXES
from jaxq.flax.linen_variables import STATS
from jaxq.flax.linen_variables import ScopeVariables
from jaxq.flax.linen_variables import act_ranges
from jaxq.flax.linen_variables import lookup
from jaxq.flax.linen_variables import with_enabled
from jaxq.flax.layer_variables import SwitchedOp
from jaxq.spec import QArray

# The collections and helpers live in `jaxq.flax.linen_variables`; they are
# part of this module's interface too.
__all__ = [
    "ENABLED", "FIXED", "LEARNED", "RANGES", "SCAN_AXES", "STATS",
    "QuantizedLinen", "act_ranges", "quantize_linen", "with_enabled",
]

_PROMOTING = (nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.ConvTranspose)
_MASKED = (nn.Conv, nn.ConvTranspose)  # Their kernel is ``kernel * mask``.
_OP_FIELDS = ("dot_general", "conv_general_dilated")


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


# Attention modules a rule's kv_cache applies to.
_ATTENTION = (nn.MultiHeadDotProductAttention, kv_cache.KVCacheAttention)


def _path(module: nn.Module) -> str:
  return "/".join(module.path)


@dataclasses.dataclass(frozen=True)
class QuantizedLinen:
  """A linen model with quantization inserted; ``init``/``apply`` as linen's.

  Attributes:
    model: the original module (unchanged).
    rules: the rules, tried in order.
    mode: ``"qat"``, ``"calibrate"`` or ``"serve"``.
    on_nonfinite: calibrate mode's reaction to NaN/inf (see `LayerQuant`).
    observer_for: picks the activation observer from a spec.
    int8_forward: in qat mode, run the Dense/DenseGeneral/Einsum forwards
      on int8 values (see `jaxq.flax.int8_qat`); other modes ignore it.
    backward: in qat mode, the matmul layers' backward, ``"ste"``,
      ``"float"`` or ``"int8"`` (see `jaxq.flax.int8_qat`; ``"int8"`` takes
      ``rngs={"jaxq": key}`` in ``apply``); other modes ignore it.
    switchable: each quantized layer reads an on/off flag from the
      ``quant_enabled`` collection (``{<layer path>: {"enabled": bool}}``,
      made by `with_enabled`; on when absent) and computes in float when
      off, so one compilation runs any subset of layers quantized (qat and
      serve modes; serve mode selects the low-bit or the float op by
      ``lax.cond`` and needs float params; see `jaxq.flax.core.LayerQuant`).
  """

  model: nn.Module
  rules: tuple[rules_lib.Rule, ...]
  mode: core.Mode = "qat"
  on_nonfinite: core.OnNonfinite = "raise"
  observer_for: core.ObserverFor = calibration.observer_for
  int8_forward: bool = False
  backward: str = "ste"
  switchable: bool = False
  _layers: dict[str, rules_lib.LayerInfo] = dataclasses.field(
      default_factory=dict, compare=False, repr=False)
  # Path -> the rule giving an attention module its KV cache.
  _kv_caches: dict[str, rules_lib.Rule] = dataclasses.field(
      default_factory=dict, compare=False, repr=False)
  _warned: list[bool] = dataclasses.field(
      default_factory=lambda: [False], compare=False, repr=False)

  def init(self, rngs, *args, **kwargs) -> Any:
    """``model.init`` under the interceptor; the same variables as the model's."""
    return self._run(self.model.init, True, rngs, *args, **kwargs)

  def apply(self, variables, *args, **kwargs) -> Any:
    """``model.apply`` under the interceptor (``method``, ``mutable``, ``rngs``
    and the rest as for linen)."""
    return self._run(self.model.apply, False, variables, *args, **kwargs)

  def with_mode(self, mode: core.Mode) -> "QuantizedLinen":
    """The same model and rules in another mode (sharing the layer record)."""
    core.check_mode(mode)
    return dataclasses.replace(self, mode=mode, _layers=self._layers,
                               _kv_caches=self._kv_caches,
                               _warned=self._warned)

  def layers(self) -> dict[str, rules_lib.LayerInfo]:
    """Path -> `LayerInfo` of every quantizable layer traced so far."""
    return dict(self._layers)

  def unmatched_rules(self) -> tuple[rules_lib.Rule, ...]:
    """The rules that no traced layer (or KV cache) got."""
    return rules_lib.unmatched(self.rules, self._layers.values(),
                               self._kv_caches.values())

  def _run(self, fn: Callable[..., Any], initializing: bool, *args,
           **kwargs) -> Any:
    """``fn(*args, **kwargs)`` under the interceptor; ``initializing`` for
    ``init`` (whose result holds the params) rather than ``apply`` (whose
    first argument does)."""
    variables = {} if initializing else args[0]
    mutable = kwargs.get("mutable", False)
    call = CallContext(
        stats_mutable=mutable is True or (
            isinstance(mutable, (list, tuple, set, str)) and
            STATS in ([mutable] if isinstance(mutable, str) else mutable)),
        ranges=variables.get(RANGES) if isinstance(variables, Mapping)
        else None,
        collections={c: variables[c] for c in (FIXED, ENABLED)
                     if isinstance(variables, Mapping) and c in variables})
    token = CURRENT_CALL.set(call)
    try:
      with nn.intercept_methods(self._intercept):
        out = fn(*args, **kwargs)
    finally:
      CURRENT_CALL.reset(token)
    params = (out if initializing else variables)
    if isinstance(params, Mapping) and "params" in params:
      self._note_stacked(params["params"])
    if (self._layers or self._kv_caches) and not self._warned[0]:
      self._warned[0] = True
      rules_lib.warn_unmatched(self.rules, self._layers.values(),
                               self._kv_caches.values())
    return out

  def _note_stacked(self, params: Any) -> None:
    """Marks the layers whose stored weight has one more leading axis than
    the layer sees: layers scanned (``nn.scan``) over a stack."""
    for path, info in list(self._layers.items()):
      node = lookup(params, path)
      weight = node.get(info.weight_name) if isinstance(node, Mapping) else None
      shape = tuple(getattr(weight, "shape", ()))
      stacked = (shape[0] if len(shape) == len(info.weight_shape) + 1 and
                 shape[1:] == info.weight_shape else None)
      if stacked != info.stacked:
        self._layers[path] = dataclasses.replace(info, stacked=stacked)

  # The interceptor.

  def _quant(self, module: nn.Module, weight_shape: tuple[int, ...],
             weight_name: str = "kernel") -> core.LayerQuant | None:
    """Records the layer and returns its `LayerQuant`, or None if float."""
    path = _path(module)
    rule = rules_lib.match(self.rules, path, module)
    mask = module.mask if isinstance(module, _MASKED) else None
    recorded = self._layers.get(path)
    if (isinstance(mask, jax.core.Tracer) and recorded is not None and
        recorded.mask is not None and
        not isinstance(recorded.mask, jax.core.Tracer)):
      # A mask built inside a jitted call: keep the concrete one of an
      # earlier call for jaxq.convert (which refuses a traced one).
      mask = recorded.mask
    quant = core.layer_quant(
        path, module, rule, tuple(weight_shape),
        is_embed=isinstance(module, nn.Embed), mode=self.mode,
        on_nonfinite=self.on_nonfinite, observer_for=self.observer_for,
        int8_forward=self.int8_forward, backward=self.backward,
        switchable=self.switchable)
    self._layers[path] = rules_lib.LayerInfo(
        path=path, module_type=type(module).__name__, rule=rule,
        weight_shape=tuple(weight_shape), weight_name=weight_name,
        weight=quant and quant.weight, act=quant and quant.act, mask=mask,
        serve_fallback=recorded and recorded.serve_fallback,
        stacked=recorded and recorded.stacked)
    return quant

  def _record_fallback(self, module: nn.Module, quant: core.LayerQuant,
                       w_shape: tuple[int, ...]) -> None:
    """Records in the layer's `LayerInfo` why serve mode cannot run it as
    one low-bit op (`serve_ops.layer_fallback_reason`, from its specs and
    kernel shape, as nnx decides it), or None."""
    is_conv = isinstance(module, (nn.Conv, nn.ConvTranspose))
    reason = serve_ops.layer_fallback_reason(
        quant.act, quant.weight,
        conv_kernel_shape=tuple(w_shape) if is_conv else None,
        transposed=(isinstance(module, nn.ConvTranspose) and
                    module.transpose_kernel),
        feature_group_count=getattr(module, "feature_group_count", 1))
    info = self._layers[quant.path]
    if info.serve_fallback != reason:
      self._layers[quant.path] = dataclasses.replace(
          info, serve_fallback=reason)

  def _intercept(self, next_fun, args, kwargs, context) -> Any:
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
    path = _path(module)
    rule = rules_lib.match_kv_cache(self.rules, path, module)
    decodes = getattr(module, "decode", True)
    if rule is None or rule.skip or not decodes:
      return next_fun(*args, **kwargs)
    self._kv_caches[path] = rule
    if isinstance(module, kv_cache.KVCacheAttention):
      hooks = dict(spec=rule.kv_cache)
    else:  # Flax's own: its projections, jaxq's cache and attention.
      hooks = dict(decode=False, attention_fn=kv_cache.linen_attention_fn(
          module, rule.kv_cache))
    with _attributes(module, **hooks):
      return next_fun(*args, **kwargs)

  def _promoting(self, module: nn.Module, next_fun, args, kwargs) -> Any:
    """Flax layers that pass ``(inputs, kernel, bias)`` to ``promote_dtype``."""
    original = module.promote_dtype
    layer: list[ScopeVariables] = []
    # The qat op: the int8 forward, or a non-STE backward.
    qat_op = ((self.int8_forward or self.backward != "ste") and
              self.mode == "qat" and
              not isinstance(module, (nn.Conv, nn.ConvTranspose)))
    # A switchable serve layer: float operands, a `SwitchedOp` as its op.
    switched_serve = self.mode == "serve" and self.switchable

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
      quant = self._quant(module, kernel.shape)
      if quant is None:
        if isinstance(kernel, QArray):
          raise ValueError(f"jaxq: {_path(module)!r} holds a QArray weight but "
                           f"no rule quantizes it.")
        return inputs, kernel, bias
      layer.append(ScopeVariables(module, quant))
      self._record_fallback(module, quant, kernel.shape)
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
    if self.mode == "serve":
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
        _path(module), config, inputs, kernel, bias,
        lambda x, w, b: promote_dtype(x, w, b, dtype=module.dtype), conv)

  def _embed(self, module: nn.Embed, method: str, next_fun,
             query: jax.Array) -> jax.Array:
    """``nn.Embed.__call__`` (a row lookup) and ``attend`` (``q @ table.T``)."""
    table = module.embedding
    quant = self._quant(module, table.shape, "embedding")
    if quant is None or quant.weight is None:
      if isinstance(table, QArray):
        raise ValueError(f"jaxq: {_path(module)!r} holds a QArray table but "
                         f"no rule quantizes its weight.")
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
    hooks = {f: _WeightOp(self, module, f, getattr(module, f)) for f in fields}
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

  qmodel: QuantizedLinen
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
    quant = self.qmodel._quant(  # pylint: disable=protected-access
        self.module, w.shape, name_of(w))
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
      raise ValueError(f"jaxq: {_path(self.module)!r} holds a QArray weight "
                       f"but no rule quantizes it.")
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


def quantize_linen(model: nn.Module, rules: Sequence[rules_lib.Rule],
                   mode: core.Mode, on_nonfinite: core.OnNonfinite,
                   observer_for: core.ObserverFor,
                   int8_forward: bool = False, backward: str = "ste",
                   switchable: bool = False) -> QuantizedLinen:
  core.check_switchable(switchable, mode, int8_forward)
  return QuantizedLinen(model=model, rules=tuple(rules), mode=mode,
                        on_nonfinite=on_nonfinite, observer_for=observer_for,
                        int8_forward=int8_forward, backward=backward,
                        switchable=switchable)
