"""Serve runs what QAT accepted: the fallback of a conv with per-token acts.

A catch-all ``PerToken()`` act rule also matches convolutions, whose input
scales then vary along the summed window; QAT trains such a model, so serve
must run it too: integer ops where the scales allow, and the documented
fallback (dequantized input, low-bit kernel) where they don't, reported in
``LayerInfo.serve_fallback``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxq
from jaxq import PerChannel, QuantSpec

import flax_models as fm

RULES = (jaxq.Rule(r".*", weight=fm.W8, act=fm.A8_TOKEN),)
CONVS = ("Conv_0", "Conv_1", "Conv_2")


def _serve(model, variables, x):
  qat = jaxq.quantize_model(model, RULES, "qat")
  y_qat = qat.apply(variables, x)
  serving, _ = jaxq.convert(qat, variables)
  serve = qat.with_mode("serve")
  return qat, serve, serving, y_qat


def _dot_dtypes(jaxpr) -> list[list[jnp.dtype]]:
  return [[v.aval.dtype for v in e.invars] for e in jaxpr.eqns
          if e.primitive.name == "dot_general"]


def test_linen_cnn_per_token_serves_equal_to_qat_and_reports_fallback():
  model = fm.LinenCNN()
  x = fm.cnn_input(jax.random.key(1))
  variables = model.init(jax.random.key(0), x)
  qat, serve, serving, y_qat = _serve(model, variables, x)
  y_serve = serve.apply(serving, x)
  np.testing.assert_allclose(y_serve, y_qat, rtol=1e-4,
                             atol=1e-4 * fm.max_abs(y_qat))
  layers = jaxq.layers(qat)
  for path in CONVS:
    assert "per tensor or per example" in layers[path].serve_fallback, path
  assert layers["Dense_0"].serve_fallback is None
  # The convs run in float on the dequantized input; the Dense stays int8.
  jaxpr = jax.make_jaxpr(serve.apply)(serving, x).jaxpr
  convs = list(fm.conv_equations(jaxpr))
  assert len(convs) == 3
  assert all(v.aval.dtype == jnp.float32 for e in convs for v in e.invars)
  assert _dot_dtypes(jaxpr) == [[jnp.int8, jnp.int8]]


def test_per_tensor_convs_keep_the_integer_op():
  model = fm.LinenCNN()
  x = fm.cnn_input(jax.random.key(1))
  variables = model.init(jax.random.key(0), x)
  rules = (jaxq.Rule(r".*", weight=fm.W8, act=QuantSpec("int8")),)
  qat = jaxq.quantize_model(model, rules, "qat")
  jax.eval_shape(qat.apply, variables, x)  # Traces the layers.
  assert all(info.serve_fallback is None
             for info in jaxq.layers(qat).values())
  serving, _ = jaxq.convert(qat, variables)
  jaxpr = jax.make_jaxpr(qat.with_mode("serve").apply)(serving, x).jaxpr
  assert all([v.aval.dtype for v in e.invars] == [jnp.int8, jnp.int8]
             for e in fm.conv_equations(jaxpr))


def test_conv_transpose_with_per_input_channel_kernel_scales_falls_back():
  # Kernel scales along the summed input channel: no integer conv; the
  # fallback serves it equal to QAT instead of refusing.
  model = nn.ConvTranspose(4, (3, 3), strides=(2, 2))
  x = jax.random.normal(jax.random.key(1), (2, 5, 5, 3))
  variables = model.init(jax.random.key(0), x)
  rules = (jaxq.Rule(r".*", weight=QuantSpec("int8", PerChannel(axis=-2)),
                     act=QuantSpec("int8")),)
  qat = jaxq.quantize_model(model, rules, "qat")
  y_qat = qat.apply(variables, x)
  assert "output channel" in jaxq.layers(qat)[""].serve_fallback
  serving, _ = jaxq.convert(qat, variables)
  y_serve = qat.with_mode("serve").apply(serving, x)
  np.testing.assert_allclose(y_serve, y_qat, rtol=1e-4,
                             atol=1e-4 * fm.max_abs(y_qat))


def test_nnx_cnn_per_token_serves_equal_to_qat():
  model = fm.NnxCNN(nnx.Rngs(0))
  x = fm.cnn_input(jax.random.key(1))
  qat = jaxq.quantize_model(model, RULES, "qat")
  y_qat = qat(x)
  serve = jaxq.quantize_model(model, RULES, "serve")
  serving, _ = jaxq.convert(serve, nnx.state(model))
  nnx.update(serve, serving)
  y_serve = serve(x)
  np.testing.assert_allclose(y_serve, y_qat, rtol=1e-4,
                             atol=1e-4 * fm.max_abs(y_qat))


def test_mixed_integer_and_float_formats_serve_by_the_fallback():
  # An fp8 activation with int8 weights: no shared low-bit op exists.
  model = fm.LinenMLP()
  x = fm.mlp_input(jax.random.key(1))
  variables = model.init(jax.random.key(0), x)
  rules = (jaxq.Rule(r".*", weight=fm.W8,
                     act=QuantSpec("float8_e4m3fn")),)
  qat = jaxq.quantize_model(model, rules, "qat")
  y_qat = qat.apply(variables, x)
  assert "cannot share a low-bit op" in jaxq.layers(qat)["Dense_0"
                                                        ].serve_fallback
  serving, _ = jaxq.convert(qat, variables)
  y_serve = qat.with_mode("serve").apply(serving, x)
  np.testing.assert_allclose(y_serve, y_qat, rtol=1e-4,
                             atol=1e-4 * fm.max_abs(y_qat))


def _linen_and_nnx_fallbacks(rules) -> tuple[list, list]:
  """The serve_fallback of each layer, in call order, for the linen and
  the nnx CNN (the same layers); nnx's is known before any call."""
  model = fm.LinenCNN()
  x = fm.cnn_input(jax.random.key(1))
  # Abstract: tracing the layers decides their fallbacks, nothing compiles.
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  qat = jaxq.quantize_model(model, rules, "qat")
  jax.eval_shape(qat.apply, variables, x)
  linen = [jaxq.layers(qat)[p].serve_fallback for p in CONVS + ("Dense_0",)]
  nnx_q = jaxq.quantize_model(fm.NnxCNN(nnx.Rngs(0)), rules, "serve")
  nnx_layers = jaxq.layers(nnx_q)
  nnx_fallbacks = [nnx_layers[p].serve_fallback
                   for p in ("conv1", "depthwise", "conv3", "head")]
  return linen, nnx_fallbacks


def test_nnx_reports_the_same_fallback_as_linen_for_per_token_convs():
  linen, nnx_fallbacks = _linen_and_nnx_fallbacks(RULES)
  assert nnx_fallbacks == linen
  assert all("per tensor or per example" in r for r in nnx_fallbacks[:3])
  assert nnx_fallbacks[3] is None


def test_nnx_reports_the_same_fallback_as_linen_for_kernel_scales():
  rules = (jaxq.Rule(r".*", weight=QuantSpec("int8", PerChannel(axis=-2)),
                     act=QuantSpec("int8")),)
  linen, nnx_fallbacks = _linen_and_nnx_fallbacks(rules)
  assert nnx_fallbacks == linen
  # The depthwise conv's kernel has one input channel: no variation there.
  assert ["output channel" in (r or "") for r in nnx_fallbacks] == [
      True, False, True, False]


def test_nnx_reports_the_same_fallback_as_linen_for_mixed_formats():
  rules = (jaxq.Rule(r".*", weight=fm.W8, act=QuantSpec("float8_e4m3fn")),)
  linen, nnx_fallbacks = _linen_and_nnx_fallbacks(rules)
  assert nnx_fallbacks == linen
  assert all("cannot share a low-bit op" in r for r in nnx_fallbacks)


def test_nnx_per_tensor_layers_report_no_fallback():
  rules = (jaxq.Rule(r".*", weight=fm.W8, act=QuantSpec("int8")),)
  linen, nnx_fallbacks = _linen_and_nnx_fallbacks(rules)
  assert nnx_fallbacks == linen == [None] * 4


def test_nnx_conv_transpose_fallback_matches_linen():
  rules = (jaxq.Rule(r".*", weight=QuantSpec("int8", PerChannel(axis=-2)),
                     act=QuantSpec("int8")),)
  x = jax.random.normal(jax.random.key(1), (2, 5, 5, 3))
  reasons = []
  for transpose_kernel in (False, True):
    model = nn.ConvTranspose(4, (3, 3), transpose_kernel=transpose_kernel)
    qat = jaxq.quantize_model(model, rules, "qat")
    # Abstract: tracing the layer decides its fallback, nothing compiles.
    jax.eval_shape(qat.apply, jax.eval_shape(model.init, jax.random.key(0), x),
                   x)
    layer = nnx.ConvTranspose(3, 4, (3, 3), transpose_kernel=transpose_kernel,
                              rngs=nnx.Rngs(0))
    nnx_q = jaxq.quantize_model(layer, rules, "qat")
    assert jaxq.layers(nnx_q)[""].serve_fallback == (
        jaxq.layers(qat)[""].serve_fallback)
    reasons.append(jaxq.layers(qat)[""].serve_fallback)
  # (*window, in, out) with scales along in falls back; (*window, out, in)
  # with scales along out is the integer op.
  assert "output channel" in reasons[0] and reasons[1] is None
