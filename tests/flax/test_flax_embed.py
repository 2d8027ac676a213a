"""Embedding tables quantized row by row (`jaxq.flax.core.embed_spec`),
whatever the vocabulary size: a one-row table (V == 1) gets the same spec
as any other, so gathered rows carry scales their spec accepts."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq
from jaxq import PerChannel, PerTensor, QuantSpec
from jaxq.flax import core

PER_TENSOR = QuantSpec("int8", PerTensor())
RULES = (jaxq.Rule(r".*", weight=PER_TENSOR),)
FEATURES = 6


@pytest.mark.parametrize("vocab", [1, 2, 5])
def test_embed_spec_of_a_per_tensor_table_is_per_row_for_any_vocab(vocab):
  assert core.embed_spec(PER_TENSOR, (vocab, FEATURES)) == (
      PER_TENSOR.replace(granularity=PerChannel(axis=0)))


def test_embed_spec_keeps_row_local_granularities_for_one_row():
  per_row = QuantSpec("int8", PerChannel(axis=0))
  assert core.embed_spec(per_row, (1, FEATURES)) == per_row


def _expected(table: jax.Array, ids: jax.Array) -> jax.Array:
  """Each looked-up row fake-quantized with its own scale (one row here)."""
  return jaxq.fake_quant(table, QuantSpec("int8", PerChannel(axis=0)))[ids]


def test_linen_one_row_embed_qat_and_serve():
  model = nn.Embed(1, FEATURES)
  ids = jnp.zeros((2, 3), jnp.int32)
  variables = model.init(jax.random.key(0), ids)
  qat = jaxq.quantize_model(model, RULES, "qat")
  y_qat = qat.apply(variables, ids)
  expected = _expected(variables["params"]["embedding"], ids)
  np.testing.assert_allclose(y_qat, expected, rtol=1e-6, atol=1e-7)
  serving, _ = jaxq.convert(qat, variables)
  y_serve = qat.with_mode("serve").apply(serving, ids)
  np.testing.assert_allclose(y_serve, expected, rtol=1e-6, atol=1e-7)


def test_nnx_one_row_embed_qat_and_serve():
  model = nnx.Embed(1, FEATURES, rngs=nnx.Rngs(0))
  ids = jnp.zeros((2, 3), jnp.int32)
  expected = _expected(model.embedding.get_value(), ids)
  qat = jaxq.quantize_model(model, RULES, "qat")
  np.testing.assert_allclose(qat(ids), expected, rtol=1e-6, atol=1e-7)
  serve = jaxq.quantize_model(model, RULES, "serve")
  serving, _ = jaxq.convert(serve, nnx.state(model))
  nnx.update(serve, serving)
  np.testing.assert_allclose(serve(ids), expected, rtol=1e-6, atol=1e-7)
