"""The range of a weight, per scale, as its spec's ``calibration`` asks.

Shapes: ``w`` has any shape ``S`` (a Flax ``Dense`` kernel is (d_in, d_out));
``amax`` and ``amin`` have the keepdims scale shape of ``spec.granularity``
for ``S`` (see `jaxq.granularity`), exactly what `jaxq.quantize` takes.

The ranges are `jaxq.compute_range`'s (``"max"``, ``"percentile"``,
``"mse"``; see `jaxq.range_search`), which `jaxq.quantize` itself uses when
no range is given; `weight_range` adds the knobs of the ``"mse"`` search:
its grid (``num_ratios`` ratios in ``[min_ratio, 1]``) and an optional
``error_weight`` (broadcastable to ``S``, >= 0) per element of the squared
error: GPTQ passes its Hessian diagonal per input row, so that the search
minimises the layer's output error rather than the weight's, and never
clips a weight that multiplies a large input channel.

``"entropy"`` (KL between histograms) describes activations, not a weight's
few thousand values per scale: it raises rather than being ignored.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxq import range_search
from jaxq.quantize import compute_range, fake_quant
from jaxq.range_search import block_squared_error  # Re-exported.
from jaxq.spec import QuantSpec

Range = range_search.Range


@functools.partial(jax.jit,
                   static_argnames=("spec", "num_ratios", "min_ratio"))
def weight_range(w: jax.Array, spec: QuantSpec, *,
                 num_ratios: int = range_search.NUM_RATIOS,
                 min_ratio: float = range_search.MIN_RATIO,
                 error_weight: jax.Array | None = None) -> Range:
  """``(amin, amax)`` of each block of ``w`` as ``spec.calibration`` asks.

  Args:
    w: float weight of any shape; non-finite elements are not expected.
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
  w = jnp.asarray(w)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"weight_range expects a float weight, got dtype "
                     f"{w.dtype} with shape {tuple(w.shape)}.")
  if spec.calibration not in range_search.ARRAY_CALIBRATIONS:
    raise ValueError(f"weight_range: calibration {spec.calibration!r} is for "
                     f"activations; a weight's range supports "
                     f"{range_search.ARRAY_CALIBRATIONS}.")
  blocks = spec.granularity.block_shape(tuple(w.shape))
  w = w.astype(jnp.float32)
  if spec.calibration != "mse":
    if error_weight is not None:
      raise ValueError(f"weight_range: error_weight weights the 'mse' "
                       f"search; calibration={spec.calibration!r} has none.")
    return compute_range(w, spec)
  if error_weight is not None:
    error_weight = jnp.asarray(error_weight, jnp.float32)
    try:
      shape = jnp.broadcast_shapes(error_weight.shape, w.shape)
    except ValueError:
      shape = None
    if shape != w.shape:
      raise ValueError(f"weight_range: error_weight of shape "
                       f"{tuple(error_weight.shape)} does not broadcast to "
                       f"the weight's shape {tuple(w.shape)}.")
  nearest = spec.replace(rounding="nearest")  # The search needs no key.
  round_trip = lambda amax, amin: fake_quant(
      w, nearest, amax=amax, amin=amin, range_from_data=True)
  return range_search.mse_range(
      w, blocks, compute_range(w, spec.replace(calibration="max")),
      round_trip, num_ratios=num_ratios, min_ratio=min_ratio,
      error_weight=error_weight)
