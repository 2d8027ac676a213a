"""QAT: LSQ and PACT learned ranges, their Flax wiring, and the optax recipe."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxq
import jaxq.qat
from jaxq import PerChannel, PerTensor, PerToken, QuantSpec
from jaxq import learned

KEY = jax.random.key(0)
W_LSQ = QuantSpec("int8", PerChannel(axis=-1), learn="lsq")
A_PACT = QuantSpec("int8", PerTensor(), learn="pact")


def _np_lsq(x: np.ndarray, s: np.ndarray, qmin: float, qmax: float):
  """float64 reference: (x_hat, d x_hat / d s elementwise, inside mask)."""
  v = x / s
  q = np.clip(np.round(v), qmin, qmax)
  inside = (v >= qmin) & (v <= qmax)
  return q * s, np.where(inside, q - v, q), inside


def _data(shape=(16, 6), seed=0):
  return jax.random.normal(jax.random.key(seed), shape) * jnp.linspace(
      0.5, 3.0, shape[-1])


# The pure functions.


def test_lsq_forward_and_gradients_match_the_formulas():
  x = _data()
  scale = jnp.abs(x).max(axis=0, keepdims=True) / 127 * 0.6  # Some clip.
  cotangent = jax.random.normal(jax.random.key(3), x.shape)

  @jax.jit  # One compilation instead of one per eager op.
  def forward_and_vjp(x, s, cotangent):
    y, vjp = jax.vjp(lambda x, s: learned.lsq_fake_quant(x, s, W_LSQ), x, s)
    return y, vjp(cotangent)

  y, (dx, ds) = forward_and_vjp(x, scale, cotangent)

  xs, ss, gs = (np.asarray(a, np.float64) for a in (x, scale, cotangent))
  y_ref, ds_elem, inside = _np_lsq(xs, ss, -127, 127)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(y, jaxq.fake_quant(x, W_LSQ, amax=scale * 127),
                             rtol=1e-6)
  np.testing.assert_array_equal(dx, np.where(inside, gs, 0.0))
  grad_scale = 1 / np.sqrt(x.shape[0] * 127)
  np.testing.assert_allclose(
      ds, (ds_elem * gs).sum(axis=0, keepdims=True) * grad_scale, rtol=1e-4,
      atol=1e-6)
  assert (~inside).any() and inside.any()


def test_lsq_scale_gradient_is_exact_where_saturated():
  """Outside the range x_hat = qmax * s (or qmin * s): finite differences."""
  x = jnp.array([[-9.0, 0.3, 7.5, 12.0]])
  scale = jnp.array([[0.05]])  # Range +-6.35: three elements saturate.
  saturated = jnp.array([[1.0, 0.0, 1.0, 1.0]])
  loss = jax.jit(lambda s: jnp.sum(learned.lsq_fake_quant(
      x, s, W_LSQ.replace(granularity=PerTensor()), grad_scale=1.0) *
                                    saturated))
  eps = 1e-3
  fd = (loss(scale + eps) - loss(scale - eps)) / (2 * eps)
  np.testing.assert_allclose(jax.grad(loss)(scale), [[fd]], rtol=1e-4)
  np.testing.assert_allclose(fd, 127 + 127 - 127, rtol=1e-4)
  # A negative parameter acts through its magnitude, gradient mirrored.
  np.testing.assert_allclose(loss(-scale), loss(scale))
  np.testing.assert_allclose(jax.grad(loss)(-scale), -jax.grad(loss)(scale))


def test_pact_clip_gradient():
  spec = QuantSpec("int8", PerTensor(), learn="pact")
  x = jnp.array([-5.0, -1.0, 0.2, 2.0, 4.0])
  clip = jnp.array([1.5])
  # d/d clip is 1 above, -1 below (narrow range), 0 inside: finite
  # differences agree exactly on the saturated elements.
  weights = jnp.array([1.0, 0.0, 0.0, 1.0, 2.0])
  # Jitted: one compilation each instead of one per eager op.
  loss = jax.jit(lambda c: jnp.sum(learned.pact_fake_quant(x, c, spec) *
                                   weights))
  eps = 1e-3
  fd = (loss(clip + eps) - loss(clip - eps)) / (2 * eps)
  np.testing.assert_allclose(jax.grad(loss)(clip), [-1.0 + 1.0 + 2.0],
                             rtol=1e-6)
  np.testing.assert_allclose(fd, 2.0, rtol=1e-3)
  # Inside the clip: straight-through for x, nothing for the clip.
  dx = jax.jit(jax.grad(lambda x: jnp.sum(learned.pact_fake_quant(
      x, clip, spec))))(x)
  np.testing.assert_array_equal(dx, [0, 1, 1, 0, 0])
  inside = jax.jit(lambda c: jnp.sum(learned.pact_fake_quant(x[1:3], c,
                                                               spec)))
  assert float(jax.grad(inside)(clip)[0]) == 0.0
  # Full signed range: below, x_hat = qmin * clip / qmax.
  full = spec.replace(narrow_range=False)
  g = jax.jit(jax.grad(lambda c: learned.pact_fake_quant(x[:1], c, full)[0]
                       ))(clip)
  np.testing.assert_allclose(g, [-128 / 127], rtol=1e-6)


def test_learned_ranges_start_from_the_int4_full_range():
  """int4's default [-8, 7]: both learned ranges start as jaxq.fake_quant
  with step amax / 7.5, and LSQ's saturated gradient is qmin = -8."""
  x = _data((32, 6), seed=5)
  amax = jnp.abs(x).max(axis=0, keepdims=True)
  lsq = QuantSpec("int4", PerChannel(axis=-1), learn="lsq")
  assert not lsq.narrow_range
  want = jaxq.fake_quant(x, lsq.replace(learn=None), amax=amax)
  scale = learned.init_param(lsq, amax)
  np.testing.assert_allclose(scale, amax / 7.5, rtol=2e-6)
  np.testing.assert_array_equal(learned.lsq_fake_quant(x, scale, lsq), want)
  values = np.asarray(learned.quantize_with_scale(x, scale, lsq).values)
  assert values.min() == -8 and values.max() == 7
  pact = lsq.replace(learn="pact")
  clip = learned.init_param(pact, amax)  # The largest level, 7 steps.
  np.testing.assert_allclose(clip, amax * 7 / 7.5, rtol=2e-6)
  np.testing.assert_allclose(learned.pact_fake_quant(x, clip, pact), want,
                             rtol=1e-6, atol=1e-7)
  # LSQ: saturated elements contribute qmin = -8 below, qmax = 7 above.
  row = jnp.array([[-9.0, 0.3, 7.4, 12.0]])
  saturated = jnp.array([[1.0, 0.0, 1.0, 1.0]])
  loss = jax.jit(lambda s: jnp.sum(learned.lsq_fake_quant(
      row, s, lsq.replace(granularity=PerTensor()), grad_scale=1.0) *
                                    saturated))
  one = jnp.array([[1.0]])
  fd = (loss(one + 1e-3) - loss(one - 1e-3)) / 2e-3
  np.testing.assert_allclose(jax.grad(loss)(one), [[-8 + 7 + 7]], rtol=1e-6)
  np.testing.assert_allclose(fd, -8 + 7 + 7, rtol=1e-3)


def test_learned_params_broadcast_and_bf16():
  x = _data((4, 5, 6)).astype(jnp.bfloat16)
  spec = QuantSpec("int8", PerChannel(axis=-1), learn="lsq")
  scale = jnp.full((6,), 0.02)  # (C,) broadcasts to the (1, 1, 6) scales.
  y, ds = jax.jit(jax.value_and_grad(
      lambda s: jnp.sum(learned.lsq_fake_quant(x, s, spec)), argnums=0))(scale)
  assert ds.shape == (6,) and y.dtype == jnp.bfloat16
  y_keep = learned.lsq_fake_quant(x, scale.reshape(1, 1, 6), spec)
  np.testing.assert_array_equal(learned.lsq_fake_quant(x, scale, spec), y_keep)
  qa = learned.quantize_with_scale(x, scale, spec)
  np.testing.assert_array_equal(jaxq.dequantize(qa), y_keep)
  with pytest.raises(ValueError, match=r"scale has shape \(5,\)"):
    learned.lsq_fake_quant(x, jnp.ones(5), spec)


@pytest.mark.parametrize("changes, match", [
    ({"learn": "adaround"}, "unknown learn"),
    ({"learn": "lsq", "format": "float8_e4m3fn"}, "signed integer"),
    ({"learn": "lsq", "symmetric": False, "format": "uint8"}, "symmetric"),
    ({"learn": "pact", "rounding": "stochastic"}, "rounding='nearest'"),
])
def test_spec_learn_validation(changes, match):
  with pytest.raises(ValueError, match=match):
    QuantSpec(**{"format": "int8", **changes})
  assert hash(QuantSpec("int8", learn="lsq")) != hash(QuantSpec("int8"))


# Flax wiring.


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(2)(x)


def _regression(key, n=64):
  kx, kw = jax.random.split(key)
  x = jax.random.normal(kx, (n, 8))
  return x, jnp.tanh(x @ jax.random.normal(kw, (8, 2)))


def _calibrated_linen(rules, x):
  model = _MLP()
  variables = model.init(KEY, x)
  cal = jaxq.quantize_model(model, rules, "calibrate")
  _, stats = jax.jit(lambda v, x: cal.apply(v, x, mutable=["quant_stats"]))(
      variables, x)
  ranges = jaxq.act_ranges(cal, stats["quant_stats"])
  return cal.with_mode("qat"), {**variables, "quant_ranges": ranges}


def _train(apply, params, x, y, steps, lr=1e-2):
  loss_fn = lambda p: jnp.mean((apply(p, x) - y) ** 2)
  tx = optax.adam(lr)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, losses = tx.init(params), []
  for _ in range(steps):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  return params, losses


def test_linen_learned_ranges_init_train_and_serve():
  x, y = _regression(jax.random.key(1))
  rules = [jaxq.Rule(r"Dense_0", weight=W_LSQ, act=A_PACT),
           jaxq.Rule(r"Dense_1", weight=W_LSQ.replace(learn="pact"),
                     act=A_PACT.replace(learn="lsq"))]
  # Calibrated on a few samples, so that PACT's clip sees larger values.
  qat, variables = _calibrated_linen(rules, x[-8:])
  with pytest.raises(ValueError, match=r"lack 'Dense_0/jaxq/act_clip'"):
    qat.apply(variables, x)
  variables = jaxq.qat.init_learned(qat, variables, x)
  params = variables["params"]
  # Weights start from their own max, activations from calibration.
  kernel = params["Dense_0"]["kernel"]
  np.testing.assert_allclose(params["Dense_0"]["jaxq"]["weight_scale"],
                             jnp.abs(kernel).max(0, keepdims=True) / 127)
  np.testing.assert_allclose(params["Dense_1"]["jaxq"]["weight_clip"],
                             jnp.abs(params["Dense_1"]["kernel"]).max(
                                 0, keepdims=True), rtol=1e-6)
  amax = variables["quant_ranges"]["Dense_1"]["act"]["amax"]
  np.testing.assert_allclose(params["Dense_1"]["jaxq"]["act_scale"],
                             amax.reshape(1) / 127)
  np.testing.assert_allclose(params["Dense_0"]["jaxq"]["act_clip"],
                             jnp.abs(x[-8:]).max(keepdims=True).reshape(1))

  apply = lambda p, x: qat.apply({**variables, "params": p}, x)
  trained, losses = _train(apply, params, x, y, steps=30)
  assert losses[-1] < 0.5 * losses[0]
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                       trained, params)
  for layer in ("Dense_0", "Dense_1"):
    assert all(d > 0 for d in jax.tree.leaves(moved[layer]["jaxq"])), layer

  # Serving uses the learned scales and reproduces QAT.
  trained_vars = {**variables, "params": trained}
  serving, _ = jaxq.convert(qat, trained_vars)
  learned_scale = trained["Dense_0"]["jaxq"]["weight_scale"]
  np.testing.assert_allclose(serving["params"]["Dense_0"]["kernel"].scale,
                             jnp.abs(learned_scale))
  qat_out = jax.jit(qat.apply)(trained_vars, x)
  serve_out = jax.jit(qat.with_mode("serve").apply)(serving, x)
  np.testing.assert_allclose(serve_out, qat_out, rtol=1e-5, atol=1e-5)


def test_learned_act_rejects_per_token_scales():
  x, _ = _regression(KEY, n=4)
  rules = [jaxq.Rule(r".*", act=QuantSpec("int8", PerToken(), learn="lsq"))]
  qat = jaxq.quantize_model(_MLP(), rules, "qat")
  with pytest.raises(ValueError, match="Dense_0.*across tokens"):
    qat.init(KEY, x)


@pytest.mark.parametrize("act", [
    QuantSpec("int8", PerTensor(), dynamic=False),  # Calibrated, fixed.
    QuantSpec("int8", PerToken()),                  # Dynamic per token.
], ids=["fixed", "dynamic"])
def test_linen_fixed_and_dynamic_range_qat_train(act):
  x, y = _regression(jax.random.key(2))
  rules = [jaxq.Rule(r".*", weight=QuantSpec("int4", PerChannel(-1)),
                     act=act)]
  qat, variables = _calibrated_linen(rules, x)
  if act.dynamic:
    variables.pop("quant_ranges")
  apply = lambda p, x: qat.apply({**variables, "params": p}, x)
  trained, losses = _train(apply, variables["params"], x, y, steps=30)
  assert losses[-1] < 0.5 * losses[0]
  trained_vars = {**variables, "params": trained}
  serving, _ = jaxq.convert(qat, trained_vars,
                            ranges=variables.get("quant_ranges"))
  np.testing.assert_allclose(
      jax.jit(qat.with_mode("serve").apply)(serving, x),
      jax.jit(qat.apply)(trained_vars, x), rtol=1e-5, atol=1e-5)


class _NnxMLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(8, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 2, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


def test_nnx_learned_ranges_train_and_serve():
  x, y = _regression(jax.random.key(4))
  act = QuantSpec("int8", PerChannel(-1), learn="pact")
  rules = [jaxq.Rule(r".*", weight=W_LSQ, act=act)]
  model = _NnxMLP(nnx.Rngs(0))
  cal = jaxq.quantize_model(model, rules, "calibrate")
  cal(x)
  stats = nnx.state(cal, jaxq.flax.QuantStat)
  qat = jaxq.quantize_model(model, rules, "qat")
  nnx.update(qat, jaxq.act_ranges(qat, stats))
  jaxq.qat.init_learned(qat, x)
  np.testing.assert_allclose(qat.fc1.jaxq_act_clip.get_value(),
                             jnp.abs(x).max(axis=0), rtol=1e-6)
  assert qat.fc2.jaxq_weight_scale.get_value().shape == (1, 2)
  before = qat.fc1.jaxq_weight_scale.get_value()

  optimizer = nnx.Optimizer(qat, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(
        lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(qat, optimizer)) for _ in range(30)]
  assert losses[-1] < 0.5 * losses[0]
  assert float(jnp.max(jnp.abs(qat.fc1.jaxq_weight_scale.get_value() -
                               before))) > 0

  serve = jaxq.quantize_model(model, rules, "serve")
  serving, _ = jaxq.convert(serve, nnx.state(qat))
  nnx.update(serve, serving)
  np.testing.assert_allclose(serve(x), qat(x), rtol=1e-5, atol=1e-5)


# The recipe.


def test_recipe_schedule_follows_the_literature():
  assert jaxq.qat.finetune_steps(1000) == 100
  lr = jaxq.qat.schedule(0.1, 1000)
  np.testing.assert_allclose(lr(0), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(lr(50), 5e-4, rtol=1e-5)  # Half-way cosine.
  np.testing.assert_allclose(lr(100), 0.0, atol=1e-12)
  tx = jaxq.qat.recipe(0.1, 1000, optimizer=optax.sgd)
  params = {"w": jnp.ones(3)}
  updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -1e-3, rtol=1e-6)
  with pytest.raises(ValueError, match="original_steps"):
    jaxq.qat.finetune_steps(0)


# The int8-forward op.


@pytest.mark.parametrize("lhs_shape, rhs_shape, dims, reshape", [
    ((4, 6, 16), (16, 8), (((2,), (0,)), ((), ())), None),
    # Attention's output projection: two contracting axes (heads, head_dim).
    ((2, 5, 3, 4), (3, 4, 7), (((2, 3), (0, 1)), ((), ())), (12,)),
])
def test_int8_dot_general_is_fake_quant_matmul(lhs_shape, rhs_shape, dims,
                                               reshape):
  lhs = jax.random.normal(jax.random.key(5), lhs_shape)
  rhs = jax.random.normal(jax.random.key(6), rhs_shape)
  k = len(dims[0][0])

  def reference(lhs, rhs):  # W8A8 K-C fake quant, then the float matmul.
    lhs2 = lhs.reshape(lhs.shape[:-k] + (-1,))
    rhs2 = rhs.reshape((-1,) + rhs.shape[k:])
    return (jaxq.fake_quant(lhs2, QuantSpec("int8", PerToken())) @
            jaxq.fake_quant(rhs2, QuantSpec("int8", PerChannel(-1))))

  def forward_and_vjp(fn):
    """``fn(lhs, rhs)`` and its gradients for ``cotangent``, jitted: one
    compilation for both instead of one each (or one per eager op)."""

    @jax.jit
    def run(lhs, rhs, cotangent):
      out, vjp = jax.vjp(fn, lhs, rhs)
      return out, vjp(cotangent)

    return run

  shape = jax.eval_shape(reference, lhs, rhs).shape
  cotangent = jax.random.normal(jax.random.key(7), shape)
  out, grads = forward_and_vjp(
      lambda a, b: jaxq.qat.int8_dot_general(a, b, dims))(lhs, rhs, cotangent)
  want_out, expected = forward_and_vjp(reference)(lhs, rhs, cotangent)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  jaxpr = jax.make_jaxpr(jax.grad(lambda a, b: jnp.sum(
      jaxq.qat.int8_dot_general(a, b, dims))))(lhs, rhs)
  assert "i8[" in str(jaxpr) and "i32[" in str(jaxpr)
