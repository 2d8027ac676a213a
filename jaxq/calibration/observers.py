"""The public observer constructors, `observer_for` and `merge`.

``jaxq.observers`` re-exports this module:

```python
obs = jaxq.observers.entropy(num_bins=2048, start_bin=128)
state = obs.init(x, spec)
state = jax.jit(obs.update)(state, x)
amax = obs.finalize(state)                          # KL threshold
amax_999 = jaxq.observers.percentile(99.9).finalize(state)   # same pass
amax_max = jaxq.observers.max().finalize(state)               # exact max
```

`percentile`, `entropy` and `mse` share one state type, `HistogramState`, so
a single calibration pass can be finalized by each of them (and by `max`,
which reads the state's exact running max): the observers only have to be
built with the same ``num_bins`` as the one that made the state.
"""

from __future__ import annotations

from jaxq.calibration import base
from jaxq.calibration import histogram
from jaxq.calibration import minmax
from jaxq.calibration import thresholds
from jaxq.spec import QuantSpec

Observer = base.Observer
nonfinite_count = base.nonfinite_count

DEFAULT_NUM_BINS = 2048


def _finalize_max(state: base.State) -> base.Range:
  if isinstance(state, histogram.HistogramState):
    return state.amax
  return minmax.finalize_max(state)


def max() -> base.Observer:  # pylint: disable=redefined-builtin
  """The running max |x| (symmetric) or min/max (affine) per scale block.

  Any granularity. Its ``finalize`` also accepts a `HistogramState`, whose
  exact running max it returns.
  """
  return minmax.max_observer()._replace(finalize=_finalize_max)


def _histogram_observer(num_bins: int, select, what: str) -> base.Observer:
  """An observer over `HistogramState` whose finalize applies ``select``.

  ``select(counts, width, amax, spec)`` maps flattened ``(channels,
  num_bins)`` counts and ``(channels,)`` widths and maxima to ``(channels,)``.
  """
  histogram.check_num_bins_arg(num_bins, what)

  def init(x, spec: QuantSpec) -> histogram.HistogramState:
    return histogram.init_histogram(x, spec, num_bins)

  def finalize(state: histogram.HistogramState):
    histogram.check_num_bins(state, num_bins, what)
    shape = state.range.shape
    amax = select(state.counts.reshape(-1, num_bins),
                  state.bin_width.reshape(-1), state.amax.reshape(-1),
                  state.spec)
    return amax.reshape(shape)

  return base.Observer(init=init, update=histogram.update_histogram,
                       finalize=finalize)


def percentile(q: float = 99.99, num_bins: int = DEFAULT_NUM_BINS
               ) -> base.Observer:
  """The ``q``-th percentile of |x| (e.g. 99.9, 99.99, 99.999, 99.9999).

  Per-tensor or per-channel, symmetric. Estimates numpy's default
  ("linear") percentile of |x| from the histogram, within half a bin width
  of the exact value; ``q = 100`` gives the exact max.
  """
  if not 0.0 < q <= 100.0:
    raise ValueError(f"percentile: q must be in (0, 100], got {q}.")
  return _histogram_observer(
      num_bins,
      lambda counts, width, amax, spec: thresholds.percentile_amax(
          counts, width, amax, q),
      f"percentile({q})")


def entropy(num_bins: int = DEFAULT_NUM_BINS, start_bin: int = 128
            ) -> base.Observer:
  """TensorRT's KL-divergence threshold over a ``num_bins`` |x| histogram.

  Candidates are the bin edges ``i * width`` for ``i`` in ``[start_bin,
  num_bins]``; the quantized distribution has ``2**(bits - 1)`` levels of
  the spec's format (128 for int8 and fp8, 8 for int4 and fp4). See
  `jaxq.calibration.thresholds` for the algorithm. Per-tensor or
  per-channel, symmetric.
  """
  histogram.check_num_bins_arg(num_bins, "entropy")
  if not isinstance(start_bin, int) or not 1 <= start_bin <= num_bins:
    raise ValueError(f"entropy: start_bin must be an integer in [1, "
                     f"num_bins={num_bins}], got {start_bin!r}.")

  def select(counts, width, amax, spec: QuantSpec):
    return thresholds.entropy_amax(counts, width, amax,
                                   num_levels=2 ** (spec.fmt.bits - 1),
                                   start_bin=start_bin)

  return _histogram_observer(num_bins, select, "entropy")


def mse(num_bins: int = DEFAULT_NUM_BINS) -> base.Observer:
  """The bin edge minimising the expected quantization MSE (clip + round).

  Per-tensor or per-channel, symmetric; the rounding noise follows the
  spec's format (uniform for integers, per-binade for floats). See
  `jaxq.calibration.thresholds`.
  """
  return _histogram_observer(
      num_bins,
      lambda counts, width, amax, spec: thresholds.mse_amax(
          counts, width, amax, fmt=spec.fmt),
      "mse")


def observer_for(spec: QuantSpec) -> base.Observer:
  """The observer that ``spec.calibration`` names, with default settings.

  ``"max"`` gives `max`; ``"percentile"`` gives ``percentile(
  spec.percentile)``; ``"entropy"`` and ``"mse"`` give `entropy` and `mse`.
  Histogram methods need a symmetric per-tensor or per-channel spec and
  raise a ValueError here otherwise.
  """
  if spec.calibration == "max":
    return max()
  histogram.check_histogram_spec(spec, "observer_for")
  if spec.calibration == "percentile":
    return percentile(spec.percentile)
  if spec.calibration == "entropy":
    return entropy()
  if spec.calibration == "mse":
    return mse()
  raise ValueError(f"observer_for: no observer for calibration "
                   f"{spec.calibration!r} in {spec}.")


def merge(a: base.State, b: base.State) -> base.State:
  """Combines two observer states of the same kind, spec and shape.

  Use it to reduce per-device or per-run states: max states take the
  elementwise max of ``amax`` (and min of ``amin``); histogram states sum
  their counts after re-binning onto the larger range (see
  `jaxq.calibration.histogram`). Both sum their ``nonfinite`` counts.
  """
  if isinstance(a, minmax.MaxState) and isinstance(b, minmax.MaxState):
    return minmax.merge_max_states(a, b)
  if (isinstance(a, histogram.HistogramState) and
      isinstance(b, histogram.HistogramState)):
    return histogram.merge_histograms(a, b)
  raise ValueError(f"merge: cannot merge a {type(a).__name__} with a "
                   f"{type(b).__name__}; both must be states of the same "
                   f"observer kind.")
