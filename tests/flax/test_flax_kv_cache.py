"""Quantized KV caches chosen by rules: Flax's MultiHeadDotProductAttention
(decode=True) and jaxq's cache modules, linen and nnx."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq
from jaxq import kvcache
from jaxq.flax import KVCacheAttention, NnxKVCacheAttention

B, T, F, HEADS = 2, 8, 16, 2
INT8 = kvcache.KVCacheSpec("int8")


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def mha_setup():
  mha = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=F,
                                        decode=True)
  x = jax.random.normal(jax.random.key(0), (B, T, F))
  variables = mha.init(jax.random.key(1), x)
  return mha, x, variables


@functools.partial(jax.jit, static_argnums=0)
def _step(model: nn.Module, params: Any, cache: Any, tokens: jax.Array
          ) -> tuple[jax.Array, Any]:
  """One decode step of ``model`` (static: linen modules hash by their
  fields), compiled once per model and chunk size across the tests."""
  return model.apply({"params": params, "cache": cache}, tokens,
                     mutable=["cache"])


def _decode(model, params, cache, tokens, steps):
  """Feeds ``tokens`` ``(B, n, F)`` in chunks of ``steps`` tokens, jitted."""
  outs, start = [], 0
  for size in steps:
    out, mutated = _step(model, params, cache, tokens[:, start:start + size])
    cache, start = mutated["cache"], start + size
    outs.append(out)
  return jnp.concatenate(outs, 1), cache


@pytest.mark.parametrize("spec,tolerance", [
    (kvcache.KVCacheSpec(None), 1e-5), (INT8, 0.02),
    (kvcache.KVCacheSpec("int4", key_granularity="channel", group_size=4),
     0.2)], ids=["float", "int8", "int4-kivi"])
def test_linen_mha_decode_uses_the_rules_cache(mha_setup, spec, tolerance):
  mha, x, variables = mha_setup
  expected, _ = _decode(mha, variables["params"], variables["cache"], x,
                        [1] * T)
  qmodel = jaxq.quantize_model(
      mha, [jaxq.Rule(r".*", module_types=("MultiHeadDotProductAttention",),
                      kv_cache=spec)])
  cache = qmodel.init(jax.random.key(1), x)["cache"]
  assert "cached_key" not in cache
  assert cache["jaxq_kv_cache"].spec == spec
  out, cache = _decode(qmodel, variables["params"], cache, x, [1] * T)
  assert int(cache["cache_index"]) == T
  error = _rel(out, expected)
  assert error < tolerance
  if spec.quantized:
    assert error > 1e-5
    assert kvcache.nbytes(cache["jaxq_kv_cache"]) < (
        variables["cache"]["cached_key"].nbytes * 2)
  if spec.key_granularity == "channel":
    return  # A query sees its group quantized with the tokens so far.
  # Several tokens per step (a prefill) give the same outputs.
  chunked, _ = _decode(qmodel, variables["params"],
                       qmodel.init(jax.random.key(1), x)["cache"], x,
                       [3, 1, 4])
  np.testing.assert_allclose(chunked, out, atol=1e-5)


def test_linen_kv_rule_leaves_layers_alone_and_counts_as_matched(mha_setup):
  mha, x, variables = mha_setup
  rules = [jaxq.Rule(r".*(query|key|value)", weight=jaxq.QuantSpec("int8")),
           jaxq.Rule(r".*", kv_cache=INT8)]
  qmodel = jaxq.quantize_model(mha, rules)
  qmodel.init(jax.random.key(1), x)
  layers = qmodel.layers()
  assert layers["out"].rule is None  # The kv-only rule is not a layer rule.
  assert layers["query"].rule is rules[0]
  assert qmodel.unmatched_rules() == ()
  with pytest.raises(ValueError, match="mask=None in decode steps"):
    qmodel.apply({"params": variables["params"],
                  "cache": qmodel.init(jax.random.key(1), x)["cache"]},
                 x[:, :1], mask=jnp.ones((B, 1, 1, T), bool),
                 mutable=["cache"])
  with pytest.raises(ValueError, match="Flax's float cache"):
    qmodel.apply(variables, x[:, :1], mutable=["cache"])


def test_rule_kv_cache_validation():
  with pytest.raises(ValueError, match="kv_cache must be a "
                     "jaxq.kvcache.KVCacheSpec"):
    jaxq.Rule(r".*", kv_cache="int8")
  with pytest.raises(ValueError, match="skip rule cannot also carry"):
    jaxq.Rule(r".*", kv_cache=INT8, skip=True)


class _LinenAttention(nn.Module):
  """A user's GQA attention over jaxq's cache module."""

  @nn.compact
  def __call__(self, x, positions):
    q = nn.DenseGeneral((4, 8), name="q")(x)
    k = nn.DenseGeneral((2, 8), name="k")(x)
    v = nn.DenseGeneral((2, 8), name="v")(x)
    out = KVCacheAttention(max_length=T, name="kv")(q, k, v, positions)
    return nn.DenseGeneral(F, axis=(-2, -1), name="o")(out)


def test_linen_cache_module_takes_its_spec_from_the_rule():
  model = _LinenAttention()
  x = jax.random.normal(jax.random.key(2), (B, T, F))
  start = jnp.zeros((B,), jnp.int32)
  variables = model.init(jax.random.key(3), x, start)
  assert variables["cache"]["kv"]["jaxq_kv_cache"].spec == kvcache.KVCacheSpec(
      None)
  apply = lambda m, v: m.apply(v, x, start, mutable=["cache"])[0]
  expected = apply(model, variables)
  qmodel = jaxq.quantize_model(model, [jaxq.Rule(r".*kv", kv_cache=INT8)])
  qvars = qmodel.init(jax.random.key(3), x, start)
  assert qvars["cache"]["kv"]["jaxq_kv_cache"].spec == INT8
  out = apply(qmodel, {"params": variables["params"],
                       "cache": qvars["cache"]})
  assert 1e-5 < _rel(out, expected) < 0.02
  with pytest.raises(ValueError, match="was made with"):  # The float cache.
    apply(qmodel, variables)


class _NnxAttention(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.q = nnx.Linear(F, 32, rngs=rngs)
    self.k = nnx.Linear(F, 16, rngs=rngs)
    self.v = nnx.Linear(F, 16, rngs=rngs)
    self.kv = NnxKVCacheAttention(num_kv_heads=2, head_dim=8, max_length=T)

  def __call__(self, x, positions):
    split = lambda y, h: y.reshape(*y.shape[:-1], h, 8)
    out = self.kv(split(self.q(x), 4), split(self.k(x), 2),
                  split(self.v(x), 2), positions)
    return out.reshape(*out.shape[:-2], -1)


def test_nnx_cache_module_takes_its_spec_from_the_rule():
  model = _NnxAttention(nnx.Rngs(0))
  model.kv.init_cache(B)
  x = jax.random.normal(jax.random.key(2), (B, T, F))
  qmodel = jaxq.quantize_model(model, [jaxq.Rule(r"kv", kv_cache=INT8)])
  assert qmodel.kv.spec == INT8 and model.kv.spec == kvcache.KVCacheSpec(None)
  assert qmodel.kv.cache.get_value().spec == INT8  # Made again, empty.
  assert jaxq.flax.nnx.unmatched_rules(qmodel) == ()

  @nnx.jit
  def run(m, x):
    first = m(x[:, :5], jnp.zeros((B,), jnp.int32))
    rest = [m(x[:, t:t + 1], jnp.full((B,), t, jnp.int32))
            for t in range(5, T)]
    return jnp.concatenate([first] + rest, 1)

  expected, out = run(model, x), run(qmodel, x)
  assert 1e-5 < _rel(out, expected) < 0.02
  with pytest.raises(ValueError, match="init_cache"):
    NnxKVCacheAttention(2, 8, T)(jnp.ones((B, 1, 4, 8)), jnp.ones(
        (B, 1, 2, 8)), jnp.ones((B, 1, 2, 8)), jnp.zeros((B,), jnp.int32))


def test_nnx_multi_head_attention_decodes_through_the_rules_cache():
  model = nnx.MultiHeadAttention(num_heads=HEADS, in_features=F,
                                 qkv_features=F, decode=True,
                                 rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(4), (B, T, F))
  model.init_cache(x.shape)
  qmodel = jaxq.quantize_model(model, [jaxq.Rule(r".*", kv_cache=INT8)])
  assert qmodel.jaxq_kv_cache.get_value().spec == INT8  # Made again.
  assert model.cached_key is not None  # The float model keeps its own.

  @nnx.jit
  def run(m, x):
    return jnp.concatenate([m(x[:, t:t + 1]) for t in range(T)], 1)

  expected, out = run(model, x), run(qmodel, x)
  assert 1e-5 < _rel(out, expected) < 0.02
  assert int(qmodel.cache_index.get_value()) == T
  # Calls that do not decode run Flax's attention unchanged.
  np.testing.assert_array_equal(qmodel(x, decode=False),
                                model(x, decode=False))
  with pytest.raises(ValueError, match="mask=None"):
    qmodel.init_cache(x.shape)
    qmodel(x[:, :1], mask=jnp.ones((B, HEADS, 1, T), bool))
