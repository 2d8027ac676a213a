"""Static per-head KV cache ranges: measured in calibrate mode, carried as
model variables, read into the cache in the other modes.

A `jaxq.kvcache.KVCacheSpec` with ``"head"`` granularity for keys and/or
values (``spec.static_parts``) quantizes them with one range per KV head.
`jaxq.calibrate` measures it like a static act range: in calibrate mode
each attention module of `jaxq.flax.kv_cache` folds the max of ``|k|``
(``|v|``) per KV head into an observer state, in the basis the cache
stores (Hadamard rotated where the spec asks, `jaxq.kvcache.stored_basis`),
padding left out (`jaxq.flax.calibration_mask`). The ranges are model
variables, not cache data, so that linen (whose cache ``init`` makes,
before any range exists) and nnx work alike:

==================  =====================================  ================
                    linen                                  nnx
==================  =====================================  ================
observer states     ``quant_stats/<path>/jaxq_kv_cache``   ``jaxq_kv_stats``
                    ``{"key": MaxState, "value": ...}``    (`QuantStat`)
ranges              ``quant_ranges/<path>/jaxq_kv_cache``  ``jaxq_kv_range``
                    ``{"key": (1, 1, H, 1), "value": ..}``  (`QuantKVRange`)
==================  =====================================  ================

`jaxq.act_ranges`, `jaxq.calibrate`'s ``ranges(method)`` and `jaxq.convert`
finalize them with the act ranges (always by max, whatever the method: a
static cache that clips keys moves every logit). In qat and serve mode each
call reads them into the cache (`jaxq.kvcache.with_ranges`) before
writing; a static spec without loaded ranges raises, naming the module.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax import traverse_util

from jaxq import calibration
from jaxq import kvcache
from jaxq import range_checks
from jaxq.flax import calibration_mask
from jaxq.flax import core
from jaxq.flax.linen_variables import RANGES
from jaxq.flax.linen_variables import STATS
from jaxq.flax.linen_variables import lookup
from jaxq.flax.linen_variables import mutable_node
from jaxq.flax.nnx_variables import QuantKVRange
from jaxq.flax.nnx_variables import QuantStat
from jaxq.kvcache.spec import KVCacheSpec

# Linen: the ranges' (and their observer states') name in "quant_ranges"
# ("quant_stats"), as the cache's in "cache".
LINEN_NAME = "jaxq_kv_cache"
NNX_STATS = "jaxq_kv_stats"  # nnx: a `QuantStat` attribute.
NNX_RANGE = "jaxq_kv_range"  # nnx: a `QuantKVRange` attribute.
_OBSERVER = calibration.max()


def observed(spec: KVCacheSpec, path: str, states: Any | None,
             key: jax.Array, value: jax.Array) -> dict[str, Any]:
  """``states`` (``{part: MaxState}``, None before the first call) with
  this call's keys and values ``(B, S, H, D)`` observed per KV head, for
  each of ``spec.static_parts``; the batch's padding mask leaves padding
  out (`jaxq.flax.calibration_mask`)."""
  out = {}
  for part, x in (("key", key), ("value", value)):
    if part not in spec.static_parts:
      continue
    x = kvcache.stored_basis(spec, part, x)
    state = (_OBSERVER.init(x, spec.part_quant_spec(part)) if states is None
             else states[part])
    out[part] = _OBSERVER.update(
        state, x, calibration_mask.layer_mask(path, tuple(x.shape)))
  return out


def finalized(states: Any, path: str) -> dict[str, jax.Array]:
  """The ``{part: amax}`` ranges of `observed` states (stacked states, of
  a scan over layers, give stacked ranges); warns, naming the module, when
  the observers skipped NaN or inf keys or values, and raises for a range
  of 0 (`jaxq.check_range`: calibration never saw a non-zero key)."""
  counts = {part: calibration.nonfinite_count(state)
            for part, state in states.items()}
  if not any(isinstance(n, jax.core.Tracer) for n in counts.values()):
    skipped = [f"{int(jnp.sum(n))} {part}s" for part, n in counts.items()
               if int(jnp.sum(n))]
    if skipped:
      warnings.warn(f"jaxq: the KV cache of {path!r} saw non-finite "
                    f"(NaN or inf) {' and '.join(skipped)} in calibration, "
                    f"left out of its static ranges.", stacklevel=2)
  ranges = {part: core.finalize_range(_OBSERVER, state, path)["amax"]
            for part, state in states.items()}
  for part, amax in ranges.items():
    if not isinstance(amax, jax.core.Tracer):  # A range of 0 raises.
      range_checks.check_range(states[part].spec, amax,
                               where=f"the KV cache of {path!r} ({part}s)")
  return ranges


def _missing(path: str, spec: KVCacheSpec, where: str) -> ValueError:
  parts = " and ".join(spec.static_parts)
  return ValueError(
      f"jaxq: the KV cache of {path!r} quantizes {parts} with static "
      f"per-head ranges (granularity 'head'), but {where} holds none: "
      f"calibrate the model "
      f"(jaxq.quantize_model(..., mode='calibrate'), jaxq.calibrate) and "
      f"use the variables jaxq.convert returns (or jaxq.act_ranges).")


def into_cache(cache: kvcache.KVCache, ranges: Mapping[str, jax.Array],
               path: str) -> kvcache.KVCache:
  """``cache`` with the ``{part: amax}`` ``ranges`` of the module at
  ``path`` as its static ones; raises naming the module for ranges of
  another model (another number of KV heads)."""
  try:
    return kvcache.with_ranges(cache, **{f"{part}_amax": amax
                                         for part, amax in ranges.items()})
  except ValueError as error:
    raise ValueError(f"jaxq: the KV cache of {path!r}: its loaded static "
                     f"ranges do not fit: {error}") from None


def placeholder(spec: KVCacheSpec, num_kv_heads: int
                ) -> dict[str, jax.Array]:
  """Ranges of 1 (as `jaxq.kvcache.init` keywords) for a linen cache made
  by the model's ``init``, before calibrated ones exist; every later call
  replaces them (`module_ranges_linen`, `into_cache`)."""
  return {f"{part}_amax": jnp.ones((num_kv_heads,), jnp.float32)
          for part in spec.static_parts}


def observe_linen(module: nn.Module, path: str, spec: KVCacheSpec,
                  key: jax.Array, value: jax.Array) -> None:
  """Calibrate mode (linen): folds keys and values into the module's
  ``quant_stats`` entry."""
  if not spec.static_parts:
    return
  if not module.is_mutable_collection(STATS):
    raise ValueError(f"jaxq calibrate: {path!r} records its KV cache's "
                     f"ranges in the {STATS!r} collection; call apply(..., "
                     f"mutable=[{STATS!r}]).")
  states = (module.get_variable(STATS, LINEN_NAME)
            if module.has_variable(STATS, LINEN_NAME) else None)
  module.put_variable(STATS, LINEN_NAME,
                      observed(spec, path, states, key, value))


def module_ranges_linen(module: nn.Module, path: str, spec: KVCacheSpec
                        ) -> dict[str, jax.Array] | None:
  """The static ranges in the module's ``quant_ranges`` entry (None for a
  spec without); raises when the spec needs them and none are loaded."""
  if not spec.static_parts:
    return None
  if not module.has_variable(RANGES, LINEN_NAME):
    raise _missing(path, spec, f"its {RANGES!r} collection")
  return module.get_variable(RANGES, LINEN_NAME)


def linen_ranges(kv_specs: Mapping[str, KVCacheSpec], stats: Any
                 ) -> dict[str, Any]:
  """The ``quant_ranges`` entries (a nested dict) of the static KV caches
  in ``kv_specs`` (path -> spec), finalized from a ``quant_stats`` tree."""
  ranges: dict[str, Any] = {}
  for path, spec in kv_specs.items():
    if not spec.static_parts:
      continue
    node = lookup(stats, path)
    if node is None or LINEN_NAME not in node:
      raise ValueError(f"jaxq: no KV statistics for {path!r}, whose cache "
                       f"has static per-head ranges; run it in calibrate "
                       f"mode on at least one batch.")
    mutable_node(ranges, path)[LINEN_NAME] = finalized(node[LINEN_NAME],
                                                       path)
  return ranges


def with_linen_ranges(ranges: Any, kv_specs: Mapping[str, KVCacheSpec],
                      stats: Any) -> dict[str, Any]:
  """``ranges`` (a ``quant_ranges`` collection) with `linen_ranges`."""
  kv = linen_ranges(kv_specs, stats or {})
  if not kv:
    return ranges
  return traverse_util.unflatten_dict({
      **traverse_util.flatten_dict(dict(ranges or {})),
      **traverse_util.flatten_dict(kv)})


def with_nnx_ranges(ranges: nnx.State, model: nnx.Module, stats: nnx.State
                    ) -> nnx.State:
  """``ranges`` (a ``State`` of `QuantRange` variables) with `nnx_ranges`."""
  kv = nnx.to_flat_state(nnx_ranges(model, stats))
  if not kv:
    return ranges
  return nnx.from_flat_state({**dict(nnx.to_flat_state(ranges)), **dict(kv)})


def nnx_ranges(model: nnx.Module, stats: nnx.State) -> nnx.State:
  """`QuantKVRange` variables (``jaxq_kv_range``) of the static KV caches
  of ``model``, finalized from ``nnx.state(model, QuantStat)``."""
  flat = {tuple(path): var.get_value()
          for path, var in nnx.to_flat_state(stats)}
  ranges = {}
  for path, module in nnx.iter_graph(model):
    spec = module_spec(module)
    if spec is None or not spec.static_parts:
      continue
    name = "/".join(map(str, path))
    states = flat.get(tuple(path) + (NNX_STATS,))
    if states is None:
      raise ValueError(f"jaxq: no KV statistics for {name!r}, whose cache "
                       f"has static per-head ranges; run it in calibrate "
                       f"mode on at least one batch.")
    ranges[tuple(path) + (NNX_RANGE,)] = QuantKVRange(finalized(states, name))
  return nnx.from_flat_state(ranges)


def module_spec(module: Any) -> KVCacheSpec | None:
  """The KV cache spec of an nnx attention module of a quantized copy
  (its ``jaxq_kv_spec``), or None for any other module."""
  spec = getattr(module, "jaxq_kv_spec", None)
  return spec if isinstance(spec, KVCacheSpec) else None


def observe_nnx(module: nnx.Module, spec: KVCacheSpec, key: jax.Array,
                value: jax.Array) -> None:
  """Calibrate mode (nnx): folds keys and values into ``jaxq_kv_stats``."""
  if not spec.static_parts:
    return
  held = getattr(module, NNX_STATS, None)
  states = observed(spec, type(module).__name__,
                    None if held is None else held.get_value(), key, value)
  if held is None:
    setattr(module, NNX_STATS, QuantStat(states))
  else:
    held.set_value(states)


def module_ranges_nnx(module: nnx.Module, spec: KVCacheSpec
                      ) -> dict[str, jax.Array] | None:
  """The loaded ``jaxq_kv_range`` of a static spec, or None."""
  held = getattr(module, NNX_RANGE, None)
  if not spec.static_parts or held is None:
    return None
  return held.get_value()


def made_cache(module: nnx.Module, spec: KVCacheSpec,
               make: Callable[..., Any],
               static_ranges: Mapping[str, jax.Array]) -> Any:
  """``make(**ranges)``: a new cache with the given static ranges, else the
  loaded ones; raises naming the module when a static spec has none."""
  if spec.static_parts and not static_ranges:
    loaded = module_ranges_nnx(module, spec)
    if loaded is None:
      raise _missing(type(module).__name__, spec,
                     f"its {NNX_RANGE!r} attribute")
    static_ranges = {f"{part}_amax": amax for part, amax in loaded.items()}
  return make(**static_ranges)
