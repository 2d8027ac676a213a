"""Serve keeps a layer's computation dtype (issue 13, item 9).

A layer with ``dtype=bfloat16`` and float32 params returns bfloat16 in
float and QAT; serve from converted (float32-dequantizing) QArrays must too.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxq
from jaxq import PerChannel, PerTensor, QuantSpec

BF16 = jnp.bfloat16
W8 = QuantSpec("int8", PerChannel(axis=-1))
ACTS = {"weight_only": None, "int8_act": QuantSpec("int8", PerTensor())}
X = jax.random.normal(jax.random.key(1), (2, 5, 3))
IDS = jnp.array([[0, 3, 4], [1, 2, 0]])

LINEN = {
    "Dense": (lambda: nn.Dense(4, dtype=BF16), X),
    "DenseGeneral": (lambda: nn.DenseGeneral((2, 2), dtype=BF16), X),
    "Einsum": (lambda: nn.Einsum((3, 4), "bti,io->bto", dtype=BF16), X),
    "Conv": (lambda: nn.Conv(4, (3,), dtype=BF16), X),
    "ConvTranspose": (lambda: nn.ConvTranspose(4, (3,), dtype=BF16), X),
    "Embed": (lambda: nn.Embed(5, 4, dtype=BF16), IDS),
}
NNX = {
    "Linear": (lambda r: nnx.Linear(3, 4, dtype=BF16, rngs=r), X),
    "LinearGeneral": (lambda r: nnx.LinearGeneral(3, (2, 2), dtype=BF16,
                                                  rngs=r), X),
    "Einsum": (lambda r: nnx.Einsum("bti,io->bto", (3, 4), dtype=BF16,
                                    rngs=r), X),
    "Conv": (lambda r: nnx.Conv(3, 4, (3,), dtype=BF16, rngs=r), X),
    "ConvTranspose": (lambda r: nnx.ConvTranspose(3, 4, (3,), dtype=BF16,
                                                  rngs=r), X),
    "Embed": (lambda r: nnx.Embed(5, 4, dtype=BF16, rngs=r), IDS),
}


def _rules(act):
  return (jaxq.Rule(r".*", weight=W8, act=act),)


def _dtype(fn, *args) -> jnp.dtype:
  """The dtype ``fn(*args)`` returns, from an abstract evaluation: the
  output dtype is fixed when tracing, and nothing gets compiled."""
  return jax.eval_shape(fn, *args).dtype


@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("name", LINEN)
def test_linen_serve_keeps_layer_dtype(name, act):
  make, x = LINEN[name]
  model = make()
  variables = model.init(jax.random.key(0), x)
  assert jax.tree.leaves(variables)[0].dtype == jnp.float32
  qat = jaxq.quantize_model(model, _rules(ACTS[act]), "qat")
  serving, _ = jaxq.convert(qat, (qat.init(jax.random.key(0), x)))
  dtypes = (_dtype(model.apply, variables, x),
            _dtype(qat.apply, variables, x),
            _dtype(qat.with_mode("serve").apply, serving, x))
  assert dtypes == (BF16, BF16, BF16)


@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("name", NNX)
def test_nnx_serve_keeps_layer_dtype(name, act):
  make, x = NNX[name]
  model = make(nnx.Rngs(0))
  qat = jaxq.quantize_model(model, _rules(ACTS[act]), "qat")
  serve = jaxq.quantize_model(model, _rules(ACTS[act]), "serve")
  serving, _ = jaxq.convert(serve, nnx.state(model))
  nnx.update(serve, serving)
  assert tuple(_dtype(m, x) for m in (model, qat, serve)) == (BF16,) * 3


def test_embed_attend_keeps_layer_dtype():
  query = jax.random.normal(jax.random.key(2), (2, 4))
  rules = _rules(None)
  model = nn.Embed(5, 4, dtype=BF16)
  variables = model.init(jax.random.key(0), IDS)
  qat = jaxq.quantize_model(model, rules, "qat")
  qat.apply(variables, IDS)
  serving, _ = jaxq.convert(qat, variables)
  serve = qat.with_mode("serve")
  assert _dtype(lambda q: serve.apply(serving, q, method="attend"),
                query) == BF16
  nnx_model = nnx.Embed(5, 4, dtype=BF16, rngs=nnx.Rngs(0))
  nnx_serve = jaxq.quantize_model(nnx_model, rules, "serve")
  nnx_serving, _ = jaxq.convert(nnx_serve, nnx.state(nnx_model))
  nnx.update(nnx_serve, nnx_serving)
  assert (_dtype(nnx_model.attend, query),
          _dtype(nnx_serve.attend, query)) == (BF16, BF16)
