"""``quantize_model(..., "qat", backward=...)``: the QAT backward modes.

``"float"``: the backward matmuls take the float operands (checked against a
hand-written gradient). ``"int8"``: every forward and backward matmul is int8
x int8 -> int32 in the jaxpr, the gradient is within a bound of the STE one
and unbiased (its mean over keys converges to it), the key comes from linen's
``"jaxq"`` rng or nnx's ``rngs``, and the digits CNN's QAT still recovers
what 4-bit PTQ loses. Bad options raise naming the problem.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

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
from jaxq import hlo
from jaxq.flax import int8_qat

X = jax.random.normal(jax.random.key(1), (16, 8))
KEY = jax.random.key(7)


def _dots(fn, *args) -> tuple[int, int]:
  """(int8 x int8 -> int32 dot_generals, all dot_generals) in ``fn``'s
  jaxpr."""
  def count(jaxpr) -> tuple[int, int]:
    int8, total = 0, 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        total += 1
        int8 += (all(v.aval.dtype == jnp.int8 for v in eqn.invars) and
                 eqn.outvars[0].aval.dtype == jnp.int32)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        a, b = count(sub)
        int8, total = int8 + a, total + b
    return int8, total
  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def _distance(grads, reference) -> float:
  """``|g - g_ref| / |g_ref|`` over all leaves."""
  diff = sum(float(jnp.sum((a - b) ** 2)) for a, b in
             zip(jax.tree.leaves(grads), jax.tree.leaves(reference)))
  norm = sum(float(jnp.sum(b ** 2)) for b in jax.tree.leaves(reference))
  return (diff / norm) ** 0.5


def _linen(rules=DYNAMIC_RULES, **options):
  model = LinenMLP()
  variables = model.init(jax.random.key(0), X)
  qmodel = jaxq.quantize_model(model, rules, "qat", **options)

  def grads(params, x, key=KEY):
    loss = lambda p, x: jnp.sum(
        qmodel.apply({"params": p}, x, rngs={"jaxq": key}) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

  return qmodel, variables["params"], grads


# Validation.


def test_unknown_backward_lists_the_choices():
  for model in (LinenMLP(), NnxMLP(nnx.Rngs(0))):
    with pytest.raises(ValueError, match=r"unknown backward 'exact'.*'ste', "
                                         r"'float', 'int8'"):
      jaxq.quantize_model(model, DYNAMIC_RULES, "qat", backward="exact")


def test_int8_backward_needs_the_int8_forward():
  with pytest.raises(ValueError, match="int8_forward=True"):
    jaxq.quantize_model(LinenMLP(), DYNAMIC_RULES, "qat", backward="int8")


def test_keys_missing_or_misplaced_raise():
  qmodel, params, _ = _linen(int8_forward=True, backward="int8")
  # The backward runs last layer first: the first one it reaches is named.
  with pytest.raises(ValueError, match=r"'Dense_1'.*rngs=\{'jaxq': key\}"):
    jax.grad(lambda p: jnp.sum(qmodel.apply({"params": p}, X)))(params)
  # The key is the backward's: a forward-only evaluation needs none.
  np.testing.assert_array_equal(
      qmodel.apply({"params": params}, X),
      qmodel.apply({"params": params}, X, rngs={"jaxq": KEY}))
  with pytest.raises(ValueError, match="rngs=nnx.Rngs"):
    jaxq.quantize_model(NnxMLP(nnx.Rngs(0)), DYNAMIC_RULES, "qat",
                        int8_forward=True, backward="int8")
  with pytest.raises(ValueError, match="takes rngs with it only"):
    jaxq.quantize_model(NnxMLP(nnx.Rngs(0)), DYNAMIC_RULES, "qat",
                        rngs=nnx.Rngs(jaxq=0))
  with pytest.raises(ValueError, match="rngs is for nnx"):
    jaxq.quantize_model(LinenMLP(), DYNAMIC_RULES, "qat", int8_forward=True,
                        backward="int8", rngs=nnx.Rngs(jaxq=0))


@pytest.mark.parametrize("weight, act, match", [
    # Scales per input feature: vary along the contraction.
    (QuantSpec("int8", PerChannel(axis=0)), QuantSpec("int8", PerToken()),
     r"'Dense_0' \(Dense\).*weight scales"),
    (QuantSpec("int8", PerChannel(axis=-1)),
     QuantSpec("int8", PerToken(), symmetric=False), r"'Dense_0'.*affine"),
])
def test_int8_backward_rejects_specs_naming_the_layer(weight, act, match):
  qmodel, params, grads = _linen((jaxq.Rule(r".*", weight=weight, act=act),),
                                 int8_forward=True, backward="int8")
  with pytest.raises(ValueError, match=match):
    grads(params, X)


# backward="float".


class _Dense(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(5)(x)


@pytest.mark.parametrize("int8_forward", [False, True])
def test_float_backward_multiplies_the_float_operands(int8_forward):
  model = _Dense()
  params = model.init(jax.random.key(0), X)["params"]
  qmodel = jaxq.quantize_model(model, DYNAMIC_RULES, "qat", backward="float",
                               int8_forward=int8_forward)
  ste = jaxq.quantize_model(model, DYNAMIC_RULES, "qat")
  loss = lambda q: lambda p, x: jnp.sum(q.apply({"params": p}, x) ** 2)
  (grads, dx) = jax.jit(jax.grad(loss(qmodel), argnums=(0, 1)))(params, X)
  # The reference: g = dloss/dy at the quantized forward, times the float
  # operands (the dynamic ranges' estimator is the identity).
  g = 2 * jax.jit(ste.apply)({"params": params}, X)
  kernel = params["Dense_0"]["kernel"]
  np.testing.assert_allclose(grads["Dense_0"]["kernel"], X.T @ g, rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(grads["Dense_0"]["bias"], g.sum(0), rtol=1e-4,
                             atol=1e-4)
  np.testing.assert_allclose(dx, g @ kernel.T, rtol=1e-4, atol=1e-4)
  # ...which is not the STE gradient (that one takes the quantized ones).
  ste_grads = jax.jit(jax.grad(loss(ste)))(params, X)
  assert 1e-4 < _distance(grads, ste_grads) < 0.05


class _UserDense(nn.Module):
  """A user module with a ``dot_general`` field and a weight of its own."""

  dot_general: Any = jax.lax.dot_general

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.lecun_normal(), (x.shape[-1], 5))
    return self.dot_general(x, w, (((1,), (0,)), ((), ())))


def test_float_backward_reaches_user_modules():
  model = _UserDense()
  params = model.init(jax.random.key(0), X)["params"]
  qmodel = jaxq.quantize_model(model, DYNAMIC_RULES, "qat", backward="float")
  ste = jaxq.quantize_model(model, DYNAMIC_RULES, "qat")
  loss = lambda q: lambda p: jnp.sum(q.apply({"params": p}, X) ** 2)
  g = 2 * jax.jit(ste.apply)({"params": params}, X)
  grads = jax.jit(jax.grad(loss(qmodel)))(params)
  np.testing.assert_allclose(grads["w"], X.T @ g, rtol=1e-4, atol=1e-4)
  assert _distance(grads, jax.jit(jax.grad(loss(ste)))(params)) > 1e-4


@pytest.mark.parametrize("rules", [DYNAMIC_RULES, STATIC_RULES],
                         ids=["dynamic", "static"])
def test_float_backward_same_for_fake_quant_and_int8_forward(rules):
  model = LinenMLP()
  variables = model.init(jax.random.key(0), X)
  if rules is STATIC_RULES:
    cal = jaxq.quantize_model(model, rules, "calibrate")
    _, stats = cal.apply(variables, X, mutable=["quant_stats"])
    # A narrow range, so the clipped estimator zeroes some gradients.
    variables = {**variables, "quant_ranges": jax.tree.map(
        lambda a: a * 0.5, jaxq.act_ranges(cal, stats["quant_stats"]))}
  grads = []
  for int8_forward in (False, True):
    qmodel = jaxq.quantize_model(model, rules, "qat", backward="float",
                                 int8_forward=int8_forward)
    loss = lambda p, x, q=qmodel: jnp.sum(
        q.apply({**variables, "params": p}, x) ** 2)
    grads.append(jax.jit(jax.grad(loss, argnums=(0, 1)))(
        variables["params"], X))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-4), *grads)


def test_float_backward_nnx():
  nnx_model = NnxMLP(nnx.Rngs(0))
  qmodel = jaxq.quantize_model(nnx_model, DYNAMIC_RULES, "qat",
                               backward="float")
  ste = jaxq.quantize_model(nnx_model, DYNAMIC_RULES, "qat")
  loss = lambda m: jnp.sum(m(X) ** 2)
  float_grads = nnx.state(nnx.jit(nnx.grad(loss))(qmodel), nnx.Param)
  ste_grads = nnx.state(nnx.jit(nnx.grad(loss))(ste), nnx.Param)
  assert 1e-4 < _distance(float_grads, ste_grads) < 0.05
  graphdef, state = nnx.split(qmodel)
  # Fake-quant stays: no int8 matmul.
  assert _dots(lambda s: nnx.grad(loss)(nnx.merge(graphdef, s)), state)[0] == 0


# backward="int8".


def test_stochastic_int8_is_unbiased_and_in_range():
  v = jax.random.normal(jax.random.key(0), (4, 64))
  keys = jax.random.split(jax.random.key(1), 512)
  values, scale = jax.jit(jax.vmap(
      lambda k: int8_qat._stochastic_int8(v, 1, k)))(keys)
  assert values.dtype == jnp.int8
  assert int(jnp.max(jnp.abs(values))) <= 127
  np.testing.assert_allclose(scale[0, :, 0],
                             jnp.max(jnp.abs(v), axis=1) / 127, rtol=1e-6)
  mean = jnp.mean(values.astype(jnp.float32) * scale, axis=0)
  # One rounding's error is below a scale step; the mean of 512 is ~20x less.
  step = float(jnp.max(scale))
  assert float(jnp.max(jnp.abs(mean - v))) < 0.2 * step


def test_uniform_noise_is_uniform_and_seeded():
  seed = jnp.array([3, 5], jnp.uint32)
  u = np.asarray(int8_qat._uniform_noise(seed, (64, 256)))
  assert u.dtype == np.float32 and u.min() >= 0.0 and u.max() < 1.0
  # 16 bins of 1024 expected draws each: a few sigma (32) of slack.
  counts = np.histogram(u, bins=16, range=(0.0, 1.0))[0]
  assert np.all(np.abs(counts - 1024) < 160), counts
  # Neighbours along either axis are uncorrelated.
  for a, b in ((u[:, 1:], u[:, :-1]), (u[1:], u[:-1])):
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.03
  other = np.asarray(int8_qat._uniform_noise(seed + 1, (64, 256)))
  assert np.mean(other == u) < 0.01
  np.testing.assert_array_equal(
      int8_qat._uniform_noise(seed, (64, 256)), u)  # Deterministic.


class _Wide(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(64)(nn.relu(nn.Dense(128)(x)))


def test_int8_backward_compiles_to_int8_dots():
  # Each backward matmul contracts its left operand's last axis: XLA:CPU
  # widens an int8 dot contracting the first axis to int32 (and runs it
  # ~100x slower), which the compiled program would show as an "int" dot.
  model = _Wide()
  x = jax.random.normal(jax.random.key(0), (64, 32))
  params = model.init(jax.random.key(1), x)["params"]
  qmodel = jaxq.quantize_model(model, DYNAMIC_RULES, "qat", int8_forward=True,
                               backward="int8")
  grad = jax.jit(jax.grad(lambda p: jnp.sum(qmodel.apply(
      {"params": p}, x, rngs={"jaxq": KEY}) ** 2)))
  text = grad.lower(params).compile().as_text()
  kinds = [m.kind for m in hlo.parse_hlo(text, jax.default_backend())]
  # 2 forward, 2 dw, 1 dx (the input's own gradient is not asked for).
  assert kinds == ["int8"] * 5, kinds


@pytest.mark.parametrize("rules", [DYNAMIC_RULES, STATIC_RULES],
                         ids=["dynamic", "static"])
def test_int8_backward_runs_int8_dots_near_the_ste_gradient(rules):
  qmodel, params, grads = _linen(rules, int8_forward=True, backward="int8")
  variables = {"params": params}
  if rules is STATIC_RULES:
    cal = jaxq.quantize_model(LinenMLP(), rules, "calibrate")
    _, stats = cal.apply(variables, X, mutable=["quant_stats"])
    ranges = jaxq.act_ranges(cal, stats["quant_stats"])
    variables = {**variables, "quant_ranges": ranges}
  ste = jaxq.quantize_model(LinenMLP(), rules, "qat")

  def loss(q, p, x, key=KEY):
    return jnp.sum(q.apply({**variables, "params": p}, x,
                           rngs={"jaxq": key}) ** 2)

  grad = jax.jit(jax.grad(lambda p, x, k: loss(qmodel, p, x, k),
                          argnums=(0, 1)))
  # 3 layers: each forward, dx and dw matmul is int8 x int8 -> int32, and
  # no float matmul is left.
  assert _dots(grad, params, X, KEY) == (9, 9)
  reference = jax.jit(jax.grad(lambda p, x: loss(ste, p, x),
                               argnums=(0, 1)))(params, X)
  one = grad(params, X, KEY)
  assert 1e-4 < _distance(one, reference) < 0.1
  # New keys, new noise; the mean over keys converges to the STE gradient.
  keys = jax.random.split(jax.random.key(3), 64)
  assert _distance(grad(params, X, keys[0]), one) > 1e-4
  mean = jax.tree.map(lambda *g: sum(g) / len(g),
                      *[grad(params, X, k) for k in keys])
  assert _distance(mean, reference) < 0.3 * _distance(one, reference)


def test_int8_backward_nnx_draws_from_its_stream():
  model = NnxMLP(nnx.Rngs(0))
  qmodel = jaxq.quantize_model(model, DYNAMIC_RULES, "qat", int8_forward=True,
                               backward="int8", rngs=nnx.Rngs(jaxq=0))
  ste = jaxq.quantize_model(model, DYNAMIC_RULES, "qat")
  loss = lambda m: jnp.sum(m(X) ** 2)
  grad = nnx.jit(nnx.grad(loss))
  first = nnx.state(grad(qmodel), nnx.Param)
  second = nnx.state(grad(qmodel), nnx.Param)  # The stream advanced.
  reference = nnx.state(nnx.jit(nnx.grad(loss))(ste), nnx.Param)
  assert 1e-4 < _distance(first, reference) < 0.1
  assert _distance(second, first) > 1e-4
  graphdef, state = nnx.split(qmodel)
  int8, total = _dots(lambda s: nnx.grad(loss)(nnx.merge(graphdef, s)),
                      state)
  assert int8 == total == 9  # 3 forward, 3 dw, 3 dx


class _EinsumHeads(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Einsum((2, 4, 5), "bhd,hdk->kb")(x)  # Output axes swapped.


def test_int8_backward_einsum_near_the_ste_gradient():
  rules = (jaxq.Rule(r".*", weight=QuantSpec("int8", PerChannel(axis=-1)),
                     act=QuantSpec("int8", PerToken((-2, -1)))),)
  x = X.reshape(16, 2, 4)
  model = _EinsumHeads()
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda q: lambda p, x, k: jnp.sum(
      q.apply({"params": p}, x, rngs={"jaxq": k}) ** 2)
  int8 = jaxq.quantize_model(model, rules, "qat", int8_forward=True,
                             backward="int8")
  ste = jaxq.quantize_model(model, rules, "qat")
  grad = jax.jit(jax.grad(loss(int8), argnums=(0, 1)))
  assert _dots(grad, params, x, KEY) == (3, 3)
  reference = jax.jit(jax.grad(loss(ste), argnums=(0, 1)))(params, x, KEY)
  assert 1e-4 < _distance(grad(params, x, KEY), reference) < 0.1


def test_with_mode_keeps_the_backward():
  qmodel = jaxq.quantize_model(LinenMLP(), DYNAMIC_RULES, "qat",
                               int8_forward=True, backward="int8")
  assert qmodel.with_mode("calibrate").with_mode("qat").backward == "int8"


# The digits CNN: QAT with the int8 backward on its Dense head (the convs
# keep fake-quant) still wins back what 4-bit PTQ loses.

sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "examples"))
import digits_cnn  # noqa: E402


@pytest.mark.slow  # End to end: float training, PTQ, QAT, serving.
def test_digits_qat_with_int8_backward_recovers_ptq_loss():
  data = digits_cnn.load_digits(seed=0)
  config = digits_cnn.TrainConfig(epochs=2, seed=0)
  variables, float_accuracy = digits_cnn.train(data, config, progress=False)
  folded = jaxq.fold_batchnorm(variables, digits_cnn.CONV_BN_PAIRS,
                               model=digits_cnn.DigitsCNN(),
                               batch=data.x_train[:1])
  rules = digits_cnn.rules_for(digits_cnn.WEIGHTS[digits_cnn.LOW_BIT])
  qat, calibrated = digits_cnn.ptq(folded, rules, data, 256)
  ptq_accuracy, _ = digits_cnn.serve(qat, calibrated, data)
  assert ptq_accuracy < float_accuracy - 0.03
  qat = jaxq.quantize_model(digits_cnn.DigitsCNN(), rules, "qat",
                            int8_forward=True, backward="int8")
  frozen = {k: v for k, v in calibrated.items() if k != "params"}
  # Batches are cut from the host arrays: an eager slice of a device array
  # compiles once per offset.
  x_train, y_train = np.asarray(data.x_train), np.asarray(data.y_train)
  batches = x_train.shape[0] // config.batch_size
  steps = config.epochs * batches
  tx = digits_cnn.make_qat_optimizer(config, digits_cnn.QUICK_QAT, steps)

  @jax.jit
  def step(params, opt_state, x, y, key):
    def loss_fn(params):
      logits = qat.apply({"params": params, **frozen}, x, train=False,
                         rngs={"jaxq": key})
      return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y]
                      ) * -1
    updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state,
                                   params)
    return jax.tree.map(jnp.add, params, updates), opt_state

  assert _dots(lambda p: jax.grad(lambda p: jnp.sum(qat.apply(
      {"params": p, **frozen}, jnp.asarray(x_train[:4]), train=False,
      rngs={"jaxq": KEY})))(p), calibrated["params"])[0] == 3
  params = calibrated["params"]
  opt_state = tx.init(params)
  for i in range(steps):
    b = i % batches
    x = x_train[b * config.batch_size:(b + 1) * config.batch_size]
    y = y_train[b * config.batch_size:(b + 1) * config.batch_size]
    params, opt_state = step(params, opt_state, x, y,
                             jax.random.fold_in(KEY, i))
  qat_accuracy, _ = digits_cnn.serve(qat, {**calibrated, "params": params},
                                     data)
  assert qat_accuracy - ptq_accuracy > 0.5 * (float_accuracy - ptq_accuracy)
