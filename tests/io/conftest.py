"""Session fixtures of tests/io: a tiny linen MLP quantized with every scheme
the compressed-tensors export writes, converted once."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jaxq
from jaxq import PerBlock, PerChannel, PerGroup, PerTensor, PerToken, QuantSpec

WIDTH = 256

# layer -> (weight spec, act spec): one layer per compressed-tensors scheme.
SCHEMES = {
    "w4a16": (QuantSpec("int4", PerGroup(axis=0, size=32)), None),
    "w4a16_asym": (QuantSpec("int4", PerGroup(axis=0, size=32),
                             symmetric=False), None),
    "w4a16_channel": (QuantSpec("int4", PerChannel(axis=-1)), None),
    "w8a16": (QuantSpec("int8", PerChannel(axis=-1)), None),
    "w8a8": (QuantSpec("int8", PerChannel(axis=-1)),
             QuantSpec("int8", PerToken())),
    "fp8_channel_static": (
        QuantSpec("float8_e4m3fn", PerChannel(axis=-1)),
        QuantSpec("float8_e4m3fn", PerTensor(), dynamic=False)),
    "fp8_block": (QuantSpec("float8_e4m3fn", PerBlock((128, 128))),
                  QuantSpec("float8_e4m3fn", PerToken())),
}
LAYERS = tuple(SCHEMES)


class MLP(nn.Module):
  """Dense layers of width 256, one per scheme, then a float head."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for name in LAYERS:
      x = nn.tanh(nn.Dense(WIDTH, name=name)(x))
    return nn.Dense(8, name="head")(x)


def hf_name(path: str) -> str:
  """The tiny model's Hugging Face-style module names."""
  return f"model.{path}" if path != "head" else "lm_head"


@dataclasses.dataclass(frozen=True)
class Quantized:
  model: Any
  variables: Any
  rules: tuple[jaxq.Rule, ...]
  serve: Any
  serving: Any
  x: jax.Array


@pytest.fixture(scope="session")
def quantized() -> Quantized:
  model = MLP()
  x = jax.random.normal(jax.random.key(0), (4, WIDTH), jnp.float32)
  variables = model.init(jax.random.key(1), x)
  rules = tuple(jaxq.Rule(name, weight=w, act=a)
                for name, (w, a) in SCHEMES.items())
  calibrating = jaxq.quantize_model(model, rules, "calibrate")
  result = jaxq.calibrate(calibrating, variables, [x], methods=("max",))
  serve = calibrating.with_mode("serve")
  serving, _ = jaxq.convert(serve, variables, ranges=result.ranges("max"))
  return Quantized(model, variables, rules, serve, serving, x)
