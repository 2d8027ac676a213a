"""Choosing ``amax`` from an |x| histogram: percentile, entropy (KL) and MSE.

Every function takes ``counts`` (int32 ``(channels, num_bins)``; bin ``i`` of
channel ``c`` holds ``(i, i + 1] * width[c]``), ``width`` (float32
``(channels,)``) and the exact data ``amax`` (float32 ``(channels,)``), and
returns float32 ``(channels,)``. Results never exceed the data's ``amax``: a
range beyond the largest value seen only coarsens the grid. An empty
histogram gives 0. The search over candidate thresholds is vectorised: one
``(candidates, num_bins)`` array per channel for MSE, ``(candidates,
num_levels)`` for entropy, channels mapped sequentially with `jax.lax.map`
to bound memory (about 16 MB per MSE array at 2048 bins). The functions
are jitted (settings static), so eager calls compile once.

Cost: MSE evaluates ``O(num_bins**2)`` terms per channel (about 4M at 2048
bins): milliseconds per tensor on an accelerator, tens of milliseconds on
a CPU, paid once per channel by per-channel histograms. Entropy sums per
level instead of per bin, ``O(num_bins * num_levels)`` (about 250K terms
for int8 at 2048 bins): about 2 ms per channel on a CPU.

* `percentile_amax`: numpy's default ("linear") percentile, estimated from
  the histogram: the two order statistics around the 0-based rank
  ``q / 100 * (N - 1)`` sit at their bins' centres (the largest at the exact
  max) and are interpolated linearly, so the result is within half a bin
  width of ``np.percentile(|x|, q)``.
* `entropy_amax`: TensorRT's KL-divergence search, as pytorch-quantization
  runs it. Bin 0 first takes bin 1's count: it holds the exact zeros, which
  after a ReLU are half the values and would otherwise pull the threshold
  far below the bulk of the data. Then for every candidate
  ``i`` in ``[start_bin, num_bins]``: the reference ``P`` is ``counts[:i]``
  with the outliers ``sum(counts[i:])`` added to its last bin; the candidate
  ``Q`` splits ``counts[:i]`` into ``num_levels`` equal runs of bins
  (bin ``j`` in level ``(j * num_levels) // i``), gives every non-zero bin
  of a run the run's mean over its non-zero bins, and leaves empty bins
  empty. ``KL(P || Q)`` of the normalised pair is computed for all
  candidates at once, level by level from prefix sums of ``c log c``
  (split on power-of-two grids, so float32 keeps the small differences; see
  `_entropy_one`), and the last minimiser ``i`` gives ``amax = i * width``
  (a ``P > 0`` where ``Q == 0`` makes the divergence infinite).
* `mse_amax`: the amax among the bin edges ``i * width`` (``i`` in
  ``[1, num_bins]``) minimising the expected squared error per element:
  bins whose centre lies beyond the amax are clipped, costing
  ``(centre - amax)**2``; bins inside cost the rounding noise
  ``step**2 / 12``, ``step = scale = amax / amax_level`` for integer
  formats and the local grid spacing ``scale * 2**(e - mantissa_bits)`` of
  the binade ``e`` for float formats (`jaxq.formats.Format.amax_level`:
  ``qmax``, or ``qmax + 0.5`` in the full integer range). In the full range
  the two signs clip at different ends, ``qmax * scale = amax - step / 2``
  above and ``-(qmax + 1) * scale = -(amax + step / 2)`` below, so a clipped
  bin costs the mean of the two signs' errors, ``d = centre - amax``:
  ``((d + step / 2)**2 + (d - step / 2)**2) / 2`` (the second the rounding
  noise while ``d <= step / 2``); with ``step / 2`` zero, ``d**2`` as
  above. The errors are computed in units of the bin
  width, so the choice does not depend on the data's magnitude (squares of
  values below 1e-19 would underflow, above 1e19 overflow).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import formats as formats_lib

def _per_channel(fn, counts: jax.Array, width: jax.Array, amax: jax.Array
                 ) -> jax.Array:
  # Sequential over channels: one (candidates, num_bins) search in memory.
  threshold = jax.lax.map(lambda args: fn(*args), (counts, width))
  return jnp.minimum(threshold, amax)


@functools.partial(jax.jit, static_argnames=("q",))
def percentile_amax(counts: jax.Array, width: jax.Array, amax: jax.Array,
                    q: float) -> jax.Array:
  """The ``q``-th percentile of |x| per channel (numpy's "linear" rule)."""
  cumulative = jnp.cumsum(counts, axis=-1).astype(jnp.float32)
  total = cumulative[:, -1]
  rank = (q / 100.0) * jnp.maximum(total - 1.0, 0.0)
  lower = jnp.floor(rank)
  upper = jnp.minimum(lower + 1.0, jnp.maximum(total - 1.0, 0.0))

  def order_statistic(k: jax.Array) -> jax.Array:
    # The element of 0-based rank k lies in the first bin whose cumulative
    # count exceeds k; the largest one is known exactly.
    bin_index = jnp.sum(cumulative <= k[:, None], axis=-1)
    centre = (bin_index.astype(jnp.float32) + 0.5) * width
    return jnp.where(k >= total - 1.0, amax, centre)

  low = order_statistic(lower)
  estimate = low + (rank - lower) * (order_statistic(upper) - low)
  return jnp.where(total > 0, jnp.minimum(estimate, amax), 0.0)


def _prefix_sums(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Prefix sums of float32 ``x`` ``(n,)`` as ``(hi, lo)``: differences of
  ``hi`` are exact, those of ``lo`` within about ``n * 2**-48`` of
  ``sum(|x|)``.

  Differences of plain float32 prefix sums lose the small ones to
  cancellation. So ``x`` is cut on two power-of-two grids, ``x = hi1 +
  hi2 + rest``: ``hi1`` on the grid ``q1 = 2**(e - 23)`` (``2**e >=
  sum(|x|)``), whose prefix sums are integer multiples of ``q1`` below
  ``2**24 q1``, exact in float32; ``hi2`` likewise on the grid ``q2`` of
  the remainders (each within ``q1 / 2``); the rest, each within ``q2 /
  2``, summed plainly. Each cut is exact (a remainder is a whole number of
  ``x``'s ulps, fewer than ``2**24``). Three plain cumsums compile in a
  third of the time of a compensated (TwoSum) associative scan. (Here
  ``x`` is ``c log c`` of counts, 0 or above 1, so the grids stay far from
  float32's subnormals.)
  """
  _, exponent = jnp.frexp(jnp.sum(jnp.abs(x)))
  q1 = jnp.ldexp(jnp.float32(1), exponent - 23)
  hi1 = jnp.round(x / q1) * q1
  rest = x - hi1
  # sum(|rest|) <= n * q1 / 2 <= 2**(bits - 1) * q1: q2's own headroom.
  q2 = q1 * np.float32(2.0 ** (max(x.shape[0] - 1, 1).bit_length() - 24))
  hi2 = jnp.round(rest / q2) * q2
  return jnp.cumsum(hi1), jnp.cumsum(hi2) + jnp.cumsum(rest - hi2)


def _entropy_one(counts: jax.Array, width: jax.Array, *, num_levels: int,
                 start_bin: int) -> jax.Array:
  """The KL threshold of one histogram ``(num_bins,)``.

  ``O(candidates * num_levels)``: within a level every non-zero bin of
  ``Q`` holds the level's mean ``m = S / N`` (``S`` its count, ``N`` its
  non-zero bins), so the level adds ``sum(c log c) - S log m`` to
  ``total * KL``, with ``sum(c log c)`` a difference of exact prefix
  sums. With ``prefix = counts[:i].sum()`` and ``o`` the outliers, which
  join bin ``i - 1`` (count ``c``, level mean ``m``)::

    total * KL = sum over levels + prefix log(prefix / total)
                 + c log1p(o / c) + o log((c + o) / m * prefix / total)

  (infinite when ``c == 0 < o``: P has mass where Q has none).
  """
  num_bins = counts.shape[0]
  if num_bins > 1:  # The zero spike (see the module docstring).
    counts = counts.at[0].set(counts[1])
  candidates = jnp.arange(start_bin, num_bins + 1, dtype=jnp.int32)  # (T,)
  zero = jnp.zeros(1, jnp.int32)
  prefix = jnp.concatenate([zero, jnp.cumsum(counts)])
  prefix_nonzero = jnp.concatenate(
      [zero, jnp.cumsum(counts > 0, dtype=jnp.int32)])
  count_f = counts.astype(jnp.float32)
  c_log_c = count_f * jnp.log(jnp.where(counts > 0, count_f, 1.0))
  c_log_c_hi, c_log_c_lo = (jnp.concatenate([jnp.zeros(1), part])
                            for part in _prefix_sums(c_log_c))
  total = prefix[-1]

  # Level l of candidate i spans bins [ceil(l i / L), ceil((l + 1) i / L)).
  levels = jnp.arange(num_levels + 1, dtype=jnp.int32)
  edges = (levels[None, :] * candidates[:, None] + num_levels - 1) // num_levels
  level_sum = jnp.diff(prefix[edges], axis=-1)  # (T, L)
  level_nonzero = jnp.diff(prefix_nonzero[edges], axis=-1)
  level_c_log_c = (jnp.diff(c_log_c_hi[edges], axis=-1) +
                   jnp.diff(c_log_c_lo[edges], axis=-1))
  level_sum_f = level_sum.astype(jnp.float32)
  log_mean = (jnp.log(jnp.where(level_sum > 0, level_sum_f, 1.0)) -
              jnp.log(jnp.maximum(level_nonzero, 1).astype(jnp.float32)))
  # A level with one non-zero bin has Q == P there: exactly zero.
  inside = jnp.sum(jnp.where(level_nonzero > 1,
                             level_c_log_c - level_sum_f * log_mean, 0.0),
                   axis=-1)

  total_f = jnp.maximum(total, 1).astype(jnp.float32)
  kept = prefix[candidates].astype(jnp.float32)
  kept_fraction = kept / total_f
  normalisation = kept * jnp.log(jnp.where(kept > 0, kept_fraction, 1.0))
  last = count_f[candidates - 1]
  outliers = (total - prefix[candidates]).astype(jnp.float32)
  last_log_mean = jnp.take_along_axis(
      log_mean, (((candidates - 1) * num_levels) // candidates)[:, None],
      axis=-1)[:, 0]
  safe_last = jnp.where(last > 0, last, 1.0)
  merged = (safe_last * jnp.log1p(outliers / safe_last) + outliers * (
      jnp.log((safe_last + outliers) * kept_fraction) - last_log_mean))
  divergence = (inside + normalisation +
                jnp.where(outliers > 0, merged, 0.0)) / total_f
  divergence = jnp.where((outliers > 0) & (last == 0), jnp.inf, divergence)
  # The last minimiser, as in TensorRT / pytorch-quantization.
  best = candidates.shape[0] - 1 - jnp.argmin(divergence[::-1])
  return candidates[best].astype(jnp.float32) * width


@functools.partial(jax.jit, static_argnames=("num_levels", "start_bin"))
def entropy_amax(counts: jax.Array, width: jax.Array, amax: jax.Array, *,
                 num_levels: int, start_bin: int) -> jax.Array:
  """TensorRT's minimum-KL threshold per channel (see the module docstring)."""
  fn = functools.partial(_entropy_one, num_levels=num_levels,
                         start_bin=start_bin)
  return _per_channel(fn, counts, width, amax)


def _rounding_step(magnitude: jax.Array, scale: jax.Array,
                   fmt: formats_lib.Format) -> jax.Array:
  """Spacing of ``fmt``'s grid around ``magnitude`` (broadcastable)."""
  if fmt.kind == "int":
    return scale
  scaled = magnitude / scale
  exponent = jnp.floor(jnp.log2(jnp.where(scaled > 0, scaled, 1.0)))
  exponent = jnp.maximum(exponent, fmt.min_normal_exponent)
  return scale * jnp.exp2(exponent - fmt.mantissa_bits)


def _mse_one(counts: jax.Array, width: jax.Array, *,
             fmt: formats_lib.Format) -> jax.Array:
  """The MSE-optimal amax of one histogram ``(num_bins,)``.

  The errors are computed in units of the bin width, where they are
  independent of the data's magnitude: squared in the data's own units they
  underflow below about 1e-19 (every candidate costing 0, the first one
  chosen) and overflow above about 1e19.
  """
  num_bins = counts.shape[0]
  candidates = jnp.arange(1, num_bins + 1, dtype=jnp.float32)  # (T,)
  centres = jnp.arange(num_bins, dtype=jnp.float32) + 0.5
  scale = candidates / fmt.amax_level
  # How far beyond +-amax each sign saturates: half a step in the full
  # integer range (below at amax + half, above at amax - half), else 0.
  half = ((fmt.amax_level - fmt.qmax) * scale)[:, None]
  distance = centres[None, :] - candidates[:, None]
  clipped = distance > 0
  step = _rounding_step(centres[None, :], scale[:, None], fmt)
  noise = step ** 2 / 12.0
  clip_error = 0.5 * (distance + half) ** 2 + 0.5 * jnp.where(
      distance > half, (distance - half) ** 2, noise)
  error = jnp.where(clipped, clip_error, noise)
  total_error = jnp.sum(counts[None, :].astype(jnp.float32) * error, axis=-1)
  return candidates[jnp.argmin(total_error)] * width


@functools.partial(jax.jit, static_argnames=("fmt",))
def mse_amax(counts: jax.Array, width: jax.Array, amax: jax.Array, *,
             fmt: formats_lib.Format) -> jax.Array:
  """The bin edge minimising the expected quantization MSE, per channel."""
  return _per_channel(functools.partial(_mse_one, fmt=fmt), counts, width,
                      amax)
