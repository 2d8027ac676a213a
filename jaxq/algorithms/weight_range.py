"""The range of a weight, per scale, as its spec's ``calibration`` asks.

Shapes: ``w`` has any shape ``S`` (a Flax ``Dense`` kernel is (d_in, d_out));
``amax`` and ``amin`` have the keepdims scale shape of ``spec.granularity``
for ``S`` (see `jaxq.granularity`), exactly what `jaxq.quantize` takes.

Calibrations (``spec.calibration``):

* ``"max"``: the abs-max (symmetric) or min/max (affine) of each block, as
  `jaxq.compute_range` gives.
* ``"percentile"``: ``spec.percentile`` of ``|w|`` in each block (numpy's
  "linear" rule); affine specs take the ``100 - q`` and ``q`` percentiles of
  ``w`` itself.
* ``"mse"``: per block, the clipping ratio ``r`` in a grid of ``num_ratios``
  ratios in ``[min_ratio, 1]`` whose range ``r * (amin, amax)`` minimises the
  block's squared quantization error ``sum (w - fake_quant(w))**2``. The grid
  is evaluated in ``jit`` by `jax.lax.map` (a batch of ratios at a time, so
  memory stays a few copies of ``w``), never by a Python loop. An optional
  ``error_weight`` (broadcastable to ``S``, >= 0) weights each element's
  squared error: GPTQ passes its Hessian diagonal per input row, so that the
  search minimises the layer's output error rather than the weight's, and
  never clips a weight that multiplies a large input channel.

Every calibration skips NaN elements (`compute_range` ignores non-finite
ones, the percentile is ``nanpercentile``, the "mse" error sums the other
elements'), so a caller masks elements out by setting them to NaN, as GPTQ
does for the rows missing from a short last group. A group or block that
does not divide its axis is ragged (see `jaxq.granularity`): its last block
is ranged over its own elements.

``"entropy"`` (KL between histograms) describes activations, not a weight's
few thousand values per scale: it raises rather than being ignored.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxq.granularity import block_elements
from jaxq.quantize import compute_range, fake_quant
from jaxq.spec import QuantSpec

Range = tuple[jax.Array | None, jax.Array]


def _percentile_range(w: jax.Array, spec: QuantSpec,
                      blocks: tuple[int, ...]) -> Range:
  # NaN pads a ragged last block and is skipped: its percentile is of its
  # own elements only.
  elements = block_elements(w, blocks, fill=jnp.nan)
  if spec.symmetric:
    return None, jnp.nanpercentile(jnp.abs(elements), spec.percentile,
                                   axis=-1)
  amin = jnp.nanpercentile(elements, 100.0 - spec.percentile, axis=-1)
  amax = jnp.nanpercentile(elements, spec.percentile, axis=-1)
  return amin, amax


def block_squared_error(w: jax.Array, w_hat: jax.Array,
                        blocks: tuple[int, ...],
                        error_weight: jax.Array | None = None) -> jax.Array:
  """``sum error_weight * (w - w_hat)**2`` over each block (weight 1 by
  default; NaN elements and a ragged last block's padding add nothing);
  the scale shape."""
  squared = jnp.square(w - w_hat)
  if error_weight is not None:
    squared = squared * error_weight
  # A NaN element (masked out by its caller) adds no error.
  squared = jnp.where(jnp.isnan(squared), 0.0, squared)
  return jnp.sum(block_elements(squared, blocks), axis=-1)


def _mse_range(w: jax.Array, spec: QuantSpec, blocks: tuple[int, ...],
               num_ratios: int, min_ratio: float,
               error_weight: jax.Array | None) -> Range:
  amin, amax = compute_range(w, spec)
  ratios = jnp.linspace(1.0, min_ratio, num_ratios, dtype=jnp.float32)

  def error(ratio):
    lo = None if amin is None else amin * ratio
    w_hat = fake_quant(w, spec, amax=amax * ratio, amin=lo,
                       range_from_data=True)
    return block_squared_error(w, w_hat, blocks, error_weight)

  errors = jax.lax.map(error, ratios, batch_size=min(num_ratios, 8))
  # argmin takes the first minimum: ties keep the larger (less clipped) ratio.
  best = jnp.take(ratios, jnp.argmin(errors, axis=0))
  return (None if amin is None else amin * best), amax * best


@functools.partial(jax.jit,
                   static_argnames=("spec", "num_ratios", "min_ratio"))
def weight_range(w: jax.Array, spec: QuantSpec, *, num_ratios: int = 100,
                 min_ratio: float = 0.5,
                 error_weight: jax.Array | None = None) -> Range:
  """``(amin, amax)`` of each block of ``w`` as ``spec.calibration`` asks.

  Args:
    w: float weight of any shape; NaN elements are skipped (a mask).
    spec: the weight's quantizer; its granularity must fit ``w.shape``.
    num_ratios: grid size of the ``"mse"`` search.
    min_ratio: smallest clipping ratio of the ``"mse"`` search, in (0, 1].
    error_weight: ``"mse"`` only: a weight >= 0 per element of the squared
      error, broadcastable to ``w.shape``; e.g. (d_in, 1) per input row.

  Returns:
    ``(amin, amax)`` float32 in the scale shape; ``amin`` is None for
    symmetric specs. Pass them to `jaxq.quantize` as ``amax=``/``amin=``.

  Raises:
    ValueError: for ``calibration="entropy"``, a bad grid, a granularity
      that does not fit ``w.shape`` (naming the axis and sizes), or an
      ``error_weight`` that does not broadcast to it or comes without
      ``calibration="mse"``.
  """
  if not 0.0 < min_ratio <= 1.0:
    raise ValueError(f"weight_range: min_ratio must be in (0, 1], got "
                     f"{min_ratio}.")
  if num_ratios < 1:
    raise ValueError(f"weight_range: num_ratios must be >= 1, got "
                     f"{num_ratios}.")
  w = jnp.asarray(w)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"weight_range expects a float weight, got dtype "
                     f"{w.dtype} with shape {tuple(w.shape)}.")
  blocks = spec.granularity.block_shape(tuple(w.shape))
  w = w.astype(jnp.float32)
  if error_weight is not None:
    if spec.calibration != "mse":
      raise ValueError(f"weight_range: error_weight weights the 'mse' "
                       f"search; calibration={spec.calibration!r} has none.")
    error_weight = jnp.asarray(error_weight, jnp.float32)
    try:
      shape = jnp.broadcast_shapes(error_weight.shape, w.shape)
    except ValueError:
      shape = None
    if shape != w.shape:
      raise ValueError(f"weight_range: error_weight of shape "
                       f"{tuple(error_weight.shape)} does not broadcast to "
                       f"the weight's shape {tuple(w.shape)}.")
  if spec.calibration == "max":
    return compute_range(w, spec)
  if spec.calibration == "percentile":
    return _percentile_range(w, spec, blocks)
  if spec.calibration == "mse":
    return _mse_range(w, spec, blocks, num_ratios, min_ratio, error_weight)
  raise ValueError(f"weight_range: calibration {spec.calibration!r} is for "
                   f"activations; a weight's range supports 'max', "
                   f"'percentile' and 'mse'.")
