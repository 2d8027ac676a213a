"""Histogram observers (percentile, entropy, mse) against numpy references.

The references are written here in plain numpy and never call jaxq.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import calibration
from jaxq.calibration import thresholds
from jaxq import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec

INT8 = QuantSpec("int8", calibration="entropy")


def _calibrate(obs, spec, batches):
  state = obs.init(jnp.asarray(batches[0]), spec)
  update = jax.jit(obs.update)
  for x in batches:
    state = update(state, jnp.asarray(x))
  return state


def _laplace_batches(seed=0, n=4, size=8192):
  rng = np.random.default_rng(seed)
  return [rng.laplace(scale=1.0, size=size).astype(np.float32)
          for _ in range(n)]


def _kl_threshold_bin(counts: np.ndarray, num_levels: int, start_bin: int
                      ) -> int:
  """TensorRT's KL search, one candidate at a time, in float64.

  As in pytorch-quantization, bin 0 (the exact zeros) first takes bin 1's
  count.
  """
  counts = counts.astype(np.float64)
  counts[0] = counts[1]
  num_bins = counts.size
  best_bin, best_kl = start_bin, np.inf
  for i in range(start_bin, num_bins + 1):
    p = counts[:i].copy()
    p[-1] += counts[i:].sum()
    level = (np.arange(i) * num_levels) // i
    level_sum = np.bincount(level, weights=counts[:i], minlength=num_levels)
    level_nonzero = np.bincount(level, weights=counts[:i] > 0,
                                minlength=num_levels)
    q = np.where(counts[:i] > 0,
                 level_sum[level] / np.maximum(level_nonzero[level], 1), 0.0)
    p, q = p / p.sum(), q / q.sum()
    support = p > 0
    if np.any(q[support] == 0):
      kl = np.inf
    else:
      kl = np.sum(p[support] * np.log(p[support] / q[support]))
    if kl <= best_kl:  # ties go to the larger threshold
      best_bin, best_kl = i, kl
  return best_bin


def _expected_mse(counts: np.ndarray, width: float, amax: float,
                  qmax: float, mantissa_bits: int | None,
                  min_exponent: int, full_range: bool = False) -> float:
  """Clipping error beyond amax plus step**2 / 12 rounding noise inside.

  In the full integer range (scale ``amax / (qmax + 0.5)``) positive values
  saturate half a step below amax and negative ones half a step beyond it:
  a clipped bin costs the mean of the two signs' errors.
  """
  centres = (np.arange(counts.size) + 0.5) * width
  scale = amax / (qmax + 0.5 if full_range else qmax)
  if mantissa_bits is None:
    step = np.full_like(centres, scale)
  else:
    exponent = np.floor(np.log2(np.maximum(centres / scale, 1e-30)))
    step = scale * 2.0 ** (np.maximum(exponent, min_exponent) - mantissa_bits)
  noise = step ** 2 / 12
  half = scale / 2 if full_range else 0.0
  beyond = centres - amax
  above = (beyond + half) ** 2  # Positive values, saturated at amax - half.
  below = np.where(beyond > half, (beyond - half) ** 2, noise)
  error = np.where(beyond > 0, (above + below) / 2, noise)
  return float(np.sum(counts * error) / counts.sum())


def test_histogram_counts_match_numpy_histogram():
  batches = _laplace_batches(1, n=1)
  state = _calibrate(jaxq.observers.percentile(), INT8, batches)
  magnitude = np.abs(batches[0])
  expected, _ = np.histogram(magnitude, bins=2048,
                             range=(0.0, magnitude.max()))
  np.testing.assert_array_equal(np.asarray(state.counts)[0], expected)
  np.testing.assert_allclose(np.asarray(state.range), [magnitude.max()])


@pytest.mark.parametrize("q", [99.0, 99.9, 99.99])
def test_percentile_gaussian_within_one_bin(q):
  rng = np.random.default_rng(2)
  batches = [rng.standard_normal(16384).astype(np.float32) for _ in range(3)]
  spec = QuantSpec("int8", calibration="percentile", percentile=q)
  obs = jaxq.observers.observer_for(spec)
  state = _calibrate(obs, spec, batches)
  amax = float(obs.finalize(state)[0])
  reference = np.percentile(np.abs(np.concatenate(batches)), q)
  width = float(state.bin_width[0])
  assert abs(amax - reference) <= 0.5 * width + 1e-6, (amax, reference, width)


def test_entropy_laplace_equals_numpy_kl_search():
  batches = _laplace_batches(3)
  state = _calibrate(jaxq.observers.entropy(), INT8, batches)
  amax = float(jax.jit(jaxq.observers.entropy().finalize)(state)[0])
  counts = np.asarray(state.counts)[0]
  best_bin = _kl_threshold_bin(counts, num_levels=128, start_bin=128)
  width = float(state.range[0]) / 2048
  expected = min(best_bin * width, np.abs(np.concatenate(batches)).max())
  np.testing.assert_allclose(amax, expected, rtol=1e-6)


def test_entropy_relu_zero_spike_equals_numpy_kl_search():
  """Post-ReLU data, half exact zeros: the spike must not pull amax down."""
  batches = [np.maximum(b, 0.0) for b in _laplace_batches(5, n=2)]
  state = _calibrate(jaxq.observers.entropy(), INT8, batches)
  amax = float(jax.jit(jaxq.observers.entropy().finalize)(state)[0])
  best_bin = _kl_threshold_bin(np.asarray(state.counts)[0], num_levels=128,
                               start_bin=128)
  expected = min(best_bin * float(state.range[0]) / 2048,
                 float(state.amax[0]))
  np.testing.assert_allclose(amax, expected, rtol=1e-6)
  # The bulk: the KL pick clips well under 1% of the positive values.
  positive = np.concatenate(batches)
  positive = positive[positive > 0]
  assert np.mean(positive > amax) < 0.01, amax


def test_entropy_int4_uses_eight_levels():
  batches = _laplace_batches(4, n=2)
  spec = QuantSpec("int4", calibration="entropy")
  obs = jaxq.observers.entropy(num_bins=512, start_bin=16)
  state = _calibrate(obs, spec, batches)
  best_bin = _kl_threshold_bin(np.asarray(state.counts)[0], num_levels=8,
                               start_bin=16)
  expected = min(best_bin * float(state.range[0]) / 512,
                 float(state.amax[0]))
  np.testing.assert_allclose(float(obs.finalize(state)[0]), expected,
                             rtol=1e-6)


def test_entropy_per_channel_equals_numpy_kl_search_on_varied_data():
  """Light and heavy tails, an outlier and a sparse (rounded) channel."""
  rng = np.random.default_rng(12)
  size = 20000
  outlier = rng.standard_normal(size)
  outlier[:20] *= 40.0
  x = np.stack([rng.laplace(size=size), rng.standard_normal(size),
                rng.standard_t(2, size), outlier,
                np.round(rng.standard_normal(size) * 4) / 4], axis=-1)
  spec = QuantSpec("int8", PerChannel(axis=-1))
  state = _calibrate(jaxq.observers.entropy(), spec, [x.astype(np.float32)])
  amax = np.asarray(jaxq.observers.entropy().finalize(state))[0]
  for c in range(x.shape[-1]):
    best_bin = _kl_threshold_bin(np.asarray(state.counts)[0, c],
                                 num_levels=128, start_bin=128)
    expected = min(best_bin * float(state.range[0, c]) / 2048,
                   float(state.amax[0, c]))
    np.testing.assert_allclose(amax[c], expected, rtol=1e-6, err_msg=str(c))


def test_entropy_prefix_sums_keep_small_differences():
  """The ``sum(c log c)`` of a few bins far out in the tail, as a
  difference of prefix sums: plain float32 cumsums lose it to cancellation,
  the split sums keep it to float32's precision of the total mass."""
  rng = np.random.default_rng(3)
  counts = np.concatenate([rng.integers(10**6, 10**7, 1024),
                           rng.integers(0, 3, 1024)]).astype(np.float32)
  x = counts * np.log(np.maximum(counts, 1.0))  # c log c, as the search
  hi, lo = jax.jit(thresholds._prefix_sums)(jnp.asarray(x))
  exact = np.concatenate([[0.0], np.cumsum(x.astype(np.float64))])[1:]
  got = np.asarray(hi, np.float64) + np.asarray(lo, np.float64)
  start, stop = rng.integers(1024, 2048, (2, 200))
  want = exact[stop] - exact[start]
  err = np.abs((got[stop] - got[start]) - want) / exact[-1]
  assert err.max() < 2.0**-40
  plain = np.cumsum(x)  # float32: the tail's sums are lost
  plain_err = np.abs((plain[stop].astype(np.float64) - plain[start]) - want)
  assert plain_err.max() / exact[-1] > 2.0**-30


@pytest.mark.parametrize("fmt", ["int8", "int4", "float8_e4m3fn"])
def test_mse_minimises_brute_force_mse(fmt):
  batches = _laplace_batches(5, n=2)
  spec = QuantSpec(fmt, calibration="mse")
  obs = jaxq.observers.mse(num_bins=512)
  state = _calibrate(obs, spec, batches)
  amax = float(obs.finalize(state)[0])
  counts = np.asarray(state.counts)[0]
  width = float(state.range[0]) / 512
  info = spec.fmt
  mantissa = None if info.kind == "int" else info.mantissa_bits
  mse = lambda a: _expected_mse(counts, width, a, info.qmax, mantissa,
                                info.min_normal_exponent, info.is_full_range)
  brute_force = min(mse(i * width) for i in range(1, 513))
  assert mse(amax) <= brute_force * (1 + 1e-5)
  # The optimum is a bin edge, found among all of them.
  assert abs(amax / width - round(amax / width)) < 1e-3


@pytest.mark.parametrize("narrow_range", [True, False],
                         ids=["narrow", "full"])
def test_mse_models_the_int4_quantizer(narrow_range):
  """The model's error is the real fake-quant error, and its choice is
  within a fraction of a percent of the best range on a fine grid."""
  batches = _laplace_batches(5, n=2)
  x = jnp.asarray(np.concatenate(batches))
  spec = QuantSpec("int4", calibration="mse", narrow_range=narrow_range)
  obs = jaxq.observers.mse(num_bins=512)
  state = _calibrate(obs, spec, batches)
  amax = obs.finalize(state)[0]
  counts = np.asarray(state.counts)[0]
  width = float(state.range[0]) / 512
  actual = jax.jit(jax.vmap(lambda a: jnp.mean(
      (jaxq.fake_quant(x, spec, amax=a) - x) ** 2)))
  chosen = float(actual(amax[None])[0])
  model = _expected_mse(counts, width, float(amax), spec.fmt.qmax, None, 0,
                        full_range=not narrow_range)
  assert model == pytest.approx(chosen, rel=0.03)
  grid = jnp.arange(64, 513, dtype=jnp.float32) * width
  assert chosen <= float(jnp.min(actual(grid))) * 1.005
  if not narrow_range:  # The finer step: below the narrow range's best.
    narrow = spec.replace(narrow_range=True)
    narrow_best = jnp.min(jax.vmap(lambda a: jnp.mean(
        (jaxq.fake_quant(x, narrow, amax=a) - x) ** 2))(grid))
    assert chosen < 0.95 * float(narrow_best)


def test_range_growth_loses_no_counts():
  rng = np.random.default_rng(6)
  batches = [(rng.standard_normal((64, 4)) * s).astype(np.float32)
             for s in (0.1, 1.0, 3.0, 50.0, 2.0)]
  spec = QuantSpec("int8", PerChannel(axis=-1), calibration="percentile")
  state = _calibrate(jaxq.observers.percentile(num_bins=256), spec, batches)
  np.testing.assert_array_equal(np.asarray(state.counts).sum(-1),
                                [[len(batches) * 64] * 4])
  stacked = np.abs(np.concatenate(batches))
  np.testing.assert_array_equal(np.asarray(state.amax)[0], stacked.max(0))
  assert np.all(np.asarray(state.range)[0] >= stacked.max(0))


def test_range_growth_equals_one_big_batch_when_bins_align():
  rng = np.random.default_rng(7)
  first = rng.uniform(-1, 1, (256, 3)).astype(np.float32)
  first[0] = 1.0  # first max |x| = 1 per channel
  # Growth by 2**2, 2**1 and 2**3, each reaching exactly the new range.
  second = (rng.uniform(-1, 1, (256, 3)) * [4, 2, 8]).astype(np.float32)
  second[0] = [-4.0, 2.0, 8.0]
  third = rng.uniform(-2, 2, (256, 3)).astype(np.float32)
  spec = QuantSpec("int8", PerChannel(axis=-1), calibration="entropy")
  obs = jaxq.observers.entropy(num_bins=512, start_bin=128)
  incremental = _calibrate(obs, spec, [first, second, third])
  one_pass = _calibrate(obs, spec, [np.concatenate([first, second, third])])
  chex.assert_trees_all_equal(incremental, one_pass)
  np.testing.assert_array_equal(np.asarray(incremental.range), [[4, 2, 8]])


@pytest.mark.parametrize("make", [
    lambda: jaxq.observers.percentile(99.9, num_bins=256),
    lambda: jaxq.observers.entropy(num_bins=256, start_bin=32),
    lambda: jaxq.observers.mse(num_bins=256),
])
def test_per_channel_equals_each_channel_alone(make):
  obs = make()
  rng = np.random.default_rng(8)
  batches = [rng.laplace(size=(500, 3)).astype(np.float32) *
             np.array([0.5, 1.0, 7.0], np.float32) for _ in range(2)]
  per_channel = obs.finalize(_calibrate(
      obs, QuantSpec("int8", PerChannel(axis=-1)), batches))
  assert per_channel.shape == (1, 3)
  alone = [float(obs.finalize(_calibrate(obs, QuantSpec("int8"),
                                         [b[:, c] for b in batches]))[0])
           for c in range(3)]
  np.testing.assert_array_equal(np.asarray(per_channel)[0], alone)


def test_per_channel_middle_axis_of_conv_activations():
  rng = np.random.default_rng(9)
  x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
  x *= np.arange(1, 4, dtype=np.float32)[None, :, None, None]
  spec = QuantSpec("int8", PerChannel(axis=1), calibration="percentile")
  obs = jaxq.observers.percentile(100.0, num_bins=64)
  amax = obs.finalize(_calibrate(obs, spec, [x]))
  np.testing.assert_array_equal(
      np.asarray(amax), np.abs(x).max(axis=(0, 2, 3), keepdims=True))


def test_one_pass_finalized_by_several_methods():
  batches = _laplace_batches(10, n=2)
  state = _calibrate(jaxq.observers.entropy(), INT8, batches)
  for make in (lambda: jaxq.observers.percentile(99.99),
               lambda: jaxq.observers.percentile(99.999),
               jaxq.observers.mse):
    own_pass = _calibrate(make(), INT8, batches)
    chex.assert_trees_all_equal(own_pass.counts, state.counts)
    np.testing.assert_array_equal(make().finalize(state),
                                  make().finalize(own_pass))
  np.testing.assert_array_equal(
      jaxq.observers.max().finalize(state),
      [np.abs(np.concatenate(batches)).max()])
  with pytest.raises(ValueError, match="1024 .*2048 bins|2048 bins.*1024"):
    jaxq.observers.percentile(num_bins=1024).finalize(state)


def test_nonfinite_values_are_counted_and_excluded():
  x = np.array([0.5, np.nan, -2.0, np.inf, 1.0, -np.inf], np.float32)
  obs = jaxq.observers.percentile(100.0, num_bins=16)
  state = _calibrate(obs, QuantSpec("int8"), [x, x])
  assert int(calibration.nonfinite_count(state)) == 6
  assert int(np.asarray(state.counts).sum()) == 6
  np.testing.assert_array_equal(np.asarray(obs.finalize(state)), [2.0])


def test_all_zero_data_gives_zero_amax():
  for obs in (jaxq.observers.percentile(num_bins=64),
              jaxq.observers.entropy(num_bins=64, start_bin=8),
              jaxq.observers.mse(num_bins=64)):
    state = _calibrate(obs, QuantSpec("int8"), [np.zeros(10, np.float32)])
    np.testing.assert_array_equal(np.asarray(obs.finalize(state)), [0.0])
    assert int(np.asarray(state.counts)[0, 0]) == 10


def test_merge_of_power_of_two_ranges_equals_one_pass():
  rng = np.random.default_rng(11)
  a = rng.uniform(-1, 1, 1000).astype(np.float32)
  a[0] = 1.0
  b = rng.uniform(-2, 2, 1000).astype(np.float32)
  b[0] = -2.0
  obs = jaxq.observers.entropy(num_bins=256, start_bin=32)
  merged = jaxq.observers.merge(_calibrate(obs, INT8, [a]),
                                _calibrate(obs, INT8, [b]))
  chex.assert_trees_all_equal(merged, _calibrate(obs, INT8, [a, b]))


def test_merge_of_unaligned_ranges_keeps_every_count():
  rng = np.random.default_rng(12)
  a, b = (rng.standard_normal(1000).astype(np.float32) * s for s in (1, 3))
  obs = jaxq.observers.percentile(99.0, num_bins=128)
  merged = jaxq.observers.merge(_calibrate(obs, INT8, [a]),
                                _calibrate(obs, INT8, [b]))
  assert int(np.asarray(merged.counts).sum()) == 2000
  reference = np.percentile(np.abs(np.concatenate([a, b])), 99.0)
  assert abs(float(obs.finalize(merged)[0]) - reference) <= 2 * float(
      merged.bin_width[0])


def test_sharded_batch_gives_single_device_statistics():
  devices = np.array(jax.devices())
  mesh = jax.sharding.Mesh(devices, ("batch",))
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("batch"))
  rng = np.random.default_rng(13)
  x = rng.laplace(size=(8 * len(devices), 6)).astype(np.float32)
  spec = QuantSpec("int8", PerChannel(axis=-1))
  for obs in (jaxq.observers.max(), jaxq.observers.entropy(num_bins=128,
                                                           start_bin=32)):
    state = obs.init(x, spec)
    sharded = jax.jit(obs.update)(state, jax.device_put(x, sharding))
    chex.assert_trees_all_equal(sharded, obs.update(state, jnp.asarray(x)))


@pytest.mark.parametrize("spec, match", [
    (QuantSpec("int8", PerToken(), calibration="entropy"), "per-channel"),
    (QuantSpec("int8", PerGroup(size=4), calibration="mse"), "per-channel"),
    (QuantSpec("uint8", symmetric=False, calibration="percentile"),
     "affine"),
])
def test_histogram_rejects_dynamic_grouped_and_affine_specs(spec, match):
  with pytest.raises(ValueError, match=match):
    jaxq.observers.observer_for(spec)
  with pytest.raises(ValueError, match=match):
    jaxq.observers.percentile().init(jnp.zeros((4, 8)), spec)


def test_observer_for_picks_the_named_method():
  rng = np.random.default_rng(14)
  x = rng.standard_normal(4096).astype(np.float32)
  state = _calibrate(jaxq.observers.entropy(), INT8, [x])
  for method, reference in (
      ("max", jaxq.observers.max()),
      ("percentile", jaxq.observers.percentile(99.9)),
      ("entropy", jaxq.observers.entropy()),
      ("mse", jaxq.observers.mse())):
    spec = QuantSpec("int8", PerTensor(), calibration=method,
                     **({"percentile": 99.9} if method == "percentile" else {}))
    obs = jaxq.observers.observer_for(spec)
    np.testing.assert_array_equal(obs.finalize(state),
                                  reference.finalize(state))
  spec = QuantSpec("int8", calibration="mse")
  assert isinstance(jaxq.observers.observer_for(spec).init(x, spec),
                    calibration.HistogramState)


def test_bad_arguments_are_rejected():
  with pytest.raises(ValueError, match="q must be"):
    jaxq.observers.percentile(0.0)
  with pytest.raises(ValueError, match="start_bin"):
    jaxq.observers.entropy(num_bins=64, start_bin=128)
  with pytest.raises(ValueError, match="num_bins"):
    jaxq.observers.mse(num_bins=1)
  with pytest.raises(ValueError, match="HistogramState"):
    state = jaxq.observers.max().init(jnp.zeros(3), INT8)
    jaxq.observers.entropy().finalize(state)
