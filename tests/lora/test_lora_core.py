"""jaxq.lora.core: rules, the one-layer LoRA forward, its gradient, merge."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq.lora import core

KERNELS = {"blocks/0/q_proj": (64, 32), "blocks/0/down_proj": (128, 64),
           "head": (64, 1000)}


def test_rules_first_match_wins_and_keep_their_settings():
  rules = [core.LoraRule(r".*q_proj", rank=4, alpha=8, base=core.NF4_DQ,
                         dropout=0.1),
           core.LoraRule(r"blocks/.*", rank=2)]
  layers = core.choose_layers(KERNELS, rules)
  assert list(layers) == ["blocks/0/q_proj", "blocks/0/down_proj"]
  q = layers["blocks/0/q_proj"]
  assert (q.in_features, q.out_features, q.rank, q.scale, q.dropout) == (
      64, 32, 4, 2.0, 0.1)
  assert q.base == core.NF4_DQ and layers["blocks/0/down_proj"].rank == 2
  assert q.adapter_shapes == {"lora_a": (64, 4), "lora_b": (4, 32)}


def test_rank_above_min_in_out_raises_naming_the_layer_and_shape():
  with pytest.raises(ValueError, match=r"rank 33 .*'blocks/0/q_proj' "
                     r"\(kernel 64 x 32\)"):
    core.choose_layers(KERNELS, [core.LoraRule(r".*q_proj", rank=33)])
  core.choose_layers(KERNELS, [core.LoraRule(r".*q_proj", rank=32)])


def test_a_rule_matching_no_layer_raises_naming_it_and_listing_layers():
  with pytest.raises(ValueError, match=r"LoraRule\('.*gate_proj'\) matches "
                     r"no layer; the dense layers are 'blocks/0/q_proj'"):
    core.choose_layers(KERNELS, [core.LoraRule(r".*q_proj"),
                                 core.LoraRule(r".*gate_proj")])
  with pytest.raises(ValueError, match="no rules"):
    core.choose_layers(KERNELS, [])


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, "rank"), ({"rank": 2.0}, "rank"), ({"alpha": 0}, "alpha"),
    ({"dropout": 1.0}, "dropout"), ({"base": "nf4"}, "QuantSpec")])
def test_rule_fields_are_checked(kwargs, match):
  with pytest.raises(ValueError, match=match):
    core.LoraRule(".*", **kwargs)


def _layer(base=None, rank=4, dropout=0.0):
  return core.LoraLayer("l", 64, 24, rank, 8.0, base, dropout)


def test_fresh_adapter_leaves_the_base_output_exactly():
  layer = _layer(core.NF4_DQ)
  kernel = jax.random.normal(jax.random.key(0), (64, 24))
  base = core.quantize_base(kernel, layer.base)
  a, b = core.init_adapter(jax.random.key(1), layer)
  assert a.shape == (64, 4) and b.shape == (4, 24) and not jnp.any(b)
  np.testing.assert_allclose(jnp.std(a) * 8, 1.0, atol=0.15)  # N(0, 1/in)
  x = jax.random.normal(jax.random.key(2), (3, 5, 64))
  bias = jnp.arange(24.0)
  y = core.lora_dense(x, base, a, b, bias, scale=layer.scale)
  assert y.shape == (3, 5, 24)
  np.testing.assert_array_equal(y, x @ jaxq.dequantize(base) + bias)


def test_forward_is_base_plus_scaled_low_rank_product():
  layer = _layer()
  kernel, a, b = (jax.random.normal(jax.random.key(i), s) for i, s in
                  enumerate([(64, 24), (64, 4), (4, 24)]))
  x = jax.random.normal(jax.random.key(9), (7, 64))
  y = core.lora_dense(x, kernel, a, b, scale=layer.scale)
  np.testing.assert_allclose(y, x @ kernel + (x @ a) @ b * 2.0, rtol=1e-5,
                             atol=1e-4)
  # The merged kernel computes the same (before any requantization).
  merged = core.merged_kernel(kernel, a, b, layer.scale)
  np.testing.assert_allclose(x @ merged, y, rtol=1e-5, atol=1e-4)


def test_merged_kernel_of_a_quantized_base_adds_to_its_dequantized_kernel():
  kernel = jax.random.normal(jax.random.key(0), (64, 24))
  base = core.quantize_base(kernel, core.INT4_G64)
  a, b = jnp.ones((64, 2)), jnp.full((2, 24), 0.5)
  np.testing.assert_allclose(core.merged_kernel(base, a, b, 3.0),
                             jaxq.dequantize(base) + 3.0, rtol=1e-6)


@pytest.mark.parametrize("spec", [None, core.NF4_DQ, core.INT4_G64,
                                  core.INT8_CHANNEL, core.FP8_CHANNEL])
def test_gradient_reaches_the_adapters_never_the_base(spec):
  kernel = jax.random.normal(jax.random.key(0), (64, 24))
  base = core.quantize_base(kernel, spec)
  a = jax.random.normal(jax.random.key(1), (64, 4)) * 0.1
  b = jax.random.normal(jax.random.key(2), (4, 24)) * 0.1
  x = jax.random.normal(jax.random.key(3), (6, 64))

  def loss(base, a, b):
    return jnp.sum(core.lora_dense(x, base, a, b, scale=2.0) ** 2)

  grads = jax.grad(loss, argnums=(0, 1, 2), allow_int=True)(base, a, b)
  base_grad = grads[0].scale if spec is not None else grads[0]
  assert not jnp.any(base_grad)  # stop_gradient: exactly zero
  assert jnp.all(jnp.isfinite(grads[1])) and jnp.any(grads[1])
  assert jnp.any(grads[2])


def test_dropout_is_inverted_and_only_on_the_adapter_input():
  x = jnp.ones((1000, 64))
  kept = core.dropout(x, 0.25, jax.random.key(0))
  values = np.unique(np.asarray(kept))
  np.testing.assert_allclose(values, [0.0, 1 / 0.75], rtol=1e-6)
  assert abs(float(jnp.mean(kept == 0)) - 0.25) < 0.01
  assert core.dropout(x, 0.25, None) is x
  kernel = jax.random.normal(jax.random.key(1), (64, 24))
  a, b = jnp.zeros((64, 4)), jnp.zeros((4, 24))  # adapter output 0
  y = core.lora_dense(x[:3], kernel, a, b, scale=1.0, dropout_rate=0.5,
                      key=jax.random.key(2))
  np.testing.assert_array_equal(y, x[:3] @ kernel)  # base sees all of x


def test_base_bytes_packed_and_check_adapter():
  base = core.quantize_base(jnp.ones((128, 64)), core.NF4_DQ)
  assert core.base_bytes(base) == 128 * 64 // 2 + 2 * 64 + 1
  # Held two codes per byte; an odd output width stays one per byte.
  assert isinstance(base, jaxq.PackedQArray)
  assert base.packed.nbytes == 128 * 64 // 2
  odd = core.quantize_base(jnp.ones((64, 33)), core.INT4_G64)
  assert isinstance(odd, jaxq.QArray) and odd.shape == (64, 33)
  assert core.base_bytes(jnp.ones((4, 8), jnp.bfloat16)) == 64
  with pytest.raises(ValueError, match=r"lora_b of layer 'l' has shape "
                     r"\(4, 25\).*needs \(4, 24\)"):
    core.check_adapter(_layer(), "lora_b", (4, 25), "here")
