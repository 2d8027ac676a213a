"""The KV cache's functional core: writes, block-by-block attention, formats,
KIVI and Hadamard, ragged batches, GQA and sizes."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import formats
from jaxq import kvcache
from jaxq.io.tensors import _pack_nibbles

B, T, H_KV, H_Q, D = 2, 32, 2, 4, 16

update = jax.jit(kvcache.update)
attend = jax.jit(kvcache.attend)

# Shared specs (equal specs and shapes reuse one compiled program).
INT8 = kvcache.KVCacheSpec("int8", block_size=8)
INT4 = kvcache.KVCacheSpec("int4", block_size=8)
KIVI = kvcache.KVCacheSpec("int4", key_granularity="channel", group_size=8,
                           block_size=16)
HADAMARD = kvcache.KVCacheSpec("int4", hadamard=True, block_size=8)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def qkv() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  query = rng.normal(size=(B, T, H_Q, D)).astype(np.float32)
  key = rng.normal(size=(B, T, H_KV, D)).astype(np.float32)
  value = rng.normal(size=(B, T, H_KV, D)).astype(np.float32)
  return query, key, value


@pytest.fixture(scope="module")
def outlier_keys() -> np.ndarray:
  """Keys like a real LLM's: two channels of each head 10x the others."""
  rng = np.random.default_rng(1)
  key = rng.normal(size=(B, T, H_KV, D)).astype(np.float32)
  key[..., [3, 11]] *= 10.0
  return key


def _fill(spec, key, value, positions=None, **init_kwargs):
  cache = kvcache.init(spec, batch=B, max_length=T, num_kv_heads=H_KV,
                       head_dim=D, **init_kwargs)
  positions = jnp.zeros((B,), jnp.int32) if positions is None else positions
  return update(cache, key, value, positions)


# (spec, tolerance of attention's relative error on unit-normal data)
FORMAT_CASES = [
    (kvcache.KVCacheSpec(None), 1e-5),
    (INT8, 0.02),
    (kvcache.KVCacheSpec("float8_e4m3fn"), 0.06),
    (INT4, 0.3),
    (KIVI, 0.3),
]


@pytest.mark.parametrize("spec,tolerance", FORMAT_CASES,
                         ids=lambda c: getattr(c, "format", None) and
                         f"{c.format}-{c.key_granularity}")
def test_prefill_attention_matches_float_reference(qkv, spec, tolerance):
  query, key, value = qkv
  positions = jnp.zeros((B,), jnp.int32)
  cache = _fill(spec, key, value)
  out = attend(cache, query, positions)
  ref = kvcache.reference_attention(query, key, value, positions)
  assert out.shape == (B, T, H_Q, D)
  error = _rel(out, ref)
  assert error < tolerance
  if spec.quantized:  # Really quantized: not the float answer.
    assert error > 1e-4


def test_reference_attention_is_gqa_with_repeated_heads(qkv):
  """Query head h reads KV head h // (H_q / H_kv), as jnp.repeat gives."""
  query, key, value = qkv
  positions = jnp.zeros((B,), jnp.int32)
  groups = H_Q // H_KV
  mha = kvcache.reference_attention(query, jnp.repeat(key, groups, axis=2),
                                    jnp.repeat(value, groups, axis=2),
                                    positions)
  np.testing.assert_allclose(
      kvcache.reference_attention(query, key, value, positions), mha,
      atol=1e-5)
  logits = np.einsum("bshd,bthd->bhst", query[:, :, 2:3], key[:, :, 1:2])
  logits /= np.sqrt(D)
  logits = np.where(np.tril(np.ones((T, T), bool)), logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  head2 = np.einsum("bhst,bthd->bshd", weights, value[:, :, 1:2])
  np.testing.assert_allclose(mha[:, :, 2:3], head2, atol=1e-5)


@pytest.mark.parametrize("spec", [INT8, HADAMARD],
                         ids=["int8", "int4-hadamard"])
def test_decode_token_by_token_equals_one_shot_prefill(qkv, spec):
  query, key, value = qkv
  prefill = 5
  one_shot = _fill(spec, key, value)
  expected = attend(one_shot, query, jnp.zeros((B,), jnp.int32))

  @jax.jit
  def generate(cache):
    cache = kvcache.update(cache, key[:, :prefill], value[:, :prefill],
                           jnp.zeros((B,), jnp.int32))
    first = kvcache.attend(cache, query[:, :prefill],
                           jnp.zeros((B,), jnp.int32))

    def step(cache, t):
      positions = jnp.full((B,), t, jnp.int32)
      take = lambda x: jax.lax.dynamic_slice_in_dim(x, t, 1, axis=1)
      cache = kvcache.update(cache, take(key), take(value), positions)
      return cache, kvcache.attend(cache, take(query), positions)[:, 0]

    cache, rest = jax.lax.scan(step, cache, jnp.arange(prefill, T))
    return cache, jnp.concatenate([first, rest.transpose(1, 0, 2, 3)], 1)

  cache, out = generate(kvcache.init(spec, batch=B, max_length=T,
                                     num_kv_heads=H_KV, head_dim=D))
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, cache, one_shot)


def test_kivi_decode_stays_close_to_one_shot_prefill(qkv, outlier_keys):
  """KIVI re-quantizes an incomplete group as tokens arrive; decoding keeps
  the one-shot error level."""
  query, _, value = qkv
  key = outlier_keys
  spec = KIVI
  zeros = jnp.zeros((B,), jnp.int32)
  ref = kvcache.reference_attention(query, key, value, zeros)
  one_shot_cache = _fill(spec, key, value)
  one_shot = _rel(attend(one_shot_cache, query, zeros), ref)
  cache = _fill(spec, key[:, :3], value[:, :3])
  outs = [attend(cache, query[:, :3], zeros)]
  for t in range(3, T):
    positions = jnp.full((B,), t, jnp.int32)
    cache = update(cache, key[:, t:t + 1], value[:, t:t + 1], positions)
    outs.append(attend(cache, query[:, t:t + 1], positions))
  decoded = _rel(jnp.concatenate(outs, 1), ref)
  assert decoded < 1.5 * one_shot, (decoded, one_shot)
  # The float residual group: every key rounded once, as in one shot.
  np.testing.assert_array_equal(cache.key, one_shot_cache.key)
  np.testing.assert_array_equal(cache.key_scale, one_shot_cache.key_scale)


@pytest.mark.parametrize("spec", [INT8, KIVI], ids=["token", "channel"])
def test_ragged_batch_rows_see_only_their_own_tokens(qkv, spec):
  """Row 0 holds 7 tokens, row 1 holds 20; each decodes one more. Padding
  written past a row's end by the prefill (other keys of the same size) is
  never attended: attention equals float attention over the row's own
  dequantized tokens."""
  query, key, value = qkv
  lengths = jnp.array([7, 20], jnp.int32)
  padded_key = jnp.where(jnp.arange(T)[None, :, None, None] <
                         lengths[:, None, None, None], key, -key[:, ::-1])
  cache = _fill(spec, padded_key[:, :20], value[:, :20])
  rows = jnp.arange(B)
  cache = update(cache, key[rows, lengths][:, None],
                 value[rows, lengths][:, None], lengths)
  out = attend(cache, query[rows, lengths][:, None], lengths)
  read_key, read_value = kvcache.read(cache)
  for row, length in enumerate((7, 20)):
    own = slice(row, row + 1), slice(0, length + 1)
    assert _rel(read_key[own], key[own]) < (0.01 if spec is INT8 else 0.15)
    ref = kvcache.reference_attention(
        query[row:row + 1, length:length + 1], read_key[own],
        read_value[own], jnp.array([length]))
    np.testing.assert_allclose(out[row:row + 1], ref, atol=1e-5)


def test_block_size_does_not_change_the_answer(qkv):
  """A block that does not divide the cache (the last block is shifted
  back and masked) gives the one-block result."""
  query, key, value = qkv
  positions = jnp.array([3, 9], jnp.int32)
  outs = []
  for block_size in (8, 12, 5):
    spec = kvcache.KVCacheSpec("int8", block_size=block_size)
    cache = _fill(spec, key, value)
    outs.append(attend(cache, query[:, :T - 9], positions))
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)
  np.testing.assert_allclose(outs[2], outs[0], atol=1e-5)


def test_static_per_head_ranges(qkv):
  query, key, value = qkv
  spec = kvcache.KVCacheSpec("int8", key_granularity="head",
                             value_granularity="head")
  # Calibrated by a jaxq observer, over two batches of keys.
  observer = jaxq.observers.max()
  state = observer.init(key[:, :16], spec.key_quant_spec())
  for chunk in (key[:, :16], key[:, 16:]):
    state = observer.update(state, chunk)
  key_amax = observer.finalize(state)
  assert key_amax.shape == (1, 1, H_KV, 1)
  np.testing.assert_allclose(key_amax.reshape(-1),
                             np.abs(key).max(axis=(0, 1, 3)))
  key_amax = np.asarray(key_amax).reshape(-1)
  value_amax = np.abs(value).max(axis=(0, 1, 3))
  cache = _fill(spec, key, value, key_amax=key_amax, value_amax=value_amax)
  assert cache.key_scale.shape == (1, 1, H_KV, 1)
  np.testing.assert_allclose(cache.key_scale[0, 0, :, 0], key_amax / 127,
                             rtol=1e-6)
  positions = jnp.zeros((B,), jnp.int32)
  ref = kvcache.reference_attention(query, key, value, positions)
  assert _rel(attend(cache, query, positions), ref) < 0.03
  # A range too small saturates: keys read back clipped to it.
  small = _fill(spec, key, value, key_amax=key_amax / 4,
                value_amax=value_amax)
  read_key, _ = kvcache.read(small)
  assert float(jnp.max(jnp.abs(read_key[:, :, 0]))) <= key_amax[0] / 4 + 1e-6
  # Ranges given later (a Flax model's cache made in init) write the same.
  later = kvcache.init(spec, batch=B, max_length=T, num_kv_heads=H_KV,
                       head_dim=D, key_amax=np.ones(H_KV),
                       value_amax=np.ones(H_KV))
  later = kvcache.with_ranges(later, key_amax=key_amax, value_amax=value_amax)
  later = kvcache.update(later, key, value, positions)
  chex.assert_trees_all_equal(later, cache)


def test_read_dequantizes_and_rotates_back(qkv):
  _, key, value = qkv
  for spec in (kvcache.KVCacheSpec(None), HADAMARD):
    read_key, read_value = kvcache.read(_fill(spec, key, value))
    assert read_key.shape == (B, T, H_KV, D)
    assert _rel(read_key, key) < (1e-6 if spec.format is None else 0.1)
    assert _rel(read_value, value) < (1e-6 if spec.format is None else 0.15)


def test_int4_is_packed_and_sizes_are_reported(qkv):
  _, key, value = qkv
  sizes = {}
  for fmt in (None, "int8", "int4", "float8_e4m3fn"):
    cache = kvcache.init(kvcache.KVCacheSpec(fmt), batch=B, max_length=T,
                         num_kv_heads=H_KV, head_dim=D, dtype=jnp.bfloat16)
    sizes[fmt] = kvcache.nbytes(cache)
  int4 = kvcache.init(kvcache.KVCacheSpec("int4"), batch=B, max_length=T,
                      num_kv_heads=H_KV, head_dim=D)
  assert int4.key.dtype == jnp.uint8 and int4.key.shape == (B, T, H_KV, D // 2)
  elements = 2 * B * T * H_KV * D
  scales = 2 * B * T * H_KV * 4  # float32, one per token per head
  assert sizes[None] == elements * 2
  assert sizes["int8"] == sizes["float8_e4m3fn"] == elements + scales
  assert sizes["int4"] == elements // 2 + scales
  # Packing is a bitcast in jaxq.save's nibble order.
  values = jnp.asarray(np.arange(-8, 8).reshape(2, 8), jnp.int4)
  packed = formats.pack_nibbles(values)
  np.testing.assert_array_equal(packed.reshape(-1),
                                _pack_nibbles(np.asarray(values)))
  np.testing.assert_array_equal(formats.unpack_nibbles(packed), values)


def test_kivi_and_hadamard_cut_int4_error_on_outlier_channels(qkv,
                                                              outlier_keys):
  query, _, value = qkv
  key = outlier_keys
  positions = jnp.zeros((B,), jnp.int32)
  ref = kvcache.reference_attention(query, key, value, positions)
  errors = {}
  for name, spec in {
      "token": INT4, "kivi": KIVI, "hadamard": HADAMARD,
  }.items():
    cache = _fill(spec, key, value)
    key_error = _rel(kvcache.read(cache)[0], key)
    errors[name] = (key_error, _rel(attend(cache, query, positions), ref))
  for better in ("kivi", "hadamard"):
    assert errors[better][0] < 0.7 * errors["token"][0], errors
    assert errors[better][1] < errors["token"][1], errors


def test_integer_qk_multiplies_int8_and_matches_dequantized_keys(qkv):
  query, key, value = qkv
  positions = jnp.zeros((B,), jnp.int32)
  integer = kvcache.KVCacheSpec("int8", block_size=8, integer_qk=True)
  cache = _fill(integer, key, value)
  out = attend(cache, query, positions)
  # The same stored keys, dequantized: only the queries' int8 rounding
  # differs.
  dequantized = attend(_fill(INT8, key, value), query, positions)
  assert _rel(out, dequantized) < 0.01
  report = jaxq.inspect(kvcache.attend, cache, query, positions)
  assert report.summary().shares["int8"] > 0.4, report
