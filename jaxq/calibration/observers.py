"""The public observer constructors and `observer_for`.

``jaxq.observers`` re-exports this module: ``jaxq.observers.max()``.
"""

from __future__ import annotations

from jaxq.calibration import base
from jaxq.calibration import minmax
from jaxq.spec import QuantSpec

Observer = base.Observer
nonfinite_count = base.nonfinite_count


def max() -> base.Observer:  # pylint: disable=redefined-builtin
  """The running max |x| (symmetric) or min/max (affine) per scale block."""
  return minmax.max_observer()


def observer_for(spec: QuantSpec) -> base.Observer:
  """The observer that ``spec.calibration`` names.

  ``"max"`` gives `max`; ``"percentile"``, ``"entropy"`` and ``"mse"`` give
  the histogram observers (``"percentile"`` at ``spec.percentile``).
  """
  if spec.calibration == "max":
    return max()
  raise ValueError(f"observer_for: no observer for calibration "
                   f"{spec.calibration!r} in {spec}.")


def merge(a: base.State, b: base.State) -> base.State:
  """Combines two observer states of the same kind, spec and shape.

  Use it to reduce per-device or per-run states: max states take the
  elementwise max of ``amax`` (and min of ``amin``), and every state sums its
  ``nonfinite`` count.
  """
  if isinstance(a, minmax.MaxState) and isinstance(b, minmax.MaxState):
    return minmax.merge_max_states(a, b)
  raise ValueError(f"merge: cannot merge a {type(a).__name__} with a "
                   f"{type(b).__name__}; both must be states of the same "
                   f"observer kind.")
