"""Choosing ``amax`` from an |x| histogram: percentile, entropy (KL) and MSE.

Every function takes ``counts`` (int32 ``(channels, num_bins)``; bin ``i`` of
channel ``c`` holds ``(i, i + 1] * width[c]``), ``width`` (float32
``(channels,)``) and the exact data ``amax`` (float32 ``(channels,)``), and
returns float32 ``(channels,)``. Results never exceed the data's ``amax``: a
range beyond the largest value seen only coarsens the grid. An empty
histogram gives 0. The search over candidate thresholds is vectorised: one
``(candidates, num_bins)`` array per channel, channels mapped sequentially
with `jax.lax.map` to bound memory (about 16 MB per array at 2048 bins).
The functions are jitted (settings static), so eager calls compile once.

Cost: entropy and MSE evaluate ``O(num_bins**2)`` terms per channel (about
4M at 2048 bins): milliseconds per tensor on an accelerator, tens of
milliseconds on a CPU. Per-channel histograms pay that once per channel, so
on a CPU prefer fewer bins for per-channel entropy/MSE of wide layers.

* `percentile_amax`: numpy's default ("linear") percentile, estimated from
  the histogram: the two order statistics around the 0-based rank
  ``q / 100 * (N - 1)`` sit at their bins' centres (the largest at the exact
  max) and are interpolated linearly, so the result is within half a bin
  width of ``np.percentile(|x|, q)``.
* `entropy_amax`: TensorRT's KL-divergence search. For every candidate
  ``i`` in ``[start_bin, num_bins]``: the reference ``P`` is ``counts[:i]``
  with the outliers ``sum(counts[i:])`` added to its last bin; the candidate
  ``Q`` splits ``counts[:i]`` into ``num_levels`` equal runs of bins
  (bin ``j`` in level ``(j * num_levels) // i``), gives every non-zero bin
  of a run the run's mean over its non-zero bins, and leaves empty bins
  empty. ``KL(P || Q)`` of the normalised pair is computed for all
  candidates at once and the last minimiser ``i`` gives ``amax = i * width``
  (a ``P > 0`` where ``Q == 0`` makes the divergence infinite).
* `mse_amax`: the amax among the bin edges ``i * width`` (``i`` in
  ``[1, num_bins]``) minimising the expected squared error per element:
  bins whose centre lies beyond the amax are clipped, costing
  ``(centre - amax)**2``; bins inside cost the rounding noise
  ``step**2 / 12``, ``step = scale = amax / qmax`` for integer formats and
  the local grid spacing ``scale * 2**(e - mantissa_bits)`` of the binade
  ``e`` for float formats.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

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


def _entropy_one(counts: jax.Array, width: jax.Array, *, num_levels: int,
                 start_bin: int) -> jax.Array:
  """The KL threshold of one histogram ``(num_bins,)``."""
  num_bins = counts.shape[0]
  candidates = jnp.arange(start_bin, num_bins + 1, dtype=jnp.int32)  # (T,)
  prefix = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(counts)])
  prefix_nonzero = jnp.concatenate(
      [jnp.zeros(1, jnp.int32), jnp.cumsum(counts > 0, dtype=jnp.int32)])
  total = prefix[-1]

  # Level l of candidate i spans bins [ceil(l i / L), ceil((l + 1) i / L)).
  levels = jnp.arange(num_levels + 1, dtype=jnp.int32)
  edges = (levels[None, :] * candidates[:, None] + num_levels - 1) // num_levels
  level_sum = jnp.diff(prefix[edges], axis=-1).astype(jnp.float32)
  level_nonzero = jnp.diff(prefix_nonzero[edges], axis=-1)
  level_mean = level_sum / jnp.maximum(level_nonzero, 1)  # (T, L)

  bins = jnp.arange(num_bins, dtype=jnp.int32)
  inside = bins[None, :] < candidates[:, None]  # (T, num_bins)
  level_of_bin = jnp.minimum((bins[None, :] * num_levels) // candidates[:, None],
                             num_levels - 1)
  expanded = jnp.take_along_axis(level_mean, level_of_bin, axis=-1)
  q = jnp.where(inside & (counts > 0)[None, :], expanded, 0.0)
  outliers = (total - prefix[candidates]).astype(jnp.float32)
  p = (jnp.where(inside, counts[None, :], 0).astype(jnp.float32) +
       jnp.where(bins[None, :] == candidates[:, None] - 1, outliers[:, None],
                 0.0))

  # KL of P = p / total and Q = q / sum(q), with sum(q) = prefix[i].
  total_f = total.astype(jnp.float32)
  norm = prefix[candidates].astype(jnp.float32) / jnp.maximum(total_f, 1.0)
  ratio = p / jnp.where(q > 0, q, 1.0) * norm[:, None]
  terms = jnp.where(q > 0, p / jnp.maximum(total_f, 1.0) * jnp.log(
      jnp.where(p > 0, ratio, 1.0)), jnp.where(p > 0, jnp.inf, 0.0))
  divergence = jnp.sum(terms, axis=-1)
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
  """The MSE-optimal amax of one histogram ``(num_bins,)``."""
  num_bins = counts.shape[0]
  candidates = jnp.arange(1, num_bins + 1, dtype=jnp.float32) * width  # (T,)
  centres = (jnp.arange(num_bins, dtype=jnp.float32) + 0.5) * width
  scale = jnp.maximum(candidates / fmt.qmax, jnp.finfo(jnp.float32).tiny)
  clipped = centres[None, :] > candidates[:, None]
  step = _rounding_step(centres[None, :], scale[:, None], fmt)
  error = jnp.where(clipped, (centres[None, :] - candidates[:, None]) ** 2,
                    step ** 2 / 12.0)
  total_error = jnp.sum(counts[None, :].astype(jnp.float32) * error, axis=-1)
  return candidates[jnp.argmin(total_error)]


@functools.partial(jax.jit, static_argnames=("fmt",))
def mse_amax(counts: jax.Array, width: jax.Array, amax: jax.Array, *,
             fmt: formats_lib.Format) -> jax.Array:
  """The bin edge minimising the expected quantization MSE, per channel."""
  return _per_channel(functools.partial(_mse_one, fmt=fmt), counts, width,
                      amax)
