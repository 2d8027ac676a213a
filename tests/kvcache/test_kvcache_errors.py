"""Bad input to the KV cache raises naming the problem, or (under jit) gives
NaN in the affected row, never a finite wrong answer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq import kvcache

B, T, H_KV, D = 2, 8, 2, 8


def _cache(spec=kvcache.KVCacheSpec("int8"), **kwargs):
  return kvcache.init(spec, batch=B, max_length=T, num_kv_heads=H_KV,
                      head_dim=D, **kwargs)


def _kv(tokens=1, heads=H_KV, dim=D):
  return jnp.ones((B, tokens, heads, dim)), jnp.ones((B, tokens, heads, dim))


def test_unknown_format_lists_the_valid_ones():
  with pytest.raises(ValueError, match="int8, int4, float8_e4m3fn"):
    kvcache.KVCacheSpec("int3")
  with pytest.raises(ValueError, match="uint8"):  # Needs a zero point.
    kvcache.KVCacheSpec("uint8")
  assert kvcache.KVCacheSpec(jnp.int8).format == "int8"


@pytest.mark.parametrize("kwargs,match", [
    (dict(key_granularity="row"), "key_granularity"),
    (dict(value_granularity="channel"), "value_granularity"),
    (dict(group_size=0), "group_size"),
])
def test_bad_spec_fields(kwargs, match):
  with pytest.raises(ValueError, match=match):
    kvcache.KVCacheSpec("int4", **kwargs)


@pytest.mark.parametrize("spec,kwargs,match", [
    (kvcache.KVCacheSpec("int4"), dict(head_dim=7), "even"),
    (kvcache.KVCacheSpec("int8", hadamard=True), dict(head_dim=12),
     "power of two"),
    (kvcache.KVCacheSpec("int8", key_granularity="channel", group_size=3),
     dict(), "max_length 8 is not a multiple of group_size 3"),
    (kvcache.KVCacheSpec("int8", key_granularity="head"), dict(),
     "needs key_amax"),
    (kvcache.KVCacheSpec("int8"), dict(key_amax=np.ones(H_KV)),
     "only for key_granularity='head'"),
    (kvcache.KVCacheSpec("int8", value_granularity="head"),
     dict(value_amax=np.ones(3)), r"expected \(2,\)"),
    (kvcache.KVCacheSpec("int8", value_granularity="head"),
     dict(value_amax=np.array([1.0, np.nan])), "finite"),
])
def test_bad_init(spec, kwargs, match):
  args = dict(batch=B, max_length=T, num_kv_heads=H_KV, head_dim=D)
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    kvcache.init(spec, **args)


@pytest.mark.parametrize("spec,kwargs,match", [
    (kvcache.KVCacheSpec("int8"), dict(key_amax=np.ones(H_KV)),
     "with_ranges: key_amax is only for key_granularity='head'"),
    (kvcache.KVCacheSpec("int8", key_granularity="head"),
     dict(key_amax=np.ones(H_KV + 1)), r"expected \(2,\)"),
])
def test_bad_with_ranges(spec, kwargs, match):
  static = dict(key_amax=np.ones(H_KV)) if spec.static_parts else {}
  with pytest.raises(ValueError, match=match):
    kvcache.with_ranges(_cache(spec, **static), **kwargs)


def test_mismatched_shapes_name_the_sizes():
  cache = _cache()
  positions = jnp.zeros((B,), jnp.int32)
  with pytest.raises(ValueError, match=r"kv_heads=2, head_dim=8"):
    kvcache.update(cache, *_kv(heads=3), positions)
  key, value = _kv()
  with pytest.raises(ValueError, match="same shape"):
    kvcache.update(cache, key, _kv(tokens=2)[1], positions)
  with pytest.raises(ValueError, match=r"shape \(batch,\) = \(2,\)"):
    kvcache.update(cache, key, value, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="3 query heads are not a multiple of "
                     "the cache's 2 KV heads"):
    kvcache.attend(cache, jnp.ones((B, 1, 3, D)), positions)
  with pytest.raises(ValueError, match="head_dim=8"):
    kvcache.attend(cache, jnp.ones((B, 1, 4, 16)), positions)


def test_write_past_the_end_raises_eagerly():
  cache = _cache()
  with pytest.raises(ValueError, match="row 1 writes 3 token.* at position "
                     "6, past the cache's max_length 8"):
    kvcache.update(cache, *_kv(tokens=3), jnp.array([0, 6], jnp.int32))
  with pytest.raises(ValueError, match="row 0 .* position -1"):
    kvcache.update(cache, *_kv(), jnp.array([-1, 0], jnp.int32))


def test_write_past_the_end_under_jit_gives_nan_in_that_row_only():
  @jax.jit
  def step(cache, positions):
    cache = kvcache.update(cache, *_kv(), positions)
    return cache, kvcache.attend(cache, jnp.ones((B, 1, 4, D)), positions)

  cache, out = step(_cache(), jnp.array([0, 0], jnp.int32))
  assert np.isfinite(out).all()
  cache, out = step(cache, jnp.array([1, T], jnp.int32))
  assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()
  assert cache.overflowed.tolist() == [False, True]
  _, out = step(cache, jnp.array([2, 1], jnp.int32))  # Stays marked.
  assert np.isfinite(out[0]).all() and np.isnan(out[1]).all()


def test_attention_block_is_whole_key_groups_within_the_cache():
  kivi = kvcache.KVCacheSpec("int4", key_granularity="channel", group_size=8,
                             block_size=12)
  assert kivi.attention_block(32) == 8
  assert kivi.attention_block(64) == 8
  assert kvcache.KVCacheSpec("int8", block_size=100).attention_block(32) == 32


@pytest.mark.parametrize("kwargs", [
    dict(format="float8_e4m3fn"), dict(format=None),
    dict(format="int4", key_granularity="channel")])
def test_integer_qk_needs_integer_keys_scaled_along_tokens(kwargs):
  with pytest.raises(ValueError, match="integer_qk .* needs format int8 or "
                     "int4 and key_granularity 'token' or 'head'"):
    kvcache.KVCacheSpec(integer_qk=True, **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(value_group_size=8, value_granularity="head"), "value_group_size"),
    (dict(value_group_size=0), "value_group_size"),
    (dict(float_residual=True), "float_residual"),
])
def test_bad_int4_option_fields(kwargs, match):
  with pytest.raises(ValueError, match=match):
    kvcache.KVCacheSpec("int4", **kwargs)


@pytest.mark.parametrize("spec,match", [
    (kvcache.KVCacheSpec("int4", value_group_size=8),
     "not a multiple of value_group_size 8"),
    (kvcache.KVCacheSpec("int4", value_hadamard=True), "power of two"),
])
def test_bad_int4_option_init(spec, match):
  with pytest.raises(ValueError, match=match):
    kvcache.init(spec, batch=B, max_length=T, num_kv_heads=H_KV, head_dim=12)
