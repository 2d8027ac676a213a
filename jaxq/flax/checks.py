"""Checks of a layer's weights and static ranges, with errors naming it.

Quantizing a weight that holds NaN or inf gives finite values (a NaN
rounds to a code like any number), so a served model would output finite
numbers where the float model outputs NaN; an invalid static range gives a
wrong scale. These checks refuse both where the workflows see concrete
values (``quantize_model`` for nnx, `jaxq.calibrate`, `jaxq.convert`,
ranges being loaded), naming the layer path and the parameter.

* `check_finite_weight(what, path, name, weight)`: ``weight`` any shape;
  raises a ValueError "layer 'Dense_1' parameter 'kernel' holds 3 NaN and
  1 inf values". Traced values (inside ``jit``) and QArrays are not
  checked: a traced weight cannot be read without a host round trip per
  step, and a QArray was checked when `jaxq.convert` made it.
* `check_act_range(what, path, act_range, symmetric=None)`: ``{"amax"[,
  "amin"]}`` in any (scale) shape; valid when every element is finite,
  ``amax >= 0`` for a symmetric spec and ``amin <= amax`` for an affine one
  (a zero range is valid: all-zero inputs quantize to zeros). Traced ranges
  are not checked here (see `jaxq.flax.nnx` for what happens under
  ``jit``). Same semantics as ``jaxq.quantize.check_range`` of the
  primitives, which callers can switch to once it lands.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from jaxq.spec import QArray


def _concrete(value: Any) -> bool:
  return not isinstance(value, (jax.core.Tracer, QArray)) and hasattr(
      value, "dtype")


def check_finite_weight(what: str, path: str, name: str, weight: Any) -> None:
  """Raises a ValueError naming the layer if a concrete float weight holds
  NaN or inf."""
  if not _concrete(weight) or not np.issubdtype(np.dtype(weight.dtype),
                                                np.inexact):
    return
  values = np.asarray(weight, np.float32)
  nan = int(np.count_nonzero(np.isnan(values)))
  inf = int(np.count_nonzero(np.isinf(values)))
  if nan or inf:
    raise ValueError(
        f"{what}: layer {path!r} parameter {name!r} holds {nan} NaN and {inf} "
        f"inf values (of {values.size}); quantizing it would store them as "
        f"finite numbers. Fix the weights (or skip the layer with a "
        f"Rule(..., skip=True)).")


def check_act_range(what: str, path: str, act_range: Mapping[str, Any] | None,
                    symmetric: bool | None = None) -> None:
  """Raises a ValueError naming the layer if a concrete static range is
  non-finite, negative (symmetric) or has ``amin > amax`` (affine);
  ``symmetric`` None: affine when the range holds ``amin``."""
  if not act_range or "amax" not in act_range:
    return
  if symmetric is None:
    symmetric = "amin" not in act_range
  amax, amin = act_range["amax"], act_range.get("amin")
  if not _concrete(amax) or (amin is not None and not _concrete(amin)):
    return
  amax = np.asarray(amax, np.float32)
  problems = []
  if not np.all(np.isfinite(amax)):
    problems.append(
        f"amax holds non-finite values {_few(amax[~np.isfinite(amax)])}")
  if amin is None:
    if not symmetric:
      problems.append("an affine spec needs amin, which is missing")
    elif np.any(amax < 0):
      problems.append(f"amax holds negative values {_few(amax[amax < 0])}")
  else:
    amin = np.asarray(amin, np.float32)
    if not np.all(np.isfinite(amin)):
      problems.append(
          f"amin holds non-finite values {_few(amin[~np.isfinite(amin)])}")
    with np.errstate(invalid="ignore"):
      above = np.broadcast_to(amin > amax, np.broadcast_shapes(
          amin.shape, amax.shape))
    if np.any(above):
      problems.append(f"amin > amax at {int(np.count_nonzero(above))} "
                      f"position(s)")
  if problems:
    raise ValueError(
        f"{what}: the static activation range of layer {path!r} is invalid: "
        f"{'; '.join(problems)}. Recalibrate (check the data for NaN/inf) or "
        f"fix the loaded ranges.")


def _few(values: np.ndarray) -> list[float]:
  return [float(v) for v in np.ravel(values)[:4]]
