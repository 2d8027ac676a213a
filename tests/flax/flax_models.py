"""Tiny linen and nnx test models: an MLP, a CNN with depthwise convolutions
and a transformer (embedding, attention, MLP, tied output), with the rules
the Flax tests quantize them with."""

from __future__ import annotations

from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

import jaxq
from jaxq import PerChannel, PerTensor, PerToken, QuantSpec

W8 = QuantSpec("int8", PerChannel(axis=-1))
A8_STATIC = QuantSpec("int8", PerTensor(), dynamic=False)
A8_TOKEN = QuantSpec("int8", PerToken())
EMBED = QuantSpec("int8", PerChannel(axis=0))

# Static per-tensor activations everywhere (what serve must reproduce).
STATIC_RULES = (jaxq.Rule(r".*", weight=W8, act=A8_STATIC),)
# Dynamic per-token activations for the transformer's matmuls.
DYNAMIC_RULES = (jaxq.Rule(r".*", weight=W8, act=A8_TOKEN),)
SKIP_RULES = (jaxq.Rule(r".*", skip=True),)

VOCAB, SEQ, D, HEADS = 11, 6, 8, 2


# linen


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    x = nn.DenseGeneral((2, 4))(x)
    return nn.Dense(3)(x.reshape(x.shape[:-2] + (8,)))


class LinenCNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=8)(x))  # Depthwise.
    x = nn.Conv(4, (1, 1), strides=2)(x)
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class LinenTransformer(nn.Module):

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(VOCAB, D)
    x = embed(ids)
    x = x + nn.MultiHeadDotProductAttention(HEADS)(x, x)
    h = nn.gelu(nn.Einsum((D, 16), "btd,df->btf")(x))
    x = x + nn.Dense(D)(h)
    return embed.attend(x)


# nnx


class NnxMLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(8, 16, rngs=rngs)
    self.fc2 = nnx.LinearGeneral(16, (2, 4), rngs=rngs)
    self.fc3 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = self.fc2(nnx.relu(self.fc1(x)))
    return self.fc3(x.reshape(x.shape[:-2] + (8,)))

  def features(self, x):  # A second method, through the same layers.
    return nnx.relu(self.fc1(x))


class NnxCNN(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(2, 8, (3, 3), rngs=rngs)
    self.depthwise = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)
    self.conv3 = nnx.Conv(8, 4, (1, 1), strides=2, rngs=rngs)
    self.head = nnx.Linear(4 * 4 * 4, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.depthwise(nnx.relu(self.conv1(x))))
    x = self.conv3(x)
    return self.head(x.reshape(x.shape[0], -1))


class NnxTransformer(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(HEADS, D, decode=False, rngs=rngs)
    self.up = nnx.Einsum("btd,df->btf", (D, 16), (16,), rngs=rngs)
    self.down = nnx.Linear(16, D, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids)
    x = x + self.attention(x)
    x = x + self.down(nnx.gelu(self.up(x)))
    return self.embed.attend(x)


def mlp_input(key: jax.Array, batch: int = 4) -> jax.Array:
  return jax.random.normal(key, (batch, 8))


def cnn_input(key: jax.Array, batch: int = 2) -> jax.Array:
  return jax.random.normal(key, (batch, 8, 8, 2))


def transformer_input(key: jax.Array, batch: int = 2) -> jax.Array:
  return jax.random.randint(key, (batch, SEQ), 0, VOCAB)


LINEN = {"mlp": (LinenMLP, mlp_input), "cnn": (LinenCNN, cnn_input),
         "transformer": (LinenTransformer, transformer_input)}
NNX = {"mlp": (NnxMLP, mlp_input), "cnn": (NnxCNN, cnn_input),
       "transformer": (NnxTransformer, transformer_input)}


def max_abs(a: jax.Array) -> float:
  return float(jnp.max(jnp.abs(a)))


# jaxpr checks


def conv_equations(jaxpr: Any) -> Iterator[Any]:
  """Every conv_general_dilated of a jaxpr, sub-jaxprs included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from conv_equations(inner)


def assert_int8_conv(fn, *args) -> None:
  """``fn`` runs exactly one convolution, int8 x int8 -> int32."""
  convs = list(conv_equations(jax.make_jaxpr(fn)(*args).jaxpr))
  assert len(convs) == 1, [str(eqn) for eqn in convs]
  assert [v.aval.dtype for v in convs[0].invars] == [jnp.int8, jnp.int8]
  assert convs[0].outvars[0].aval.dtype == jnp.int32


def assert_serves_int8_conv(linen_model, variables, nnx_model, rules, x):
  """Converted linen and nnx serve models each run one int8 -> int32 conv;
  returns the linen serving variables."""
  serve = jaxq.quantize_model(linen_model, rules, "serve")
  jax.eval_shape(serve.apply, variables, x)  # Traces the layers.
  serving, _ = jaxq.convert(serve, variables)
  assert_int8_conv(serve.apply, serving, x)
  nnx_serve = jaxq.quantize_model(nnx_model, rules, "serve")
  nnx_serving, _ = jaxq.convert(nnx_serve, nnx.state(nnx_model))
  nnx.update(nnx_serve, nnx_serving)
  graph, state = nnx.split(nnx_serve)
  assert_int8_conv(lambda s, x: nnx.merge(graph, s)(x), state, x)
  return serving
