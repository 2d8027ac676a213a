"""`jaxq.autoquant.candidates`: bytes, shape checks and built weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import MX, PerGroup, QuantSpec, algorithms
from jaxq.autoquant import candidates as cand_lib
from jaxq.flax.rules import LayerInfo

SHAPE = (64, 32)


def _kernel():
  return jax.random.normal(jax.random.key(0), SHAPE)


def _info(shape=SHAPE):
  return LayerInfo(path="dense", module_type="Dense", rule=None,
                   weight_shape=shape)


@pytest.mark.parametrize("candidate", cand_lib.default_candidates("rtn") +
                         (cand_lib.FLOAT32, cand_lib.w8a8(),
                          cand_lib.w4(32, affine_mse=True)))
def test_bytes_are_what_quantize_stores(candidate):
  kernel = _kernel()
  expected = (kernel.size * jnp.dtype(candidate.float_dtype).itemsize
              if candidate.is_float else
              jaxq.quantize(kernel, candidate.weight).nbytes)
  assert cand_lib.nbytes(candidate, SHAPE) == expected
  assert cand_lib.nbytes(candidate, SHAPE, stacked=3) == 3 * expected


def test_w4_g64_is_four_and_a_half_bits():
  assert cand_lib.nbytes(cand_lib.w4(64), SHAPE) * 8 / (64 * 32) == 4.5
  # Affine: an int8 zero point per group besides the float32 scale.
  affine = cand_lib.w4(64, "gptq", affine_mse=True)
  assert affine.name == "W4 g64 affine mse gptq"
  assert (not affine.weight.symmetric and affine.weight.calibration == "mse"
          and affine.algorithm == "gptq")
  assert cand_lib.nbytes(affine, SHAPE) * 8 / (64 * 32) == 4.625


def test_candidates_that_do_not_fit_name_layer_axis_and_size():
  wrong_axis = cand_lib.Candidate(
      "g32 axis 2", QuantSpec("int4", PerGroup(axis=2, size=32)))
  with pytest.raises(ValueError, match=r"'blocks/0/q'.*axis 2.*2-d"):
    cand_lib.check_fits(wrong_axis, "blocks/0/q", (48, 32))
  mx = cand_lib.Candidate("mx", QuantSpec("float8_e4m3fn", MX(axis=0)))
  with pytest.raises(ValueError, match=r"'q'.*axis 0 has size 48.*32"):
    cand_lib.check_fits(mx, "q", (48, 32))
  out_groups = cand_lib.Candidate(
      "g8 out", QuantSpec("int4", PerGroup(axis=1, size=8)), algorithm="gptq")
  with pytest.raises(ValueError, match=r"gptq needs groups along the input"):
    cand_lib.check_fits(out_groups, "q", (48, 32))
  cand_lib.check_fits(cand_lib.w4(64), "q", (48, 32))  # One ragged group.


def test_invalid_candidates_raise():
  with pytest.raises(ValueError, match="algorithm"):
    cand_lib.Candidate("x", cand_lib.INT8_CHANNEL, algorithm="magic")
  with pytest.raises(ValueError, match="float candidate"):
    cand_lib.Candidate("x", None, algorithm="gptq")
  with pytest.raises(ValueError, match="AWQ.*weight-only"):
    cand_lib.Candidate("x", cand_lib.INT8_CHANNEL,
                       act=cand_lib.w8a8().act, algorithm="awq")


def _stats(kernel_rows=64, seed=1):
  x = jax.random.normal(jax.random.key(seed), (256, kernel_rows))
  x = x * jnp.ones(kernel_rows).at[3].set(20.0)
  return algorithms.update_input_stats(
      algorithms.init_input_stats(kernel_rows), x), x


def test_rtn_and_float_weights_are_the_layer_s_own():
  kernel = _kernel()
  rtn = cand_lib.build(cand_lib.w4(32), _info(), kernel, None, None)
  np.testing.assert_array_equal(
      rtn.effective(), jaxq.fake_quant(kernel, cand_lib.w4(32).weight))
  assert cand_lib.fixed(rtn) == {}
  bf16 = cand_lib.build(cand_lib.BF16, _info(), kernel, None, None)
  np.testing.assert_array_equal(
      bf16.effective(), kernel.astype(jnp.bfloat16).astype(jnp.float32))


def test_gptq_and_awq_weights_match_the_algorithms():
  kernel = _kernel()
  stats, x = _stats()
  spec = QuantSpec("int4", PerGroup(axis=0, size=32))
  gptq = cand_lib.build(cand_lib.Candidate("g", spec, algorithm="gptq"),
                        _info(), kernel, (stats,), (256, 64))
  expected = algorithms.gptq(kernel, 2.0 * stats.gram, spec, percdamp=0.1,
                             act_order=True).kernel
  np.testing.assert_allclose(gptq.effective(), expected, atol=1e-6)
  assert set(cand_lib.fixed(gptq)) == {"weight_range"}
  awq = cand_lib.build(cand_lib.Candidate("a", spec, algorithm="awq"),
                       _info(), kernel, (stats,), (256, 64))
  factors = cand_lib.fixed(awq)["act_smooth"]
  # The layer divides its input by the factors: x @ effective equals
  # (x / s) @ Q(W s).
  np.testing.assert_allclose(
      x @ awq.effective(), (x / factors) @ awq.stored(), rtol=1e-4,
      atol=1e-3)
  # Both beat round to nearest on the layer's output error.
  rtn = jaxq.fake_quant(kernel, spec)
  error = lambda w: float(jnp.sum((x @ (w - kernel)) ** 2))
  assert error(gptq.effective()) < error(rtn)
  assert error(awq.effective()) < error(rtn)
