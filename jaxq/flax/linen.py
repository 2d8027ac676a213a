"""Quantized linen models, built on ``flax.linen.intercept_methods``.

``qmodel = jaxq.quantize_model(model, rules, mode)`` returns a
`QuantizedLinen` whose ``init`` and ``apply`` mirror the module's and run it
under a method interceptor. Nothing global is patched: for the duration of
one call of a matched layer, the interceptor hands that module a quantizing
``promote_dtype`` (every Flax layer passes ``(inputs, kernel, bias)``
through it, so the weight is known to be the module's parameter) and, in
serve mode, `jaxq.dot_general` / `jaxq.conv` as its ``dot_general`` /
``conv_general_dilated`` (in qat mode with ``int8_forward=True``, the int8
qat op of `jaxq.flax.int8_qat` as the Dense/DenseGeneral/Einsum matmul). Two
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
  ``{"weight": max-observer state, "act": act-observer state}`` (``act``
  only for static act specs). Created by the first calibrated batch, never
  by ``init``.
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

Paths are the "/"-joined linen module names (``"Encoder_0/Dense_1"``), as in
the ``params`` tree. A ``transpose_kernel=True`` ConvTranspose kernel is
``(*window, out, in)``: serving it on integer inputs needs its scales per
tensor or per output channel, ``PerChannel(axis=-2)`` (other scales serve
weight-only, or raise a ValueError naming the layer).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxq import calibration
from jaxq.flax import core
from jaxq.flax import int8_qat
from jaxq.flax import rules as rules_lib
from jaxq.flax import serve_ops
from jaxq.spec import QArray

STATS = "quant_stats"
RANGES = "quant_ranges"
FIXED = "quant_fixed"
LEARNED = "jaxq"

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


def _path(module: nn.Module) -> str:
  return "/".join(module.path)


class _Layer(core.LayerVariables):
  """One call of one matched layer; variables in the module's scope."""

  def __init__(self, module: nn.Module, quant: core.LayerQuant):
    super().__init__(quant)
    self.scope = module.scope
    self.initializing = module.is_initializing()

  def get_stats(self, name: str) -> Any | None:
    if self.scope.has_variable(STATS, name):
      return self.scope.get_variable(STATS, name)
    return None

  def put_stats(self, name: str, state: Any) -> None:
    if not self.scope.is_mutable_collection(STATS):
      raise ValueError(
          f"jaxq calibrate: {self.quant.path!r} records observer states in "
          f"the {STATS!r} collection; call apply(..., mutable=[{STATS!r}]).")
    self.scope.put_variable(STATS, name, state)

  def get_range(self) -> core.ActRange | None:
    if self.scope.has_variable(RANGES, core.ACT_STATS):
      return self.scope.get_variable(RANGES, core.ACT_STATS)
    return None

  def get_fixed(self, name: str) -> Any | None:
    if self.scope.has_variable(FIXED, name):
      return self.scope.get_variable(FIXED, name)
    return None

  def recording(self) -> bool:
    return not self.initializing  # Init data is not calibration data.

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
  """

  model: nn.Module
  rules: tuple[rules_lib.Rule, ...]
  mode: core.Mode = "qat"
  on_nonfinite: core.OnNonfinite = "raise"
  observer_for: core.ObserverFor = calibration.observer_for
  int8_forward: bool = False
  _layers: dict[str, rules_lib.LayerInfo] = dataclasses.field(
      default_factory=dict, compare=False, repr=False)
  _warned: list[bool] = dataclasses.field(
      default_factory=lambda: [False], compare=False, repr=False)

  def init(self, rngs, *args, **kwargs) -> Any:
    """``model.init`` under the interceptor; the same variables as the model's."""
    return self._run(self.model.init, rngs, *args, **kwargs)

  def apply(self, variables, *args, **kwargs) -> Any:
    """``model.apply`` under the interceptor (``method``, ``mutable``, ``rngs``
    and the rest as for linen)."""
    return self._run(self.model.apply, variables, *args, **kwargs)

  def with_mode(self, mode: core.Mode) -> "QuantizedLinen":
    """The same model and rules in another mode (sharing the layer record)."""
    core.check_mode(mode)
    return dataclasses.replace(self, mode=mode, _layers=self._layers,
                               _warned=self._warned)

  def layers(self) -> dict[str, rules_lib.LayerInfo]:
    """Path -> `LayerInfo` of every quantizable layer traced so far."""
    return dict(self._layers)

  def unmatched_rules(self) -> tuple[rules_lib.Rule, ...]:
    """The rules that no traced layer got."""
    return rules_lib.unmatched(self.rules, self._layers.values())

  def _run(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
    with nn.intercept_methods(self._intercept):
      out = fn(*args, **kwargs)
    if self._layers and not self._warned[0]:
      self._warned[0] = True
      rules_lib.warn_unmatched(self.rules, self._layers.values())
    return out

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
        int8_forward=self.int8_forward)
    self._layers[path] = rules_lib.LayerInfo(
        path=path, module_type=type(module).__name__, rule=rule,
        weight_shape=tuple(weight_shape), weight_name=weight_name,
        weight=quant and quant.weight, act=quant and quant.act, mask=mask)
    return quant

  def _intercept(self, next_fun, args, kwargs, context) -> Any:
    module = context.module
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

  def _promoting(self, module: nn.Module, next_fun, args, kwargs) -> Any:
    """Flax layers that pass ``(inputs, kernel, bias)`` to ``promote_dtype``."""
    original = module.promote_dtype
    layer: list[_Layer] = []
    int8 = (self.int8_forward and self.mode == "qat" and
            not isinstance(module, (nn.Conv, nn.ConvTranspose)))

    def promote_dtype(inputs, kernel, bias=None, *, dtype=None,
                      inexact=True):
      if isinstance(kernel, QArray):  # Serving weights: promote the rest.
        dtype = dtype or jnp.result_type(
            kernel.dtype, *(a for a in (inputs, bias) if a is not None))
        inputs, _, bias = original(inputs, None, bias, dtype=dtype,
                                   inexact=inexact)
      else:
        inputs, kernel, bias = original(inputs, kernel, bias, dtype=dtype,
                                        inexact=inexact)
      quant = self._quant(module, kernel.shape)
      if quant is None:
        if isinstance(kernel, QArray):
          raise ValueError(f"jaxq: {_path(module)!r} holds a QArray weight but "
                           f"no rule quantizes it.")
        return inputs, kernel, bias
      layer.append(_Layer(module, quant))
      if int8 and int8_qat.uses_int8_forward(quant):
        layer[0].check_int8_forward()
        # The int8 op quantizes them itself.
        return layer[0].smoothed(inputs), kernel, bias
      return layer[0].act(inputs), layer[0].weight(kernel), bias

    hooks: dict[str, Any] = {"promote_dtype": promote_dtype}
    if int8:
      if isinstance(module, nn.Einsum):
        return self._einsum(module, promote_dtype,
                            _Int8Op(layer, int8_qat.int8_qat_einsum,
                                    jnp.einsum),
                            *args, **kwargs)
      original_op = (module.dot_general_cls() if module.dot_general_cls
                     else module.dot_general or jax.lax.dot_general)
      hooks.update(dot_general=_Int8Op(layer, int8_qat.int8_qat_dot_general,
                                       original_op), dot_general_cls=None)
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

  def _einsum(self, module: nn.Einsum, promote_dtype,
              einsum_op: Callable[..., jax.Array], inputs,
              einsum_str: str | None = None) -> jax.Array:
    """``nn.Einsum.__call__`` with ``einsum_op`` (linen's takes no op):
    `jaxq.einsum` to serve, the int8 qat einsum for ``int8_forward``."""
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
                      inputs: jax.Array) -> jax.Array:
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
        lambda x, w, b: promote_dtype(x, w, b, dtype=module.dtype))

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
    layer = _Layer(module, quant)
    dtype = module.dtype or table.dtype
    if method == "__call__":
      if not jnp.issubdtype(query.dtype, jnp.integer):
        raise ValueError(f"jaxq: {quant.path!r} (Embed) needs integer ids, "
                         f"got dtype {query.dtype}.")
      return layer.embed(table, query).astype(dtype)
    table = layer.weight(table)
    query = query.astype(dtype)
    dims = (((query.ndim - 1,), (1,)), ((), ()))
    if isinstance(table, QArray):
      return serve_ops.serve_dot_general(query, table, dims)
    return jax.lax.dot_general(query, table.astype(dtype), dims)

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
class _Int8Op:
  """A matmul layer's op in qat mode with ``int8_forward``.

  ``layer`` holds the call's `_Layer` once ``promote_dtype`` has matched the
  layer; a float layer (skip rule, or no rule) keeps ``original``.
  """

  layer: list[_Layer]
  int8_op: Callable[..., jax.Array]
  original: Callable[..., jax.Array]

  def __call__(self, *args, **kwargs) -> jax.Array:
    if not self.layer or not int8_qat.uses_int8_forward(self.layer[0].quant):
      return self.original(*args, **kwargs)
    layer = self.layer[0]
    act_range = layer.get_range() if layer.quant.static_act else None
    return self.int8_op(layer.quant, act_range, *args, **kwargs)


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
    if quant is not None:
      layer = _Layer(self.module, quant)
      x, w = layer.act(x), layer.weight(w)
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
                   int8_forward: bool = False) -> QuantizedLinen:
  return QuantizedLinen(model=model, rules=tuple(rules), mode=mode,
                        on_nonfinite=on_nonfinite, observer_for=observer_for,
                        int8_forward=int8_forward)


def act_ranges(qmodel: QuantizedLinen, stats: Any) -> dict[str, Any]:
  """The ``quant_ranges`` collection finalized from a ``quant_stats`` tree."""
  ranges: dict[str, Any] = {}
  for path, info in qmodel.layers().items():
    if info.act is None or info.module_type == "Embed":
      continue
    if info.act.dynamic and info.act.learn is None:
      continue
    node = _lookup(stats, path)
    if info.act.learn is not None and (node is None or
                                       core.ACT_STATS not in node):
      continue  # A learned range may start from its first batch instead.
    if node is None or core.ACT_STATS not in node:
      raise ValueError(f"jaxq: no activation statistics for {path!r}, which "
                       f"has a static act spec; run it in calibrate mode on "
                       f"at least one batch.")
    subtree = ranges
    for name in path.split("/") if path else []:
      subtree = subtree.setdefault(name, {})
    subtree[core.ACT_STATS] = core.finalize_range(
        qmodel.observer_for(info.act), node[core.ACT_STATS])
  return ranges


def _lookup(tree: Any, path: str) -> Any:
  for name in path.split("/") if path else []:
    if not isinstance(tree, dict) or name not in tree:
      return None
    tree = tree[name]
  return tree
