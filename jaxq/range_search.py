"""The range of one array as its spec's ``calibration`` asks, block by block.

`jaxq.compute_range` (and so `jaxq.quantize` and `jaxq.fake_quant` without
a range) computes the abs-max range itself and calls this module for the
other calibrations an array's own values can decide:

A group or block that does not divide its axis is ragged (see
`jaxq.granularity`): its last block is ranged over its own elements.

* ``"percentile"``: ``spec.percentile`` of ``|x|`` in each block (numpy's
  "linear" rule; in the full integer range of ``range_magnitude(x)``, the
  negative values divided by `jaxq.formats.Format.negative_reach`, so that
  the 100th percentile is the abs-max range); affine specs take the ``100 -
  q`` and ``q`` percentiles of ``x`` itself. Non-finite elements are left out, as the abs-max range
  leaves them out; a block with no finite element gives 0.
* ``"mse"``: per block, the clipping ratio ``r`` in a grid of
  ``num_ratios`` ratios in ``[min_ratio, 1]`` whose range ``r * (amin,
  amax)`` (the abs-max range scaled) minimises the block's squared
  quantization error ``sum (x - x_hat)**2`` over its finite elements. The
  grid is evaluated by `jax.lax.map` (a batch of ratios at a time, so
  memory stays a few copies of ``x``), never by a Python loop. An optional
  ``error_weight`` (broadcastable to ``x``, >= 0) weights each element's
  squared error (GPTQ passes its Hessian diagonal per input row).

``"entropy"`` (KL divergence between histograms) chooses a static range
from a histogram of many calibration batches (`jaxq.observers.entropy`,
`jaxq.calibrate`); one array's range refuses it, naming the field.

This module sits beside `jaxq.quantize` in the primitives layer and imports
nothing of it: the mse search is handed the round trip it scores
(``x_hat`` for a candidate range), which `jaxq.quantize` builds from its own
arithmetic. Shapes: ``x`` any shape ``S``; ranges in the keepdims scale
shape of ``spec.granularity`` for ``S`` (see `jaxq.granularity`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxq import formats as formats_lib
from jaxq import granularity as granularity_lib
from jaxq.spec import QuantSpec

Range = tuple[jax.Array | None, jax.Array]
# ``(amax, amin) -> x_hat``: ``x`` quantized and dequantized with that range.
RoundTrip = Callable[[jax.Array, jax.Array | None], jax.Array]

# The calibrations one array's own values decide (`check_array_calibration`).
ARRAY_CALIBRATIONS: tuple[str, ...] = ("max", "percentile", "mse")
# The mse search's default grid: 100 ratios from 1 down to 0.5.
NUM_RATIOS = 100
MIN_RATIO = 0.5


def check_array_calibration(spec: QuantSpec, what: str) -> None:
  """Raises a ValueError naming ``calibration`` unless one array's values
  can decide its range (``"max"``, ``"percentile"``, ``"mse"``)."""
  if spec.calibration not in ARRAY_CALIBRATIONS:
    raise ValueError(
        f"{what}: QuantSpec.calibration={spec.calibration!r} chooses a static "
        f"range from a histogram of calibration data (jaxq.calibrate, "
        f"jaxq.observers); the range of one array, computed when no amax is "
        f"given, supports calibration in {ARRAY_CALIBRATIONS}. Pass amax= "
        f"(e.g. from jaxq.calibrate) or another calibration.")


def _block_percentile(x: jax.Array, blocks: tuple[int, ...],
                      q: float) -> jax.Array:
  """The ``q``-th percentile of each block's non-NaN elements (0 if none)."""
  reducer = lambda a, axis, keepdims: jnp.nanpercentile(
      a, q, axis=axis, keepdims=keepdims)
  # NaN pads a ragged last block, which so ranges over its own elements; an
  # all-NaN block (jnp warns nothing under jit) gives NaN: 0 instead.
  return jnp.nan_to_num(granularity_lib.block_reduce(
      x, blocks, reducer, fill=jnp.nan), nan=0.0)


def percentile_range(x: jax.Array, spec: QuantSpec,
                     blocks: tuple[int, ...]) -> Range:
  """``spec.percentile`` of each block of float32 ``x`` (see the module
  docstring); ``blocks`` is ``spec.granularity.block_shape(x.shape)``."""
  finite = jnp.where(jnp.isfinite(x), x, jnp.nan)
  if spec.symmetric:
    magnitude = formats_lib.range_magnitude(finite, spec.negative_reach)
    return None, _block_percentile(magnitude, blocks, spec.percentile)
  return (_block_percentile(finite, blocks, 100.0 - spec.percentile),
          _block_percentile(finite, blocks, spec.percentile))


def block_squared_error(x: jax.Array, x_hat: jax.Array,
                        blocks: tuple[int, ...],
                        error_weight: jax.Array | None = None) -> jax.Array:
  """``sum error_weight * (x - x_hat)**2`` over the finite elements of each
  block (weight 1 by default); the scale shape."""
  squared = jnp.square(x - x_hat)
  if error_weight is not None:
    squared = squared * error_weight
  squared = jnp.where(jnp.isfinite(x), squared, 0.0)
  # A ragged last block's padding adds nothing.
  return granularity_lib.block_reduce(squared, blocks, jnp.sum, fill=0.0)


def mse_range(x: jax.Array, blocks: tuple[int, ...], max_range: Range,
              round_trip: RoundTrip, *, num_ratios: int = NUM_RATIOS,
              min_ratio: float = MIN_RATIO,
              error_weight: jax.Array | None = None) -> Range:
  """The abs-max range ``max_range`` of float32 ``x``, scaled per block by
  the clipping ratio that minimises ``block_squared_error(x,
  round_trip(amax, amin))`` (see the module docstring).

  Raises:
    ValueError: for a grid outside ``num_ratios >= 1``, ``0 < min_ratio
      <= 1``.
  """
  if not 0.0 < min_ratio <= 1.0:
    raise ValueError(f"mse range search: min_ratio must be in (0, 1], got "
                     f"{min_ratio}.")
  if num_ratios < 1:
    raise ValueError(f"mse range search: num_ratios must be >= 1, got "
                     f"{num_ratios}.")
  amin, amax = max_range
  ratios = jnp.linspace(1.0, min_ratio, num_ratios, dtype=jnp.float32)

  def error(ratio: jax.Array) -> jax.Array:
    x_hat = round_trip(amax * ratio, None if amin is None else amin * ratio)
    return block_squared_error(x, x_hat, blocks, error_weight)

  errors = jax.lax.map(error, ratios, batch_size=min(num_ratios, 8))
  # argmin takes the first minimum: ties keep the larger (less clipped) ratio.
  best = jnp.take(ratios, jnp.argmin(errors, axis=0))
  return (None if amin is None else amin * best), amax * best
