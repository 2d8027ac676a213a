"""Per-group 128 on 576 inputs ("g128" on SmolLM2's width), whose last group
holds 64: a linen MLP calibrates, converts, saves, loads and serves, an nnx
MLP calibrates, converts and serves, and serving equals QAT in both, with
ragged int4 and int8 kernels (and a dynamic activation grouped alike,
G-G)."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

import jaxq
from jaxq import PerGroup, PerTensor, QuantSpec

D_IN, D_HIDDEN, D_OUT = 576, 576, 8
RULES = [
    # Static per-tensor input range (calibrated), G128 int4 kernel.
    jaxq.Rule(r".*0", weight=QuantSpec("int4", PerGroup(axis=0, size=128)),
              act=QuantSpec("int8", PerTensor(), dynamic=False)),
    # Dynamic activation grouped like the kernel: G-G, both ragged.
    jaxq.Rule(r".*1", weight=QuantSpec("int8", PerGroup(axis=0, size=128)),
              act=QuantSpec("int8", PerGroup(axis=-1, size=128))),
]


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(D_OUT, name="dense_1")(
        nn.relu(nn.Dense(D_HIDDEN, name="dense_0")(x)))


class NnxMLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.dense_0 = nnx.Linear(D_IN, D_HIDDEN, rngs=rngs)
    self.dense_1 = nnx.Linear(D_HIDDEN, D_OUT, rngs=rngs)

  def __call__(self, x):
    return self.dense_1(nnx.relu(self.dense_0(x)))


def _batches() -> list[jax.Array]:
  return [jax.random.normal(jax.random.key(i), (4, D_IN)) for i in (1, 2)]


def _check_kernels(serving_kernels) -> None:
  for kernel in serving_kernels:
    assert isinstance(kernel, jaxq.QArray)
    assert kernel.scale.shape == (5, kernel.shape[1])  # 4 x 128 + 64.


def test_linen_calibrate_convert_save_load_serve_equals_qat(tmp_path):
  model, batches = LinenMLP(), _batches()
  variables = model.init(jax.random.key(0), batches[0])
  cal = jaxq.quantize_model(model, RULES, "calibrate")
  result = jaxq.calibrate(cal, variables, batches, progress=False)
  serving, _ = jaxq.convert(cal, variables, result.stats)
  _check_kernels([serving["params"][name]["kernel"]
                  for name in ("dense_0", "dense_1")])
  path = tmp_path / "model.safetensors"
  jaxq.save(path, serving, RULES)
  loaded = jaxq.load(path)
  assert loaded.rules == tuple(RULES)
  serve_out = jax.jit(cal.with_mode("serve").apply)(loaded.variables,
                                                    batches[0])
  qat_out = jax.jit(cal.with_mode("qat").apply)(
      {**variables, "quant_ranges": serving["quant_ranges"]}, batches[0])
  np.testing.assert_allclose(serve_out, qat_out, rtol=1e-5, atol=1e-5)
  float_out = np.asarray(model.apply(variables, batches[0]))
  assert not np.allclose(serve_out, float_out, atol=1e-4)  # Quantized.
  np.testing.assert_allclose(serve_out, float_out,
                             atol=0.1 * np.abs(float_out).max())


def test_nnx_calibrate_convert_serve_equals_qat():
  batches = _batches()
  model = NnxMLP(nnx.Rngs(0))
  cal = jaxq.quantize_model(model, RULES, "calibrate")
  result = jaxq.calibrate(cal, None, batches, progress=False)
  serve = jaxq.quantize_model(model, RULES, "serve")
  serving, _ = jaxq.convert(serve, nnx.state(model), result.stats)
  nnx.update(serve, serving)
  _check_kernels([serve.dense_0.kernel.get_value(),
                  serve.dense_1.kernel.get_value()])
  qat = jaxq.quantize_model(model, RULES, "qat")
  nnx.update(qat, nnx.State({"dense_0": {
      "jaxq_act_range": jaxq.flax.QuantRange(
          serve.dense_0.jaxq_act_range.get_value())}}))
  np.testing.assert_allclose(serve(batches[0]), qat(batches[0]), rtol=1e-5,
                             atol=1e-5)
