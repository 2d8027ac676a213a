"""Masked convolutions (``mask=``) in serve mode, linen and nnx.

``Conv`` and ``ConvTranspose`` compute with ``kernel * mask``, which QAT
fake-quantizes. `jaxq.convert` quantizes that same product, so the `QArray`
carries the mask and serve mode must not multiply by it again; a float
kernel in serve mode (a skipped or act-only layer, or unconverted weights)
is still masked. Serve is checked against QAT, itself checked against the
float layer on fake-quant operands, with a binary mask and with a
non-binary float one, and with learned (LSQ) weight scales.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq
from jaxq import PerTensor, QuantSpec
from jaxq.flax import QuantStat
from jaxq.spec import QArray

import flax_models as fm

W8 = fm.W8  # Per output channel: the kernels' last axis.
A8_STATIC = fm.A8_STATIC
A8 = QuantSpec("int8", PerTensor())
INPUT_SHAPE = (2, 5, 6, 3)
KERNEL_SHAPE = (3, 2, 3, 4)  # (*window, in, out) for both layers.
KINDS = ["conv", "conv_transpose"]
MASKS = ["binary", "float"]


def _mask(mask_kind: str) -> jax.Array:
  if mask_kind == "binary":
    # Causal in the channels, and one whole window position off.
    return jnp.tril(jnp.ones(KERNEL_SHAPE)).at[0, 1].set(0.0)
  return jax.random.uniform(jax.random.key(2), KERNEL_SHAPE, minval=-0.5,
                            maxval=1.5)


def _linen(kind: str, mask: jax.Array | None) -> nn.Module:
  if kind == "conv":
    return nn.Conv(KERNEL_SHAPE[-1], KERNEL_SHAPE[:2], mask=mask)
  return nn.ConvTranspose(KERNEL_SHAPE[-1], KERNEL_SHAPE[:2], strides=(2, 2),
                          mask=mask)


def _models(kind: str, mask: jax.Array
            ) -> tuple[nn.Module, dict[str, Any], nnx.Module]:
  """The masked linen layer with its variables, and an nnx twin holding
  them (a non-zero bias, so that adding it is checked too)."""
  linen_model = _linen(kind, mask)
  params = dict(linen_model.init(jax.random.key(0),
                                 jnp.zeros(INPUT_SHAPE))["params"])
  params["bias"] = jnp.linspace(-0.5, 0.5, KERNEL_SHAPE[-1])
  nnx_cls = nnx.Conv if kind == "conv" else nnx.ConvTranspose
  settings = {} if kind == "conv" else dict(strides=(2, 2))
  nnx_model = nnx_cls(KERNEL_SHAPE[2], KERNEL_SHAPE[3], KERNEL_SHAPE[:2],
                      mask=mask, rngs=nnx.Rngs(0), **settings)
  nnx_model.kernel.set_value(params["kernel"])
  nnx_model.bias.set_value(params["bias"])
  return linen_model, {"params": params}, nnx_model


def _input() -> jax.Array:
  return jax.random.normal(jax.random.key(1), INPUT_SHAPE)


def _reference(kind: str, params: dict[str, Any], kernel: jax.Array,
               x: jax.Array) -> jax.Array:
  """The unmasked float layer with ``kernel``."""
  return _linen(kind, None).apply({"params": {**params, "kernel": kernel}}, x)


def _assert_holds_mask(qa: Any, kernel: jax.Array, mask: jax.Array,
                       mask_kind: str) -> None:
  """``qa`` is ``kernel * mask`` quantized: masked elements exactly 0."""
  assert isinstance(qa, QArray) and qa.values.dtype == jnp.int8
  np.testing.assert_array_equal(jaxq.dequantize(qa),
                                jaxq.fake_quant(kernel * mask, W8))
  if mask_kind == "binary":
    assert np.all(np.asarray(qa.values)[np.asarray(mask) == 0] == 0)
    assert np.any(np.asarray(qa.values)[np.asarray(mask) == 1] != 0)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("kind", KINDS)
def test_linen_serve_equals_qat(kind, mask_kind):
  mask = _mask(mask_kind)
  model, variables, _ = _models(kind, mask)
  x = _input()
  rules = [jaxq.Rule(r".*", weight=W8, act=A8_STATIC)]
  cal = jaxq.quantize_model(model, rules, "calibrate")
  _, stats = cal.apply(variables, x, mutable=["quant_stats"])
  ranges = jaxq.act_ranges(cal, stats["quant_stats"])
  qat_out = cal.with_mode("qat").apply({**variables, "quant_ranges": ranges},
                                       x)
  params = variables["params"]
  expected = _reference(
      kind, params, jaxq.fake_quant(params["kernel"] * mask, W8),
      jaxq.fake_quant(x, A8_STATIC, amax=ranges["act"]["amax"]))
  scale = fm.max_abs(expected)
  np.testing.assert_allclose(qat_out, expected, rtol=1e-5, atol=1e-6 * scale)

  serving, _ = jaxq.convert(cal, variables, stats["quant_stats"])
  _assert_holds_mask(serving["params"]["kernel"], params["kernel"], mask,
                     mask_kind)
  # A fresh serve model: it needs nothing recorded by calibration.
  serve = jaxq.quantize_model(model, rules, "serve")
  np.testing.assert_allclose(serve.apply(serving, x), qat_out,
                             atol=1e-5 * scale)
  # Unconverted float weights: masked, then quantized on the fly.
  np.testing.assert_allclose(
      serve.apply({**variables, "quant_ranges": ranges}, x), qat_out,
      atol=1e-5 * scale)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("kind", KINDS)
def test_nnx_serve_equals_qat(kind, mask_kind):
  mask = _mask(mask_kind)
  _, variables, model = _models(kind, mask)
  x = _input()
  rules = [jaxq.Rule(r".*", weight=W8, act=A8_STATIC)]
  cal = jaxq.quantize_model(model, rules, "calibrate")
  cal(x)
  stats = nnx.state(cal, QuantStat)
  qat = jaxq.quantize_model(model, rules, "qat")
  ranges = jaxq.act_ranges(qat, stats)
  nnx.update(qat, ranges)
  qat_out = qat(x)
  params = variables["params"]
  expected = _reference(
      kind, params, jaxq.fake_quant(params["kernel"] * mask, W8),
      jaxq.fake_quant(x, A8_STATIC, amax=ranges["jaxq_act_range"].get_value()[
          "amax"]))
  scale = fm.max_abs(expected)
  np.testing.assert_allclose(qat_out, expected, rtol=1e-5, atol=1e-6 * scale)

  serve = jaxq.quantize_model(model, rules, "serve")
  serving, _ = jaxq.convert(serve, nnx.state(model), stats)
  _assert_holds_mask(serving["kernel"].get_value(), params["kernel"], mask,
                     mask_kind)
  # Params only (no mask in the state): the model's mask is used.
  params_only, _ = jaxq.convert(serve, nnx.state(model, nnx.Param), stats)
  np.testing.assert_array_equal(params_only["kernel"].get_value().values,
                                serving["kernel"].get_value().values)
  nnx.update(serve, serving)
  np.testing.assert_allclose(serve(x), qat_out, atol=1e-5 * scale)
  # The layer keeps its mask (only the QArray's call skips it).
  np.testing.assert_array_equal(serve.mask, mask)


@pytest.mark.parametrize("kind", KINDS)
def test_serve_convolves_int8_into_int32(kind):
  model, variables, nnx_model = _models(kind, _mask("float"))
  x = _input()
  rules = [jaxq.Rule(r".*", weight=W8, act=A8)]
  fm.assert_serves_int8_conv(model, variables, nnx_model, rules, x)


@pytest.mark.parametrize("kind", KINDS)
def test_float_weights_in_serve_are_masked(kind):
  """A skipped layer equals the float layer; an act-only one, the float
  layer on the fake-quant input; a weight-only one serves its masked
  QArray with a float input."""
  mask = _mask("float")
  model, variables, nnx_model = _models(kind, mask)
  x = _input()
  params = variables["params"]
  float_out = model.apply(variables, x)
  scale = fm.max_abs(float_out)
  skip = [jaxq.Rule(r".*", skip=True)]
  np.testing.assert_allclose(
      jaxq.quantize_model(model, skip, "serve").apply(variables, x),
      float_out, rtol=1e-6, atol=1e-6 * scale)
  np.testing.assert_allclose(jaxq.quantize_model(nnx_model, skip, "serve")(x),
                             float_out, rtol=1e-6, atol=1e-6 * scale)

  act_only = [jaxq.Rule(r".*", act=A8)]
  expected = model.apply(variables, jaxq.fake_quant(x, A8))
  np.testing.assert_allclose(
      jaxq.quantize_model(model, act_only, "serve").apply(variables, x),
      expected, rtol=1e-5, atol=1e-6 * scale)
  np.testing.assert_allclose(
      jaxq.quantize_model(nnx_model, act_only, "serve")(x), expected,
      rtol=1e-5, atol=1e-6 * scale)

  weight_only = [jaxq.Rule(r".*", weight=W8)]
  expected = _reference(kind, params,
                        jaxq.fake_quant(params["kernel"] * mask, W8), x)
  serve = jaxq.quantize_model(model, weight_only, "serve")
  jax.eval_shape(serve.apply, variables, x)
  serving, _ = jaxq.convert(serve, variables)
  np.testing.assert_allclose(serve.apply(serving, x), expected, rtol=1e-5,
                             atol=1e-6 * scale)
  nnx_serve = jaxq.quantize_model(nnx_model, weight_only, "serve")
  nnx_serving, _ = jaxq.convert(nnx_serve, nnx.state(nnx_model))
  nnx.update(nnx_serve, nnx_serving)
  np.testing.assert_allclose(nnx_serve(x), expected, rtol=1e-5,
                             atol=1e-6 * scale)


class MaskBuiltInside(nn.Module):
  """A masked Conv whose mask is computed in the traced call."""

  @nn.compact
  def __call__(self, x):
    mask = jnp.tril(jnp.ones(KERNEL_SHAPE))
    return nn.Conv(KERNEL_SHAPE[-1], KERNEL_SHAPE[:2], mask=mask)(x)


def test_linen_mask_built_under_jit():
  """A mask only ever seen as a tracer cannot be converted; one recorded by
  an eager call survives later jitted calls."""
  x = _input()
  rules = [jaxq.Rule(r".*", weight=W8, act=A8)]
  serve = jaxq.quantize_model(MaskBuiltInside(), rules, "serve")
  variables = jax.jit(serve.init)(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"mask of 'Conv_0' was only seen as "
                     r"a tracer"):
    jaxq.convert(serve, variables)

  serve = jaxq.quantize_model(MaskBuiltInside(), rules, "serve")
  serve.init(jax.random.key(0), x)
  jax.jit(serve.apply)(variables, x)
  serving, _ = jaxq.convert(serve, variables)
  kernel = variables["params"]["Conv_0"]["kernel"]
  _assert_holds_mask(serving["params"]["Conv_0"]["kernel"], kernel,
                     jnp.tril(jnp.ones(KERNEL_SHAPE)), "binary")
  qat = serve.with_mode("qat")
  np.testing.assert_allclose(jax.jit(serve.apply)(serving, x),
                             qat.apply(variables, x),
                             atol=1e-5 * fm.max_abs(qat.apply(variables, x)))


@pytest.mark.parametrize("kind", KINDS)
def test_learned_weight_scale_quantizes_the_masked_kernel(kind):
  """With a learned (LSQ) weight scale, convert quantizes ``kernel * mask``
  with the trained scale, and serve equals QAT."""
  mask = _mask("binary")
  model, variables, nnx_model = _models(kind, mask)
  x = _input()
  rules = [jaxq.Rule(r".*", weight=W8.replace(learn="lsq"), act=A8)]
  qat = jaxq.quantize_model(model, rules, "qat")
  variables = jaxq.qat.init_learned(qat, variables, x)
  # A trained scale, not the initial max-based one.
  learned = variables["params"]["jaxq"]
  learned = jax.tree.map(lambda s: s * 0.8, learned)
  variables = {"params": {**variables["params"], "jaxq": learned}}
  qat_out = qat.apply(variables, x)
  serving, _ = jaxq.convert(qat, variables)
  qa = serving["params"]["kernel"]
  assert np.all(np.asarray(qa.values)[np.asarray(mask) == 0] == 0)
  scale = fm.max_abs(qat_out)
  np.testing.assert_allclose(qat.with_mode("serve").apply(serving, x),
                             qat_out, atol=1e-5 * scale)

  nnx_qat = jaxq.quantize_model(nnx_model, rules, "qat")
  jaxq.qat.init_learned(nnx_qat, x)
  nnx_qat.jaxq_weight_scale.set_value(nnx_qat.jaxq_weight_scale.get_value()
                                      * 0.8)
  nnx_serve = jaxq.quantize_model(nnx_model, rules, "serve")
  nnx_serving, _ = jaxq.convert(nnx_serve, nnx.state(nnx_qat))
  nnx.update(nnx_serve, nnx_serving)
  np.testing.assert_allclose(nnx_serve(x), nnx_qat(x), atol=1e-5 * scale)
  np.testing.assert_allclose(nnx_serve(x), qat_out, atol=1e-5 * scale)
