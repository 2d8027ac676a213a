"""The padding mask of the batch in calibration, as each layer sees it.

A `jaxq.flax.Batch` carries a ``mask`` (True at real positions) that the
model never receives: the calibration pass (`ModelAdapter.calibration_pass`,
which `jaxq.calibrate` runs) sets it here with `masking` for the one call of
the model on that batch, and every calibrate-mode layer that records
activation statistics reads it with `layer_mask` and hands it to its act
observer (``observer.update(state, x, mask)``), so padding counts in no
statistic.

Shapes: the mask has the shape of the batch's leading (token) axes, e.g.
``(batch, seq)``; a layer input ``x`` must start with exactly those axes,
``x.shape[:mask.ndim] == mask.shape``, with at least one axis after them
(the features), and the mask is broadcast over the rest. A layer whose
input does not (after pooling, a reshape or a flatten) raises naming the
layer and both shapes: its rows cannot be matched to the mask, and using or
dropping the mask silently would both be wrong.

Like the nnx layers' per-call hooks, the mask lives in a
``contextvars.ContextVar``: set only while the step traces the model, one
per thread, never in the model's state.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

import jax

_MASK: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar(
    "jaxq_calibration_mask", default=None)


@contextlib.contextmanager
def masking(mask: jax.Array | None) -> Iterator[None]:
  """Within the block, calibrate-mode layers observe only where ``mask``
  is True (None: everywhere)."""
  token = _MASK.set(mask)
  try:
    yield
  finally:
    _MASK.reset(token)


def layer_mask(path: str, shape: tuple[int, ...]) -> Any | None:
  """The mask for the input (of ``shape``) of the layer at ``path``, or None.

  Raises:
    ValueError: naming the layer and both shapes when the input's leading
      axes are not the mask's.
  """
  mask = _MASK.get()
  if mask is None:
    return None
  lead = tuple(mask.shape)
  shape = tuple(shape)
  if len(shape) <= len(lead) or shape[:len(lead)] != lead:
    raise ValueError(
        f"jaxq calibrate: the batch's padding mask has shape {lead}, but the "
        f"input of {path!r} has shape {shape}, whose leading axes (all but "
        f"the features) are not {lead}: its rows cannot be matched to the "
        f"mask (a layer after pooling or a reshape). Give that layer a "
        f"dynamic act spec or skip it (a rule of its own), or calibrate "
        f"without the mask.")
  return mask
