"""The observer protocol shared by every calibration method.

An `Observer` is an ``(init, update, finalize)`` triple of pure functions,
like optax's ``GradientTransformation``:

* ``init(x, spec) -> state``: an empty state for arrays shaped like ``x``
  quantized with ``spec``. ``x`` only supplies the shape and dtype.
* ``update(state, x, mask=None) -> state``: folds one batch into the state.
  It is pure and jit-able on its own, ``state = jax.jit(obs.update)(state,
  x)``, because everything it needs besides the data (the spec, the bin
  count) is static aux data of the state pytree. ``mask``, optional, is a
  boolean (or 0/1 integer) array shaped like the leading axes of ``x``
  (``x.shape[:mask.ndim]``, e.g. ``(batch, seq)`` for a ``(batch, seq,
  features)`` batch), broadcast over the remaining axes: False marks
  positions that count in no statistic (padding). Without a mask the
  update runs exactly the unmasked code; a mask that is False everywhere
  leaves the state unchanged.
* ``finalize(state)``: the chosen range in the keepdims scale shape of
  ``spec.granularity`` for ``x``'s shape: ``amax`` for symmetric specs, or
  ``(amin, amax)`` for affine specs (``symmetric=False``).

Non-finite values (NaN, +-inf) never enter the statistics; every state
counts them in an int32 ``nonfinite`` field instead, read with
`nonfinite_count`, so a caller can refuse a bad batch or skip-and-count.
Masked-out positions are not data: they are neither observed nor counted,
whatever they hold.

States are pytrees whose leaves reduce across batches and devices with
`jaxq.calibration.merge`: max states take the elementwise max of ``amax``
(min of ``amin``); histogram states sum their bin counts after aligning
their ranges. Inside one ``jit`` over a batch sharded across devices no
merge is needed at all: the reductions in ``update`` are global.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp

from jaxq.spec import QuantSpec

State = Any
Range = Union[jax.Array, tuple[jax.Array, jax.Array]]


class Observer(NamedTuple):
  """A calibration method as three pure functions (see the module docstring).

  Attributes:
    init: ``(x, spec) -> state`` for arrays shaped like ``x`` under ``spec``.
    update: ``(state, x, mask=None) -> state``; pure and jit-able.
    finalize: ``state -> amax`` (symmetric) or ``(amin, amax)`` (affine), in
      the keepdims scale shape.
  """

  init: Callable[[jax.Array, QuantSpec], State]
  update: Callable[..., State]
  finalize: Callable[[State], Range]


def check_float(x: jax.Array, what: str) -> None:
  """Raises a ValueError unless ``x`` is a floating-point array."""
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{what} expects a floating-point array, got dtype "
                     f"{x.dtype} with shape {tuple(x.shape)}.")


def check_shape(what: str, expected: tuple[int, ...], x: jax.Array,
                spec: QuantSpec, state_shape: tuple[int, ...]) -> None:
  """Raises unless batch ``x`` gives the scale shape the state was built for."""
  if expected != state_shape:
    raise ValueError(
        f"{what}: a batch of shape {tuple(x.shape)} has scale shape "
        f"{expected} under {spec.granularity}, but the state holds statistics "
        f"of scale shape {state_shape}; every batch must have the shape the "
        f"state was initialised with (up to axes reduced by the granularity).")


def broadcast_mask(mask: jax.Array, x: jax.Array, what: str) -> jax.Array:
  """``mask`` as a boolean array of ``x``'s shape (see `Observer.update`).

  Args:
    mask: bool or integer (non-zero: observed), shaped like the leading
      axes of ``x``, ``x.shape[:mask.ndim]``.
    x: the batch.
    what: the caller, for errors.

  Raises:
    ValueError: for another dtype, or a shape that is not a prefix of
      ``x``'s.
  """
  mask = jnp.asarray(mask)
  if not (mask.dtype == jnp.bool_ or jnp.issubdtype(mask.dtype, jnp.integer)):
    raise ValueError(f"{what}: the mask must be boolean (or 0/1 integers), "
                     f"got dtype {mask.dtype}.")
  shape = tuple(mask.shape)
  if mask.ndim > x.ndim or tuple(x.shape[:mask.ndim]) != shape:
    raise ValueError(
        f"{what}: the mask of shape {shape} does not match the leading axes "
        f"of the batch of shape {tuple(x.shape)}; it must equal "
        f"x.shape[:mask.ndim].")
  keep = mask if mask.dtype == jnp.bool_ else mask != 0
  return jnp.broadcast_to(keep.reshape(shape + (1,) * (x.ndim - mask.ndim)),
                          x.shape)


def count_nonfinite(x: jax.Array) -> jax.Array:
  """The number of NaN and +-inf elements of ``x``, as an int32 scalar."""
  return jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)


def nonfinite_count(state: State) -> jax.Array:
  """The number of NaN/Inf elements an observer state has seen and skipped.

  Args:
    state: any observer state (`MaxState`, `HistogramState`).

  Returns:
    An int32 scalar; non-zero means some batch held non-finite values, which
    were left out of the statistics.
  """
  if not hasattr(state, "nonfinite"):
    raise ValueError(f"nonfinite_count expects an observer state (MaxState, "
                     f"HistogramState), got {type(state).__name__}.")
  return state.nonfinite
