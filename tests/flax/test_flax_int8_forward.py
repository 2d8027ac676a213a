"""``quantize_model(..., "qat", int8_forward=True)``: the int8 forward equals
the fake-quant QAT forward, the gradients are its STE gradients, and the
forward's jaxpr multiplies int8 by int8 into int32."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq
from flax_models import DYNAMIC_RULES, STATIC_RULES, LinenMLP, NnxMLP
from jaxq import PerChannel, PerToken, QuantSpec

X = jax.random.normal(jax.random.key(1), (4, 8))


def _int8_dots(fn, *args) -> int:
  """The number of int8 x int8 -> int32 dot_generals in ``fn``'s jaxpr."""
  def count(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        n += (all(v.aval.dtype == jnp.int8 for v in eqn.invars) and
              eqn.outvars[0].aval.dtype == jnp.int32)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        n += count(sub)
    return n
  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def _assert_close(a, b):
  scale = float(jnp.max(jnp.abs(b)))
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


def _linen_variables(rules):
  model = LinenMLP()
  variables = model.init(jax.random.key(0), X)
  if rules is STATIC_RULES:
    cal = jaxq.quantize_model(model, rules, "calibrate")
    _, stats = jax.jit(lambda v, x: cal.apply(
        v, x, mutable=["quant_stats"]))(variables, X)
    # A narrow range, so the clipped STE zeroes some gradients.
    ranges = jax.tree.map(lambda a: a * 0.5,
                          jaxq.act_ranges(cal, stats["quant_stats"]))
    variables = {**variables, "quant_ranges": ranges}
  return model, variables


def _grad_and_output(qmodel, variables, params, x):
  """``((d/dparams, d/dx) of sum(out ** 2), out)``, in one jitted program."""
  def loss(p, x):
    out = qmodel.apply({**variables, "params": p}, x)
    return jnp.sum(out ** 2), out

  return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)


@pytest.mark.parametrize("rules", [DYNAMIC_RULES, STATIC_RULES],
                         ids=["dynamic", "static"])
def test_linen_matches_fake_quant_qat(rules):
  model, variables = _linen_variables(rules)
  qat = jaxq.quantize_model(model, rules, "qat")
  int8 = jaxq.quantize_model(model, rules, "qat", int8_forward=True)
  params = variables["params"]
  # The forward outputs come from the gradients' programs (fewer compiles).
  grads, out = _grad_and_output(int8, variables, params, X)
  expected, expected_out = _grad_and_output(qat, variables, params, X)
  _assert_close(out, expected_out)
  jax.tree.map(_assert_close, grads, expected)
  assert _int8_dots(lambda x: int8.apply(variables, x), X) == 3
  assert _int8_dots(lambda x: qat.apply(variables, x), X) == 0
  assert int8.with_mode("calibrate").with_mode("qat").int8_forward


def test_nnx_matches_fake_quant_qat():
  model = NnxMLP(nnx.Rngs(0))
  qat = jaxq.quantize_model(model, DYNAMIC_RULES, "qat")
  int8 = jaxq.quantize_model(model, DYNAMIC_RULES, "qat", int8_forward=True)
  def loss(m, x):
    out = m(x)
    return jnp.sum(out ** 2), out

  # Jitted: one compilation instead of one per eager op, the forward output
  # from the gradient's program.
  grads, out = nnx.jit(nnx.grad(loss, argnums=(0, 1), has_aux=True))(int8, X)
  expected, expected_out = nnx.jit(nnx.grad(loss, argnums=(0, 1),
                                            has_aux=True))(qat, X)
  _assert_close(out, expected_out)
  jax.tree.map(_assert_close, nnx.state(grads[0], nnx.Param), nnx.state(
      expected[0], nnx.Param))
  _assert_close(grads[1], expected[1])
  graphdef, state = nnx.split(int8)
  assert _int8_dots(lambda s, x: nnx.merge(graphdef, s)(x), state, X) == 3


class LinenEinsumMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Einsum((8, 5), "bd,df->bf")(x)


class LinenHeadsOut(nn.Module):
  """An attention output projection: contracts (heads, head_dim)."""

  @nn.compact
  def __call__(self, x):
    return nn.DenseGeneral(5, axis=(-2, -1))(x)


def _int8_dot_shapes(fn, *args) -> list[tuple[int, ...]]:
  """Output shapes of the int8 x int8 -> int32 dot_generals in ``fn``."""
  shapes = []
  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if (eqn.primitive.name == "dot_general" and
          all(v.aval.dtype == jnp.int8 for v in eqn.invars)):
        shapes.append(tuple(eqn.outvars[0].aval.shape))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)
  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return shapes


@pytest.mark.parametrize("contraction_axis,dot_shape", [
    # One scale per (token, head): varies along the contraction, so the
    # heads become a batch axis of the grouped int8 matmul.
    (-1, (2, 4, 5)),
    # One scale per token over (heads, head_dim): a single int8 matmul.
    ((-2, -1), (4, 5)),
], ids=["per-head", "per-token"])
def test_heads_out_projection_matches_fake_quant(contraction_axis, dot_shape):
  x = X.reshape(4, 2, 4)
  rules = (jaxq.Rule(r".*", weight=QuantSpec("int8", PerChannel(axis=-1)),
                     act=QuantSpec("int8", PerToken(contraction_axis))),)
  model = LinenHeadsOut()
  variables = model.init(jax.random.key(0), x)
  qat = jaxq.quantize_model(model, rules, "qat")
  int8 = jaxq.quantize_model(model, rules, "qat", int8_forward=True)
  assert _int8_dot_shapes(lambda x: int8.apply(variables, x), x) == [
      dot_shape]
  # Jitted: one compilation instead of one per eager op, the forward output
  # from the gradient's program.
  grads, out = _grad_and_output(int8, variables, variables["params"], x)
  expected, expected_out = _grad_and_output(qat, variables,
                                            variables["params"], x)
  _assert_close(out, expected_out)
  jax.tree.map(_assert_close, grads, expected)


def test_einsum_linen_and_nnx():
  model = LinenEinsumMLP()
  variables = model.init(jax.random.key(0), X)
  qat = jaxq.quantize_model(model, DYNAMIC_RULES, "qat")
  int8 = jaxq.quantize_model(model, DYNAMIC_RULES, "qat", int8_forward=True)
  _assert_close(int8.apply(variables, X), qat.apply(variables, X))
  assert _int8_dots(lambda x: int8.apply(variables, x), X) == 1
  layer = nnx.Einsum("bd,df->bf", (8, 5), (5,), rngs=nnx.Rngs(0))
  nnx_qat = jaxq.quantize_model(layer, DYNAMIC_RULES, "qat")
  nnx_int8 = jaxq.quantize_model(layer, DYNAMIC_RULES, "qat",
                                 int8_forward=True)
  _assert_close(nnx_int8(X), nnx_qat(X))
  dx = jax.jit(jax.grad(lambda x: jnp.sum(nnx_int8(x) ** 2)))(X)
  _assert_close(dx, jax.jit(jax.grad(lambda x: jnp.sum(nnx_qat(x) ** 2)))(X))


@pytest.mark.parametrize("weight,act,match", [
    (QuantSpec("float8_e4m3fn", PerChannel(axis=-1)),
     QuantSpec("int8", PerToken()), "integer weight spec"),
    (QuantSpec("int8", PerChannel(axis=-1)), None, "integer activation"),
])
def test_ineligible_specs_raise_naming_the_layer(weight, act, match):
  rules = (jaxq.Rule(r".*", weight=weight, act=act),)
  model = NnxMLP(nnx.Rngs(0))
  int8 = jaxq.quantize_model(model, rules, "qat", int8_forward=True)
  with pytest.raises(ValueError, match=match) as e:
    int8(X)
  assert "fc1" in str(e.value)
