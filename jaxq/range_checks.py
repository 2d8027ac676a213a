"""Static ranges: what makes one valid, and the errors that say why not.

A range is ``amax`` (symmetric: the range `jaxq.compute_range` gives, ``max
|x|`` in most formats) or ``(amin, amax)`` (affine), of any shape (a scale
shape). Valid: finite, ``amax >= 0`` (symmetric) or ``amin <= amax``
(affine), and, when static (calibrated, loaded, passed in), not 0
everywhere (`ZeroRangeError`). Concrete ranges are checked on the host and
raise naming the bad element; traced ones turn into NaN scales
(`nan_if_zero`) or are checked by a host callback (`check_range`).
`jaxq.quantize` calls these before its compiled arithmetic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.spec import QuantSpec


def is_traced(*arrays) -> bool:
  return any(isinstance(a, jax.core.Tracer) for a in arrays)


class ZeroRangeError(ValueError):
  """A static range that is zero everywhere (see `check_range`)."""


def _zero_problem(spec: QuantSpec, amax: np.ndarray,
                  amin: np.ndarray | None) -> str | None:
  """Why a valid concrete range is refused as static, or None: it is zero
  everywhere (an empty range has nothing to refuse)."""
  if amax.size == 0 or np.any(amax != 0) or (
      amin is not None and np.any(amin != 0)):
    return None
  what = ("amax is 0 in every one of its" if spec.symmetric
          else "amin and amax are 0 in every one of their")
  return (f"{what} {amax.size} element(s): a static range of 0 "
          f"quantizes every input to 0, which is right only if the input "
          f"is always 0")


def _range_problem(spec: QuantSpec, amax: np.ndarray,
                   amin: np.ndarray | None) -> str | None:
  """What is wrong with a concrete range, or None when it is valid (a zero
  range included: see `_zero_problem`)."""

  def first_bad(name: str, values: np.ndarray, bad: np.ndarray, rule: str
                ) -> str:
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    return (f"{name} must be {rule}, but {int(bad.sum())} of its "
            f"{values.size} element(s) are not, e.g. {name}{index} = "
            f"{float(values[index])}")

  amax = np.asarray(amax, np.float32).reshape(np.shape(amax))
  if amax.ndim == 0:
    amax = amax.reshape(1)
  if not np.all(np.isfinite(amax)):
    return first_bad("amax", amax, ~np.isfinite(amax), "finite")
  if spec.symmetric:
    if np.any(amax < 0):
      return first_bad("amax", amax, amax < 0,
                       "non-negative (it is max |x|)")
    return None
  if amin is None:
    return ("an affine spec (symmetric=False) needs amin as well as amax")
  amin = np.broadcast_to(np.asarray(amin, np.float32), amax.shape)
  if not np.all(np.isfinite(amin)):
    return first_bad("amin", amin, ~np.isfinite(amin), "finite")
  if np.any(amin > amax):
    index = tuple(int(i) for i in np.argwhere(amin > amax)[0])
    return (f"amin{index} = {float(amin[index])} is greater than "
            f"amax{index} = {float(amax[index])}")
  return None


def raise_range_problem(spec: QuantSpec, where: str, amax, amin, *,
                         range_from_data: bool = False) -> None:
  """Raises a ValueError (a `ZeroRangeError` for a static range of 0) if
  the concrete range is invalid; a zero range is valid ``range_from_data``."""
  amax = np.asarray(amax, np.float32)
  amin = None if amin is None else np.asarray(amin, np.float32)
  problem = _range_problem(spec, amax, amin)
  error = ValueError
  if problem is None and not range_from_data:
    problem, error = _zero_problem(spec, amax, amin), ZeroRangeError
  if problem is not None:
    prefix = f"{where!r}: " if where else ""
    raise error(
        f"{prefix}invalid static range for {spec.format} "
        f"({'symmetric' if spec.symmetric else 'affine'}, "
        f"{spec.granularity}): {problem}. A static range must be finite, "
        f"with amax >= 0 (symmetric) or amin <= amax (affine), and not 0 "
        f"everywhere; recalibrate with data that reaches it, use a dynamic "
        f"range, or fix the loaded ranges.")


def nan_if_zero(spec: QuantSpec, amax: jax.Array, amin: jax.Array | None
                 ) -> jax.Array:
  """``amax``, NaN everywhere when the range is 0 everywhere: a traced
  static range of 0 then gives a NaN scale, as other invalid ranges do."""
  amax = jnp.asarray(amax, jnp.float32)
  if amax.size == 0:
    return amax
  zero = jnp.all(amax == 0)
  if not spec.symmetric and amin is not None:
    zero = zero & jnp.all(jnp.asarray(amin, jnp.float32) == 0)
  return jnp.where(zero, jnp.nan, amax)


def check_range(spec: QuantSpec, amax: jax.Array,
                amin: jax.Array | None = None, *, where: str = "") -> None:
  """Raises unless ``(amin, amax)`` is a valid static range for ``spec``.

  Valid: finite everywhere, ``amax >= 0`` (symmetric) or ``amin <= amax``
  (affine; ``amin`` required), and not 0 everywhere.

  Zero ranges: a range computed from data at run time (dynamic
  activations, a weight's own range, a zero tensor quantized without a
  range) may be 0, and a zero block then quantizes to zeros exactly. A
  static range (calibrated, loaded, or passed as ``amax=``/``amin=``) that
  is 0 everywhere (``amin == amax == 0`` when affine) is refused with a
  `ZeroRangeError` (a ValueError): it would quantize every input to 0,
  silently wrong once the input is not 0, and it means calibration never
  saw a non-zero value there. Some zero entries of a per-channel or
  per-block range (dead channels) are valid. Under ``jit``, `quantize`,
  `fake_quant` and `scale_from_range` turn a traced static range of 0 into
  a NaN scale, like any other invalid range.

  Concrete arrays are checked now and raise a ValueError naming ``where``
  (e.g. the layer path), the bad element and its value. Traced arrays are
  checked when the computation runs, by a ``jax.debug.callback`` that
  raises the same message (surfacing as a ``JaxRuntimeError``); that costs
  one host round trip per call, so call it where ranges enter (loading,
  converting), not on every step.

  Args:
    spec: the quantizer the range is for.
    amax: max |x| (symmetric) or max x (affine), any shape.
    amin: min x, affine only.
    where: what holds the range, for the message (e.g. ``"dense/act"``).
  """
  if spec.symmetric:
    amin = None
  if not spec.symmetric and amin is None:
    raise_range_problem(spec, where, np.zeros(1), None)
  if is_traced(amax, amin):
    jax.debug.callback(
        lambda a, b: raise_range_problem(spec, where, a, b),
        jnp.asarray(amax, jnp.float32),
        None if amin is None else jnp.asarray(amin, jnp.float32))
    return
  raise_range_problem(spec, where, amax, amin)
