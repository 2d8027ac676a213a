"""NF4 (QLoRA's 4-bit NormalFloat) as a jaxq format, and double quantization.

The levels are rebuilt here from their definition (Dettmers et al., 2023:
quantiles of N(0, 1), each half normalised to +-1, with an exact 0); every
path NF4 takes through jaxq is checked: `quantize` / `dequantize` round
trips on the levels, `dot_general`, `convert` + serve, `jaxq.save` /
`jaxq.load`, and the double-quantized scales' error bound and storage.
"""

from __future__ import annotations

import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import PerChannel, PerGroup, QuantSpec, formats

LEVELS = np.asarray(formats.NF4_LEVELS, np.float64)


def test_levels_are_the_qlora_normal_float_quantiles():
  # bitsandbytes' create_normal_map: 8 positive and 7 negative quantiles at
  # probabilities from 0.9677 (= (1/(2*15) + 1/(2*16)) / 2 + 1/2 ... the
  # paper's offset) to 0.5, each side normalised to end at +-1, and 0.
  offset = 0.9677083
  ppf = statistics.NormalDist().inv_cdf
  positive = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
  negative = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
  values = np.sort(np.asarray(positive + [0.0] + negative))
  values /= np.max(np.abs(values))
  np.testing.assert_allclose(LEVELS, values, atol=2e-7)
  assert LEVELS[7] == 0.0 and LEVELS[0] == -1.0 and LEVELS[-1] == 1.0
  fmt = formats.get_format("nf4")
  assert (fmt.kind, fmt.bits, fmt.qmin, fmt.qmax) == ("lut", 4, -1.0, 1.0)


def test_encode_picks_the_nearest_level_and_handles_specials():
  fmt = formats.get_format("nf4")
  x = np.random.default_rng(0).uniform(-1.3, 1.3, 4000).astype(np.float32)
  codes = np.asarray(formats.lut_encode(jnp.asarray(x), fmt)).astype(int)
  nearest = np.abs(x[:, None] - LEVELS[None]).min(axis=1)
  np.testing.assert_allclose(np.abs(x - LEVELS[codes]), nearest, atol=1e-7)
  special = formats.lut_encode(jnp.asarray([np.nan, np.inf, -np.inf]), fmt)
  np.testing.assert_array_equal(np.asarray(special).astype(int), [7, 15, 0])


def _on_levels(shape: tuple[int, int], group: int, seed: int = 0):
  """(in, out) weights that are exactly scale * level, every group of
  ``group`` rows holding level +1 in each column (so abs-max = scale)."""
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 16, shape)
  codes[::group] = 15
  scales = rng.uniform(0.5, 2.0, (-(-shape[0] // group), shape[1]))
  scales = 2.0 ** np.round(np.log2(scales) * 4) / 16  # exact products
  w = LEVELS[codes] * np.repeat(scales, group, axis=0)[:shape[0]]
  return codes, w.astype(np.float32)


@pytest.mark.parametrize("shape", [(128, 24), (100, 8)])  # 100: ragged
def test_round_trip_on_the_levels_is_exact(shape):
  codes, w = _on_levels(shape, 64)
  q = jaxq.quantize(jnp.asarray(w), QuantSpec("nf4", PerGroup(axis=0, size=64)))
  assert q.values.dtype == jnp.uint4
  np.testing.assert_array_equal(np.asarray(q.values).astype(int), codes)
  np.testing.assert_array_equal(np.asarray(jaxq.dequantize(q)), w)


def test_round_trip_error_is_at_most_half_a_level_gap():
  w = jax.random.normal(jax.random.key(0), (256, 32))
  spec = QuantSpec("nf4", PerGroup(axis=0, size=64))
  q = jaxq.quantize(w, spec)
  scale = np.repeat(np.asarray(q.scale), 64, axis=0)
  err = np.abs(np.asarray(jaxq.dequantize(q)) - np.asarray(w)) / scale
  assert err.max() <= np.max(np.diff(LEVELS)) / 2 + 1e-6
  # NF4 fits normal weights better than int4 on the same groups.
  int4 = jaxq.dequantize(jaxq.quantize(w, spec.replace(format="int4")))
  assert (jnp.mean((jaxq.dequantize(q) - w) ** 2) <
          jnp.mean((int4 - w) ** 2))


def test_double_quantized_scales_error_bound_and_fixed_point():
  rng = np.random.default_rng(1)
  scale = jnp.asarray(rng.uniform(0.01, 3.0, (7, 100)), jnp.float32)
  codes, steps = formats.double_quantize_scale(scale, 256)
  assert codes.dtype == jnp.uint8 and steps.shape == (3,)  # ceil(700/256)
  assert int(jnp.min(codes)) >= 1
  back = formats.double_dequantize_scale(codes, steps, 256)
  flat, err = np.ravel(scale), np.ravel(np.abs(back - scale))
  step = np.repeat(np.asarray(steps.astype(jnp.float32)), 256)[:flat.size]
  assert np.all(np.log2(step) == np.round(np.log2(step)))  # powers of two
  peak = np.repeat([flat[i:i + 256].max() for i in range(0, 700, 256)],
                   256)[:flat.size]
  # Each scale within half a step, and the step below peak / 127.5: the
  # relative error of a block's largest scale is under 0.4%.
  assert np.all(err <= step / 2 * (1 + 1e-6))
  assert np.all(step < peak / 127.5)
  again = formats.double_quantize_scale(back, 256)
  np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(codes))


def test_double_quant_spec_scales_bytes_and_errors():
  w = jax.random.normal(jax.random.key(2), (512, 48))
  q = jaxq.quantize(w, jaxq.lora.NF4_DQ)
  plain = jaxq.quantize(w, jaxq.lora.NF4)
  # Within half a power-of-two step, under 1/255 of the largest scale.
  np.testing.assert_allclose(q.scale, plain.scale, rtol=0,
                             atol=float(jnp.max(plain.scale)) / 255)
  num_scales = 8 * 48
  assert q.nbytes == 512 * 48 // 2 + num_scales + -(-num_scales // 256)
  assert plain.nbytes == 512 * 48 // 2 + 4 * num_scales
  # 4 bits + 8 / 64 + ~0: QLoRA's 4.127 bits per weight.
  assert q.nbytes * 8 / w.size < 4.13
  with pytest.raises(ValueError, match="double_quant"):
    QuantSpec("int4", PerChannel(-1), symmetric=False, double_quant=256)
  with pytest.raises(ValueError, match="double_quant"):
    QuantSpec("nf4", PerGroup(0, 64), double_quant=0)
  with pytest.raises(ValueError, match="affine"):
    QuantSpec("nf4", PerGroup(0, 64), symmetric=False)
  with pytest.raises(ValueError, match="nearest"):
    QuantSpec("nf4", PerGroup(0, 64), rounding="stochastic")


def test_dot_general_with_an_nf4_weight_is_the_float_product():
  x = jax.random.normal(jax.random.key(3), (5, 128))
  q = jaxq.quantize(jax.random.normal(jax.random.key(4), (128, 16)),
                    jaxq.lora.NF4_DQ)
  out = jaxq.dot_general(x, q, (((1,), (0,)), ((), ())))
  np.testing.assert_allclose(out, x @ jaxq.dequantize(q), rtol=1e-5,
                             atol=1e-5)


def test_gptq_refuses_double_quant_naming_it():
  kernel = jnp.ones((64, 8))
  with pytest.raises(ValueError, match="double_quant"):
    jaxq.algorithms.gptq(kernel, jnp.eye(64), jaxq.lora.NF4_DQ)


class _Mlp(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(8, name="down")(nn.relu(nn.Dense(128, name="up")(x)))


def test_convert_serve_save_load_round_trip(tmp_path):
  model, x = _Mlp(), jax.random.normal(jax.random.key(5), (4, 128))
  variables = model.init(jax.random.key(6), x)
  cal = jaxq.quantize_model(model, [jaxq.Rule(".*", weight=jaxq.lora.NF4_DQ)],
                            mode="calibrate")
  serve = cal.with_mode("serve")
  serving, _ = jaxq.convert(serve, variables,
                            jaxq.calibrate(cal, variables, [x]).stats)
  kernel = serving["params"]["up"]["kernel"]
  assert isinstance(kernel, jaxq.QArray) and kernel.spec.format == "nf4"
  # Serving multiplies by the dequantized NF4 kernels, exactly.
  dequantized = jax.tree.map(
      lambda a: jaxq.dequantize(a) if isinstance(a, jaxq.QArray) else a,
      serving, is_leaf=lambda a: isinstance(a, jaxq.QArray))
  np.testing.assert_allclose(serve.apply(serving, x),
                             model.apply(dequantized, x), rtol=1e-5, atol=1e-5)
  report = jaxq.save(tmp_path / "nf4.safetensors", serving)
  loaded = jaxq.load(tmp_path / "nf4.safetensors").variables
  back = loaded["params"]["up"]["kernel"]
  np.testing.assert_array_equal(np.asarray(back.values).astype(int),
                                np.asarray(kernel.values).astype(int))
  np.testing.assert_array_equal(back.scale, kernel.scale)
  assert back.spec == kernel.spec
  np.testing.assert_array_equal(serve.apply(loaded, x),
                                serve.apply(serving, x))
  # Values packed, scales as one-byte codes: far below float32's bytes.
  assert report.file_bytes < report.float_bytes / 4
