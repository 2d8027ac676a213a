"""nnx: quantize_model by graph surgery, in qat, calibrate and serve mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxq
from jaxq import PerChannel, QuantSpec
from jaxq.flax import QuantStat

import flax_models as fm


def _setup(name: str):
  model_cls, make_input = fm.NNX[name]
  return model_cls(nnx.Rngs(0)), make_input(jax.random.key(1))


@nnx.jit
def _forward(model, x):
  return model(x)


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_guarantees(name):
  """Skip-all QAT is the float model; serve equals QAT; grads reach all."""
  model, x = _setup(name)
  skipped = jaxq.quantize_model(model, fm.SKIP_RULES)
  cal = jaxq.quantize_model(model, fm.STATIC_RULES, "calibrate")
  # Fewer compilations: the float, skip-all and calibration passes in one
  # program, and the QAT output from the gradient's program.
  float_out, skipped_out, cal_out = nnx.jit(
      lambda a, b, c, x: (a(x), b(x), c(x)))(model, skipped, cal, x)
  np.testing.assert_array_equal(skipped_out, float_out)
  np.testing.assert_array_equal(cal_out, float_out)
  stats = nnx.state(cal, QuantStat)
  qat = jaxq.quantize_model(model, fm.STATIC_RULES, "qat")
  nnx.update(qat, jaxq.act_ranges(qat, stats))

  def loss(m, x):
    out = m(x)
    return jnp.sum(out ** 2), out

  grads, qat_out = nnx.jit(nnx.grad(loss, has_aux=True))(qat, x)
  serve = jaxq.quantize_model(model, fm.STATIC_RULES, "serve")
  serving, report = jaxq.convert(serve, nnx.state(model), stats)
  nnx.update(serve, serving)
  serve_out = _forward(serve, x)
  scale = fm.max_abs(float_out)
  np.testing.assert_allclose(serve_out, qat_out, atol=1e-5 * scale)
  assert 1e-4 * scale < fm.max_abs(qat_out - float_out) < 0.1 * scale
  assert report.quantized_bytes < 0.5 * report.float_bytes
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)
  # The original model is untouched and its params are the quantized one's.
  assert all(not hasattr(m, "jaxq_layer") for _, m in nnx.iter_graph(model))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param),
               nnx.state(qat, nnx.Param))


def test_layers_swapped_in_place_of_originals():
  model, x = _setup("transformer")
  qmodel = jaxq.quantize_model(model, fm.DYNAMIC_RULES)
  assert type(qmodel.up).__name__ == "QuantizedEinsum"
  assert isinstance(qmodel.up, nnx.Einsum)
  infos = jaxq.layers(qmodel)
  assert sorted(infos) == ["attention/key", "attention/out", "attention/query",
                           "attention/value", "down", "embed", "up"]
  assert infos["embed"].weight == QuantSpec("int8", PerChannel(axis=0))
  assert infos["attention/query"].weight_shape == (fm.D, fm.HEADS,
                                                   fm.D // fm.HEADS)
  # A trained float state loads unchanged.
  nnx.update(qmodel, nnx.state(fm.NnxTransformer(nnx.Rngs(7)), nnx.Param))


def test_serve_dynamic_and_multiple_methods():
  model, x = _setup("mlp")
  qat = jaxq.quantize_model(model, fm.DYNAMIC_RULES)
  serve = jaxq.quantize_model(model, fm.DYNAMIC_RULES, "serve")
  serving, _ = jaxq.convert(serve, nnx.state(model))
  nnx.update(serve, serving)
  assert serve.fc1.kernel.get_value().values.dtype == jnp.int8
  for method in ("__call__", "features"):
    run = nnx.jit(lambda m, x, method=method: getattr(m, method)(x))
    np.testing.assert_allclose(run(serve, x), run(qat, x), rtol=1e-5,
                               atol=1e-5)
  expected = jax.nn.relu(
      jaxq.fake_quant(x, fm.A8_TOKEN) @ jaxq.fake_quant(
          model.fc1.kernel.get_value(), fm.W8) + model.fc1.bias.get_value())
  np.testing.assert_allclose(qat.features(x), expected, rtol=1e-5, atol=1e-6)


def test_calibrate_nonfinite_raises_or_counts():
  model, x = _setup("mlp")
  bad = x.at[1, 2].set(jnp.inf)
  cal = jaxq.quantize_model(model, fm.STATIC_RULES, "calibrate")
  with pytest.raises(Exception, match="fc1"):
    jax.block_until_ready(_forward(cal, bad))
  counting = jaxq.quantize_model(model, fm.STATIC_RULES, "calibrate",
                                 on_nonfinite="count")
  _forward(counting, bad)
  _forward(counting, 2.0 * x)
  state = counting.fc1.jaxq_act_stats.get_value()
  assert int(jaxq.calibration.nonfinite_count(state)) == 1
  np.testing.assert_allclose(state.amax, 2.0 * fm.max_abs(x), rtol=1e-6)


def test_qat_trains_with_optax():
  model, x = _setup("cnn")
  target = jnp.ones((x.shape[0], 3))
  rules = [jaxq.Rule(r".*", weight=fm.W8, act=QuantSpec("int8"))]
  qat = jaxq.quantize_model(model, rules)
  optimizer = nnx.Optimizer(qat, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(
        lambda m: jnp.mean((m(x) - target) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(qat, optimizer)) for _ in range(15)]
  assert losses[-1] < 0.5 * losses[0]


def test_bad_spec_raises_at_quantize_model_naming_layer():
  model, _ = _setup("mlp")
  # A group may be ragged (16 in groups of 5), an MX block may not.
  rules = [jaxq.Rule(r"fc2", weight=QuantSpec("int8", jaxq.MX(0)))]
  with pytest.raises(ValueError, match=r"'fc2'.*\(16, 2, 4\).*size 32"):
    jaxq.quantize_model(model, rules)
  rules = [jaxq.Rule(r"fc1", weight=QuantSpec("int8", PerChannel(axis=3)))]
  with pytest.raises(ValueError, match=r"'fc1'.*\(8, 16\).*axis 3"):
    jaxq.quantize_model(model, rules)


def test_convert_rejects_mismatched_state():
  model, _ = _setup("mlp")
  serve = jaxq.quantize_model(model, fm.DYNAMIC_RULES, "serve")
  other = nnx.state(fm.NnxCNN(nnx.Rngs(0)))
  with pytest.raises(ValueError, match="missing.*fc1.*extra.*conv1"):
    jaxq.convert(serve, other)
  static = jaxq.quantize_model(model, fm.STATIC_RULES, "serve")
  with pytest.raises(ValueError, match="no activation statistics for 'fc1'"):
    jaxq.convert(static, nnx.state(model), nnx.State({}))
