"""The cache pytree of one attention layer: create, write, read, size.

Layout: keys and values are ``(batch, max_length, kv_heads, head_dim)``
(int4: ``head_dim / 2`` bytes, packed two per byte), each with the scales of
its `KVCacheSpec` granularity. Writes quantize with `jaxq.quantize` and
reads dequantize with `jaxq.dequantize`, so the cache follows jaxq's
numerics exactly.

Writing (`update`) puts ``S`` tokens of each sequence at its own start
position with ``lax.dynamic_update_slice``: a prefill writes many, a decode
step one. A write at position ``p`` defines the sequence as ``p + S``
tokens long: later tokens hold stale data that attention never sees (it is
causal), and a later write overwrites them.

KIVI keys (``key_granularity="channel"``) share a scale per channel over a
group of ``group_size`` tokens. The incomplete group at the end of each
sequence is quantized with the tokens it has so far, and its tokens are
also kept in float (``key_residual``, one group per row): a write
re-quantizes every group it touches from float (the residual and the new
tokens), so attention always reads one low-bit cache, and decoding token by
token rounds each key once, as a one-shot prefill does. Tokens at ``p + S``
and later in the touched groups are zeroed, so stale data never widens a
range. A write that starts before the residual group (a ragged batch's
padding overwritten) re-quantizes that group's earlier tokens from their
dequantized values: rounded twice.

Out-of-range writes: with concrete positions, `update` raises naming the
row. Under ``jit`` positions are unknown when tracing; a row whose write
does not fit (``p < 0`` or ``p + S > max_length``) is marked in
``KVCache.overflowed``, and `jaxq.kvcache.attend` returns NaN for that
row from then on: never a finite, wrong answer (the write itself is
clamped by ``dynamic_update_slice`` into the last ``S`` slots).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import formats as formats_lib
from jaxq import granularity as granularity_lib
from jaxq.kvcache import hadamard
from jaxq.kvcache.spec import KVCacheSpec
from jaxq.quantize import dequantize, quantize, scale_from_range
from jaxq.spec import QArray


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["key", "value", "key_scale", "value_scale", "key_amax",
                 "value_amax", "key_residual", "key_residual_group",
                 "overflowed", "value_residual"],
    meta_fields=["spec", "dtype"])
@dataclasses.dataclass(frozen=True)
class KVCache:
  """One layer's KV cache (a pytree; ``spec`` and ``dtype`` are static).

  Attributes:
    key: ``(B, T, H, D)`` in the format's storage dtype (the float
      ``dtype`` when ``spec.format`` is None); int4 as ``(B, T, H, D / 2)``
      uint8, two per byte.
    value: like ``key``.
    key_scale: float32 scales of ``spec.key_granularity`` (see
      `jaxq.kvcache.spec`), or None for a float cache.
    value_scale: likewise for values.
    key_amax: the static ``(1, 1, H, 1)`` range of ``"head"`` keys (what
      writes quantize with), else None.
    value_amax: likewise for values.
    key_residual: ``"channel"`` keys only (else None): ``(B, group_size, H,
      D)`` in ``dtype``, the float keys written so far in the group where
      each row's next write starts, so that group is re-quantized from
      exact values as it fills.
    key_residual_group: ``(B,)`` int32, that group's index per row.
    overflowed: ``(B,)`` bool, True for a row that was written past the
      cache (under ``jit``); its attention is NaN.
    spec: the `KVCacheSpec`.
    dtype: the float dtype of `read` and of a float cache.
    value_residual: ``spec.float_residual`` only (else None): ``(B,
      group_size, H, D)`` in ``dtype``, the float values of the tokens in
      ``key_residual``, which `jaxq.kvcache.attend` reads in place of the
      quantized ones (as it reads ``key_residual`` for keys).
  """

  key: jax.Array
  value: jax.Array
  key_scale: jax.Array | None
  value_scale: jax.Array | None
  key_amax: jax.Array | None
  value_amax: jax.Array | None
  key_residual: jax.Array | None
  key_residual_group: jax.Array | None
  overflowed: jax.Array
  spec: KVCacheSpec
  dtype: np.dtype
  value_residual: jax.Array | None = None

  @property
  def batch(self) -> int:
    return int(self.key.shape[0])

  @property
  def max_length(self) -> int:
    return int(self.key.shape[1])

  @property
  def num_kv_heads(self) -> int:
    return int(self.key.shape[2])

  @property
  def head_dim(self) -> int:
    return int(self.key.shape[3]) * (2 if self.spec.packed else 1)


def _storage_dtype(spec: KVCacheSpec, dtype: np.dtype) -> np.dtype:
  if not spec.quantized:
    return dtype
  return np.uint8 if spec.packed else formats_lib.get_format(spec.format).dtype


def _static_amax(name: str, amax: jax.Array | None, spec: KVCacheSpec,
                 granularity: str, num_kv_heads: int,
                 what: str = "kvcache.init") -> jax.Array | None:
  """A ``"head"`` range reshaped to ``(1, 1, H, 1)``, checked; else None."""
  part = name.split("_")[0]
  if granularity != "head" or not spec.quantized:
    if amax is not None:
      raise ValueError(f"{what}: {name} is only for {part}_granularity="
                       f"'head' with a quantized format, but the spec has "
                       f"format {spec.format!r} and {part}_granularity="
                       f"{granularity!r}.")
    return None
  if amax is None:
    raise ValueError(f"{what}: {part}_granularity='head' needs {name}, a "
                     f"static range of shape ({num_kv_heads},) (one per KV "
                     f"head, e.g. from jaxq.calibrate).")
  amax = jnp.asarray(amax, jnp.float32)
  if amax.size != num_kv_heads:
    raise ValueError(f"{what}: {name} has shape {tuple(amax.shape)}, "
                     f"expected ({num_kv_heads},), one per KV head.")
  return amax.reshape(1, 1, num_kv_heads, 1)


def init(spec: KVCacheSpec, *, batch: int, max_length: int,
         num_kv_heads: int, head_dim: int, dtype=jnp.float32,
         key_amax: jax.Array | None = None,
         value_amax: jax.Array | None = None) -> KVCache:
  """An empty cache for one attention layer.

  Args:
    spec: the `KVCacheSpec`.
    batch, max_length, num_kv_heads, head_dim: the cache shape ``(B, T, H,
      D)``.
    dtype: the float dtype `read` returns, and a float cache stores.
    key_amax, value_amax: static ranges, one per KV head (``max |k|`` per
      head, any shape of ``num_kv_heads`` elements, e.g. a jaxq observer's
      ``(1, 1, H, 1)`` result on keys under ``spec.key_quant_spec()``), for
      a ``"head"`` granularity; not allowed otherwise. With
      ``spec.hadamard``, ``key_amax`` is the range of the rotated keys
      (`jaxq.kvcache.hadamard.rotate`), which the cache stores.

  Raises:
    ValueError: for a non-positive size, an odd ``head_dim`` with int4, a
      ``max_length`` that is not a multiple of ``group_size`` for
      ``"channel"`` keys, a ``head_dim`` that is not a multiple of
      ``value_group_size``, or not a power of two with ``hadamard`` or
      ``value_hadamard``, or a missing, misshapen or invalid static range.
  """
  if not isinstance(spec, KVCacheSpec):
    raise TypeError(f"kvcache.init: spec must be a KVCacheSpec, got {spec!r}.")
  sizes = dict(batch=batch, max_length=max_length, num_kv_heads=num_kv_heads,
               head_dim=head_dim)
  for name, size in sizes.items():
    if not isinstance(size, (int, np.integer)) or size <= 0:
      raise ValueError(f"kvcache.init: {name} must be a positive integer, "
                       f"got {size!r}.")
  if spec.packed and head_dim % 2:
    raise ValueError(f"kvcache.init: int4 packs two values per byte along "
                     f"head_dim, which must be even; got {head_dim}.")
  if spec.key_granularity == "channel" and max_length % spec.group_size:
    raise ValueError(f"kvcache.init: max_length {max_length} is not a "
                     f"multiple of group_size {spec.group_size} "
                     f"(key_granularity='channel').")
  if spec.value_group_size and head_dim % spec.value_group_size:
    raise ValueError(f"kvcache.init: head_dim {head_dim} is not a multiple "
                     f"of value_group_size {spec.value_group_size}.")
  if spec.hadamard or spec.value_hadamard:
    hadamard.hadamard_matrix(head_dim)  # Raises unless a power of two.
  dtype = np.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"kvcache.init: dtype must be a float dtype, got {dtype}.")
  key_amax = _static_amax("key_amax", key_amax, spec, spec.key_granularity,
                          num_kv_heads)
  value_amax = _static_amax("value_amax", value_amax, spec,
                            spec.value_granularity, num_kv_heads)
  shape = (batch, max_length, num_kv_heads, head_dim)
  stored_shape = shape[:-1] + (head_dim // 2 if spec.packed else head_dim,)
  storage = _storage_dtype(spec, dtype)
  key_scale = value_scale = residual = residual_group = None
  value_residual = None
  if spec.quantized:
    key_scale = _empty_scale(spec.key_quant_spec(), shape, key_amax)
    value_scale = _empty_scale(spec.value_quant_spec(), shape, value_amax)
  if spec.quantized and spec.key_granularity == "channel":
    residual = jnp.zeros((batch, spec.group_size) + shape[2:], dtype)
    residual_group = jnp.zeros((batch,), jnp.int32)
  if spec.float_residual:
    value_residual = jnp.zeros_like(residual)
  return KVCache(key=jnp.zeros(stored_shape, storage),
                 value=jnp.zeros(stored_shape, storage),
                 key_scale=key_scale, value_scale=value_scale,
                 key_amax=key_amax, value_amax=value_amax,
                 key_residual=residual, key_residual_group=residual_group,
                 overflowed=jnp.zeros((batch,), bool), spec=spec,
                 dtype=dtype, value_residual=value_residual)


def with_ranges(cache: KVCache, *, key_amax: jax.Array | None = None,
                value_amax: jax.Array | None = None) -> KVCache:
  """``cache`` with new static ranges (and the static scales they give).

  For a cache made before its calibrated ranges were known (a Flax model's
  ``init``): each range given replaces the ``"head"`` range of that part,
  which must have one (``spec.static_parts``); tokens already stored are
  read with the new scale. Works under ``jit``.

  Raises:
    ValueError: for a range the spec has no place for, or one of another
      size than ``num_kv_heads`` (naming it).
  """
  spec = cache.spec
  out = {}
  for part, amax in (("key", key_amax), ("value", value_amax)):
    if amax is None:
      continue
    granularity = spec.key_granularity if part == "key" else (
        spec.value_granularity)
    amax = _static_amax(f"{part}_amax", amax, spec, granularity,
                        cache.num_kv_heads, what="kvcache.with_ranges")
    scale, _ = scale_from_range(spec.part_quant_spec(part), amax)
    out.update({f"{part}_amax": amax, f"{part}_scale": scale})
  return dataclasses.replace(cache, **out)


def stored_basis(spec: KVCacheSpec, part: str, x: jax.Array) -> jax.Array:
  """Keys (``part="key"``) or values ``(B, S, H, D)`` in the basis the
  cache quantizes them in: Hadamard-rotated with ``spec.hadamard`` (keys)
  or ``spec.value_hadamard`` (values), else as given. Static ranges are
  ranges of these (what calibration observes)."""
  rotated = spec.hadamard if part == "key" else spec.value_hadamard
  return hadamard.rotate(x) if rotated else x


def _empty_scale(quant_spec, shape: tuple[int, ...],
                 amax: jax.Array | None) -> jax.Array:
  """Zeros of the scale shape (an empty slot reads as 0), or the static
  scale of ``amax`` (raising for an invalid concrete range)."""
  if amax is not None:
    scale, _ = scale_from_range(quant_spec, amax)
    return scale
  return jnp.zeros(granularity_lib.scale_shape(quant_spec.granularity, shape),
                   jnp.float32)


def _check_write(cache: KVCache, key: jax.Array, value: jax.Array,
                 positions: jax.Array) -> None:
  """Shapes always; positions when concrete."""
  expected = (cache.batch, None, cache.num_kv_heads, cache.head_dim)
  for name, x in (("key", key), ("value", value)):
    if (x.ndim != 4 or x.shape[0] != cache.batch or
        x.shape[2:] != expected[2:]):
      raise ValueError(
          f"kvcache.update: {name} has shape {tuple(x.shape)}, but the cache "
          f"needs (batch={cache.batch}, tokens, kv_heads="
          f"{cache.num_kv_heads}, head_dim={cache.head_dim}).")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"kvcache.update: {name} must be a float array, got "
                       f"dtype {x.dtype}.")
  if key.shape != value.shape:
    raise ValueError(f"kvcache.update: key {tuple(key.shape)} and value "
                     f"{tuple(value.shape)} must have the same shape.")
  tokens = key.shape[1]
  if tokens > cache.max_length:
    raise ValueError(f"kvcache.update: writing {tokens} tokens into a cache "
                     f"of max_length {cache.max_length}.")
  if positions.shape != (cache.batch,) or not jnp.issubdtype(
      positions.dtype, jnp.integer):
    raise ValueError(f"kvcache.update: positions must be an integer array of "
                     f"shape (batch,) = ({cache.batch},), the start of the "
                     f"written tokens in each sequence; got "
                     f"{positions.dtype}{tuple(positions.shape)}.")
  if not isinstance(positions, jax.core.Tracer):
    starts = np.asarray(positions)
    bad = np.flatnonzero((starts < 0) | (starts + tokens > cache.max_length))
    if bad.size:
      row = int(bad[0])
      raise ValueError(
          f"kvcache.update: row {row} writes {tokens} token(s) at position "
          f"{int(starts[row])}, past the cache's max_length "
          f"{cache.max_length} (positions must satisfy 0 <= p and p + "
          f"{tokens} <= {cache.max_length}).")


def _write_rows(store: jax.Array, rows: jax.Array, starts: jax.Array
                ) -> jax.Array:
  """Writes ``rows[b]`` into ``store[b]`` at token ``starts[b]`` (axis 1)."""
  def write(s, r, p):
    return jax.lax.dynamic_update_slice(s, r.astype(s.dtype),
                                        (p,) + (0,) * (s.ndim - 1))
  return jax.vmap(write)(store, rows, starts)


def _read_rows(store: jax.Array, starts: jax.Array, length: int) -> jax.Array:
  """``store[b, starts[b]:starts[b] + length]`` for every row."""
  def read_row(s, p):
    return jax.lax.dynamic_slice_in_dim(s, p, length, axis=0)
  return jax.vmap(read_row)(store, starts)


def _encode(values: jax.Array, spec: KVCacheSpec) -> jax.Array:
  return formats_lib.pack_nibbles(values) if spec.packed else values


def _decode(stored: jax.Array, spec: KVCacheSpec) -> jax.Array:
  return formats_lib.unpack_nibbles(stored) if spec.packed else stored


def dequantize_tokens(cache: KVCache, which: str, start: jax.Array | int,
                      length: int) -> jax.Array:
  """Tokens ``[start, start + length)`` of every row of the keys
  (``which="key"``) or values, dequantized to float32 ``(B, length, H,
  D)``; keys (values) stay rotated when ``spec.hadamard``
  (``value_hadamard``). ``start`` is shared by
  the rows; for ``"channel"`` keys it must be a multiple of ``group_size``
  and ``length`` too.
  """
  tokens = stored_tokens(cache, which, start, length)
  if isinstance(tokens, QArray):
    return dequantize(tokens)
  return tokens.astype(jnp.float32)


def stored_tokens(cache: KVCache, which: str, start: jax.Array | int,
                  length: int) -> QArray | jax.Array:
  """Like `dequantize_tokens`, but as stored: a `QArray` (int4 unpacked)
  of the spec's granularity, or the float array of a float cache."""
  spec = cache.spec
  stored = jax.lax.dynamic_slice_in_dim(getattr(cache, which), start, length,
                                        axis=1)
  if not spec.quantized:
    return stored
  scale = getattr(cache, f"{which}_scale")
  if _granularity(spec, which) == "token":
    scale = jax.lax.dynamic_slice_in_dim(scale, start, length, axis=1)
  elif _granularity(spec, which) == "channel":
    scale = jax.lax.dynamic_slice_in_dim(scale, start // spec.group_size,
                                         length // spec.group_size, axis=1)
  return _as_qarray(spec, which, stored, scale)


def _granularity(spec: KVCacheSpec, which: str) -> str:
  return spec.key_granularity if which == "key" else spec.value_granularity


def _as_qarray(spec: KVCacheSpec, which: str, stored: jax.Array,
               scale: jax.Array) -> QArray:
  return QArray(values=_decode(stored, spec), scale=scale, zero_point=None,
                spec=spec.part_quant_spec(which), dtype=np.dtype(np.float32))


def _dequantize(spec: KVCacheSpec, which: str, stored: jax.Array,
                scale: jax.Array | None) -> jax.Array:
  """Stored tokens and their scales, as float32 ``(B, S, H, D)``."""
  if not spec.quantized:
    return stored.astype(jnp.float32)
  return dequantize(_as_qarray(spec, which, stored, scale))


def _update_token_scaled(cache: KVCache, which: str, x: jax.Array,
                         positions: jax.Array) -> dict[str, jax.Array]:
  """Writes per-token or static-scaled ``x`` (B, S, H, D) at ``positions``."""
  spec = cache.spec
  if not spec.quantized:
    return {which: _write_rows(getattr(cache, which), x, positions)}
  amax = getattr(cache, f"{which}_amax")
  qa = quantize(x, spec.part_quant_spec(which), amax=amax)
  out = {which: _write_rows(getattr(cache, which), _encode(qa.values, spec),
                            positions)}
  if amax is None:  # Dynamic per-token scales are written with the tokens.
    out[f"{which}_scale"] = _write_rows(getattr(cache, f"{which}_scale"),
                                        qa.scale, positions)
  return out


def _update_channel_keys(cache: KVCache, key: jax.Array, value: jax.Array,
                         positions: jax.Array) -> dict[str, jax.Array]:
  """Writes KIVI keys: re-quantizes, from float, every group the write
  touches, and keeps the float keys (``float_residual``: and values; the
  caller writes the quantized values) of the group the next write starts
  in.
  """
  spec, tokens = cache.spec, key.shape[1]
  group = spec.group_size
  num_groups = cache.max_length // group
  # Groups spanned by S tokens starting anywhere in a group, within T.
  window_groups = min((tokens - 1) // group + 2, num_groups)
  window = window_groups * group
  first_group = jnp.minimum(positions // group, num_groups - window_groups)
  window_start = first_group * group
  stored = _read_rows(cache.key, window_start, window)
  stored_scale = _read_rows(cache.key_scale, first_group, window_groups)
  old = _dequantize(spec, "key", stored, stored_scale)
  merged = _merge_window(cache, old, cache.key_residual, key, positions,
                         first_group)
  qa = quantize(merged, spec.key_quant_spec())
  # Groups wholly before the write keep their stored values and scales
  # (quantizing dequantized values again would move them).
  touched = (first_group[:, None] + jnp.arange(window_groups) + 1) * group > (
      positions[:, None])
  values = jnp.where(jnp.repeat(touched, group, axis=1)[:, :, None, None],
                     _encode(qa.values, spec), stored)
  scale = jnp.where(touched[:, :, None, None], qa.scale, stored_scale)
  end = positions + tokens
  residual_group = end // group
  residual_start = jnp.clip(residual_group * group - window_start, 0,
                            window - group)
  out = {"key": _write_rows(cache.key, values, window_start),
         "key_scale": _write_rows(cache.key_scale, scale, first_group),
         "key_residual": _read_rows(merged, residual_start, group).astype(
             cache.key_residual.dtype),
         "key_residual_group": residual_group}
  if spec.float_residual:  # The same tokens' values, from float too.
    old_values = _dequantize(
        spec, "value", _read_rows(cache.value, window_start, window),
        _read_rows(cache.value_scale, window_start, window)
        if spec.value_granularity == "token" else cache.value_scale)
    merged_values = _merge_window(cache, old_values, cache.value_residual,
                                  value, positions, first_group)
    out["value_residual"] = _read_rows(
        merged_values, residual_start, group).astype(cache.value_residual.dtype)
  return out


def _merge_window(cache: KVCache, old: jax.Array, residual: jax.Array,
                  x: jax.Array, positions: jax.Array, first_group: jax.Array
                  ) -> jax.Array:
  """The float tokens of a write's window of whole groups, ``(B, W, H,
  D)`` from token ``first_group * group_size``: ``old`` (dequantized) with
  the float ``residual`` group over it where the window holds it, the new
  ``x`` at ``positions``, zeros after them (stale data never widens a
  range)."""
  group = cache.spec.group_size
  window = old.shape[1]
  window_start = first_group * group
  residual_at = (cache.key_residual_group - first_group) * group
  placed = _write_rows(jnp.zeros_like(old), residual.astype(jnp.float32),
                       jnp.clip(residual_at, 0, window - group))
  index = jnp.arange(window)[None, :, None, None]
  residual_at = residual_at[:, None, None, None]
  old = jnp.where((index >= residual_at) & (index < residual_at + group),
                  placed, old)
  offset = positions - window_start
  # The new tokens at their offset in the window (in bounds: see caller).
  new = _write_rows(jnp.zeros_like(old), x.astype(jnp.float32), offset)
  offset = offset[:, None, None, None]
  return jnp.where(index < offset, old,
                   jnp.where(index < offset + x.shape[1], new, 0.0))


def update(cache: KVCache, key: jax.Array, value: jax.Array,
           positions: jax.Array) -> KVCache:
  """Writes ``S`` new tokens per sequence; returns the new cache.

  Args:
    cache: the layer's `KVCache`.
    key, value: ``(B, S, H, D)`` float, the new tokens' keys and values
      (before any Hadamard rotation: the cache rotates them).
    positions: ``(B,)`` int, where in its sequence each row's ``S`` tokens
      start (prefill: 0, decode: the current length). Rows may differ.

  Raises:
    ValueError: for shapes that do not match the cache (naming the sizes),
      or concrete positions that do not fit (naming the row). Traced
      positions that do not fit mark the row in ``cache.overflowed``.
  """
  key, value = jnp.asarray(key), jnp.asarray(value)
  positions = jnp.asarray(positions)
  _check_write(cache, key, value, positions)
  return _update_compiled(cache, key, value, positions)


# One compiled program per spec and shape when called eagerly (as
# `jaxq.quantize`); inlined under an outer `jit`.
@jax.jit
def _update_compiled(cache: KVCache, key: jax.Array, value: jax.Array,
                     positions: jax.Array) -> KVCache:
  positions = positions.astype(jnp.int32)
  tokens = key.shape[1]
  key = stored_basis(cache.spec, "key", key)
  value = stored_basis(cache.spec, "value", value)
  out = {}
  if cache.spec.quantized and cache.spec.key_granularity == "channel":
    out.update(_update_channel_keys(cache, key, value, positions))
  else:
    out.update(_update_token_scaled(cache, "key", key, positions))
  out.update(_update_token_scaled(cache, "value", value, positions))
  overflow = (positions < 0) | (positions + tokens > cache.max_length)
  return dataclasses.replace(cache, overflowed=cache.overflowed | overflow,
                             **out)


def read(cache: KVCache) -> tuple[jax.Array, jax.Array]:
  """The whole cache dequantized: ``(key, value)``, each ``(B, T, H, D)``
  in ``cache.dtype`` (rotated back with ``spec.hadamard`` /
  ``value_hadamard``). Empty
  slots read as 0. Materialises a float copy: attention uses
  `jaxq.kvcache.attend`, which dequantizes block by block."""
  return _read_compiled(cache)


@jax.jit
def _read_compiled(cache: KVCache) -> tuple[jax.Array, jax.Array]:
  length = cache.max_length
  key = dequantize_tokens(cache, "key", 0, length)
  if cache.spec.hadamard:
    key = hadamard.rotate(key)
  value = dequantize_tokens(cache, "value", 0, length)
  if cache.spec.value_hadamard:
    value = hadamard.rotate(value)
  return key.astype(cache.dtype), value.astype(cache.dtype)


def nbytes(cache: KVCache) -> int:
  """Bytes the cache holds: values (int4 packed) plus scales, static
  ranges and KIVI's float residual group (keys; values too with
  ``float_residual``); not the bookkeeping
  (``overflowed``, ``key_residual_group``)."""
  leaves = (cache.key, cache.value, cache.key_scale, cache.value_scale,
            cache.key_amax, cache.value_amax, cache.key_residual,
            cache.value_residual)
  return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize
             for a in leaves if a is not None)
