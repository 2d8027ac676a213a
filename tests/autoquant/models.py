"""Tiny linen and nnx twins for the auto_quantize tests: a pre-norm block
(q, k, v from one LayerNorm, o, an MLP) with group-friendly widths."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

D, H = 64, 128


class Linen(nn.Module):
  """x -> LN -> q, k, v -> o(q * sigmoid(k) + v) -> up -> down, residuals."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="ln")(x)
    q = nn.Dense(D, name="q")(h)
    k = nn.Dense(D, name="k")(h)
    v = nn.Dense(D, name="v")(h)
    x = x + nn.Dense(D, name="o")(q * jax.nn.sigmoid(k) + v)
    return x + nn.Dense(D, name="down")(jax.nn.gelu(nn.Dense(H, name="up")(x)))


class Nnx(nnx.Module):
  """The same model in nnx."""

  def __init__(self, rngs: nnx.Rngs):
    self.ln = nnx.LayerNorm(D, rngs=rngs)
    self.q = nnx.Linear(D, D, rngs=rngs)
    self.k = nnx.Linear(D, D, rngs=rngs)
    self.v = nnx.Linear(D, D, rngs=rngs)
    self.o = nnx.Linear(D, D, rngs=rngs)
    self.up = nnx.Linear(D, H, rngs=rngs)
    self.down = nnx.Linear(H, D, rngs=rngs)

  def __call__(self, x):
    h = self.ln(x)
    x = x + self.o(self.q(h) * jax.nn.sigmoid(self.k(h)) + self.v(h))
    return x + self.down(jax.nn.gelu(self.up(x)))


def inputs(seed: int, batch: int = 4, length: int = 8) -> jax.Array:
  """Unit-normal inputs with two outlier channels."""
  scale = jnp.ones((D,)).at[3].set(10.0).at[40].set(5.0)
  return jax.random.normal(jax.random.key(seed), (batch, length, D)) * scale


def linen_model():
  model = Linen()
  return model, model.init(jax.random.key(0), inputs(0))


def nnx_model():
  return Nnx(nnx.Rngs(0))


L = 3


class Block(nn.Module):
  """A residual MLP block for a scan: ``x + down(gelu(up(x)))``."""

  @nn.compact
  def __call__(self, x, _):
    h = jax.nn.gelu(nn.Dense(H, name="up")(x))
    return x + nn.Dense(D, name="down")(h), None


class Scanned(nn.Module):
  """``inp``, then ``L`` blocks as one ``nn.scan`` (stacked kernels)."""

  @nn.compact
  def __call__(self, x):
    import jaxq  # The scan axes of jaxq's collections.
    x = nn.Dense(D, name="inp")(x)
    stack = nn.scan(Block, variable_axes={"params": 0,
                                          **jaxq.flax.SCAN_AXES},
                    split_rngs={"params": True}, length=L)
    x, _ = stack(name="layers")(x, None)
    return x


def scanned_model():
  model = Scanned()
  return model, model.init(jax.random.key(0), inputs(0))


def nnx_twin(variables):
  """`Nnx` holding the weights of `Linen`'s ``variables``."""
  model = nnx_model()
  params = variables["params"]
  for name in ("q", "k", "v", "o", "up", "down"):
    layer = getattr(model, name)
    layer.kernel[...] = params[name]["kernel"]
    layer.bias[...] = params[name]["bias"]
  model.ln.scale[...] = params["ln"]["scale"]
  model.ln.bias[...] = params["ln"]["bias"]
  return model


class NnxBlock(nnx.Module):
  """`Block` in nnx."""

  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Linear(D, H, rngs=rngs)
    self.down = nnx.Linear(H, D, rngs=rngs)

  def __call__(self, x):
    return x + self.down(jax.nn.gelu(self.up(x)))


class NnxScanned(nnx.Module):
  """`Scanned` in nnx: blocks made by ``nnx.vmap``, run by ``nnx.scan``."""

  def __init__(self, rngs: nnx.Rngs):
    self.inp = nnx.Linear(D, D, rngs=rngs)

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> NnxBlock:
      return NnxBlock(rngs)

    self.layers = create(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
      return block(x)

    return forward(self.inp(x), self.layers)


def nnx_scanned_model():
  return NnxScanned(nnx.Rngs(0))
