"""ConvTranspose (linen and nnx) in serve mode: `jaxq.conv` on low-bit values.

Serve re-implements the layer's ``__call__`` (``lax.conv_transpose`` takes
no op), so each case checks it against QAT (the float layer on fake-quant
operands, itself checked against flax's float layer on fake-quant kernel
and input) for the layer's paddings, strides, dilations, kernel layouts and
input ranks, and that the jaxpr convolves int8 values into int32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq
from jaxq import PerChannel, PerTensor, QuantSpec
from jaxq.flax import QuantStat

import flax_models as fm

KEY = jax.random.key(0)
A8 = QuantSpec("int8", PerTensor())
A8_STATIC = fm.A8_STATIC
W8 = fm.W8  # Per output channel of (*window, in, out) kernels.
W8_TRANSPOSED = QuantSpec("int8", PerChannel(axis=-2))  # (*window, out, in).


@dataclasses.dataclass(frozen=True)
class Case:
  """One ConvTranspose layer, its input shape and its specs."""

  name: str
  settings: dict[str, Any]
  input_shape: tuple[int, ...]
  weight: QuantSpec
  act: QuantSpec | None = A8
  features: int = 4
  kernel_size: tuple[int, ...] = (3, 2)


CASES = [
    Case("same-s22", dict(strides=(2, 2)), (2, 5, 6, 3), W8),
    Case("valid-s12-transposed", dict(strides=(1, 2), padding="VALID",
                                      transpose_kernel=True),
         (2, 5, 6, 3), W8_TRANSPOSED),
    Case("pairs-dilated", dict(strides=(2, 2), padding=((1, 2), (0, 1)),
                               kernel_dilation=(2, 1)), (2, 5, 6, 3), W8),
    Case("circular-s22-transposed", dict(strides=(2, 2), padding="CIRCULAR",
                                         transpose_kernel=True),
         (2, 5, 6, 3), W8_TRANSPOSED),
    Case("circular-s12-no-bias", dict(strides=(1, 2), padding="CIRCULAR",
                                      use_bias=False), (2, 5, 6, 3), W8),
    Case("same-dilated-transposed-no-bias-batch2",
         dict(strides=2, kernel_dilation=2, transpose_kernel=True,
              use_bias=False), (2, 3, 5, 6, 3), W8_TRANSPOSED),
    Case("valid-1d-static", dict(strides=2, padding="VALID"), (3, 7, 3), W8,
         act=A8_STATIC, kernel_size=(4,)),
    Case("same-transposed-static", dict(strides=(2, 1), transpose_kernel=True),
         (2, 5, 6, 3), W8_TRANSPOSED, act=A8_STATIC),
    Case("int4", dict(strides=(2, 2)), (2, 5, 6, 3),
         QuantSpec("int4", PerChannel(axis=-1))),
    Case("fp8", dict(strides=(2, 2), padding="VALID"), (2, 5, 6, 3),
         QuantSpec("float8_e4m3fn", PerChannel(axis=-1)),
         act=QuantSpec("float8_e4m3fn")),
]


def _models(case: Case, **changes: Any) -> tuple[nn.ConvTranspose,
                                                 dict[str, Any],
                                                 nnx.ConvTranspose]:
  """The linen layer with its variables, and an nnx twin holding them."""
  settings = {**case.settings, **changes}
  x = jnp.zeros(case.input_shape)
  linen_model = nn.ConvTranspose(case.features, case.kernel_size, **settings)
  variables = linen_model.init(KEY, x)
  nnx_model = nnx.ConvTranspose(case.input_shape[-1], case.features,
                                case.kernel_size, rngs=nnx.Rngs(0),
                                **settings)
  nnx_model.kernel.set_value(variables["params"]["kernel"])
  if nnx_model.bias is not None:
    # A non-zero bias, so that adding it is checked too.
    bias = jnp.linspace(-0.5, 0.5, case.features)
    nnx_model.bias.set_value(bias)
    variables = {"params": {**variables["params"], "bias": bias}}
  return linen_model, variables, nnx_model


def _input(case: Case) -> jax.Array:
  return jax.random.normal(jax.random.key(1), case.input_shape)


def _linen_qat_and_serve(model: nn.Module, variables: Any, x: jax.Array,
                         rules: list[jaxq.Rule]
                         ) -> tuple[jax.Array, jax.Array, Any]:
  """(qat output, serve output, act ranges) after calibrating on ``x``."""
  cal = jaxq.quantize_model(model, rules, "calibrate")
  _, stats = cal.apply(variables, x, mutable=["quant_stats"])
  stats = stats["quant_stats"]
  ranges = jaxq.act_ranges(cal, stats)
  qat_out = cal.with_mode("qat").apply({**variables, "quant_ranges": ranges},
                                       x)
  serving, _ = jaxq.convert(cal, variables, stats)
  serve_out = cal.with_mode("serve").apply(serving, x)
  return qat_out, serve_out, ranges


def _nnx_qat_and_serve(model: nnx.Module, x: jax.Array,
                       rules: list[jaxq.Rule]
                       ) -> tuple[jax.Array, jax.Array]:
  """(qat output, serve output) after calibrating on ``x``."""
  cal = jaxq.quantize_model(model, rules, "calibrate")
  cal(x)
  stats = nnx.state(cal, QuantStat)
  qat = jaxq.quantize_model(model, rules, "qat")
  if any(layer.act is not None and not layer.act.dynamic
         for layer in jaxq.layers(qat).values()):
    nnx.update(qat, jaxq.act_ranges(qat, stats))
  serve = jaxq.quantize_model(model, rules, "serve")
  serving, _ = jaxq.convert(serve, nnx.state(model), stats)
  nnx.update(serve, serving)
  return qat(x), serve(x)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_serve_equals_qat(case):
  linen_model, variables, nnx_model = _models(case)
  x = _input(case)
  rules = [jaxq.Rule(r".*", weight=case.weight, act=case.act)]
  qat_out, serve_out, ranges = _linen_qat_and_serve(linen_model, variables, x,
                                                    rules)

  # QAT is the float layer on the fake-quant kernel and input.
  params = variables["params"]
  k_hat = jaxq.fake_quant(params["kernel"], case.weight)
  x_hat = x
  if case.act is not None:
    amax = None if case.act.dynamic else ranges["act"]["amax"]
    x_hat = jaxq.fake_quant(x, case.act, amax=amax)
  expected = linen_model.apply({"params": {**params, "kernel": k_hat}}, x_hat)
  scale = fm.max_abs(expected)
  np.testing.assert_allclose(qat_out, expected, rtol=1e-5, atol=1e-6 * scale)
  float_out = linen_model.apply(variables, x)
  assert fm.max_abs(qat_out - float_out) > 1e-4 * scale  # Quantized.

  assert serve_out.shape == float_out.shape
  np.testing.assert_allclose(serve_out, qat_out, atol=1e-5 * scale)
  nnx_qat, nnx_serve = _nnx_qat_and_serve(nnx_model, x, rules)
  np.testing.assert_allclose(nnx_qat, qat_out, rtol=1e-6, atol=1e-6 * scale)
  np.testing.assert_allclose(nnx_serve, serve_out, rtol=1e-6,
                             atol=1e-6 * scale)


@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_serve_convolves_int8_into_int32(transpose_kernel):
  case = Case("int8", dict(strides=(2, 2), transpose_kernel=transpose_kernel),
              (2, 5, 6, 3), W8_TRANSPOSED if transpose_kernel else W8)
  linen_model, variables, nnx_model = _models(case)
  x = _input(case)
  rules = [jaxq.Rule(r".*", weight=case.weight, act=case.act)]
  serving = fm.assert_serves_int8_conv(linen_model, variables, nnx_model,
                                      rules, x)
  assert serving["params"]["kernel"].values.dtype == jnp.int8


def test_transposed_kernel_with_input_channel_scales():
  """``PerChannel(-1)`` of a (*window, out, in) kernel varies along the
  contraction: integer inputs cannot run an integer conv, so serve falls
  back (dequantized input, low-bit kernel; issue 13: serve what QAT
  accepted), still equals QAT, and `LayerInfo.serve_fallback` names the
  axis to use for the integer path; float inputs (weight-only) dequantize
  and still equal QAT."""
  case = Case("transposed", dict(strides=(2, 2), transpose_kernel=True),
              (2, 5, 6, 3), W8)
  linen_model, variables, nnx_model = _models(case)
  x = _input(case)
  rules = [jaxq.Rule(r".*", weight=case.weight, act=A8)]
  qat_out, serve_out, _ = _linen_qat_and_serve(linen_model, variables, x,
                                               rules)
  np.testing.assert_allclose(serve_out, qat_out,
                             atol=1e-5 * fm.max_abs(qat_out))
  serve = jaxq.quantize_model(linen_model, rules, "serve")
  serve.apply(variables, x)
  assert "PerChannel(axis=-2)" in jaxq.layers(serve)[""].serve_fallback
  nnx_qat = jaxq.quantize_model(nnx_model, rules, "qat")
  nnx_serve = jaxq.quantize_model(nnx_model, rules, "serve")
  np.testing.assert_allclose(nnx_serve(x), nnx_qat(x),
                             atol=1e-5 * fm.max_abs(qat_out))

  weight_only = [jaxq.Rule(r".*", weight=case.weight)]
  qat_out, serve_out, _ = _linen_qat_and_serve(linen_model, variables, x,
                                               weight_only)
  np.testing.assert_allclose(serve_out, qat_out,
                             atol=1e-5 * fm.max_abs(qat_out))


def test_transposed_kernel_with_ragged_groups_along_the_window():
  """Groups of 2 along a window of 3 (2 + 1): reversing the window would put
  the short group first, so the kernel is reversed dequantized, and serve
  still equals QAT."""
  case = Case("transposed-ragged", dict(strides=(2, 2), transpose_kernel=True),
              (2, 5, 6, 3), QuantSpec("int8", jaxq.PerGroup(axis=0, size=2)))
  linen_model, variables, _ = _models(case)
  x = _input(case)
  rules = [jaxq.Rule(r".*", weight=case.weight, act=A8)]
  qat_out, serve_out, _ = _linen_qat_and_serve(linen_model, variables, x,
                                               rules)
  np.testing.assert_allclose(serve_out, qat_out,
                             atol=1e-5 * fm.max_abs(qat_out))


def test_mask_applies_before_quantizing():
  """A masked kernel serves from its float weights (masked, then quantized,
  as QAT does) and from its QArray (`jaxq.convert` quantizes the masked
  kernel, so serve does not mask it again)."""
  case = Case("masked", dict(strides=(2, 2)), (2, 5, 6, 3), W8)
  mask = jnp.tril(jnp.ones((3, 2, 3, 4))).at[0, 0, 0].set(0.0)
  linen_model, variables, nnx_model = _models(case, mask=mask)
  x = _input(case)
  rules = [jaxq.Rule(r".*", weight=case.weight, act=case.act)]
  qat = jaxq.quantize_model(linen_model, rules, "qat")
  qat_out = qat.apply(variables, x)
  params = variables["params"]
  k_hat = jaxq.fake_quant(params["kernel"] * mask, case.weight)
  expected = nn.ConvTranspose(case.features, case.kernel_size,
                              **case.settings).apply(
                                  {"params": {**params, "kernel": k_hat}},
                                  jaxq.fake_quant(x, case.act))
  scale = fm.max_abs(expected)
  np.testing.assert_allclose(qat_out, expected, rtol=1e-5, atol=1e-6 * scale)

  serve = qat.with_mode("serve")
  np.testing.assert_allclose(serve.apply(variables, x), qat_out,
                             atol=1e-5 * scale)
  serving, _ = jaxq.convert(qat, variables)
  np.testing.assert_array_equal(jaxq.dequantize(serving["params"]["kernel"]),
                                k_hat)
  np.testing.assert_allclose(serve.apply(serving, x), qat_out,
                             atol=1e-5 * scale)

  nnx_serve = jaxq.quantize_model(nnx_model, rules, "serve")
  np.testing.assert_allclose(nnx_serve(x), qat_out, atol=1e-5 * scale)
  nnx_serving, _ = jaxq.convert(nnx_serve, nnx.state(nnx_model))
  nnx.update(nnx_serve, nnx_serving)
  np.testing.assert_allclose(nnx_serve(x), qat_out, atol=1e-5 * scale)


@pytest.mark.parametrize("padding", ["SAME", "CIRCULAR"])
def test_skipped_layer_serves_the_float_layer(padding):
  """linen serve runs every ConvTranspose through its re-implemented call,
  which equals flax's own on float operands."""
  case = Case("float", dict(strides=(2, 1), padding=padding,
                            transpose_kernel=True, kernel_dilation=(1, 2)),
              (2, 3, 5, 6, 3), W8)
  linen_model, variables, _ = _models(case)
  x = _input(case)
  serve = jaxq.quantize_model(linen_model, [jaxq.Rule(r".*", skip=True)],
                              "serve")
  float_out = linen_model.apply(variables, x)
  # Equal up to float accumulation order (flax swaps the kernel's axes, serve
  # reads them in place).
  np.testing.assert_allclose(serve.apply(variables, x), float_out, rtol=1e-6,
                             atol=1e-6 * fm.max_abs(float_out))


# End to end: a tiny decoder calibrated, converted and served.


class LinenDecoder(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3))(x))
    x = nn.relu(nn.ConvTranspose(4, (3, 3), strides=(2, 2))(x))
    return nn.ConvTranspose(2, (4, 4), strides=(2, 2), transpose_kernel=True,
                            padding="CIRCULAR")(x)


class NnxDecoder(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)
    self.up1 = nnx.ConvTranspose(6, 4, (3, 3), strides=(2, 2), rngs=rngs)
    self.up2 = nnx.ConvTranspose(4, 2, (4, 4), strides=(2, 2),
                                 transpose_kernel=True, padding="CIRCULAR",
                                 rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv(x))
    return self.up2(nnx.relu(self.up1(x)))


DECODER_RULES = [
    jaxq.Rule(r".*up2|ConvTranspose_1", weight=W8_TRANSPOSED, act=A8_STATIC),
    jaxq.Rule(r".*", weight=W8, act=A8_STATIC),
]


def _batches() -> list[jax.Array]:
  keys = jax.random.split(jax.random.key(3), 3)
  return [jax.random.normal(k, (2, 4, 4, 3)) for k in keys]


def test_decoder_calibrate_convert_serve_linen():
  model = LinenDecoder()
  batches = _batches()
  variables = model.init(KEY, batches[0])
  cal = jaxq.quantize_model(model, DECODER_RULES, "calibrate")
  result = jaxq.calibrate(cal, variables, batches, progress=False)
  serving, report = jaxq.convert(cal, variables, result.stats)
  assert report.quantized_bytes < 0.6 * report.float_bytes
  assert sorted(jaxq.layers(cal)) == ["ConvTranspose_0", "ConvTranspose_1",
                                      "Conv_0"]
  qat = cal.with_mode("qat")
  qat_variables = {**variables,
                   "quant_ranges": jaxq.act_ranges(cal, result.stats)}
  x = batches[1]
  qat_out = jax.jit(qat.apply)(qat_variables, x)
  serve_out = jax.jit(cal.with_mode("serve").apply)(serving, x)
  float_out = model.apply(variables, x)
  scale = fm.max_abs(float_out)
  assert serve_out.shape == (2, 16, 16, 2)
  np.testing.assert_allclose(serve_out, qat_out, atol=1e-5 * scale)
  assert 1e-4 * scale < fm.max_abs(qat_out - float_out) < 0.1 * scale


def test_decoder_calibrate_convert_serve_nnx():
  model = NnxDecoder(nnx.Rngs(0))
  batches = _batches()
  cal = jaxq.quantize_model(model, DECODER_RULES, "calibrate")
  result = jaxq.calibrate(cal, None, batches, progress=False)
  qat = jaxq.quantize_model(model, DECODER_RULES, "qat")
  nnx.update(qat, jaxq.act_ranges(qat, result.stats))
  serve = jaxq.quantize_model(model, DECODER_RULES, "serve")
  serving, _ = jaxq.convert(serve, nnx.state(model), result.stats)
  nnx.update(serve, serving)
  assert serve.up2.kernel.get_value().values.dtype == jnp.int8
  x = batches[1]
  forward = nnx.jit(lambda m, x: m(x))
  qat_out, serve_out = forward(qat, x), forward(serve, x)
  scale = fm.max_abs(model(x))
  np.testing.assert_allclose(serve_out, qat_out, atol=1e-5 * scale)
  assert 1e-4 * scale < fm.max_abs(qat_out - model(x)) < 0.1 * scale
