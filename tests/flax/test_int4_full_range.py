"""int4's default full range [-8, 7] through the Flax layers: a Dense layer
served from converted int4 kernels equals its QAT fake-quant (linen, nnx,
and learned LSQ scales), and the kernels reach -8."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq
import jaxq.qat
from jaxq import PerChannel, PerGroup, PerToken, QuantSpec

IN, OUT = 32, 8
ACT = QuantSpec("int8", PerToken())
WEIGHTS = {"C": QuantSpec("int4", PerChannel(axis=-1)),
           "G16": QuantSpec("int4", PerGroup(axis=0, size=16))}


def _kernel(seed: int = 0) -> np.ndarray:
  """(IN, OUT) with every odd column's abs-max negative (where -8 shows)."""
  w = np.random.default_rng(seed).standard_normal((IN, OUT)).astype(
      np.float32) * np.float32(0.2)
  peak = np.abs(w).max(axis=0) * np.float32(1.5)
  w[3] = np.where(np.arange(OUT) % 2 == 1, -peak, peak)
  return w


def _inputs(seed: int = 1) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (4, IN))


def _check_kernel(qa: jaxq.QArray, w: np.ndarray, spec: QuantSpec) -> None:
  assert qa.spec == spec and not qa.spec.narrow_range
  values = np.asarray(qa.values).astype(np.int32)
  np.testing.assert_array_equal(values[3],
                                np.where(np.arange(OUT) % 2 == 1, -8, 7))
  amax = jaxq.compute_range(jnp.asarray(w), spec)[1]
  np.testing.assert_allclose(np.asarray(qa.scale), np.asarray(amax) / 7.5,
                             rtol=2e-6)


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_linen_dense_serve_equals_qat(name):
  spec = WEIGHTS[name]
  model = nn.Dense(OUT)
  w, x = _kernel(), _inputs()
  variables = jax.tree.map(lambda a: a, model.init(jax.random.key(0), x))
  variables["params"]["kernel"] = jnp.asarray(w)
  rules = [jaxq.Rule(r".*", weight=spec, act=ACT)]
  qat = jaxq.quantize_model(model, rules, "qat")
  qat_out = jax.jit(qat.apply)(variables, x)
  serving, _ = jaxq.convert(qat, variables)
  kernel = serving["params"]["kernel"]
  assert isinstance(kernel, jaxq.QArray)
  _check_kernel(kernel, w, spec)
  serve_out = jax.jit(qat.with_mode("serve").apply)(serving, x)
  np.testing.assert_allclose(serve_out, qat_out, rtol=1e-5, atol=1e-5)
  # QAT is the fake-quant matmul with the full-range kernel.
  want = (jaxq.fake_quant(x, ACT) @ jaxq.fake_quant(jnp.asarray(w), spec) +
          variables["params"]["bias"])
  np.testing.assert_allclose(qat_out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_nnx_linear_serve_equals_qat(name):
  spec = WEIGHTS[name]
  model = nnx.Linear(IN, OUT, rngs=nnx.Rngs(0))
  w, x = _kernel(2), _inputs(3)
  model.kernel.set_value(jnp.asarray(w))
  rules = [jaxq.Rule(r".*", weight=spec, act=ACT)]
  qat = jaxq.quantize_model(model, rules, "qat")
  serve = jaxq.quantize_model(model, rules, "serve")
  serving, _ = jaxq.convert(serve, nnx.state(model))
  nnx.update(serve, serving)
  kernel = serve.kernel.get_value()
  assert isinstance(kernel, jaxq.QArray)
  _check_kernel(kernel, w, spec)
  qat_out, serve_out = qat(x), serve(x)
  np.testing.assert_allclose(serve_out, qat_out, rtol=1e-5, atol=1e-5)
  want = (jaxq.fake_quant(x, ACT) @ jaxq.fake_quant(jnp.asarray(w), spec) +
          model.bias.get_value())
  np.testing.assert_allclose(qat_out, want, rtol=1e-5, atol=1e-5)


def test_linen_learned_int4_scales_serve_equals_qat():
  spec = QuantSpec("int4", PerChannel(axis=-1), learn="lsq")
  model = nn.Dense(OUT)
  w, x = _kernel(4), _inputs(5)
  variables = jax.tree.map(lambda a: a, model.init(jax.random.key(0), x))
  variables["params"]["kernel"] = jnp.asarray(w)
  qat = jaxq.quantize_model(model, [jaxq.Rule(r".*", weight=spec, act=ACT)],
                            "qat")
  variables = jaxq.qat.init_learned(qat, variables, x)
  scale = variables["params"]["jaxq"]["weight_scale"]
  # The full range's step: max w at 7, min w at -8, each within half a step.
  np.testing.assert_allclose(
      scale, np.maximum(w.max(0) / 7.5, -w.min(0) / 8.5)[None], rtol=2e-6)
  # A trained (moved) scale: serve still reproduces QAT.
  variables["params"]["jaxq"]["weight_scale"] = scale * 0.9
  serving, _ = jaxq.convert(qat, variables)
  kernel = serving["params"]["kernel"]
  assert int(np.asarray(kernel.values).astype(np.int32).min()) == -8
  np.testing.assert_allclose(
      jax.jit(qat.with_mode("serve").apply)(serving, x),
      jax.jit(qat.apply)(variables, x), rtol=1e-5, atol=1e-5)
