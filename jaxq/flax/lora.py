"""LoRA adapters on linen and nnx models: where `jaxq.lora` meets Flax.

Everything that differs between the two APIs lives here, so that
`jaxq.lora` has no linen/nnx branch:

* linen: the chosen ``nn.Dense`` layers' ``params`` hold ``kernel`` (the
  frozen base, a `QArray` (`PackedQArray` for 4-bit formats) or float
  array), ``lora_a``, ``lora_b`` (and
  ``bias`` as before). `LinenLora.apply` runs the model under
  ``flax.linen.intercept_methods``: a chosen Dense's ``__call__`` becomes
  `jaxq.lora.core.lora_dense` on those variables. Dropout is on when the
  call is given a ``"dropout"`` rng.
* nnx: each chosen ``nnx.Linear`` is replaced, in a new model that shares
  the other arrays, by a `LoraLinear` holding ``base`` (`LoraBase`, a
  variable that is not a Param), ``bias`` (Param) and ``lora_a`` /
  ``lora_b`` (`LoraParam`, a Param subclass): ``nnx.Optimizer(model, tx,
  wrt=LoraParam)`` and ``nnx.DiffState(0, LoraParam)`` train the adapters
  only. Dropout follows ``model.train()`` / ``model.eval()``.

Paths are the "/"-joined module paths (linen's module names, nnx's
attribute names and list indices).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
from flax import nnx
from flax import traverse_util

from jaxq.lora import core
from jaxq.spec import PackedQArray
from jaxq.spec import QArray

Adapters = dict[str, dict[str, jax.Array]]


class LoraBase(nnx.Variable):
  """The frozen base kernel of an nnx `LoraLinear` (a `QArray`, a
  `PackedQArray` or float)."""


class LoraParam(nnx.Param):
  """A trainable LoRA adapter matrix (``lora_a``, ``lora_b``) in nnx."""


# ---------------------------------------------------------------- linen


def _linen_candidates(params: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """path -> kernel shape of every params node with a 2-D ``kernel``
  (``nn.Dense``)."""
  flat = traverse_util.flatten_dict(params, keep_empty_nodes=False)
  shapes = {}
  for key, leaf in flat.items():
    if key[-1] == "kernel" and len(getattr(leaf, "shape", ())) == 2:
      shapes["/".join(key[:-1])] = tuple(leaf.shape)
  return shapes


def _node(params: dict[str, Any], path: str) -> dict[str, Any]:
  node = params
  for name in path.split("/"):
    node = node[name]
  return node


def _copy_path(params: Mapping[str, Any], path: str) -> dict[str, Any]:
  """A shallow copy of ``params`` whose dicts along ``path`` are new, so
  the layer's node can be replaced without touching the caller's tree."""
  out = dict(params)
  node = out
  for name in path.split("/"):
    node[name] = dict(node[name])
    node = node[name]
  return out


@dataclasses.dataclass(frozen=True)
class LinenLora:
  """A linen model with LoRA layers (see the module docstring).

  Attributes:
    model: the original ``nn.Module``.
    layers: path -> `jaxq.lora.LoraLayer` of every chosen Dense.
  """

  model: nn.Module
  layers: Mapping[str, core.LoraLayer]

  def apply(self, variables: Any, *args, **kwargs) -> Any:
    """``model.apply`` with the chosen Dense layers computing base +
    adapters; ``rngs={"dropout": key}`` turns adapter dropout on."""
    with nn.intercept_methods(self._intercept):
      return self.model.apply(variables, *args, **kwargs)

  def __hash__(self):
    return hash((id(self.model), tuple(self.layers)))

  def __eq__(self, other):
    return self is other

  def _intercept(self, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.Dense):
      return next_fun(*args, **kwargs)
    layer = self.layers.get("/".join(module.path))
    if layer is None:
      return next_fun(*args, **kwargs)
    key = None
    if layer.dropout and module.has_rng("dropout"):
      key = module.make_rng("dropout")
    params = module.variables["params"]
    return core.lora_dense(
        args[0], params["kernel"], params["lora_a"], params["lora_b"],
        params.get("bias") if module.use_bias else None, scale=layer.scale,
        dropout_rate=layer.dropout, key=key, dtype=module.dtype)


def _linen_attach(model: nn.Module, variables: Mapping[str, Any],
                  rules: Sequence[core.LoraRule], key: jax.Array
                  ) -> tuple[LinenLora, dict[str, Any]]:
  params = variables["params"]
  layers = core.choose_layers(_linen_candidates(params), rules)
  init_key, _ = jax.random.split(key)  # The same A as nnx's.
  new_params = params
  for i, (path, layer) in enumerate(layers.items()):
    new_params = _copy_path(new_params, path)
    node = _node(new_params, path)
    a, b = core.init_adapter(jax.random.fold_in(init_key, i), layer)
    node["kernel"] = core.quantize_base(node["kernel"], layer.base)
    node["lora_a"], node["lora_b"] = a, b
  return LinenLora(model, layers), {**variables, "params": new_params}


def _linen_adapters(lora: LinenLora, variables: Mapping[str, Any]
                    ) -> Adapters:
  out = {}
  for path in lora.layers:
    node = _node(variables["params"], path)
    out[path] = {name: node[name] for name in core.ADAPTER_NAMES}
  return out


def _linen_set_adapters(lora: LinenLora, variables: Mapping[str, Any],
                        adapters: Adapters) -> dict[str, Any]:
  params = variables["params"]
  for path, pair in adapters.items():
    params = _copy_path(params, path)
    _node(params, path).update(pair)
  return {**variables, "params": params}


def _linen_merge(lora: LinenLora, variables: Mapping[str, Any]
                 ) -> dict[str, Any]:
  params = variables["params"]
  for path, layer in lora.layers.items():
    params = _copy_path(params, path)
    node = _node(params, path)
    kernel = core.merged_kernel(node["kernel"], node["lora_a"],
                                node["lora_b"], layer.scale)
    del node["lora_a"], node["lora_b"]
    node["kernel"] = kernel
  return {**variables, "params": params}


def _linen_bases(lora: LinenLora, variables: Mapping[str, Any]
                 ) -> dict[str, core.Base]:
  return {path: _node(variables["params"], path)["kernel"]
          for path in lora.layers}


def partition(params: Mapping[str, Any]
              ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Linen params -> ``(adapters, frozen)``: two nested dicts, the first
  with only the ``lora_a`` / ``lora_b`` leaves, the second with the rest
  (bases, embeddings, norms). `combine` puts them back together."""
  flat = traverse_util.flatten_dict(params)
  adapters = {k: v for k, v in flat.items() if k[-1] in core.ADAPTER_NAMES}
  frozen = {k: v for k, v in flat.items() if k[-1] not in core.ADAPTER_NAMES}
  return (traverse_util.unflatten_dict(adapters),
          traverse_util.unflatten_dict(frozen))


def combine(adapters: Mapping[str, Any], frozen: Mapping[str, Any]
            ) -> dict[str, Any]:
  """The inverse of `partition`."""
  flat = traverse_util.flatten_dict(frozen)
  flat.update(traverse_util.flatten_dict(adapters))
  return traverse_util.unflatten_dict(flat)


def trainable_mask(params: Mapping[str, Any]) -> Any:
  """A pytree of bools shaped like linen ``params`` (quantized bases are
  one False leaf): True at the adapters. As labels for
  ``optax.multi_transform({True: tx, False: optax.set_to_zero()}, mask)``
  (``optax.masked(tx, mask)`` alone would pass the frozen leaves' raw
  gradients through as their updates). For a float base only: a QArray
  base's integer values take float0 gradients that optax cannot apply;
  train `partition`'s adapters instead."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) in core.ADAPTER_NAMES,
      params, is_leaf=lambda x: isinstance(x, (QArray, PackedQArray)))


# ------------------------------------------------------------------ nnx


class LoraLinear(nnx.Module):
  """An ``nnx.Linear`` with a frozen (low-bit) base and LoRA adapters.

  ``__call__(x)``: (..., in) -> (..., out), `jaxq.lora.core.lora_dense`.
  """

  def __init__(self, base: core.Base, bias: jax.Array | None,
               lora_a: jax.Array, lora_b: jax.Array, layer: core.LoraLayer,
               linear: nnx.Linear, rngs: nnx.Rngs):
    self.base = LoraBase(base)
    self.bias = None if bias is None else nnx.Param(bias)
    self.lora_a = LoraParam(lora_a)
    self.lora_b = LoraParam(lora_b)
    self.layer = layer
    self.in_features, self.out_features = linear.in_features, linear.out_features
    self.dtype, self.param_dtype = linear.dtype, linear.param_dtype
    self.dropout = nnx.Dropout(layer.dropout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    key = None
    if self.layer.dropout and not self.dropout.deterministic:
      key = self.dropout.rngs()
    return core.lora_dense(
        x, self.base.get_value(), self.lora_a[...], self.lora_b[...],
        None if self.bias is None else self.bias[...],
        scale=self.layer.scale, dropout_rate=self.layer.dropout, key=key,
        dtype=self.dtype)


def _nnx_linears(root: nnx.Module) -> dict[str, tuple[tuple[Any, ...], Any]]:
  return {"/".join(map(str, path)): (path, module)
          for path, module in nnx.iter_graph(root)
          if isinstance(module, (nnx.Linear, LoraLinear))}


def _set_child(root: Any, path: tuple[Any, ...], value: Any) -> None:
  parent = root
  for name in path[:-1]:
    parent = parent[name] if isinstance(name, int) else getattr(parent, name)
  if isinstance(path[-1], int):
    parent[path[-1]] = value
  else:
    setattr(parent, path[-1], value)


def _nnx_lora_layers(model: nnx.Module) -> dict[str, LoraLinear]:
  return {path: module for path, (_, module) in _nnx_linears(model).items()
          if isinstance(module, LoraLinear)}


def _nnx_attach(model: nnx.Module, rules: Sequence[core.LoraRule],
                key: jax.Array) -> nnx.Module:
  graphdef, state = nnx.split(model)
  new = nnx.merge(graphdef, state)  # Shares the arrays, not the modules.
  linears = {path: entry for path, entry in _nnx_linears(new).items()
             if isinstance(entry[1], nnx.Linear)}
  layers = core.choose_layers(
      {path: tuple(m.kernel.shape) for path, (_, m) in linears.items()}, rules)
  init_key, dropout_key = jax.random.split(key)
  for i, (path, layer) in enumerate(layers.items()):
    keypath, linear = linears[path]
    a, b = core.init_adapter(jax.random.fold_in(init_key, i), layer)
    base = core.quantize_base(linear.kernel[...], layer.base)
    bias = linear.bias[...] if linear.use_bias else None
    rngs = nnx.Rngs(dropout=jax.random.fold_in(dropout_key, i))
    _set_child(new, keypath,
               LoraLinear(base, bias, a, b, layer, linear, rngs))
  return new


def _nnx_merge(model: nnx.Module) -> nnx.Module:
  graphdef, state = nnx.split(model)
  new = nnx.merge(graphdef, state)
  for path, (keypath, module) in _nnx_linears(new).items():
    if not isinstance(module, LoraLinear):
      continue
    kernel = core.merged_kernel(module.base.get_value(), module.lora_a[...],
                                module.lora_b[...], module.layer.scale)
    linear = nnx.Linear(module.in_features, module.out_features,
                        use_bias=module.bias is not None, dtype=module.dtype,
                        param_dtype=module.param_dtype, rngs=nnx.Rngs(0))
    linear.kernel = nnx.Param(kernel.astype(module.param_dtype))
    if module.bias is not None:
      linear.bias = nnx.Param(module.bias[...])
    _set_child(new, keypath, linear)
  return new


# ------------------------------------------------------- the one dispatch


@dataclasses.dataclass(frozen=True)
class Lora:
  """A model with LoRA layers, as `jaxq.lora.attach` returns it.

  Attributes:
    model: linen: a `LinenLora` (``apply(variables, ...)``); nnx: the new
      ``nnx.Module`` (call it), holding its own state.
    variables: linen: the new variables (bases, adapters, the rest of the
      model's); nnx: None.
    layers: path -> `jaxq.lora.LoraLayer` of every chosen layer.
  """

  model: Any
  variables: Any
  layers: Mapping[str, core.LoraLayer]

  @property
  def is_linen(self) -> bool:
    return isinstance(self.model, LinenLora)


def attach(model: Any, variables: Any, rules: Sequence[core.LoraRule],
           key: jax.Array) -> Lora:
  """See `jaxq.lora.attach`."""
  if isinstance(model, nn.Module):
    if variables is None or "params" not in variables:
      raise ValueError("jaxq.lora.attach: a linen model needs its variables "
                       "({'params': ...}).")
    lora, new_variables = _linen_attach(model, variables, rules, key)
    return Lora(lora, new_variables, lora.layers)
  if isinstance(model, nnx.Module):
    new = _nnx_attach(model, rules, key)
    return Lora(new, None, {p: m.layer for p, m in
                            _nnx_lora_layers(new).items()})
  raise TypeError(f"jaxq.lora.attach: expected a flax.linen or flax.nnx "
                  f"module, got {type(model).__name__}.")


def get_adapters(lora: Lora, variables: Any = None) -> Adapters:
  """path -> {"lora_a": A, "lora_b": B} (linen: of ``variables``, by
  default ``lora.variables``)."""
  if lora.is_linen:
    return _linen_adapters(lora.model, _vars(lora, variables))
  return {path: {"lora_a": m.lora_a[...], "lora_b": m.lora_b[...]}
          for path, m in _nnx_lora_layers(lora.model).items()}


def set_adapters(lora: Lora, adapters: Adapters, variables: Any = None
                 ) -> Any:
  """Writes checked adapters: linen returns new variables; nnx updates
  ``lora.model`` in place and returns it."""
  if lora.is_linen:
    return _linen_set_adapters(lora.model, _vars(lora, variables), adapters)
  modules = _nnx_lora_layers(lora.model)
  for path, pair in adapters.items():
    modules[path].lora_a[...] = pair["lora_a"]
    modules[path].lora_b[...] = pair["lora_b"]
  return lora.model


def get_bases(lora: Lora, variables: Any = None) -> dict[str, core.Base]:
  """path -> the frozen base (QArray, PackedQArray or float kernel) of
  each layer."""
  if lora.is_linen:
    return _linen_bases(lora.model, _vars(lora, variables))
  return {path: m.base.get_value()
          for path, m in _nnx_lora_layers(lora.model).items()}


def merge(lora: Lora, variables: Any = None) -> Any:
  """The original model's form with float kernels ``W + A B alpha / r``:
  linen variables for the original module, or a new nnx module with
  ``nnx.Linear`` layers back."""
  if lora.is_linen:
    return _linen_merge(lora.model, _vars(lora, variables))
  return _nnx_merge(lora.model)


def _vars(lora: Lora, variables: Any) -> Any:
  return lora.variables if variables is None else variables
