"""Quantized nnx models, by module-graph surgery.

``qmodel = jaxq.quantize_model(model, rules, mode)`` copies ``model`` (with
``nnx.clone``; the original is left untouched) and, in the copy, swaps every
matched ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``, ``nnx.Conv``,
``nnx.ConvTranspose`` and ``nnx.Embed`` for an instance of a quantized
subclass of its own class (``QuantizedLinear`` for ``nnx.Linear``, and so on)
that holds the very same attributes and ``nnx.Param`` variables. Paths do not
change, so ``nnx.state(model)`` loads into ``qmodel`` with ``nnx.update`` and
``nnx.state(qmodel, nnx.Param)`` has the original's tree. The quantized
layers run the original ``__call__`` with a quantizing ``promote_dtype`` and,
in serve mode, `jaxq.dot_general` / `jaxq.einsum` / `jaxq.conv` as their
``dot_general`` / ``einsum_op`` / ``conv_general_dilated`` (in qat mode with
``int8_forward=True``, the Linear/LinearGeneral/Einsum ops are the int8 qat
ops of `jaxq.flax.int8_qat`); ``nnx.ConvTranspose``, whose
``lax.conv_transpose`` takes no op, serves through
`jaxq.flax.serve_ops.serve_conv_transpose` (its ``__call__`` with `jaxq.conv`,
shared with linen); embeddings look
up quantized rows (`jaxq.flax.core.embed_lookup`) and ``attend`` multiplies
by the quantized table. Everything works under ``nnx.jit``, ``nnx.grad``
and any method of the model.

Each quantized layer also carries:

* ``jaxq_layer``: its `LayerQuant` (static), or None when a skip rule or no
  rule applies; ``jaxq_info``: its `LayerInfo`.
* ``jaxq_weight_stats``, ``jaxq_act_stats``: `QuantStat` variables holding
  observer states, created by the first calibrate-mode call
  (``nnx.state(qmodel, QuantStat)`` collects them).
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
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxq.flax import core
from jaxq.flax import int8_qat
from jaxq.flax import rules as rules_lib
from jaxq.flax import serve_ops
from jaxq.spec import QArray

_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv,
           nnx.ConvTranspose, nnx.Embed)
_OPS = {nnx.Conv: ("conv_general_dilated", serve_ops.serve_conv),
        nnx.Einsum: ("einsum_op", serve_ops.serve_einsum),
        nnx.Linear: ("dot_general", serve_ops.serve_dot_general),
        nnx.LinearGeneral: ("dot_general", serve_ops.serve_dot_general)}
_INT8_OPS = {nnx.Einsum: ("einsum_op", int8_qat.int8_qat_einsum),
             nnx.Linear: ("dot_general", int8_qat.int8_qat_dot_general),
             nnx.LinearGeneral: ("dot_general", int8_qat.int8_qat_dot_general)}
_MASKED = (nnx.Conv, nnx.ConvTranspose)  # Their kernel is ``kernel * mask``.
_RULES_ATTR = "jaxq_rules"


class QuantStat(nnx.Variable):
  """An observer state recorded by calibrate mode."""


class QuantRange(nnx.Variable):
  """A static activation range ``{"amax": ...[, "amin": ...]}``."""


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


@contextlib.contextmanager
def _attributes(module: nnx.Module, **values: Any) -> Iterator[None]:
  """Sets attributes of ``module`` for the duration of one call."""
  saved = {name: vars(module)[name] for name in values}
  for name, value in values.items():
    object.__setattr__(module, name, value)
  try:
    yield
  finally:
    for name, value in saved.items():
      object.__setattr__(module, name, value)


class _Layer(core.LayerVariables):
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
    return None if held is None else held.get_value()

  def get_fixed(self, name: str) -> Any | None:
    held = getattr(self.module, f"jaxq_{name}", None)
    return None if held is None else held.get_value()

  def get_learned(self, name: str) -> jax.Array | None:
    param = getattr(self.module, f"jaxq_{name}", None)
    return None if param is None else param.get_value()

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

  def __call__(self, inputs, *args, **kwargs):
    if self.jaxq_layer is None:
      return super().__call__(inputs, *args, **kwargs)
    layer = _Layer(self)
    original = self.promote_dtype
    int8_kind = next((c for c in _INT8_OPS if isinstance(self, c)), None)
    int8 = int8_kind is not None and int8_qat.uses_int8_forward(layer.quant)

    def promote_dtype(arrays, /, *, dtype=None, inexact=True):
      x, w, bias = arrays
      if isinstance(w, QArray):  # Serving weights: promote the rest.
        dtype = dtype or jnp.result_type(
            w.dtype, *(a for a in (x, bias) if a is not None))
        x, _, bias = original((x, None, bias), dtype=dtype, inexact=inexact)
      else:
        x, w, bias = original((x, w, bias), dtype=dtype, inexact=inexact)
      if int8:
        layer.check_int8_forward()
        return layer.smoothed(x), w, bias  # The int8 op quantizes them.
      return layer.act(x), layer.weight(w), bias

    hooks: dict[str, Any] = {"promote_dtype": promote_dtype}
    if int8:
      name, op = _INT8_OPS[int8_kind]
      act_range = layer.get_range() if layer.quant.static_act else None
      hooks[name] = functools.partial(op, layer.quant, act_range)
      if int8_kind is not nnx.Einsum:
        hooks["dot_general_cls"] = None
    if layer.quant.mode == "serve" and isinstance(self, nnx.ConvTranspose):
      # Its __call__ runs lax.conv_transpose, which takes no op.
      bias = None if self.bias is None else self.bias.get_value()
      return serve_ops.serve_conv_transpose(
          layer.quant.path, serve_ops.ConvTransposeConfig.of(self), inputs,
          self.kernel.get_value(), bias,
          lambda x, w, b: promote_dtype((x, w, b), dtype=self.dtype))
    if layer.quant.mode == "serve":
      kind = next((c for c in _OPS if isinstance(self, c)), None)
      if kind is None:
        raise ValueError(
            f"jaxq serve: {layer.quant.path!r} is a {layer.quant.module_type}"
            f", which takes no injectable op; skip it with a Rule(..., "
            f"skip=True).")
      name, op = _OPS[kind]
      hooks[name] = op
      if kind in (nnx.Linear, nnx.LinearGeneral):
        hooks["dot_general_cls"] = None
      kernel = self.kernel.get_value()
      if isinstance(kernel, QArray):
        hooks["kernel"] = _Held(kernel)
        hooks["mask"] = None  # jaxq.convert quantized kernel * mask.
    with _attributes(self, **{k: v for k, v in hooks.items()
                              if k in vars(self)}), \
        jax.named_scope(layer.quant.path):  # For op names (jaxq.inspect).
      return super().__call__(inputs, *args, **kwargs)


class _QuantizedEmbed:
  """Mixin of the quantized ``nnx.Embed``: row lookups and ``attend``."""

  def __call__(self, inputs, *args, **kwargs):
    if self.jaxq_layer is None or self.jaxq_layer.weight is None:
      return super().__call__(inputs, *args, **kwargs)
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f"jaxq: {self.jaxq_layer.path!r} (Embed) needs integer "
                       f"ids, got dtype {inputs.dtype}.")
    table = self.embedding.get_value()
    dtype = self.dtype or table.dtype
    return _Layer(self).embed(table, inputs).astype(dtype)

  def attend(self, query, *args, **kwargs):
    if self.jaxq_layer is None or self.jaxq_layer.weight is None:
      return super().attend(query, *args, **kwargs)
    table = _Layer(self).weight(self.embedding.get_value())
    dtype = self.dtype or table.dtype
    query = query.astype(dtype)
    dims = (((query.ndim - 1,), (1,)), ((), ()))
    if isinstance(table, QArray):
      return serve_ops.serve_dot_general(query, table, dims)
    return jax.lax.dot_general(query, table.astype(dtype), dims)


@functools.lru_cache(maxsize=None)
def quantized_class(cls: type) -> type:
  """The quantized subclass of an nnx layer class (cached, so jit-stable)."""
  mixin = _QuantizedEmbed if issubclass(cls, nnx.Embed) else _QuantizedLayer
  return type(f"Quantized{cls.__name__}", (mixin, cls),
              {"__module__": __name__, "__qualname__": f"Quantized{cls.__name__}"})


def _path(path: tuple[Any, ...]) -> str:
  return "/".join(str(p) for p in path)


def _replace(root: nnx.Module, path: tuple[Any, ...], new: Any) -> None:
  parent = root
  for key in path[:-1]:
    parent = parent[key] if isinstance(parent, (list, dict, nnx.List)
                                       ) else getattr(parent, key)
  if isinstance(parent, (list, dict, nnx.List)):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def quantize_nnx(model: nnx.Module, rules: Sequence[rules_lib.Rule],
                 mode: core.Mode, on_nonfinite: core.OnNonfinite,
                 observer_for: core.ObserverFor,
                 int8_forward: bool = False) -> nnx.Module:
  """See `jaxq.quantize_model`: a quantized copy of an nnx module."""
  qmodel = nnx.clone(model)
  infos = []
  for path, module in list(nnx.iter_graph(qmodel)):
    if isinstance(module, (_QuantizedLayer, _QuantizedEmbed)):
      raise ValueError(f"quantize_model: {_path(path)!r} is already quantized; "
                       f"quantize the original float model instead.")
    if not isinstance(module, _LAYERS):
      continue
    weight = getattr(module, _weight_name(module)).get_value()
    shape = tuple(weight.shape)
    path_str = _path(path)
    rule = rules_lib.match(rules, path_str, module)
    quant = core.layer_quant(
        path_str, module, rule, shape, is_embed=isinstance(module, nnx.Embed),
        mode=mode, on_nonfinite=on_nonfinite, observer_for=observer_for,
        int8_forward=int8_forward)
    info = rules_lib.LayerInfo(
        path=path_str, module_type=type(module).__name__, rule=rule,
        weight_shape=shape, weight_name=_weight_name(module),
        weight=quant and quant.weight, act=quant and quant.act,
        mask=module.mask if isinstance(module, _MASKED) else None)
    infos.append(info)
    new = object.__new__(quantized_class(type(module)))
    vars(new).update(vars(module))
    object.__setattr__(new, "jaxq_layer", quant)
    object.__setattr__(new, "jaxq_info", info)
    if path:
      _replace(qmodel, path, new)
    else:
      qmodel = new
  object.__setattr__(qmodel, _RULES_ATTR, tuple(rules))
  rules_lib.warn_unmatched(rules, infos)
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
  return rules_lib.unmatched(getattr(qmodel, _RULES_ATTR),
                             layers(qmodel).values())


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
      raise ValueError(f"jaxq: no activation statistics for {quant.path!r}, "
                       f"which has a static act spec; run it in calibrate "
                       f"mode on at least one batch.")
    ranges[tuple(path) + ("jaxq_act_range",)] = QuantRange(
        core.finalize_range(quant.observer_for(quant.act), state))
  return nnx.from_flat_state(ranges)
