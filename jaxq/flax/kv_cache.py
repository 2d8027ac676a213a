"""Quantized KV caches in Flax models, chosen by rules.

A `jaxq.Rule` with ``kv_cache=KVCacheSpec(...)`` gives the attention
modules it matches a `jaxq.kvcache` cache of that spec; the model is not
rewritten. Three kinds of attention take one:

* ``flax.linen.MultiHeadDotProductAttention(decode=True)``: under
  `jaxq.quantize_model` (linen), its ``"cache"`` collection holds, instead of
  Flax's float ``cached_key`` / ``cached_value``, one `jaxq.kvcache.KVCache`
  ``jaxq_kv_cache`` beside Flax's ``cache_index``. As with Flax, ``init``
  on an input of ``max_length`` tokens sizes the (empty) cache and each
  decode step ``apply(..., mutable=["cache"])`` appends its tokens (one, or
  several at once) at ``cache_index``, attending causally through
  `jaxq.kvcache.attend`. The projections stay Flax's ``DenseGeneral``
  layers, so weight rules still apply to them. Decode steps take no
  ``mask`` (the cache is causal) and no dropout.
* ``flax.nnx.MultiHeadAttention`` (``decode=True``, or ``decode=True`` in
  the call): in the quantized copy that `jaxq.quantize_model` returns,
  ``init_cache(input_shape)`` makes a `jaxq.kvcache.KVCache`
  (``jaxq_kv_cache``, an ``nnx.Cache``, beside ``cache_index``) instead of
  ``cached_key`` / ``cached_value``, and each decode call appends its tokens
  and attends through `jaxq.kvcache.attend`; calls that do not decode run
  Flax's attention unchanged. As for linen: no ``mask``, no dropout while
  decoding.
* `KVCacheAttention` (linen) and `NnxKVCacheAttention` (nnx): jaxq's cache
  modules, for a user's own attention (GQA, RoPE, ragged batches): called
  with the already projected (and rotated) ``query``, ``key``, ``value``
  and each row's start ``positions``, they write the new tokens and return
  the attention output. Their own ``spec`` (a float cache by default) is
  what a matching rule replaces: for linen under `jaxq.quantize_model`'s
  interceptor, for nnx in the quantized copy `jaxq.quantize_model` returns.

A rule's spec applies in qat and serve mode. In calibrate mode the
attention modules attend in float, causally, without a cache, and a spec
with static per-head ranges has them measured by `jaxq.calibrate`
(`jaxq.flax.kv_ranges`); in qat and serve mode each call reads them into
the cache before writing.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxq import kvcache
from jaxq.flax import core
from jaxq.flax import kv_ranges
from jaxq.kvcache.spec import KVCacheSpec

CACHE = "cache"  # Flax's collection for decode caches.
CACHE_NAME = "jaxq_kv_cache"  # The cache, in linen's "cache" collection.
FLOAT_SPEC = KVCacheSpec(format=None)

# The mode of the quantized linen model whose attention is being called
# (set by its interceptor around the call; `KVCacheAttention` reads it).
_LINEN_MODE: contextvars.ContextVar[core.Mode] = contextvars.ContextVar(
    "jaxq_kv_cache_mode", default="serve")


def _check_spec(path: str, cache: kvcache.KVCache, spec: KVCacheSpec) -> None:
  if cache.spec != spec:
    raise ValueError(
        f"jaxq: the KV cache of {path!r} was made with {cache.spec}, but the "
        f"model now asks for {spec}; make the cache with this model's init "
        f"(or init_cache), not another model's.")


def _float_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                     scale: float | None = None) -> jax.Array:
  """Calibrate mode's attention: the tokens as a prefill from position 0
  of an empty float cache (causal), the module's cache left alone."""
  cache = kvcache.init(FLOAT_SPEC, batch=key.shape[0],
                       max_length=key.shape[1], num_kv_heads=key.shape[2],
                       head_dim=key.shape[3], dtype=key.dtype)
  start = jnp.zeros((key.shape[0],), jnp.int32)
  cache = kvcache.update(cache, key, value, start)
  return kvcache.attend(cache, query, start, scale=scale)


class KVCacheAttention(nn.Module):
  """Causal attention over a KV cache in the ``"cache"`` collection (linen).

  ``init`` makes an empty cache (``max_length`` tokens, the batch, heads
  and head size of the first ``key``); ``apply(..., mutable=["cache"])``
  writes ``key``/``value`` at ``positions`` and attends (see
  `jaxq.kvcache.update` and `jaxq.kvcache.attend` for shapes).

  Attributes:
    max_length: tokens the cache holds.
    spec: the cache's `KVCacheSpec`; a float cache (``format=None``) by
      default. A `jaxq.Rule` with ``kv_cache`` replaces it.
    scale: the logit scale, ``1 / sqrt(head_dim)`` when None.
  """

  max_length: int
  spec: KVCacheSpec = FLOAT_SPEC
  scale: float | None = None

  @nn.compact
  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array,
               positions: jax.Array) -> jax.Array:
    """``(B, S, H_q, D)`` attention of ``query`` over the cache, after
    writing ``key`` and ``value`` ``(B, S, H_kv, D)`` at ``positions``
    ``(B,)``. In calibrate mode: a prefill from position 0 in float, the
    cache untouched, the static ranges observed."""
    path = "/".join(self.path)
    if _LINEN_MODE.get() == "calibrate":
      kv_ranges.observe_linen(self, path, self.spec, key, value)
      return _float_attention(query, key, value, self.scale)
    initializing = not self.has_variable(CACHE, CACHE_NAME)
    ranges = (None if initializing else
              kv_ranges.module_ranges_linen(self, path, self.spec))
    cache = self.variable(CACHE, CACHE_NAME, lambda: kvcache.init(
        self.spec, batch=key.shape[0], max_length=self.max_length,
        num_kv_heads=key.shape[2], head_dim=key.shape[3], dtype=key.dtype,
        **kv_ranges.placeholder(self.spec, key.shape[2])))
    _check_spec(path, cache.value, self.spec)
    current = (cache.value if ranges is None else
               kv_ranges.into_cache(cache.value, ranges, path))
    updated = kvcache.update(current, key, value, positions)
    if not initializing:  # init keeps the cache empty.
      cache.value = updated
    return kvcache.attend(updated, query, positions, scale=self.scale)


@contextlib.contextmanager
def linen_mode(mode: core.Mode) -> Iterator[None]:
  """Within the block, `KVCacheAttention` runs as in ``mode`` (set by a
  quantized linen model's interceptor around the module's call)."""
  token = _LINEN_MODE.set(mode)
  try:
    yield
  finally:
    _LINEN_MODE.reset(token)


def linen_attention_fn(module: nn.Module, spec: KVCacheSpec,
                       mode: core.Mode = "serve"
                       ) -> Callable[..., jax.Array]:
  """The ``attention_fn`` that makes a ``MultiHeadDotProductAttention``,
  run with ``decode=False``, decode through a quantized cache (calibrate
  ``mode``: attend in float, causally, and observe the static ranges).

  It runs inside the module's compact ``__call__`` (the projections done),
  so it creates and updates the module's own ``"cache"`` variables.
  """
  path = "/".join(module.path)

  def attention_fn(query: jax.Array, key: jax.Array, value: jax.Array,
                   mask: jax.Array | None = None) -> jax.Array:
    if key.ndim != 4:
      raise ValueError(
          f"jaxq: {path!r}: a quantized KV cache takes inputs with one batch "
          f"axis, (batch, length, features); got keys of shape "
          f"{tuple(key.shape)} (batch, length, heads, head_dim) expected.")
    if mode == "calibrate":
      kv_ranges.observe_linen(module, path, spec, key, value)
      causal = nn.make_causal_mask(jnp.ones(key.shape[:2], bool))
      return nn.dot_product_attention(query, key, value,
                                      mask=nn.combine_masks(mask, causal))
    if module.has_variable(CACHE, "cached_key"):
      raise ValueError(f"jaxq: {path!r} holds Flax's float cache "
                       f"(cached_key); initialize the cache with the "
                       f"quantized model's init.")
    if not module.has_variable(CACHE, CACHE_NAME):
      # init, as Flax's: size the empty cache by the input, attend in float.
      module.variable(CACHE, CACHE_NAME, lambda: kvcache.init(
          spec, batch=key.shape[0], max_length=key.shape[1],
          num_kv_heads=key.shape[2], head_dim=key.shape[3], dtype=key.dtype,
          **kv_ranges.placeholder(spec, key.shape[2])))
      module.variable(CACHE, "cache_index", lambda: jnp.array(0, jnp.int32))
      return nn.dot_product_attention(query, key, value, mask=mask)
    if mask is not None:
      raise ValueError(f"jaxq: {path!r} decodes through a quantized KV "
                       f"cache, which is causal: pass mask=None in decode "
                       f"steps.")
    ranges = kv_ranges.module_ranges_linen(module, path, spec)
    cache = module.variable(CACHE, CACHE_NAME)
    index = module.variable(CACHE, "cache_index")
    _check_spec(path, cache.value, spec)
    current = (cache.value if ranges is None else
               kv_ranges.into_cache(cache.value, ranges, path))
    positions = jnp.full((key.shape[0],), index.value, jnp.int32)
    cache.value = kvcache.update(current, key, value, positions)
    index.value = index.value + key.shape[1]
    return kvcache.attend(cache.value, query, positions)

  return attention_fn


class NnxKVCacheAttention(nnx.Module):
  """Causal attention over a KV cache held in an ``nnx.Cache`` (nnx).

  ``init_cache(batch)`` makes the empty cache; each call writes ``key`` /
  ``value`` at ``positions`` and attends (see `jaxq.kvcache.update` and
  `jaxq.kvcache.attend` for shapes). `jaxq.quantize_model` sets ``spec``
  from a matching rule's ``kv_cache`` in the model's quantized copy (and
  makes a cache already there again, empty, in the new spec).

  Attributes:
    num_kv_heads, head_dim, max_length: the cache shape.
    spec: the `KVCacheSpec`; a float cache by default.
    dtype: the float dtype of keys and values.
    scale: the logit scale, ``1 / sqrt(head_dim)`` when None.
    cache: the `jaxq.kvcache.KVCache` (an ``nnx.Cache``), or None before
      ``init_cache``.
  """

  def __init__(self, num_kv_heads: int, head_dim: int, max_length: int, *,
               spec: KVCacheSpec = FLOAT_SPEC, dtype: Any = jnp.float32,
               scale: float | None = None):
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.max_length = max_length
    self.spec = spec
    self.dtype = dtype
    self.scale = scale
    self.jaxq_kv_mode: core.Mode = "serve"
    self.cache: nnx.Cache | None = nnx.data(None)  # Data, once made.

  @property
  def jaxq_kv_spec(self) -> KVCacheSpec:
    """``spec``, by the name every cached nnx attention has it."""
    return self.spec

  def init_cache(self, batch: int, **static_ranges: jax.Array) -> None:
    """An empty cache for ``batch`` sequences. A static spec's ranges:
    ``key_amax`` / ``value_amax`` as `jaxq.kvcache.init` takes them, else
    the calibrated ones loaded (``jaxq_kv_range``)."""
    self.cache = nnx.Cache(kv_ranges.made_cache(
        self, self.spec, functools.partial(
            kvcache.init, self.spec, batch=batch,
            max_length=self.max_length, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, dtype=self.dtype), static_ranges))

  def set_spec(self, spec: KVCacheSpec, mode: core.Mode = "serve") -> None:
    """Uses ``spec`` (in ``mode``) from now on; a cache already made is
    made again, empty, for the same batch (dropped, for a static spec whose
    ranges are not loaded yet: ``init_cache`` once they are)."""
    self.spec, self.jaxq_kv_mode = spec, mode
    if self.cache is not None:
      if spec.static_parts and (
          kv_ranges.module_ranges_nnx(self, spec) is None):
        self.cache = None
      else:
        self.init_cache(self.cache.get_value().batch)

  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array,
               positions: jax.Array) -> jax.Array:
    if self.jaxq_kv_mode == "calibrate":
      kv_ranges.observe_nnx(self, self.spec, key, value)
      return _float_attention(query, key, value, self.scale)
    if self.cache is None:
      raise ValueError("NnxKVCacheAttention: call init_cache(batch) before "
                       "the first prefill.")
    cache = self.cache.get_value()
    _check_spec(type(self).__name__, cache, self.spec)
    ranges = kv_ranges.module_ranges_nnx(self, self.spec)
    if ranges is not None:
      cache = kv_ranges.into_cache(cache, ranges, type(self).__name__)
    cache = kvcache.update(cache, key, value, positions)
    self.cache.set_value(cache)
    return kvcache.attend(cache, query, positions, scale=self.scale)


# The nnx MultiHeadAttention being called, and whether it decodes: its
# `attention_fn` (jaxq's, set once on the quantized copy) reads it, so a
# call never changes the module's attributes.
_CALL: contextvars.ContextVar[tuple[nnx.Module, bool] | None] = (
    contextvars.ContextVar("jaxq_nnx_attention_call", default=None))


def _nnx_attention_fn(query: jax.Array, key: jax.Array, value: jax.Array,
                      mask: jax.Array | None = None, **kwargs) -> jax.Array:
  """The ``attention_fn`` of a cached nnx ``MultiHeadAttention``."""
  module, decoding = _CALL.get()
  if module.jaxq_kv_mode == "calibrate":
    kv_ranges.observe_nnx(module, module.jaxq_kv_spec, key, value)
    if decoding:  # A prefill from empty, in float.
      causal = nnx.make_causal_mask(jnp.ones(key.shape[:2], bool))
      mask = nnx.combine_masks(mask, causal)
  if not decoding or module.jaxq_kv_mode == "calibrate":
    return module.jaxq_attention_fn(query, key, value, mask=mask, **kwargs)
  if mask is not None:
    raise ValueError(f"jaxq: {type(module).__name__} decodes through a "
                     f"quantized KV cache, which is causal: pass mask=None "
                     f"in decode steps.")
  cache = module.jaxq_kv_cache.get_value()
  ranges = kv_ranges.module_ranges_nnx(module, module.jaxq_kv_spec)
  if ranges is not None:
    cache = kv_ranges.into_cache(cache, ranges, type(module).__name__)
  positions = jnp.full((key.shape[0],), module.cache_index.get_value(),
                       jnp.int32)
  cache = kvcache.update(cache, key, value, positions)
  module.jaxq_kv_cache.set_value(cache)
  module.cache_index.set_value(module.cache_index.get_value() + key.shape[1])
  return kvcache.attend(cache, query, positions).astype(query.dtype)


class _CachedMultiHeadAttention:
  """What a cached ``nnx.MultiHeadAttention`` adds (see `cached_class`)."""

  def init_cache(self, input_shape: tuple[int, ...],
                 dtype: Any = jnp.float32) -> None:
    """An empty cache for inputs of ``(batch, max_length, features)``."""
    if len(input_shape) != 3:
      raise ValueError(
          f"jaxq: a quantized KV cache takes inputs with one batch axis, "
          f"(batch, max_length, features); init_cache got {input_shape}.")
    self.jaxq_kv_cache = nnx.Cache(kv_ranges.made_cache(
        self, self.jaxq_kv_spec, functools.partial(
            kvcache.init, self.jaxq_kv_spec, batch=input_shape[0],
            max_length=input_shape[1], num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, dtype=dtype), {}))
    self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

  def __call__(self, *args, decode: bool | None = None, **kwargs):
    decoding = self.decode if decode is None else decode
    if (decoding and self.jaxq_kv_cache is None and
        self.jaxq_kv_mode != "calibrate"):
      raise ValueError("Autoregressive cache not initialized, call "
                       "``init_cache`` first.")
    token = _CALL.set((self, bool(decoding)))
    try:
      return self.jaxq_float_class.__call__(self, *args, decode=False,
                                            **kwargs)
    finally:
      _CALL.reset(token)


@functools.lru_cache(maxsize=None)
def cached_class(cls: type) -> type:
  """The subclass of an nnx ``MultiHeadAttention`` class that decodes
  through a jaxq cache (cached, so jit-stable)."""
  mixin = _CachedMultiHeadAttention
  namespace = {"__module__": __name__, "__slots__": (),
               "__qualname__": f"KVCached{cls.__name__}",
               "jaxq_float_class": cls, "__call__": mixin.__call__,
               "init_cache": mixin.init_cache}
  return type(f"KVCached{cls.__name__}", (cls, mixin), namespace)


def use_nnx_cache(module: nnx.Module, spec: KVCacheSpec,
                  mode: core.Mode = "serve") -> None:
  """Gives the nnx attention ``module`` (of a model's quantized copy in
  ``mode``) a ``spec`` cache: jaxq's cache modules take the spec; a
  ``MultiHeadAttention`` becomes its `cached_class` in place, with a cache
  already made, made again (empty) in the spec (not for a static spec,
  whose ranges are calibrated later: ``init_cache`` once they are
  loaded)."""
  if isinstance(module, NnxKVCacheAttention):
    module.set_spec(spec, mode)
    return
  made = getattr(module, "cached_key", None)
  if not isinstance(module, _CachedMultiHeadAttention):
    object.__setattr__(module, "__class__", cached_class(type(module)))
    module.jaxq_attention_fn = module.attention_fn
    module.attention_fn = _nnx_attention_fn
    module.jaxq_kv_cache = nnx.data(None)
  module.jaxq_kv_spec, module.jaxq_kv_mode = spec, mode
  if made is not None and spec.static_parts:
    module.cached_key = module.cached_value = None
  elif made is not None:
    module.cached_key = module.cached_value = None
    shape = tuple(made.get_value().shape)
    module.init_cache(shape[:2] + (module.in_features,),
                      made.get_value().dtype)
