"""The |x| histogram shared by the percentile, entropy and MSE observers.

Shapes: for batches of shape ``S`` under a spec whose granularity has scale
shape ``K`` (per-tensor: all ones; per-channel: the channel sizes in place,
ones elsewhere), a `HistogramState` holds

* ``counts``: int32 ``K + (num_bins,)``, one histogram of |x| per channel;
* ``range``: float32 ``K``; channel ``c``'s histogram covers
  ``[0, range[c]]`` in ``num_bins`` bins of width ``w = range[c] / num_bins``,
  bin ``i`` holding ``(i w, (i + 1) w]`` (bin 0 also holds 0);
* ``amax``: float32 ``K``, the exact running max |x| (no histogram needed);
* ``nonfinite``: int32 scalar, NaN/Inf elements seen and left out.

Range growth inside ``jit``, without losing counts: the first batch with a
non-zero value sets ``range`` to its max |x|. A later batch whose max |x|
exceeds ``range`` doubles it ``k`` times, ``k`` the smallest integer with
``range * 2**k >= max |x|`` (computed in ``jit``, per channel), and old bin
``i`` moves to bin ``i >> k``: bins ``2**k * j ... 2**k * (j + 1) - 1`` of
the old grid are exactly bin ``j`` of the new one, because the ranges are
power-of-two multiples of each other. The merge is a scatter-add by index,
so every count survives and shapes stay static. The result equals one pass
over all batches with the final range, bin for bin: with right-closed bins,
``(ceil(y) - 1) >> k == ceil(y / 2**k) - 1`` for every ``y > 0``, and the
scaling by ``2**k`` is exact in floating point.

Because every state's range is a power-of-two multiple of its first
batch's max, states reduce across batches or devices (`merge_histograms`)
by re-binning both onto the larger range and summing counts. Each source
bin moves whole to the target bin holding its centre: exact (bin for bin
as above) when the two ranges are power-of-two multiples of each other, as
for states that saw the same first batch; otherwise no count is lost and
each count moves by less than one target bin width. Within one ``jit`` over
a batch sharded across devices, XLA reduces the statistics globally and no
merge is needed.

Ranges stay finite. Where doubling would pass the float32 max (a first
batch at 1e-30, a later one at 1e38), the range stops at the last finite
doubling, which is above half the running max, and the values between the
range and the max are counted in the last bin; the exact max is kept in
``amax``, and percentile, entropy and MSE stay finite and below it. For
the same reason ranges below about 1e-35 (``num_bins`` times the smallest
normal float32) count their bins by division rather than by an overflowing
reciprocal width.

Counts are int32, exact up to 2**31 - 1 per bin.

A ``mask`` over the batch's leading axes (`update_histogram`) leaves its
False positions out of everything above (counts, range growth, ``amax``,
``nonfinite``): the state equals that of the batch with them removed.

Only static, reduce-everything-but-channels granularities have histograms:
`PerTensor` and `PerChannel`. Per-token ranges are dynamic by nature and
per-group / per-block / MX ranges are per weight block, so those raise.
Histogram methods choose a symmetric ``amax`` from |x|: affine specs
(``symmetric=False``) raise and should use the max observer.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import granularity as granularity_lib
from jaxq.calibration import base
from jaxq.spec import QuantSpec


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["counts", "range", "amax", "nonfinite"],
    meta_fields=["spec"])
@dataclasses.dataclass(frozen=True)
class HistogramState:
  """Per-channel |x| histograms; see the module docstring for the layout.

  Attributes:
    counts: int32 ``scale_shape + (num_bins,)``.
    range: float32 ``scale_shape``; the histogram covers ``[0, range]``.
    amax: float32 ``scale_shape``, the exact running max |x|.
    nonfinite: int32 scalar, NaN/Inf elements seen and skipped.
    spec: the quantizer (static).
  """

  counts: jax.Array
  range: jax.Array
  amax: jax.Array
  nonfinite: jax.Array
  spec: QuantSpec

  @property
  def num_bins(self) -> int:
    return int(self.counts.shape[-1])

  @property
  def bin_width(self) -> jax.Array:
    """float32 ``scale_shape``: the width of every bin of each channel."""
    return self.range / self.num_bins


def check_histogram_spec(spec: QuantSpec, what: str) -> None:
  """Raises unless ``spec`` can be calibrated from |x| histograms."""
  if not isinstance(spec.granularity,
                    (granularity_lib.PerTensor, granularity_lib.PerChannel)):
    raise ValueError(
        f"{what}: histogram calibration ({spec.calibration!r}) needs a static "
        f"per-tensor or per-channel granularity, got {spec.granularity}. "
        f"Per-token activation ranges are dynamic by nature (use "
        f"dynamic=True), and per-group/per-block/MX ranges come from the "
        f"weights themselves (use the max observer).")
  if not spec.symmetric:
    raise ValueError(
        f"{what}: histogram calibration ({spec.calibration!r}) picks a "
        f"symmetric amax from |x|; an affine spec ({spec.format}, "
        f"symmetric=False) needs calibration='max'.")


def _kept_axes(spec: QuantSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The axes that keep one scale per index (none for per-tensor)."""
  blocks = spec.granularity.block_shape(shape)
  return tuple(a for a, (d, b) in enumerate(zip(shape, blocks))
               if b == 1 and d > 1)


def channels_first(x: jax.Array, spec: QuantSpec) -> jax.Array:
  """``x`` as ``(channels, elements)``; channels in scale row-major order."""
  shape = tuple(x.shape)
  kept = _kept_axes(spec, shape)
  rest = tuple(a for a in range(len(shape)) if a not in kept)
  channels = math.prod(shape[a] for a in kept)
  return jnp.transpose(x, kept + rest).reshape(channels, -1)


def init_histogram(x: jax.Array, spec: QuantSpec, num_bins: int
                   ) -> HistogramState:
  """An empty histogram state for batches shaped like ``x``."""
  base.check_float(x, "histogram observer init")
  check_histogram_spec(spec, "histogram observer init")
  shape = granularity_lib.scale_shape(spec.granularity, tuple(x.shape))
  return HistogramState(counts=jnp.zeros(shape + (num_bins,), jnp.int32),
                        range=jnp.zeros(shape, jnp.float32),
                        amax=jnp.zeros(shape, jnp.float32),
                        nonfinite=jnp.zeros((), jnp.int32), spec=spec)


def _growth(old_range: jax.Array, amax: jax.Array) -> jax.Array:
  """Smallest ``k >= 0`` with ``old_range * 2**k >= amax`` (0 if empty).

  When that range would overflow float32 (a first batch at 1e-30, a later
  one at 3e38), ``k`` is one less: the largest doubling that stays finite,
  at least ``amax / 2`` (see `update_histogram` for the values above it).
  """
  positive = old_range > 0
  safe_range = jnp.where(positive, old_range, 1.0)
  safe_amax = jnp.maximum(amax, safe_range)
  # log2 of each side, not of their ratio, which overflows for ranges far
  # apart (1e30 / 1e-30).
  k = jnp.ceil(jnp.log2(safe_amax) - jnp.log2(safe_range))
  k = jnp.clip(k, 0.0, 300.0).astype(jnp.int32)
  # log2 rounds; ldexp by an integer is exact, so correct the estimate by
  # one in either direction against the exact product.
  k = jnp.where(jnp.ldexp(safe_range, k) < amax, k + 1, k)
  k = jnp.where((k > 0) & (jnp.ldexp(safe_range, k - 1) >= amax), k - 1, k)
  k = jnp.where(jnp.isfinite(jnp.ldexp(safe_range, k)), k, k - 1)
  return jnp.where(positive, k, 0)


def coarsen(counts: jax.Array, shift: jax.Array) -> jax.Array:
  """Merges bins ``2**shift``-to-1 per channel: bin ``i`` goes to ``i >> shift``.

  Args:
    counts: ``(channels, num_bins)``.
    shift: int32 ``(channels,)``, ``>= 0``.
  """
  channels, num_bins = counts.shape
  # Shifting by >= log2(num_bins) already sends every bin to 0; the clip
  # keeps the shift amount defined for the int32 shift.
  shift = jnp.minimum(shift, 31)
  target = jnp.arange(num_bins, dtype=jnp.int32)[None, :] >> shift[:, None]
  rows = jnp.arange(channels)[:, None]
  return jnp.zeros_like(counts).at[rows, target].add(counts)


def update_histogram(state: HistogramState, x: jax.Array,
                     mask: jax.Array | None = None) -> HistogramState:
  """Adds batch ``x`` to the histograms, growing their ranges as needed.

  ``mask`` (optional, over ``x``'s leading axes, see
  `jaxq.calibration.base.broadcast_mask`): False positions enter no count,
  no range growth and no maximum, as if they were not in ``x``.
  """
  spec = state.spec
  base.check_float(x, "histogram observer update")
  base.check_shape("histogram observer update",
                   granularity_lib.scale_shape(spec.granularity,
                                               tuple(x.shape)),
                   x, spec, tuple(state.range.shape))
  keep = (None if mask is None else
          base.broadcast_mask(mask, x, "histogram observer update"))
  if x.size == 0:  # Nothing to observe.
    return state
  num_bins = state.num_bins
  magnitude = jnp.abs(channels_first(x.astype(jnp.float32), spec))
  finite = jnp.isfinite(magnitude)
  if keep is None:
    observed, nonfinite = finite, jnp.sum(~finite, dtype=jnp.int32)
  else:
    keep = channels_first(keep, spec)
    observed = finite & keep
    nonfinite = jnp.sum(keep & ~finite, dtype=jnp.int32)
  magnitude = jnp.where(observed, magnitude, 0.0)
  batch_amax = jnp.max(magnitude, axis=1)

  old_range = state.range.reshape(-1)
  shift = _growth(old_range, batch_amax)
  new_range = jnp.where(old_range > 0, jnp.ldexp(old_range, shift),
                        batch_amax)
  counts = coarsen(state.counts.reshape(-1, num_bins), shift)

  # Bin i holds (i, i + 1] * width (bin 0 also holds 0): closed on the
  # right, so |x| == range lands in the last bin without clipping and the
  # 2**k-to-1 merge stays exact at bin edges.
  # Values above a range capped below the float32 max join the last bin.
  inv_width = jnp.where(new_range > 0, num_bins / new_range, 0.0)
  position = jnp.where(jnp.isfinite(inv_width)[:, None],
                       magnitude * inv_width[:, None],
                       magnitude / new_range[:, None] * num_bins)
  bins = jnp.clip(jnp.ceil(position) - 1, 0, num_bins - 1).astype(jnp.int32)
  rows = jnp.arange(counts.shape[0])[:, None]
  counts = counts.at[rows, bins].add(observed.astype(jnp.int32))

  return HistogramState(
      counts=counts.reshape(state.counts.shape),
      range=new_range.reshape(state.range.shape),
      amax=jnp.maximum(state.amax, batch_amax.reshape(state.amax.shape)),
      nonfinite=state.nonfinite + nonfinite,
      spec=spec)


def _rebin_onto(counts: jax.Array, source_range: jax.Array,
                target_range: jax.Array) -> jax.Array:
  """Moves every bin to the bin of ``target_range`` holding its centre."""
  channels, num_bins = counts.shape
  ratio = jnp.where(target_range > 0, source_range / target_range, 0.0)
  centres = jnp.arange(num_bins, dtype=jnp.float32) + 0.5
  target = jnp.clip(jnp.floor(centres[None, :] * ratio[:, None]), 0,
                    num_bins - 1).astype(jnp.int32)
  rows = jnp.arange(channels)[:, None]
  return jnp.zeros_like(counts).at[rows, target].add(counts)


def merge_histograms(a: HistogramState, b: HistogramState) -> HistogramState:
  """Combines two histogram states (batches or devices); see module doc."""
  if a.spec != b.spec or a.counts.shape != b.counts.shape:
    raise ValueError(
        f"merge: histogram states differ: spec {a.spec} with counts "
        f"{tuple(a.counts.shape)} vs spec {b.spec} with counts "
        f"{tuple(b.counts.shape)}; merge states of the same observer.")
  num_bins = a.num_bins
  range_a, range_b = a.range.reshape(-1), b.range.reshape(-1)
  target = jnp.maximum(range_a, range_b)
  counts = (_rebin_onto(a.counts.reshape(-1, num_bins), range_a, target) +
            _rebin_onto(b.counts.reshape(-1, num_bins), range_b, target))
  return HistogramState(counts=counts.reshape(a.counts.shape),
                        range=target.reshape(a.range.shape),
                        amax=jnp.maximum(a.amax, b.amax),
                        nonfinite=a.nonfinite + b.nonfinite, spec=a.spec)


def check_num_bins(state: HistogramState, num_bins: int, what: str) -> None:
  if not isinstance(state, HistogramState):
    raise ValueError(f"{what} finalizes a HistogramState, got "
                     f"{type(state).__name__}; build the state with a "
                     f"histogram observer (percentile, entropy or mse).")
  if state.num_bins != num_bins:
    raise ValueError(
        f"{what}: the state has {state.num_bins} bins but this observer was "
        f"built with num_bins={num_bins}; one histogram pass can be finalized "
        f"by several methods when they are built with the same num_bins.")


def check_num_bins_arg(num_bins: int, what: str) -> None:
  if (not isinstance(num_bins, (int, np.integer)) or isinstance(num_bins, bool)
      or num_bins < 2):
    raise ValueError(f"{what}: num_bins must be an integer >= 2, got "
                     f"{num_bins!r}.")
