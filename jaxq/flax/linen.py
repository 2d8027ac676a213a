"""Quantized linen models: `QuantizedLinen` and the record of its layers.

``qmodel = jaxq.quantize_model(model, rules, mode)`` returns a
`QuantizedLinen` whose ``init`` and ``apply`` mirror the module's and run it
under the method interceptor of `jaxq.flax.linen_intercept` (which owns what
each matched layer runs per call, and lists the covered layers). This module
owns the model wrapper: its configuration, the call context its layers read,
the record of the layers (`LayerInfo`) and KV caches traced so far, and
`act_ranges`; the variable collections live in
`jaxq.flax.linen_variables`.

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

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax

from jaxq import calibration
from jaxq.flax import core
from jaxq.flax import rules as rules_lib
from jaxq.flax import serve_ops
from jaxq.flax.linen_intercept import Interceptor
from jaxq.flax.linen_intercept import module_path
from jaxq.flax.linen_variables import CURRENT_CALL
from jaxq.flax.linen_variables import CallContext
from jaxq.flax.linen_variables import ENABLED
from jaxq.flax.linen_variables import FIXED
from jaxq.flax.linen_variables import RANGES
from jaxq.flax.linen_variables import STATS
from jaxq.flax.linen_variables import lookup
from jaxq.kvcache.spec import KVCacheSpec

__all__ = ["QuantizedLinen", "act_ranges", "quantize_linen"]

_MASKED = (nn.Conv, nn.ConvTranspose)  # Their kernel is ``kernel * mask``.


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

  def kv_specs(self) -> dict[str, KVCacheSpec]:
    """Path -> the `KVCacheSpec` of every attention module traced so far
    that a rule gave a KV cache."""
    return {path: rule.kv_cache for path, rule in self._kv_caches.items()}

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
      with nn.intercept_methods(Interceptor(self)):
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

  # What the interceptor records (`jaxq.flax.linen_intercept.LayerRecord`).

  def record_layer(self, module: nn.Module, weight_shape: tuple[int, ...],
                   weight_name: str = "kernel") -> core.LayerQuant | None:
    """Records the layer and returns its `LayerQuant`, or None if float."""
    path = module_path(module)
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

  def record_fallback(self, module: nn.Module, quant: core.LayerQuant,
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

  def record_kv_cache(self, module: nn.Module) -> rules_lib.Rule | None:
    """The rule giving an attention module a quantized KV cache (recorded
    for `unmatched_rules`), or None for a module that keeps its own."""
    path = module_path(module)
    rule = rules_lib.match_kv_cache(self.rules, path, module)
    if rule is None or rule.skip:
      return None
    self._kv_caches[path] = rule
    return rule


def act_ranges(qmodel: QuantizedLinen, stats: Any) -> dict[str, Any]:
  """The ``quant_ranges`` collection finalized from a ``quant_stats`` tree."""
  ranges: dict[str, Any] = {}
  for path, info in qmodel.layers().items():
    if info.act is None or info.module_type == "Embed":
      continue
    if info.act.dynamic and info.act.learn is None:
      continue
    node = lookup(stats, path)
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
        qmodel.observer_for(info.act), node[core.ACT_STATS], path)
  return ranges


def quantize_linen(model: nn.Module, rules: Sequence[rules_lib.Rule],
                   mode: core.Mode, on_nonfinite: core.OnNonfinite,
                   observer_for: core.ObserverFor,
                   int8_forward: bool = False, backward: str = "ste",
                   switchable: bool = False) -> QuantizedLinen:
  """See `jaxq.quantize_model`: a `QuantizedLinen` of ``model``; its
  ``switchable`` as `QuantizedLinen`'s (checked against the mode)."""
  core.check_switchable(switchable, mode, int8_forward)
  return QuantizedLinen(model=model, rules=tuple(rules), mode=mode,
                        on_nonfinite=on_nonfinite, observer_for=observer_for,
                        int8_forward=int8_forward, backward=backward,
                        switchable=switchable)
