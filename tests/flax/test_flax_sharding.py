"""A QAT train step and a serve step, sharded over 8 CPU devices (linen and
nnx), give the single-device results."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxq
from jaxq import PerChannel, QuantSpec

import flax_models as fm

RULES = [jaxq.Rule(r".*", weight=QuantSpec("int8", PerChannel(axis=-1)),
                   act=QuantSpec("int8"))]


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < 8:
    pytest.fail("tests/conftest.py should provide 8 host devices.")
  return jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _shard_params(params, mesh):
  """Kernels split over "model" along their last axis, the rest replicated."""
  def spec(x):
    if x.ndim >= 2 and x.shape[-1] % 2 == 0:
      return NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "model"))
    return NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.device_put(x, spec(x)), params)


def test_linen_qat_step_and_serve_sharded_equal_single_device(mesh):
  model = fm.LinenMLP()
  x = fm.mlp_input(jax.random.key(1), batch=8)
  target = jnp.cos(jnp.arange(24.0).reshape(8, 3))
  variables = model.init(jax.random.key(0), x)
  qat = jaxq.quantize_model(model, RULES)
  optimizer = optax.sgd(0.1)

  @jax.jit
  def train_step(params, opt_state, x):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(
        (qat.apply({"params": p}, x) - target) ** 2))(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), loss

  params = variables["params"]
  single, single_loss = train_step(params, optimizer.init(params), x)
  sharded_params = _shard_params(params, mesh)
  sharded_x = jax.device_put(x, NamedSharding(mesh, P("data")))
  sharded, sharded_loss = train_step(
      sharded_params, optimizer.init(sharded_params), sharded_x)
  assert len(sharded_x.sharding.device_set) == 8
  np.testing.assert_allclose(sharded_loss, single_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               sharded, single)

  serving, _ = jaxq.convert(qat, {"params": single})
  serve = jax.jit(qat.with_mode("serve").apply)
  sharded_serving = jax.tree.map(
      lambda a: jax.device_put(a, NamedSharding(mesh, P())), serving)
  np.testing.assert_allclose(serve(sharded_serving, sharded_x),
                             serve(serving, x), rtol=1e-6, atol=1e-6)


def test_nnx_qat_step_and_serve_sharded_equal_single_device(mesh):
  x = fm.mlp_input(jax.random.key(1), batch=8)
  target = jnp.sin(jnp.arange(24.0).reshape(8, 3))

  def run(shard: bool):
    qat = jaxq.quantize_model(fm.NnxMLP(nnx.Rngs(0)), RULES)
    inputs = x
    if shard:
      state = nnx.state(qat)
      nnx.update(qat, _shard_params(state, mesh))
      inputs = jax.device_put(x, NamedSharding(mesh, P("data")))
    optimizer = nnx.Optimizer(qat, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x):
      loss, grads = nnx.value_and_grad(
          lambda m: jnp.mean((m(x) - target) ** 2))(model)
      optimizer.update(model, grads)
      return loss

    loss = step(qat, optimizer, inputs)
    return loss, nnx.state(qat, nnx.Param), inputs

  loss, params, _ = run(False)
  sharded_loss, sharded_params, inputs = run(True)
  np.testing.assert_allclose(sharded_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               sharded_params, params)
  model = fm.NnxMLP(nnx.Rngs(0))
  nnx.update(model, params)
  serve = jaxq.quantize_model(model, RULES, "serve")
  serving, _ = jaxq.convert(serve, nnx.state(model))
  nnx.update(serve, serving)
  forward = nnx.jit(lambda m, x: m(x))
  np.testing.assert_allclose(forward(serve, inputs), forward(serve, x),
                             rtol=1e-6, atol=1e-6)
