"""Static per-head KV cache ranges from `jaxq.calibrate`, linen and nnx:
measured in calibrate mode, carried by `jaxq.convert` (or `act_ranges`),
read by the cache in serve mode."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq
from jaxq import kvcache
from jaxq.flax import Batch, KVCacheAttention, NnxKVCacheAttention

B, T, F, HEADS, D = 2, 8, 16, 2, 8
STATIC = kvcache.KVCacheSpec("int8", key_granularity="head",
                             value_granularity="head")
# Rotated keys, per-token values: only keys take a static range.
STATIC_KEYS = kvcache.KVCacheSpec("int8", key_granularity="head",
                                  hadamard=True)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _head_amax(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
  """max |x| per KV head of ``(B, S, H, D)``, over real positions."""
  x = np.abs(np.asarray(x, np.float64))
  if mask is not None:
    x = np.where(mask[:, :, None, None], x, 0.0)
  return x.max(axis=(0, 1, 3))


def _mha_kv(mha_params, x):
  """Flax MHA's keys and values ``(B, T, H, D)`` for input ``x``."""
  project = lambda p: np.einsum("btf,fhd->bthd", x, p["kernel"]) + p["bias"]
  return project(mha_params["key"]), project(mha_params["value"])


def _decode(model, variables, cache, x):
  """Token-by-token decode of ``x``, one jitted step."""
  step = jax.jit(lambda c, t: model.apply({**variables, "cache": c}, t,
                                          mutable=["cache"]))
  outs = []
  for t in range(x.shape[1]):
    out, mutated = step(cache, x[:, t:t + 1])
    cache = mutated["cache"]
    outs.append(out)
  return jnp.concatenate(outs, 1), cache


def test_linen_mha_static_ranges_from_calibrate():
  mha = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=F,
                                        decode=True)
  x = jax.random.normal(jax.random.key(0), (B, T, F))
  params = mha.init(jax.random.key(1), x)["params"]
  float_cache = mha.init(jax.random.key(1), x)["cache"]
  expected, _ = _decode(mha, {"params": params}, float_cache, x)
  rules = [jaxq.Rule(r".*", module_types=("MultiHeadDotProductAttention",),
                     kv_cache=STATIC)]
  cal = jaxq.quantize_model(mha, rules, mode="calibrate")
  # Calibrate mode attends causally in float: the float decode's outputs.
  out, stats = cal.apply({"params": params}, x, mutable=["quant_stats"])
  np.testing.assert_allclose(out, expected, atol=1e-5)
  assert "cache" not in stats  # No cache in calibrate mode.

  result = jaxq.calibrate(cal, {"params": params}, [x[:1], x[1:]],
                          progress=False)
  key, value = _mha_kv(params, np.asarray(x))
  kv = jaxq.act_ranges(cal, result.stats)["jaxq_kv_cache"]
  np.testing.assert_allclose(kv["key"].reshape(-1), _head_amax(key),
                             rtol=1e-6)
  np.testing.assert_allclose(kv["value"].reshape(-1), _head_amax(value),
                             rtol=1e-6)

  serving, _ = jaxq.convert(cal, {"params": params}, result.stats)
  serve = cal.with_mode("serve")
  cache = serve.init(jax.random.key(1), x)["cache"]
  out, cache = _decode(serve, serving, cache, x)
  assert 1e-5 < _rel(out, expected) < 0.02
  np.testing.assert_allclose(
      cache["jaxq_kv_cache"].key_amax.reshape(-1), _head_amax(key), rtol=1e-6)
  with pytest.raises(ValueError, match="static per-head ranges"):
    serve.apply({"params": params, "cache": cache}, x[:, :1],
                mutable=["cache"])


class _LinenAttention(nn.Module):
  """A user's GQA attention over jaxq's cache module."""

  @nn.compact
  def __call__(self, x, positions):
    q = nn.DenseGeneral((4, D), name="q")(x)
    k = nn.DenseGeneral((HEADS, D), name="k")(x)
    v = nn.DenseGeneral((HEADS, D), name="v")(x)
    out = KVCacheAttention(max_length=T, name="kv")(q, k, v, positions)
    return nn.DenseGeneral(F, axis=(-2, -1), name="o")(out)


def test_linen_cache_module_static_keys_rotated_and_masked():
  """Hadamard keys take the range of the rotated keys; padding (here 1e4
  inputs) enters no range; values stay per token."""
  model = _LinenAttention()
  x = np.array(jax.random.normal(jax.random.key(2), (B, T, F)))
  mask = np.ones((B, T), bool)
  mask[1, 5:] = False
  x[~mask] = 1e4
  start = jnp.zeros((B,), jnp.int32)
  params = model.init(jax.random.key(3), x, start)["params"]
  rules = [jaxq.Rule(r"kv", kv_cache=STATIC_KEYS)]
  cal = jaxq.quantize_model(model, rules, mode="calibrate")
  result = jaxq.calibrate(cal, {"params": params},
                          [Batch((x, start), mask=mask)], methods=("max",),
                          progress=False)
  k = np.einsum("btf,fhd->bthd", x, params["k"]["kernel"]) + (
      params["k"]["bias"])
  rotated = np.asarray(kvcache.hadamard.rotate(jnp.asarray(k)))
  for ranges in (result.ranges(), result.ranges("max")):
    kv = ranges["kv"]["jaxq_kv_cache"]
    assert set(kv) == {"key"}
    np.testing.assert_allclose(kv["key"].reshape(-1),
                               _head_amax(rotated, mask), rtol=1e-5)

  serving, _ = jaxq.convert(cal, {"params": params}, result.stats,
                            ranges=result.ranges("max"))
  serve = cal.with_mode("serve")
  x = np.where(mask[..., None], x, 0.0)
  cache = serve.init(jax.random.key(3), x, start)["cache"]
  out, _ = serve.apply({**serving, "cache": cache}, x, start,
                       mutable=["cache"])
  expected = model.apply({"params": params},
                         x, start, mutable=["cache"])[0]
  assert 1e-5 < _rel(out, expected) < 0.03
  # Ranges of another model (3 KV heads) name the module.
  other = {"kv": {"jaxq_kv_cache": {"key": jnp.ones((1, 1, 3, 1))}}}
  with pytest.raises(ValueError, match=r"KV cache of 'kv': its loaded "
                     r"static ranges do not fit: .*expected \(2,\)"):
    serve.apply({**serving, "quant_ranges": other, "cache": cache}, x, start,
                mutable=["cache"])


class _NnxAttention(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.q = nnx.Linear(F, 4 * D, rngs=rngs)
    self.k = nnx.Linear(F, HEADS * D, rngs=rngs)
    self.v = nnx.Linear(F, HEADS * D, rngs=rngs)
    self.kv = NnxKVCacheAttention(num_kv_heads=HEADS, head_dim=D,
                                  max_length=T)

  def __call__(self, x, positions):
    split = lambda y, h: y.reshape(*y.shape[:-1], h, D)
    out = self.kv(split(self.q(x), 4), split(self.k(x), HEADS),
                  split(self.v(x), HEADS), positions)
    return out.reshape(*out.shape[:-2], -1)


def test_nnx_cache_module_static_ranges_from_calibrate():
  model = _NnxAttention(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(4), (B, T, F))
  start = jnp.zeros((B,), jnp.int32)
  rules = [jaxq.Rule(r"kv", kv_cache=STATIC)]
  cal = jaxq.quantize_model(model, rules, mode="calibrate")
  result = jaxq.calibrate(cal, None, [(x, start)], progress=False)
  k = np.asarray(model.k(x)).reshape(B, T, HEADS, D)
  v = np.asarray(model.v(x)).reshape(B, T, HEADS, D)
  kv = result.ranges()["kv"]["jaxq_kv_range"].get_value()
  np.testing.assert_allclose(kv["key"].reshape(-1), _head_amax(k), rtol=1e-6)
  np.testing.assert_allclose(kv["value"].reshape(-1), _head_amax(v),
                             rtol=1e-6)

  # NaN keys and values are left out of the range, with a warning.
  nan = jaxq.calibrate(cal, None, [(x.at[0, 3].set(jnp.nan), start),
                                  (x, start)], progress=False)
  with pytest.warns(UserWarning, match=r"'kv' saw non-finite \(NaN or inf\) "
                    r"16 keys and 16 values"):
    nan_kv = nan.ranges()["kv"]["jaxq_kv_range"].get_value()
  assert np.all(np.isfinite(nan_kv["key"]))
  # Keys and values never other than 0 (zero inputs, zero biases): refused.
  zeros = jaxq.calibrate(cal, None, [(jnp.zeros_like(x), start)],
                         progress=False)
  with pytest.raises(ValueError, match=r"KV cache of 'kv' \(keys\).*is 0"):
    zeros.ranges()

  serve = jaxq.quantize_model(model, rules, mode="serve")
  with pytest.raises(ValueError, match="'jaxq_kv_range' attribute holds "
                     "none"):
    serve.kv.init_cache(B)
  serving, _ = jaxq.convert(serve, nnx.state(model, nnx.Param), result.stats)
  nnx.update(serve, serving)
  serve.kv.init_cache(B)
  model.kv.init_cache(B)
  expected, out = model(x, start), serve(x, start)
  assert 1e-5 < _rel(out, expected) < 0.02
  np.testing.assert_allclose(serve.kv.cache.get_value().key_amax.reshape(-1),
                             _head_amax(k), rtol=1e-6)


def test_nnx_multi_head_attention_static_ranges():
  model = nnx.MultiHeadAttention(num_heads=HEADS, in_features=F,
                                 qkv_features=F, decode=True,
                                 rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(5), (B, T, F))
  rules = [jaxq.Rule(r".*", kv_cache=STATIC)]
  cal = jaxq.quantize_model(model, rules, mode="calibrate")
  # Calibrate mode: no cache, causal float attention.
  causal = nnx.make_causal_mask(jnp.ones((B, T), bool))
  np.testing.assert_allclose(cal(x), model(x, mask=causal, decode=False),
                             atol=1e-5)
  result = jaxq.calibrate(cal, None, [x], progress=False)
  serving, _ = jaxq.convert(cal, nnx.state(model, nnx.Param), result.stats)
  serve = jaxq.quantize_model(model, rules, mode="serve")
  nnx.update(serve, serving)
  serve.init_cache(x.shape)
  model.init_cache(x.shape)

  @nnx.jit
  def run(m, x):
    return jnp.concatenate([m(x[:, t:t + 1]) for t in range(T)], 1)

  expected, out = run(model, x), run(serve, x)
  assert 1e-5 < _rel(out, expected) < 0.02
  key = np.asarray(model.key(x))
  np.testing.assert_allclose(
      serve.jaxq_kv_cache.get_value().key_amax.reshape(-1), _head_amax(key),
      rtol=1e-6)


class _ScanBlock(nn.Module):

  @nn.compact
  def __call__(self, x, positions):
    return x + _LinenAttention(name="attn")(x, positions), None


class _Stack(nn.Module):
  """Two attention blocks scanned over layers (``nn.scan``)."""

  @nn.compact
  def __call__(self, x, positions):
    scanned = nn.scan(_ScanBlock, variable_axes={
        "params": 0, "cache": 0, **jaxq.flax.SCAN_AXES},
                      split_rngs={"params": True}, in_axes=nn.broadcast,
                      length=2)
    return scanned(name="layers")(x, positions)[0]


def test_linen_scanned_layers_take_a_range_each():
  model = _Stack()
  x = jax.random.normal(jax.random.key(6), (B, T, F))
  start = jnp.zeros((B,), jnp.int32)
  params = model.init(jax.random.key(7), x, start)["params"]
  rules = [jaxq.Rule(r".*kv", kv_cache=STATIC)]
  cal = jaxq.quantize_model(model, rules, mode="calibrate")
  result = jaxq.calibrate(cal, {"params": params}, [(x, start)],
                          progress=False)
  serving, _ = jaxq.convert(cal, {"params": params}, result.stats)
  kv = serving["quant_ranges"]["layers"]["attn"]["kv"]["jaxq_kv_cache"]
  assert kv["key"].shape == (2, 1, 1, HEADS, 1)  # One range per layer.
  # The first layer's keys, by hand.
  k = np.einsum("btf,fhd->bthd", x,
                params["layers"]["attn"]["k"]["kernel"][0]) + (
                    params["layers"]["attn"]["k"]["bias"][0])
  np.testing.assert_allclose(kv["key"][0].reshape(-1), _head_amax(k),
                             rtol=1e-5)
  assert not np.allclose(kv["key"][0], kv["key"][1])
  serve = cal.with_mode("serve")
  cache = serve.init(jax.random.key(7), x, start)["cache"]
  out, mutated = serve.apply({**serving, "cache": cache}, x, start,
                             mutable=["cache"])
  expected = model.apply({"params": params}, x, start, mutable=["cache"])[0]
  assert 1e-5 < _rel(out, expected) < 0.02
  held = mutated["cache"]["layers"]["attn"]["kv"]["jaxq_kv_cache"].key_amax
  np.testing.assert_allclose(held, kv["key"], rtol=1e-6)
