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
* `check_act_range(what, path, act_range, spec)`: ``{"amax"[, "amin"]}`` in
  any (scale) shape for the act `QuantSpec` ``spec``; valid as
  `jaxq.range_checks.check_range` defines it (the one definition: finite,
  ``amax >= 0`` symmetric, ``amin <= amax`` affine, not 0 everywhere),
  whose message follows "layer 'Dense_1'"'s. A range of 0 everywhere (the
  layer's input was 0 in every calibration batch, so it would serve every
  input as 0) raises a `jaxq.range_checks.ZeroRangeError` saying so and what
  to do. These checks run where ranges enter: `jaxq.act_ranges`,
  `jaxq.CalibrationResult.ranges`, `jaxq.convert` and loading ranges into
  a model (``with_ranges``, an eager QAT or serve call). Traced ranges are
  not checked here: this runs on every call that reads a range, and a
  traced check would cost a host round trip per step (under ``jit`` an
  invalid range, 0 included, gives NaN; see `jaxq.quantize`).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from jaxq import range_checks
from jaxq.spec import QArray, QuantSpec


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
                    spec: QuantSpec | None = None) -> None:
  """Raises a ValueError naming the layer if a concrete static range is
  invalid for ``spec`` (`jaxq.range_checks.check_range`). ``spec`` None (a range
  for a layer without an act spec): checked as affine when the range holds
  ``amin``, else symmetric."""
  if not act_range or "amax" not in act_range:
    return
  amax, amin = act_range["amax"], act_range.get("amin")
  if not _concrete(amax) or (amin is not None and not _concrete(amin)):
    return
  if spec is None:
    spec = QuantSpec("int8", symmetric=amin is None)
  try:
    range_checks.check_range(spec, amax, amin)
  except range_checks.ZeroRangeError:
    raise range_checks.ZeroRangeError(
        f"{what}: layer {path!r}: its static activation range (act) is 0 "
        f"(amax{'' if amin is None else ' and amin'} 0 in all "
        f"{np.size(amax)} element(s)): the calibration data never reached "
        f"it with a non-zero value, so every input would quantize to 0. "
        f"Calibrate with data that exercises it, use dynamic activations "
        f"for it (QuantSpec(..., dynamic=True)), or leave the layer in "
        f"float (a Rule matching {path!r} with skip=True, first)."
        ) from None
  except ValueError as e:
    raise ValueError(
        f"{what}: the static activation range of layer {path!r} is invalid: "
        f"{e}") from None


def check_act_ranges(what: str, ranges: Mapping[str, Any],
                     layers: Mapping[str, Any]) -> None:
  """`check_act_range` for every ``path -> range`` of ``ranges``, each
  checked against its layer's act spec (``layers``: path -> `LayerInfo`)."""
  for path, act_range in ranges.items():
    info = layers.get(path)
    spec = info.act if info else None
    stacked = info.stacked if info else None
    if stacked and _is_stacked(act_range, stacked):
      # One range per layer of a scanned stack: each layer's own must be
      # valid (one zero slice is a layer that saw only zeros).
      for i in range(stacked):
        check_act_range(what, f"{path}[{i}]",
                        {k: v[i] for k, v in act_range.items()}, spec)
    else:
      check_act_range(what, path, act_range, spec)


def _is_stacked(act_range: Mapping[str, Any], stacked: int) -> bool:
  """Whether every concrete entry of ``act_range`` has a leading axis of
  ``stacked`` layers."""
  return all(_concrete(v) and np.ndim(v) >= 1 and np.shape(v)[0] == stacked
             for v in act_range.values())
