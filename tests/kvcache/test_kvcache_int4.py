"""The int4 options toward KIVI: values scaled per channel group, rotated
values, and attention over the float residual group."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq import kvcache

B, T, H_KV, H_Q, D = 2, 32, 2, 4, 16

update = jax.jit(kvcache.update)
attend = jax.jit(kvcache.attend)

KIVI = kvcache.KVCacheSpec("int4", key_granularity="channel", group_size=8,
                           block_size=16)
RESIDUAL = kvcache.KVCacheSpec("int4", key_granularity="channel",
                               group_size=8, block_size=16,
                               float_residual=True)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def qkv() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Unit-normal queries and keys; values with two channels per head 10x
  the others (as real values' outlier channels)."""
  rng = np.random.default_rng(0)
  query = rng.normal(size=(B, T, H_Q, D)).astype(np.float32)
  key = rng.normal(size=(B, T, H_KV, D)).astype(np.float32)
  value = rng.normal(size=(B, T, H_KV, D)).astype(np.float32)
  value[..., [2, 5]] *= 10.0  # Both in the first group of 8.
  return query, key, value


def _fill(spec, key, value, tokens=T):
  cache = kvcache.init(spec, batch=B, max_length=T, num_kv_heads=H_KV,
                       head_dim=D)
  return update(cache, key[:, :tokens], value[:, :tokens],
                jnp.zeros((B,), jnp.int32))


def test_value_groups_and_rotation_cut_error_on_outlier_channels(qkv):
  query, key, value = qkv
  zeros = jnp.zeros((B,), jnp.int32)
  ref = kvcache.reference_attention(query, key, value, zeros)
  errors = {}
  for name, spec in {
      "token": kvcache.KVCacheSpec("int4"),
      "groups": kvcache.KVCacheSpec("int4", value_group_size=8),
      "rotated": kvcache.KVCacheSpec("int4", value_hadamard=True),
  }.items():
    cache = _fill(spec, key, value)
    errors[name] = (_rel(kvcache.read(cache)[1], value),
                    _rel(attend(cache, query, zeros), ref))
  # Groups: the second group's channels get a step of their own.
  assert errors["groups"][0] < 0.8 * errors["token"][0], errors
  assert errors["groups"][1] < 0.9 * errors["token"][1], errors
  # The rotation spreads the outliers over all channels.
  assert errors["rotated"][0] < 0.6 * errors["token"][0], errors
  assert errors["rotated"][1] < 0.7 * errors["token"][1], errors


def test_value_groups_store_one_scale_per_channel_group(qkv):
  _, key, value = qkv
  spec = kvcache.KVCacheSpec("int4", value_group_size=8)
  cache = _fill(spec, key, value)
  assert cache.value_scale.shape == (B, T, H_KV, D // 8)
  assert cache.key_scale.shape == (B, T, H_KV, 1)
  plain = _fill(kvcache.KVCacheSpec("int4"), key, value)
  assert kvcache.nbytes(cache) - kvcache.nbytes(plain) == B * T * H_KV * 4


def test_value_hadamard_attention_is_float_attention_for_a_float_format(qkv):
  """The rotation itself is exact: only the rounding it spreads differs."""
  query, key, value = qkv
  zeros = jnp.zeros((B,), jnp.int32)
  cache = _fill(kvcache.KVCacheSpec("int8", value_hadamard=True), key, value)
  ref = kvcache.reference_attention(query, key, value, zeros)
  assert _rel(attend(cache, query, zeros), ref) < 0.02
  assert _rel(kvcache.read(cache)[1], value) < 0.02


def test_float_residual_attends_to_the_last_group_in_float(qkv):
  query, key, value = qkv
  tokens = 13  # Groups [0, 8) quantized, [8, 13) the residual.
  cache = _fill(RESIDUAL, key, value, tokens)
  np.testing.assert_array_equal(cache.key_residual_group, [1, 1])
  np.testing.assert_array_equal(cache.value_residual[:, :5], value[:, 8:13])
  # Keys and values as stored are KIVI's; only attention reads the floats.
  kivi = _fill(KIVI, key, value, tokens)
  np.testing.assert_array_equal(cache.key, kivi.key)
  np.testing.assert_array_equal(cache.value, kivi.value)
  # The reference over dequantized group 0 and float group 1.
  read_key, read_value = kvcache.read(kivi)
  mixed_key = np.concatenate([read_key[:, :8], key[:, 8:tokens]], 1)
  mixed_value = np.concatenate([read_value[:, :8], value[:, 8:tokens]], 1)
  q = query[:, 8:tokens]
  positions = jnp.full((B,), 8, jnp.int32)
  np.testing.assert_allclose(
      attend(cache, q, positions),
      kvcache.reference_attention(q, mixed_key, mixed_value, positions),
      atol=1e-5)
  ref = kvcache.reference_attention(q, key[:, :tokens], value[:, :tokens],
                                    positions)
  assert _rel(attend(cache, q, positions), ref) < 0.9 * _rel(
      attend(kivi, q, positions), ref)
  # Counted: a float value group per row beside KIVI's float key group.
  assert kvcache.nbytes(cache) - kvcache.nbytes(kivi) == B * 8 * H_KV * D * 4


def test_float_residual_decode_equals_one_shot_prefill(qkv):
  """Decoding token by token leaves the cache a one-shot prefill leaves."""
  query, key, value = qkv
  spec = kvcache.KVCacheSpec("int4", key_granularity="channel", group_size=8,
                             block_size=16, float_residual=True,
                             value_group_size=8, value_hadamard=True)
  tokens = 21

  @jax.jit
  def generate(cache):
    cache = kvcache.update(cache, key[:, :3], value[:, :3],
                           jnp.zeros((B,), jnp.int32))

    def step(t, cache):
      take = lambda x: jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1)
      return kvcache.update(cache, take(key), take(value),
                            jnp.full((B,), t, jnp.int32))

    return jax.lax.fori_loop(3, tokens, step, cache)

  decoded = generate(kvcache.init(spec, batch=B, max_length=T,
                                  num_kv_heads=H_KV, head_dim=D))
  one_shot = _fill(spec, key, value, tokens)
  jax.tree.map(np.testing.assert_array_equal, decoded, one_shot)
  positions = jnp.full((B,), tokens - 1, jnp.int32)
  np.testing.assert_array_equal(
      attend(decoded, query[:, tokens - 1:tokens], positions),
      attend(one_shot, query[:, tokens - 1:tokens], positions))
