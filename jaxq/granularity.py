"""Granularities: which elements of an array share one scale.

Every granularity reduces to one idea, a *block shape*: for an array of shape
``(d_0, ..., d_{r-1})`` it gives ``(b_0, ..., b_{r-1})`` with ``b_i <= d_i``
(for ``d_i > 0``), and the elements of one ``b_0 x ... x b_{r-1}`` tile share
a scale. Tiles start at multiples of ``b_i``; when ``b_i`` does not divide
``d_i`` the last tile along axis ``i`` is shorter (*ragged*): 576 inputs in
groups of 128 are four groups of 128 and one of 64, as every LLM tool's
"g128" means. The scale therefore has the same rank as the array and shape
``(ceil(d_0 / b_0), ..., ceil(d_{r-1} / b_{r-1}))`` (a "keepdims" shape), so
a scale always broadcasts against its array after splitting the blocked
axes. A group or block larger than its axis is the whole axis (``b_i =
d_i``).

=================================  ============================  =============
granularity                        block on a (m, k) array       scale shape
=================================  ============================  =============
``PerTensor()``                    (m, k)                        (1, 1)
``PerChannel(axis=-1)``            (m, 1)                        (1, k)
``PerToken()``                     (1, k)                        (m, 1)
``PerGroup(axis=-1, size=g)``      (1, g)                        (m, ceil(k/g))
``PerBlock(shape=(bm, bk))``       (bm, bk)                      (ceil(m/bm),
                                                                 ceil(k/bk))
``MX(axis=-1, size=32)``           (1, 32)                       (m, k/32)
=================================  ============================  =============

For a Flax ``Dense`` kernel of shape (in, out), ``PerChannel(axis=-1)`` gives
one scale per output column; ``PerGroup(axis=0, size=g)`` groups the
contraction axis and also keeps one scale per column (the "CG" scales).

MX blocks stay whole: an OCP Microscaling block is exactly ``size``
elements, so ``MX`` raises when ``size`` does not divide its axis (pad the
axis, or use ``PerGroup`` for a shorter last group).

`block_reduce` and `split_blocks` / `merge_blocks` apply a block shape by
reshape and broadcast only; nothing loops over groups or blocks in Python.
A ragged axis is padded up to whole blocks first and the padding sliced off
again (`pad_blocks`): zeros for values (they change no abs-max and add
nothing to a sum or a dot product), copies of the block's last element for
a max or min. Only axes with ``1 < b_i < d_i`` are split, so per-tensor,
per-channel and per-token scales broadcast with no reshape at all.
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


def _block_size(granularity: object, size: int, axis: int, shape: Shape
                ) -> int:
  """``size`` along ``axis`` (normalised), or the whole axis when shorter.

  A zero-length axis keeps ``size`` (zero blocks of it, zero scales)."""
  return min(size, shape[axis]) if shape[axis] else size


def _check_divides(granularity: object, size: int, axis: int, shape: Shape
                   ) -> None:
  if shape[axis] % size:
    raise ValueError(
        f"{granularity}: size {size} does not divide axis {axis} of length "
        f"{shape[axis]} in an array of shape {shape}; an OCP MX block is "
        f"whole, so pad the axis to a multiple of {size}, or use "
        f"PerGroup(axis={axis}, size={size}), whose last group may be "
        f"shorter.")


def _group_blocks(granularity: object, axis: int, size: int, shape: Shape
                  ) -> Shape:
  axis = _normalize_axis(granularity, axis, shape)
  size = _block_size(granularity, size, axis, shape)
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
  axis 0 has scales (ceil(k / size), n) and a (m, k) activation grouped on
  axis -1 has scales (m, ceil(k / size)). When ``size`` does not divide the
  axis the last group is shorter (576 in groups of 128: four of 128 and one
  of 64); a ``size`` beyond the axis makes one group of the whole axis.
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

  Axes not in ``axes`` (leading batch axes) keep one scale per index. As for
  `PerGroup`, the last tile along an axis that ``shape`` does not divide is
  shorter, and a tile side beyond its axis spans the whole axis.
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
      blocks[axis] = _block_size(self, size, axis, shape)
    return tuple(blocks)


@dataclasses.dataclass(frozen=True)
class MX:
  """OCP Microscaling: groups of ``size`` along ``axis`` sharing an e8m0 scale.

  Structurally a `PerGroup`; the scale of each group is the power of two
  ``2**(floor(log2(amax)) - emax)`` with ``emax`` the element format's, and is
  stored as ``float8_e8m0fnu``. Unlike `PerGroup`, ``size`` must divide the
  axis: an OCP MX block is always whole.
  """

  axis: int = -1
  size: int = 32

  def __post_init__(self):
    object.__setattr__(self, "axis", _check_axis(self, self.axis))
    object.__setattr__(self, "size", _check_size(self, self.size))

  def block_shape(self, shape: Shape) -> Shape:
    axis = _normalize_axis(self, self.axis, shape)
    _check_divides(self, self.size, axis, shape)
    return _group_blocks(self, axis, self.size, shape)


GranularityLike = Union[PerTensor, PerChannel, PerToken, PerGroup, PerBlock,
                        MX, Granularity]


def _num_blocks(d: int, b: int) -> int:
  """Blocks of ``b`` covering an axis of length ``d``, the last maybe short."""
  return -(-d // b) if b else 1


def scale_shape(granularity: Granularity, shape: Shape) -> Shape:
  """The (keepdims) shape of the scale for an array of ``shape``:
  ``ceil(d_i / b_i)`` along each axis.

  Zero-size axes are allowed: an axis of length 0 that one block spans
  whole (per-tensor, or reduced by a per-channel scale) has one scale, of
  no elements; one that keeps a scale per index (or per group) has 0.
  """
  blocks = granularity.block_shape(tuple(shape))
  return tuple(_num_blocks(d, b) for d, b in zip(shape, blocks))


def _is_split(d: int, b: int) -> bool:
  """Whether an axis is split into (blocks, block): several blocks of
  several elements."""
  return 1 < b < d


def _split_shape(shape: Shape, blocks: Shape) -> tuple[Shape, Shape]:
  """Shapes of the split (padded) array and of a broadcastable scale."""
  split, scale = [], []
  for d, b in zip(shape, blocks):
    if _is_split(d, b):
      split += [_num_blocks(d, b), b]
      scale += [_num_blocks(d, b), 1]
    else:
      split.append(d)
      scale.append(1 if b == d else d)
  return tuple(split), tuple(scale)


def pad_blocks(x: jax.Array, blocks: Shape, fill: float | None = 0.0
               ) -> jax.Array:
  """``x`` padded at the end of each ragged axis up to whole blocks.

  Args:
    x: array of shape ``(d_0, ..., d_{r-1})``.
    blocks: its block shape; axes where ``b_i`` divides ``d_i`` (or that
      are not split, ``b_i in (1, d_i)``) are left as they are.
    fill: the padding value, or None to repeat each axis' last element,
      which leaves a block's max and min unchanged (the last block always
      holds at least one element of ``x``).

  Returns:
    Array of shape ``(ceil(d_i / b_i) * b_i, ...)`` on the split axes.
  """
  widths = [(0, _num_blocks(d, b) * b - d if _is_split(d, b) else 0)
            for d, b in zip(x.shape, blocks)]
  if not any(high for _, high in widths):
    return x
  if fill is None:
    return jnp.pad(x, widths, mode="edge")
  return jnp.pad(x, widths, constant_values=jnp.asarray(fill, x.dtype))


def split_blocks(x: jax.Array, blocks: Shape) -> jax.Array:
  """Reshapes ``x`` so that a scale reshaped by `split_scale` broadcasts;
  ragged axes are padded with zeros to whole blocks (`merge_blocks` drops
  the padding)."""
  return pad_blocks(x, blocks).reshape(_split_shape(x.shape, blocks)[0])


def split_scale(scale: jax.Array, shape: Shape, blocks: Shape) -> jax.Array:
  """Reshapes a (keepdims) scale to broadcast against ``split_blocks(x)``."""
  return scale.reshape(_split_shape(tuple(shape), blocks)[1])


def merge_blocks(x: jax.Array, shape: Shape) -> jax.Array:
  """Inverse of `split_blocks`: ``x`` (or anything of its split shape) back
  in ``shape``, the padding of ragged blocks sliced off.

  A split axis of length ``d`` appears in ``x`` as two axes ``(n, b)`` with
  ``n = ceil(d / b) < d``, an unsplit one as ``d`` itself, so the split is
  read off ``x.shape`` with no block shape needed.
  """
  padded, pos = [], 0
  for d in shape:
    if x.shape[pos] == d:
      padded.append(d)
      pos += 1
    else:
      padded.append(x.shape[pos] * x.shape[pos + 1])
      pos += 2
  x = x.reshape(padded)
  if tuple(padded) == tuple(shape):
    return x
  return x[tuple(slice(0, d) for d in shape)]


def block_reduce(x: jax.Array, blocks: Shape,
                 reducer: Callable[..., jax.Array] = jnp.max, *,
                 fill: float | None = None) -> jax.Array:
  """Reduces every block of ``x`` with ``reducer``; returns the scale shape.

  Args:
    x: array of shape ``(d_0, ..., d_{r-1})``.
    blocks: block shape from ``granularity.block_shape(x.shape)``.
    reducer: a ``jnp`` reduction taking ``axis`` and ``keepdims``.
    fill: how a ragged last block is padded to full size before reducing
      (`pad_blocks`): None repeats its last element, right for ``jnp.max``
      and ``jnp.min``; a sum needs ``fill=0``.

  Returns:
    Array of shape ``(ceil(d_0 / b_0), ..., ceil(d_{r-1} / b_{r-1}))``.
  """
  split_shape, _ = _split_shape(x.shape, blocks)
  reduce_axes, pos = [], 0
  for d, b in zip(x.shape, blocks):
    if _is_split(d, b):
      reduce_axes.append(pos + 1)
      pos += 2
    else:
      if b == d and b != 1:
        reduce_axes.append(pos)
      pos += 1
  out_shape = tuple(_num_blocks(d, b) for d, b in zip(x.shape, blocks))
  split = pad_blocks(x, blocks, fill).reshape(split_shape)
  reduced = reducer(split, axis=tuple(reduce_axes),
                    keepdims=True) if reduce_axes else split
  return reduced.reshape(out_shape)


def block_elements(x: jax.Array, blocks: Shape, fill: float = 0.0
                   ) -> jax.Array:
  """``x`` regrouped as (scale shape..., elements of one block).

  A ragged last block is padded with ``fill`` (e.g. 0 for a sum, NaN for a
  percentile that skips NaN), so every block has ``prod(blocks)`` elements.
  """
  split = []
  for d, b in zip(x.shape, blocks):
    split += [_num_blocks(d, b), b]
  widths = [(0, _num_blocks(d, b) * b - d) for d, b in zip(x.shape, blocks)]
  if any(high for _, high in widths):
    x = jnp.pad(x, widths, constant_values=jnp.asarray(fill, x.dtype))
  rank = x.ndim
  perm = [2 * i for i in range(rank)] + [2 * i + 1 for i in range(rank)]
  scale = tuple(_num_blocks(d, b) for d, b in zip(x.shape, blocks))
  return x.reshape(split).transpose(perm).reshape(scale + (-1,))
