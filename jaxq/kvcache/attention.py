"""Causal attention over a (quantized) KV cache, block by block.

`attend` never dequantizes the whole cache: a ``lax.fori_loop`` walks the
cache in blocks of ``spec.block_size`` tokens, dequantizes one block of
keys and values at a time (`jaxq.dequantize`) and folds it into an online
softmax (running max, normaliser and weighted sum, all float32). The loop
stops after the last block any query can see (``max(positions) + S``), so
a decode step over a short sequence in a long cache costs only its length.

With ``spec.float_residual`` the block holding a row's residual key group
takes that group's float keys and values in place of the dequantized ones;
with ``spec.value_hadamard`` the output is rotated back once at the end.

With ``spec.integer_qk`` the logits are int8 x int8 -> int32 products
(`jaxq.einsum`) of queries quantized per token per head and the stored
keys, rescaled by both scales; values are dequantized as above.

Grouped-query attention: ``H_q`` query heads share ``H_kv`` cache heads,
query head ``h`` reading KV head ``h // (H_q / H_kv)`` (the Llama / Flax
``repeat`` convention).

`reference_attention` is the same causal attention on float keys and
values, written plainly: the yardstick for tests and benchmarks.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jaxq import ops
from jaxq.kvcache import cache as cache_lib
from jaxq.kvcache import hadamard
from jaxq.kvcache.cache import KVCache
from jaxq.quantize import quantize


def _check_query(cache: KVCache, query: jax.Array, positions: jax.Array
                 ) -> None:
  if query.ndim != 4 or query.shape[0] != cache.batch or (
      query.shape[3] != cache.head_dim):
    raise ValueError(
        f"kvcache.attend: query has shape {tuple(query.shape)}, but the "
        f"cache needs (batch={cache.batch}, tokens, query_heads, "
        f"head_dim={cache.head_dim}).")
  if query.shape[2] % cache.num_kv_heads:
    raise ValueError(
        f"kvcache.attend: {query.shape[2]} query heads are not a multiple "
        f"of the cache's {cache.num_kv_heads} KV heads (grouped-query "
        f"attention needs H_q % H_kv == 0).")
  if positions.shape != (cache.batch,) or not jnp.issubdtype(
      positions.dtype, jnp.integer):
    raise ValueError(f"kvcache.attend: positions must be an integer array of "
                     f"shape (batch,) = ({cache.batch},); got "
                     f"{positions.dtype}{tuple(positions.shape)}.")


def _with_residual(cache: KVCache, block: jax.Array, residual: jax.Array,
                   start: jax.Array) -> jax.Array:
  """``block`` (B, L, H, D), tokens ``start ..`` of every row, with the
  float residual group (B, group_size, H, D) in place where it falls in
  it. Blocks start on group boundaries, so a group is wholly in or out."""
  group = cache.spec.group_size
  length = block.shape[1]
  at = cache.key_residual_group * group - start
  placed = jax.vmap(lambda b, r, p: jax.lax.dynamic_update_slice_in_dim(
      b, r.astype(b.dtype), p, axis=0))(block, residual,
                                       jnp.clip(at, 0, length - group))
  index = jnp.arange(length)[None, :, None, None]
  at = at[:, None, None, None]
  return jnp.where((index >= at) & (index < at + group), placed, block)


def attend(cache: KVCache, query: jax.Array, positions: jax.Array, *,
           scale: float | None = None) -> jax.Array:
  """Causal attention of ``query`` over the cache.

  Args:
    cache: the layer's `KVCache`, already holding the keys and values of
      the query tokens (`jaxq.kvcache.update` first).
    query: ``(B, S, H_q, D)`` float, ``H_q`` a multiple of the cache's
      ``H_kv``.
    positions: ``(B,)`` int, the absolute position of each row's first
      query token: query ``s`` of row ``b`` sees keys ``0 ..
      positions[b] + s`` of its own row.
    scale: the logit scale; ``1 / sqrt(D)`` by default.

  Returns:
    ``(B, S, H_q, D)`` in ``query``'s dtype; NaN in rows marked
    ``cache.overflowed``.

  Raises:
    ValueError: naming the sizes, for a query that does not match the
      cache or ``H_q % H_kv != 0``.
  """
  query = jnp.asarray(query)
  positions = jnp.asarray(positions)
  _check_query(cache, query, positions)
  return _attend_compiled(cache, query, positions, scale)


# One compiled program per spec and shape when called eagerly; inlined under
# an outer `jit`.
@functools.partial(jax.jit, static_argnames=("scale",))
def _attend_compiled(cache: KVCache, query: jax.Array, positions: jax.Array,
                     scale: float | None) -> jax.Array:
  batch, tokens, query_heads, head_dim = query.shape
  kv_heads = cache.num_kv_heads
  groups = query_heads // kv_heads
  block = cache.spec.attention_block(cache.max_length)
  num_blocks = -(-cache.max_length // block)
  if scale is None:
    scale = 1.0 / math.sqrt(head_dim)
  q = query.astype(jnp.float32) * jnp.float32(scale)
  if cache.spec.hadamard:
    q = hadamard.rotate(q)
  q = q.reshape(batch, tokens, kv_heads, groups, head_dim)
  if cache.spec.integer_qk:
    q = quantize(q, cache.spec.query_quant_spec())
  query_pos = positions.astype(jnp.int32)[:, None] + jnp.arange(tokens)
  # Blocks past the furthest visible key are never read.
  needed = jnp.clip((jnp.max(query_pos) + block) // block, 1, num_blocks)

  def step(i, carry):
    running_max, normaliser, acc = carry
    # The last block is shifted back to end at T (T need not be a multiple
    # of the block); keys an earlier block covered are masked out.
    start = jnp.minimum(i * block, cache.max_length - block)
    if cache.spec.integer_qk:  # int8 x int8 -> int32, rescaled.
      logits = ops.einsum("bsngd,btnd->bngst", q,
                          cache_lib.stored_tokens(cache, "key", start, block),
                          preferred_element_type=jnp.float32)
    else:
      key = cache_lib.dequantize_tokens(cache, "key", start, block)
      if cache.spec.float_residual:
        key = _with_residual(cache, key, cache.key_residual, start)
      logits = jnp.einsum("bsngd,btnd->bngst", q, key)
    value = cache_lib.dequantize_tokens(cache, "value", start, block)
    if cache.spec.float_residual:
      value = _with_residual(cache, value, cache.value_residual, start)
    key_pos = start + jnp.arange(block)
    visible = ((key_pos[None, None, :] <= query_pos[:, :, None]) &
               (key_pos >= i * block)[None, None, :])
    logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
    new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
    # A row with no visible key yet keeps max -inf: shift by 0 instead.
    shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    weights = jnp.exp(logits - shift[..., None])
    correction = jnp.exp(running_max - shift)
    normaliser = normaliser * correction + jnp.sum(weights, axis=-1)
    acc = acc * correction[..., None] + jnp.einsum("bngst,btnd->bngsd",
                                                   weights, value)
    return new_max, normaliser, acc

  stats_shape = (batch, kv_heads, groups, tokens)
  carry = (jnp.full(stats_shape, -jnp.inf, jnp.float32),
           jnp.zeros(stats_shape, jnp.float32),
           jnp.zeros(stats_shape + (head_dim,), jnp.float32))
  _, normaliser, acc = jax.lax.fori_loop(0, needed, step, carry)
  # Every query sees at least key 0 of its row, so the normaliser is > 0.
  out = acc / normaliser[..., None]
  if cache.spec.value_hadamard:  # P (V H) H = P V: once per query.
    out = hadamard.rotate(out)
  out = jnp.where(cache.overflowed[:, None, None, None, None], jnp.nan, out)
  out = out.transpose(0, 3, 1, 2, 4).reshape(batch, tokens, query_heads,
                                             head_dim)
  return out.astype(query.dtype)


# Compiled once per shape: called eagerly, op-by-op dispatch would compile
# each of its operations separately.
@functools.partial(jax.jit, static_argnames=("scale",))
def reference_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                        positions: jax.Array, *, scale: float | None = None
                        ) -> jax.Array:
  """Plain causal grouped-query attention in float32, for comparison.

  Args:
    query: ``(B, S, H_q, D)``.
    key, value: ``(B, T, H_kv, D)``, token ``t`` at absolute position ``t``.
    positions: ``(B,)``, the absolute position of each row's first query.
    scale: the logit scale; ``1 / sqrt(D)`` by default.

  Returns:
    ``(B, S, H_q, D)`` float32.
  """
  batch, tokens, query_heads, head_dim = query.shape
  kv_heads = key.shape[2]
  if scale is None:
    scale = 1.0 / math.sqrt(head_dim)
  q = query.astype(jnp.float32).reshape(batch, tokens, kv_heads,
                                        query_heads // kv_heads, head_dim)
  logits = jnp.einsum("bsngd,btnd->bngst", q * scale,
                      key.astype(jnp.float32))
  query_pos = jnp.asarray(positions)[:, None] + jnp.arange(tokens)
  visible = jnp.arange(key.shape[1])[None, None, :] <= query_pos[:, :, None]
  logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bngst,btnd->bsngd", weights, value.astype(jnp.float32))
  return out.reshape(batch, tokens, query_heads, head_dim)
