"""linen: quantize_model in qat, calibrate and serve mode, and convert."""

from __future__ import annotations

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxq
from jaxq import PerChannel, PerGroup, PerTensor, QuantSpec

import flax_models as fm

KEY = jax.random.key(0)


@functools.cache
def _setup(name: str) -> tuple[nn.Module, dict[str, Any], jax.Array]:
  """The model, its variables and an input, built once per model for all
  the tests (initializing compiles a program of random draws); the tests
  only read them."""
  model_cls, make_input = fm.LINEN[name]
  model = model_cls()
  x = make_input(jax.random.key(1))
  return model, jax.jit(model.init)(KEY, x), x


def _calibrated(model, variables, x, rules):
  """Calibrates on two batches; returns the calibrate-mode model and stats."""
  cal = jaxq.quantize_model(model, rules, "calibrate")
  step = jax.jit(lambda v, x: cal.apply(v, x, mutable=["quant_stats"]))
  _, stats = step(variables, x)
  _, stats = step({**variables, **stats}, 0.5 * x if x.dtype.kind == "f"
                  else x[::-1])
  return cal, stats["quant_stats"]


def _np_fake_quant_columns(a: np.ndarray, bits: int = 8) -> np.ndarray:
  """Symmetric narrow-range per-column fake quant, in float64 numpy."""
  qmax = 2 ** (bits - 1) - 1
  scale = np.abs(a).max(axis=0, keepdims=True) / qmax
  return np.clip(np.round(a / scale), -qmax, qmax) * scale


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
def test_guarantees(name):
  """Skip-all QAT is the float model; serve equals QAT; grads reach all."""
  model, variables, x = _setup(name)
  skipped = jaxq.quantize_model(model, fm.SKIP_RULES, "qat")
  cal = jaxq.quantize_model(model, fm.STATIC_RULES, "calibrate")
  # Fewer compilations: the float, skip-all and calibration passes in one
  # program, and the QAT output from the gradient's program.
  float_out, skipped_out, (cal_out, stats) = jax.jit(lambda v, x: (
      model.apply(v, x), skipped.apply(v, x),
      cal.apply(v, x, mutable=["quant_stats"])))(variables, x)
  np.testing.assert_array_equal(skipped_out, float_out)
  np.testing.assert_array_equal(cal_out, float_out)
  stats = stats["quant_stats"]
  ranges = jaxq.act_ranges(cal, stats)
  qat = cal.with_mode("qat")
  qat_variables = {**variables, "quant_ranges": ranges}

  def loss(params):
    out = qat.apply({**qat_variables, "params": params}, x)
    return jnp.sum(out ** 2), out

  grads, qat_out = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  serving, report = jaxq.convert(cal, variables, stats)
  serve_out = jax.jit(cal.with_mode("serve").apply)(serving, x)
  scale = fm.max_abs(float_out)
  np.testing.assert_allclose(serve_out, qat_out, atol=1e-5 * scale)
  # Quantization did something, within int8's error.
  assert 1e-4 * scale < fm.max_abs(qat_out - float_out) < 0.1 * scale
  assert report.quantized_bytes < 0.5 * report.float_bytes
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)


def test_serve_dynamic_per_token_equals_qat():
  model, variables, x = _setup("transformer")
  qat = jaxq.quantize_model(model, fm.DYNAMIC_RULES, "qat")
  qat_out = jax.jit(qat.apply)(variables, x)  # Also traces the layers.
  serving, _ = jaxq.convert(qat, variables)
  serve = jax.jit(qat.with_mode("serve").apply)
  serve_out = serve(serving, x)
  np.testing.assert_allclose(serve_out, qat_out,
                             atol=1e-5 * fm.max_abs(qat_out))
  # Serve also quantizes float weights on the fly, identically.
  np.testing.assert_allclose(serve(variables, x), serve_out, rtol=1e-6,
                             atol=1e-6)


def test_serve_runs_int8_dot_general_with_int32_accumulation():
  model, variables, x = _setup("mlp")
  rules = [jaxq.Rule(r".*", weight=fm.W8, act=QuantSpec("int8"))]
  qat = jaxq.quantize_model(model, rules, "qat")
  qat.apply(variables, x)
  serving, _ = jaxq.convert(qat, variables)
  jaxpr = jax.make_jaxpr(qat.with_mode("serve").apply)(serving, x)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 3
  for eqn in dots:
    assert [v.aval.dtype for v in eqn.invars] == [jnp.int8, jnp.int8]
    assert eqn.outvars[0].aval.dtype == jnp.int32


def test_qat_dense_matches_numpy_reference():
  dense = nn.Dense(5)
  x = jax.random.normal(jax.random.key(2), (3, 4))
  variables = dense.init(KEY, x)
  rules = [jaxq.Rule(r".*", weight=fm.W8, act=QuantSpec("int8"))]
  out = jaxq.quantize_model(dense, rules).apply(variables, x)
  xs = np.asarray(x, np.float64)
  sx = np.abs(xs).max() / 127
  x_hat = np.clip(np.round(xs / sx), -127, 127) * sx
  kernel = np.asarray(variables["params"]["kernel"], np.float64)
  expected = x_hat @ _np_fake_quant_columns(kernel) + np.asarray(
      variables["params"]["bias"])
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_embed_quantizes_rows_and_attend():
  vocab = 7
  embed = nn.Embed(vocab, 4)
  ids = jnp.array([[0, 3, 3], [6, 1, 2]])
  variables = embed.init(KEY, ids)
  rules = [jaxq.Rule(r".*", weight=QuantSpec("int8", PerChannel(axis=-1)),
                     act=QuantSpec("int8"))]
  qmodel = jaxq.quantize_model(embed, rules)
  table = np.asarray(variables["params"]["embedding"], np.float64)
  rows_hat = _np_fake_quant_columns(table.T).T  # One scale per row.
  np.testing.assert_allclose(qmodel.apply(variables, ids), rows_hat[ids],
                             rtol=1e-6, atol=1e-7)
  info = jaxq.layers(qmodel)[""]
  assert info.weight.granularity == PerChannel(axis=0) and info.act is None
  serving, report = jaxq.convert(qmodel, variables)
  assert serving["params"]["embedding"].values.dtype == jnp.int8
  assert report.layers[0].quantized_bytes == vocab * 4 + vocab * 4
  serve = qmodel.with_mode("serve")
  np.testing.assert_allclose(serve.apply(serving, ids), rows_hat[ids],
                             rtol=1e-6, atol=1e-7)
  query = jax.random.normal(jax.random.key(3), (2, 4))
  np.testing.assert_allclose(
      serve.apply(serving, query, method="attend"),
      np.asarray(query, np.float64) @ rows_hat.T, rtol=1e-5, atol=1e-6)


def test_calibrate_records_running_max_and_keeps_float_outputs():
  model, variables, x = _setup("mlp")
  cal, stats = _calibrated(model, variables, x, fm.STATIC_RULES)
  np.testing.assert_array_equal(cal.apply(variables, x,
                                          mutable=["quant_stats"])[0],
                                model.apply(variables, x))
  # The first layer sees x and then 0.5 * x: the range is max |x|.
  ranges = jaxq.act_ranges(cal, stats)
  np.testing.assert_allclose(ranges["Dense_0"]["act"]["amax"],
                             np.abs(np.asarray(x)).max().reshape(1, 1))
  np.testing.assert_allclose(
      stats["Dense_0"]["weight"].amax,
      np.abs(np.asarray(variables["params"]["Dense_0"]["kernel"])).max(
          axis=0, keepdims=True))
  # init never records: init data is not calibration data.
  assert "quant_stats" not in cal.init(KEY, x)


def test_calibrate_needs_mutable_stats():
  model, variables, x = _setup("mlp")
  cal = jaxq.quantize_model(model, fm.STATIC_RULES, "calibrate")
  with pytest.raises(ValueError, match="mutable"):
    cal.apply(variables, x)


def test_calibrate_nonfinite_raises_naming_module_or_counts():
  model, variables, x = _setup("mlp")
  bad = x.at[0, 0].set(jnp.nan)
  cal = jaxq.quantize_model(model, fm.STATIC_RULES, "calibrate")
  with pytest.raises(Exception, match="Dense_0"):
    jax.block_until_ready(cal.apply(variables, bad, mutable=["quant_stats"]))
  counting = jaxq.quantize_model(model, fm.STATIC_RULES, "calibrate",
                                 on_nonfinite="count")
  _, stats = jax.jit(lambda v, x: counting.apply(
      v, x, mutable=["quant_stats"]))(variables, bad)
  state = stats["quant_stats"]["Dense_0"]["act"]
  assert int(jaxq.calibration.nonfinite_count(state)) == 1
  np.testing.assert_allclose(state.amax, np.nanmax(np.abs(np.asarray(bad))))


def test_static_act_without_ranges_raises():
  model, variables, x = _setup("mlp")
  qat = jaxq.quantize_model(model, fm.STATIC_RULES, "qat")
  with pytest.raises(ValueError, match="Dense_0.*no calibrated range"):
    qat.apply(variables, x)


def test_conv_transpose_qat_and_serve():
  """QAT fake-quantizes the kernel; serve runs jaxq.conv on the converted
  kernel and equals QAT (tests/flax/test_flax_conv_transpose.py covers the
  layer's settings)."""
  model = nn.ConvTranspose(3, (3, 3), strides=(2, 2))
  x = jax.random.normal(jax.random.key(4), (1, 4, 4, 2))
  variables = model.init(KEY, x)
  spec = QuantSpec("int8", PerTensor())
  rules = [jaxq.Rule(r".*", weight=spec, act=spec)]
  kernel = variables["params"]["kernel"]
  expected = model.apply(
      {"params": {**variables["params"],
                  "kernel": jaxq.fake_quant(kernel, spec)}},
      jaxq.fake_quant(x, spec))
  qat = jaxq.quantize_model(model, rules, "qat")
  chex.assert_trees_all_close(qat.apply(variables, x), expected)
  serving, _ = jaxq.convert(qat, variables)
  assert serving["params"]["kernel"].values.dtype == jnp.int8
  np.testing.assert_allclose(qat.with_mode("serve").apply(serving, x),
                             expected, atol=1e-5 * fm.max_abs(expected))


class _UserMatmul(nn.Module):
  """A user layer with an injectable ``dot_general``."""
  dot_general: object = jax.lax.dot_general

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(1.0), (x.shape[-1], 6))
    scores = self.dot_general(x, x, (((1,), (1,)), ((), ())))  # Not a weight.
    return self.dot_general(scores @ x, w, (((1,), (0,)), ((), ())))


def test_user_module_with_dot_general_attribute():
  model = _UserMatmul()
  x = jax.random.normal(jax.random.key(5), (3, 4))
  variables = model.init(KEY, x)
  spec = QuantSpec("int8", PerChannel(axis=-1))
  rules = [jaxq.Rule(r".*", weight=spec, act=QuantSpec("int8"))]
  qat = jaxq.quantize_model(model, rules)
  h = (x @ x.T) @ x
  expected = jaxq.fake_quant(h, QuantSpec("int8")) @ jaxq.fake_quant(
      variables["params"]["w"], spec)
  np.testing.assert_allclose(qat.apply(variables, x), expected, rtol=1e-5)
  info = jaxq.layers(qat)[""]
  assert (info.weight_name, info.weight_shape) == ("w", (4, 6))
  serving, _ = jaxq.convert(qat, variables)
  np.testing.assert_allclose(qat.with_mode("serve").apply(serving, x),
                             expected, rtol=1e-5, atol=1e-5)


def test_qat_trains_with_optax():
  model, variables, x = _setup("mlp")
  target = jnp.sin(jnp.arange(12.0).reshape(4, 3))
  qat = jaxq.quantize_model(model, fm.DYNAMIC_RULES, "qat")
  optimizer = optax.adam(1e-2)
  params = variables["params"]
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: jnp.mean(
        (qat.apply({"params": p}, x) - target) ** 2))(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(20):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0]
  chex.assert_trees_all_equal_structs(params, variables["params"])


def test_convert_reports_packed_int4_and_rejects_mismatched_params():
  model, variables, x = _setup("mlp")
  rules = [jaxq.Rule(r".*", weight=QuantSpec("int4", PerGroup(axis=0, size=8)))]
  qat = jaxq.quantize_model(model, rules)
  qat.apply(variables, x)
  serving, report = jaxq.convert(qat, variables)
  first = report.layers[0]
  assert first.path == "Dense_0"
  assert first.float_bytes == 8 * 16 * 4
  assert first.quantized_bytes == 8 * 16 // 2 + 1 * 16 * 4  # Packed + scales.
  assert report.quantized_bytes < report.float_bytes
  bad = jax.tree.map(lambda a: a, variables)
  bad["params"]["Dense_0"]["kernel"] = jnp.zeros((9, 16))
  with pytest.raises(ValueError, match=r"Dense_0.*\(9, 16\).*\(8, 16\)"):
    jaxq.convert(qat, bad)
  del bad["params"]["Dense_1"]
  with pytest.raises(ValueError, match="Dense_1/kernel"):
    jaxq.convert(qat, {"params": {k: v for k, v in bad["params"].items()
                                  if k != "Dense_0"} | {
                                      "Dense_0": variables["params"]["Dense_0"]
                                  }})
  with pytest.raises(ValueError, match="traced"):
    jaxq.convert(jaxq.quantize_model(model, rules), variables)
