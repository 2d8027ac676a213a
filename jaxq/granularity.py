"""Granularities: which elements of an array share one scale.

Every granularity reduces to one idea, a *block shape*: for an array of shape
``(d_0, ..., d_{r-1})`` it gives ``(b_0, ..., b_{r-1})`` with each ``b_i``
dividing ``d_i``, and the elements of one ``b_0 x ... x b_{r-1}`` tile share
a scale. The scale therefore has the same rank as the array and shape
``(d_0 / b_0, ..., d_{r-1} / b_{r-1})`` (a "keepdims" shape), so a scale
always broadcasts against its array after splitting the blocked axes.

=================================  ============================  =============
granularity                        block on a (m, k) array       scale shape
=================================  ============================  =============
``PerTensor()``                    (m, k)                        (1, 1)
``PerChannel(axis=-1)``            (m, 1)                        (1, k)
``PerToken()``                     (1, k)                        (m, 1)
``PerGroup(axis=-1, size=g)``      (1, g)                        (m, k/g)
``PerBlock(shape=(bm, bk))``       (bm, bk)                      (m/bm, k/bk)
``MX(axis=-1, size=32)``           (1, 32)                       (m, k/32)
=================================  ============================  =============

For a Flax ``Dense`` kernel of shape (in, out), ``PerChannel(axis=-1)`` gives
one scale per output column; ``PerGroup(axis=0, size=g)`` groups the
contraction axis and also keeps one scale per column (the "CG" scales).

`block_reduce` and `split_blocks` / `merge_blocks` apply a block shape by
reshape and broadcast only; nothing loops over groups or blocks in Python.
Only axes with ``1 < b_i < d_i`` are split, so per-tensor, per-channel and
per-token scales broadcast with no reshape at all.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol, Union, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

Shape = tuple[int, ...]


@runtime_checkable
class Granularity(Protocol):
  """Anything that maps an array shape to a block shape."""

  def block_shape(self, shape: Shape) -> Shape:
    """Returns the block shape for an array of ``shape``, or raises."""


def _normalize_axis(granularity: object, axis: int, shape: Shape) -> int:
  ndim = len(shape)
  if not -ndim <= axis < ndim:
    raise ValueError(
        f"{granularity}: axis {axis} is out of range for an array of shape "
        f"{shape} (rank {ndim}).")
  return axis % ndim


def _is_int(value: object) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(
      value, (bool, np.bool_))


def _check_size(granularity: object, size: int, name: str = "size") -> int:
  """Returns ``size`` as an int, or raises unless it is a positive integer."""
  if not _is_int(size) or size <= 0:
    raise ValueError(f"{granularity}: {name} must be a positive integer, got "
                     f"{size!r}.")
  return int(size)


def _check_axis(granularity: object, axis: object, name: str = "axis",
                allow_tuple: bool = False) -> int | tuple[int, ...]:
  """Returns ``axis`` as an int (or a tuple of ints), or raises."""
  if allow_tuple and isinstance(axis, (tuple, list)):
    if not axis:
      raise ValueError(f"{granularity}: {name} must name at least one axis, "
                       f"got {axis!r}.")
    return tuple(_check_axis(granularity, a, name) for a in axis)
  if not _is_int(axis):
    kind = "an integer or a tuple of integers" if allow_tuple else (
        "an integer")
    raise ValueError(f"{granularity}: {name} must be {kind}, got {axis!r} "
                     f"({type(axis).__name__}).")
  return int(axis)


def _check_divides(granularity: object, size: int, axis: int, shape: Shape
                   ) -> None:
  if shape[axis] % size:
    raise ValueError(
        f"{granularity}: size {size} does not divide axis {axis} of length "
        f"{shape[axis]} in an array of shape {shape}.")


def _group_blocks(granularity: object, axis: int, size: int, shape: Shape
                  ) -> Shape:
  axis = _normalize_axis(granularity, axis, shape)
  _check_divides(granularity, size, axis, shape)
  return tuple(size if i == axis else 1 for i in range(len(shape)))


@dataclasses.dataclass(frozen=True)
class PerTensor:
  """One scale for the whole array (T)."""

  def block_shape(self, shape: Shape) -> Shape:
    return tuple(shape)


@dataclasses.dataclass(frozen=True)
class PerChannel:
  """One scale per index of ``axis`` (C); reduced over every other axis.

  ``axis`` may be a tuple, e.g. the (heads, head_dim) output axes of a
  ``DenseGeneral`` kernel.
  """

  axis: int | tuple[int, ...] = -1

  def __post_init__(self):
    object.__setattr__(self, "axis",
                       _check_axis(self, self.axis, allow_tuple=True))

  def block_shape(self, shape: Shape) -> Shape:
    axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
    kept = {_normalize_axis(self, a, shape) for a in axes}
    return tuple(1 if i in kept else d for i, d in enumerate(shape))


@dataclasses.dataclass(frozen=True)
class PerToken:
  """One scale per token (K): reduced over ``contraction_axis`` only.

  For activations of shape (batch, seq, features) this gives scales of shape
  (batch, seq, 1). ``contraction_axis`` may be a tuple when a layer
  contracts several axes, e.g. ``(-2, -1)`` for the (heads, head_dim) input
  of an attention output projection: scales (batch, seq, 1, 1), one per
  token, constant along the whole contraction.
  """

  contraction_axis: int | tuple[int, ...] = -1

  def __post_init__(self):
    object.__setattr__(self, "contraction_axis",
                       _check_axis(self, self.contraction_axis,
                                   "contraction_axis", allow_tuple=True))

  def block_shape(self, shape: Shape) -> Shape:
    axes = (self.contraction_axis if isinstance(self.contraction_axis, tuple)
            else (self.contraction_axis,))
    reduced = {_normalize_axis(self, a, shape) for a in axes}
    return tuple(d if i in reduced else 1 for i, d in enumerate(shape))


@dataclasses.dataclass(frozen=True)
class PerGroup:
  """Groups of ``size`` consecutive elements along ``axis`` (G).

  Every other axis keeps one scale per index, so a (k, n) weight grouped on
  axis 0 has scales (k / size, n) and a (m, k) activation grouped on axis -1
  has scales (m, k / size).
  """

  axis: int = -1
  size: int = 128

  def __post_init__(self):
    object.__setattr__(self, "axis", _check_axis(self, self.axis))
    object.__setattr__(self, "size", _check_size(self, self.size))

  def block_shape(self, shape: Shape) -> Shape:
    return _group_blocks(self, self.axis, self.size, shape)


@dataclasses.dataclass(frozen=True)
class PerBlock:
  """2-D tiles of ``shape`` over ``axes`` (B), e.g. 128x128 weight tiles.

  Axes not in ``axes`` (leading batch axes) keep one scale per index.
  """

  shape: tuple[int, int] = (128, 128)
  axes: tuple[int, int] = (-2, -1)

  def __post_init__(self):
    for name in ("shape", "axes"):
      if not isinstance(getattr(self, name), (tuple, list)):
        raise ValueError(f"PerBlock: {name} must be a tuple of integers, got "
                         f"{getattr(self, name)!r}.")
    object.__setattr__(self, "shape", tuple(
        _check_size(self, size, "block size") for size in self.shape))
    object.__setattr__(self, "axes", tuple(
        _check_axis(self, axis, "axes") for axis in self.axes))
    if len(self.shape) != len(self.axes):
      raise ValueError(f"{self}: shape and axes must have the same length.")

  def block_shape(self, shape: Shape) -> Shape:
    blocks = [1] * len(shape)
    for size, axis in zip(self.shape, self.axes):
      axis = _normalize_axis(self, axis, shape)
      _check_divides(self, size, axis, shape)
      blocks[axis] = size
    return tuple(blocks)


@dataclasses.dataclass(frozen=True)
class MX:
  """OCP Microscaling: groups of ``size`` along ``axis`` sharing an e8m0 scale.

  Structurally a `PerGroup`; the scale of each group is the power of two
  ``2**(floor(log2(amax)) - emax)`` with ``emax`` the element format's, and is
  stored as ``float8_e8m0fnu``.
  """

  axis: int = -1
  size: int = 32

  def __post_init__(self):
    object.__setattr__(self, "axis", _check_axis(self, self.axis))
    object.__setattr__(self, "size", _check_size(self, self.size))

  def block_shape(self, shape: Shape) -> Shape:
    return _group_blocks(self, self.axis, self.size, shape)


GranularityLike = Union[PerTensor, PerChannel, PerToken, PerGroup, PerBlock,
                        MX, Granularity]


def scale_shape(granularity: Granularity, shape: Shape) -> Shape:
  """The (keepdims) shape of the scale for an array of ``shape``.

  Zero-size axes are allowed: an axis of length 0 that one block spans
  whole (per-tensor, or reduced by a per-channel scale) has one scale, of
  no elements; one that keeps a scale per index (or per group) has 0.
  """
  blocks = granularity.block_shape(tuple(shape))
  return tuple(d // b if b else 1 for d, b in zip(shape, blocks))


def _split_shape(shape: Shape, blocks: Shape) -> tuple[Shape, Shape]:
  """Shapes of the split array and of a broadcastable scale."""
  split, scale = [], []
  for d, b in zip(shape, blocks):
    if 1 < b < d:
      split += [d // b, b]
      scale += [d // b, 1]
    else:
      split.append(d)
      scale.append(1 if b == d else d)
  return tuple(split), tuple(scale)


def split_blocks(x: jax.Array, blocks: Shape) -> jax.Array:
  """Reshapes ``x`` so that a scale reshaped by `split_scale` broadcasts."""
  return x.reshape(_split_shape(x.shape, blocks)[0])


def split_scale(scale: jax.Array, shape: Shape, blocks: Shape) -> jax.Array:
  """Reshapes a (keepdims) scale to broadcast against ``split_blocks(x)``."""
  return scale.reshape(_split_shape(tuple(shape), blocks)[1])


def merge_blocks(x: jax.Array, shape: Shape) -> jax.Array:
  """Inverse of `split_blocks`."""
  return x.reshape(shape)


def block_reduce(x: jax.Array, blocks: Shape,
                 reducer: Callable[..., jax.Array] = jnp.max) -> jax.Array:
  """Reduces every block of ``x`` with ``reducer``; returns the scale shape.

  Args:
    x: array of shape ``(d_0, ..., d_{r-1})``.
    blocks: block shape from ``granularity.block_shape(x.shape)``.
    reducer: a ``jnp`` reduction taking ``axis`` and ``keepdims``.

  Returns:
    Array of shape ``(d_0 / b_0, ..., d_{r-1} / b_{r-1})``.
  """
  split_shape, _ = _split_shape(x.shape, blocks)
  reduce_axes, pos = [], 0
  for d, b in zip(x.shape, blocks):
    if 1 < b < d:
      reduce_axes.append(pos + 1)
      pos += 2
    else:
      if b == d and b != 1:
        reduce_axes.append(pos)
      pos += 1
  out_shape = tuple(d // b if b else 1 for d, b in zip(x.shape, blocks))
  reduced = reducer(x.reshape(split_shape), axis=tuple(reduce_axes),
                    keepdims=True) if reduce_axes else x.reshape(split_shape)
  return reduced.reshape(out_shape)
