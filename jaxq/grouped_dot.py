"""The dot layout and the grouped matmul behind `jaxq.dot_general`.

`_dot_layout` validates ``((lhs_contract, rhs_contract), (lhs_batch,
rhs_batch))`` and finds, per contraction pair of size ``d``, the group size
``g``: the finer of the two sides' block sizes along it where their scales
vary (one must divide the other), so the pair splits into ``ceil(d / g)``
groups (1 when both scales are constant along it).

`_pad_ragged_groups` makes every group whole when a group size does not
divide ``d`` (a ragged last group, `jaxq.granularity`): it pads the pair on
both sides up to a multiple of the coarser group, the values with their
zero point (0 when symmetric), so each padded element contributes ``(a -
z_a)(b - z_b) = 0``, and the scales with their last group's; from then on
every contraction splits exactly.

`_grouped_dot` splits each grouped contraction axis into ``(d / g, g)``,
runs one low-bit ``lax.dot_general`` with the groups as batch dimensions,
so ``acc`` is laid out (batch..., groups..., lhs free..., rhs free...),
subtracts the zero-point correction ``z_a sum b + z_b sum a - g z_a z_b``
(int32, per group), multiplies both scales in float32 and sums the groups:
for a (m, k) x (k, n) matmul ``out[m, n] = sum_j acc[j, m, n] * s_lhs[m, j]
* s_rhs[j, n]``. The result is laid out like ``lax.dot_general``'s (batch...,
lhs free..., rhs free...).

Past `MAX_GROUPED_ELEMENTS` elements of ``acc``, `_chunk_plan` picks one
contraction pair and `_chunked_dot` runs a ``fori_loop`` over chunks of
whole groups of it, one grouped matmul per chunk, accumulating the scaled
float32 results: memory stays O(output).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jaxq.operand import _accumulation_dtype
from jaxq.operand import _broadcast_blocks
from jaxq.operand import _Operand

Array = jax.Array
DotDimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]],
                            tuple[Sequence[int], Sequence[int]]]


def _normalize_axes(op: str, side: str, axes: Sequence[int],
                    shape: Sequence[int]) -> tuple[int, ...]:
  ndim = len(shape)
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"{op}: {side} axis {a} is out of range for an operand "
                       f"of shape {tuple(shape)}.")
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{op}: {side} axes {tuple(axes)} repeat an axis of an "
                     f"operand of shape {tuple(shape)}.")
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class _DotLayout:
  """Axes of one dot_general, and the groups each contraction splits into.

  ``groups[i]`` is the number of groups contraction pair ``i`` splits into
  (1 when both scales are constant along it). The matmul's output is laid
  out as (batch..., grouped contractions..., lhs free..., rhs free...).
  """

  lhs_shape: tuple[int, ...]
  rhs_shape: tuple[int, ...]
  lhs_contract: tuple[int, ...]
  rhs_contract: tuple[int, ...]
  lhs_batch: tuple[int, ...]
  rhs_batch: tuple[int, ...]
  groups: tuple[int, ...]

  @property
  def lhs_free(self) -> tuple[int, ...]:
    used = set(self.lhs_contract + self.lhs_batch)
    return tuple(a for a in range(len(self.lhs_shape)) if a not in used)

  @property
  def rhs_free(self) -> tuple[int, ...]:
    used = set(self.rhs_contract + self.rhs_batch)
    return tuple(a for a in range(len(self.rhs_shape)) if a not in used)

  @property
  def num_grouped(self) -> int:
    return sum(n > 1 for n in self.groups)

  def side(self, lhs: bool) -> tuple[tuple[int, ...], ...]:
    """(shape, contract, batch, free) of one side."""
    if lhs:
      return (self.lhs_shape, self.lhs_contract, self.lhs_batch,
              self.lhs_free)
    return self.rhs_shape, self.rhs_contract, self.rhs_batch, self.rhs_free


def _dot_layout(op: str, lhs: _Operand, rhs: _Operand,
                dimension_numbers: DotDimensionNumbers) -> _DotLayout:
  """Validates the dimension numbers and finds the common group sizes."""
  (lc, rc), (lb, rb) = dimension_numbers
  lshape, rshape = tuple(lhs.values.shape), tuple(rhs.values.shape)
  lc, lb = (_normalize_axes(op, "lhs", a, lshape) for a in (lc, lb))
  rc, rb = (_normalize_axes(op, "rhs", a, rshape) for a in (rc, rb))
  if len(lc) != len(rc) or len(lb) != len(rb):
    raise ValueError(
        f"{op}: lhs and rhs need as many contracting and batch axes, got "
        f"contracting {lc} vs {rc} and batch {lb} vs {rb}.")
  if set(lc) & set(lb) or set(rc) & set(rb):
    raise ValueError(f"{op}: an axis is both contracting and batch: lhs "
                     f"{lc}/{lb}, rhs {rc}/{rb}.")
  for kind, la_, ra_ in (("contracting", lc, rc), ("batch", lb, rb)):
    for la, ra in zip(la_, ra_):
      if lshape[la] != rshape[ra]:
        raise ValueError(
            f"{op}: {kind} axes differ in size: lhs axis {la} has size "
            f"{lshape[la]} (lhs shape {lshape}) but rhs axis {ra} has size "
            f"{rshape[ra]} (rhs shape {rshape}).")
  groups = []
  for la, ra in zip(lc, rc):
    size = lshape[la]
    lgroup, rgroup = _group(lhs, la), _group(rhs, ra)
    varying = [g for g in (lgroup, rgroup) if g is not None]
    if len(varying) == 2 and max(varying) % min(varying):
      raise ValueError(
          f"{op}: the scales split contraction axis of size {size} into "
          f"groups of {lgroup} (lhs axis {la}, scale shape "
          f"{tuple(lhs.scale.shape)}) and of {rgroup} (rhs axis {ra}, scale "
          f"shape {tuple(rhs.scale.shape)}); one group size must divide the "
          f"other.")
    groups.append(-(-size // min(varying)) if varying else 1)
  return _DotLayout(lshape, rshape, lc, rc, lb, rb, tuple(groups))


def _group(operand: _Operand, axis: int) -> int | None:
  """Elements per scale along ``axis`` where the scale varies along it (the
  last group may be shorter), None where it is constant."""
  if operand.scale is None or operand.scale.shape[axis] == 1:
    return None
  return operand.blocks[axis]


def _pad_ragged_groups(op: str, lhs: _Operand, rhs: _Operand,
                       layout: _DotLayout,
                       dimension_numbers: DotDimensionNumbers
                       ) -> tuple[_Operand, _Operand, _DotLayout]:
  """Pads every contraction pair to a whole number of its coarser groups.

  A pair of size ``d`` whose coarsest varying group ``g`` does not divide
  it grows to ``ceil(d / g) * g`` on both sides (`_pad_contraction`); the
  padding multiplies to exactly 0, so the result is unchanged while every
  group, scale and chunk after this is whole. Returns the operands and
  their layout, as given when nothing is ragged.
  """
  lhs_lengths, rhs_lengths = {}, {}
  for la, ra in zip(layout.lhs_contract, layout.rhs_contract):
    size = layout.lhs_shape[la]
    unit = max((g for g in (_group(lhs, la), _group(rhs, ra))
                if g is not None), default=size)
    if size and size % unit:
      lhs_lengths[la] = rhs_lengths[ra] = -(-size // unit) * unit
  if not lhs_lengths:
    return lhs, rhs, layout
  for axis, length in lhs_lengths.items():
    lhs = _pad_contraction(lhs, axis, length)
  for axis, length in rhs_lengths.items():
    rhs = _pad_contraction(rhs, axis, length)
  return lhs, rhs, _dot_layout(op, lhs, rhs, dimension_numbers)


def _pad_contraction(operand: _Operand, axis: int, length: int) -> _Operand:
  """``operand`` padded along ``axis`` to ``length`` elements: the values
  with the zero point of the last group (0 when symmetric), so that ``a -
  z_a = 0`` there, and a varying scale and zero point with their last
  group's, one entry per (whole) block."""
  values = operand.values
  pad = length - values.shape[axis]
  pad_shape = tuple(pad if a == axis else d
                    for a, d in enumerate(values.shape))
  if operand.zero_point is None:
    fill = jnp.zeros(pad_shape, values.dtype)
  else:
    last = lax.slice_in_dim(operand.zero_point, -1, None, axis=axis)
    fill = jnp.broadcast_to(
        _broadcast_blocks(last, operand.blocks, pad_shape),
        pad_shape).astype(values.dtype)

  def extend(t: Array | None) -> Array | None:
    if t is None or t.shape[axis] == 1:
      return t
    extra = length // operand.blocks[axis] - t.shape[axis]
    return jnp.pad(t, [(0, extra if a == axis else 0) for a in range(t.ndim)],
                   mode="edge")

  return dataclasses.replace(
      operand, values=jnp.concatenate([values, fill], axis=axis),
      scale=extend(operand.scale), zero_point=extend(operand.zero_point))


def _split_groups(x: Array, layout: _DotLayout, lhs: bool
                  ) -> tuple[Array, tuple[int, ...], tuple[int, ...],
                             tuple[int, ...]]:
  """Splits each grouped contraction axis of ``x`` into (groups, group).

  Returns the reshaped array and, on it, the batch axes, the group axes and
  the contraction axes (the within-group halves), each in pair order.
  """
  shape, contract, batch, _ = layout.side(lhs)
  num_groups = dict(zip(contract, layout.groups))
  new_shape, position = [], {}
  for axis, size in enumerate(shape):
    position[axis] = len(new_shape)
    n = num_groups.get(axis, 1)
    new_shape += [n, size // n] if n > 1 else [size]
  batch_axes = tuple(position[a] for a in batch)
  group_axes = tuple(position[a] for a in contract if num_groups[a] > 1)
  contract_axes = tuple(position[a] + (num_groups[a] > 1) for a in contract)
  return x.reshape(new_shape), batch_axes, group_axes, contract_axes


def _to_output_layout(x: Array, blocks: Sequence[int], layout: _DotLayout,
                      lhs: bool) -> Array:
  """Lays out a scale-like array of one side like the grouped matmul output.

  ``x`` has the operand's rank: on contraction axes size 1 or a group
  count dividing the layout's; elsewhere size 1, the full size, or one
  entry per block of ``blocks`` (the side's block shape). The result
  broadcasts against (batch..., groups..., lhs free..., rhs free...).
  """
  shape, contract, batch, free = layout.side(lhs)
  num_groups = dict(zip(contract, layout.groups))
  target = [num_groups.get(a, d) for a, d in enumerate(shape)]
  # A coarser side's group spans target // size of the layout's groups.
  repeats = [target[a] // size if a in num_groups and size else b
             for a, (size, b) in enumerate(zip(x.shape, blocks))]
  x = _broadcast_blocks(x, repeats, target)
  grouped = tuple(a for a in contract if num_groups[a] > 1)
  ungrouped = tuple(a for a in contract if num_groups[a] == 1)
  x = jnp.transpose(x, batch + grouped + free + ungrouped)
  lead = x.shape[:len(batch) + len(grouped)]
  own = x.shape[len(lead):len(lead) + len(free)]
  if lhs:
    return x.reshape(lead + own + (1,) * len(layout.rhs_free))
  return x.reshape(lead + (1,) * len(layout.lhs_free) + own)


def _contraction_sums(values: Array, layout: _DotLayout, lhs: bool) -> Array:
  """int32 sums of one side over each group, in that side's keepdims shape."""
  split, _, _, contract_axes = _split_groups(values, layout, lhs)
  sums = jnp.sum(split.astype(jnp.int32), axis=contract_axes, keepdims=True)
  shape, contract, _, _ = layout.side(lhs)
  num_groups = dict(zip(contract, layout.groups))
  return sums.reshape([num_groups.get(a, d) for a, d in enumerate(shape)])


def _grouped_dot(lhs: _Operand, rhs: _Operand, layout: _DotLayout) -> Array:
  """The rescaled matmul in float32, laid out like ``lax.dot_general``."""
  lvalues, lbatch, lgroups, lcontract = _split_groups(lhs.values, layout,
                                                      lhs=True)
  rvalues, rbatch, rgroups, rcontract = _split_groups(rhs.values, layout,
                                                      lhs=False)
  acc = lax.dot_general(
      lvalues, rvalues,
      ((lcontract, rcontract), (lbatch + lgroups, rbatch + rgroups)),
      preferred_element_type=_accumulation_dtype(lhs.kind))
  if lhs.zero_point is not None or rhs.zero_point is not None:
    acc = acc - _zero_point_correction(lhs, rhs, layout)
  out = acc.astype(jnp.float32)
  for side, operand in ((True, lhs), (False, rhs)):
    if operand.scale is not None:
      out = out * _to_output_layout(operand.scale, operand.blocks, layout,
                                    lhs=side)
  if not layout.num_grouped:
    return out
  first = len(layout.lhs_batch)
  return jnp.sum(out, axis=tuple(range(first, first + layout.num_grouped)))


def _zero_point_correction(lhs: _Operand, rhs: _Operand, layout: _DotLayout
                           ) -> Array:
  """``z_a sum b + z_b sum a - g z_a z_b`` per group, in int32."""
  terms = []
  if lhs.zero_point is not None:
    lzero = _to_output_layout(lhs.zero_point, lhs.blocks, layout, lhs=True)
    terms.append(lzero * _to_output_layout(
        _contraction_sums(rhs.values, layout, lhs=False),
        (1,) * rhs.values.ndim, layout, lhs=False))
  if rhs.zero_point is not None:
    rzero = _to_output_layout(rhs.zero_point, rhs.blocks, layout, lhs=False)
    terms.append(rzero * _to_output_layout(
        _contraction_sums(lhs.values, layout, lhs=True),
        (1,) * lhs.values.ndim, layout, lhs=True))
  if lhs.zero_point is not None and rhs.zero_point is not None:
    group_size = math.prod(layout.lhs_shape[a] // n for a, n in
                           zip(layout.lhs_contract, layout.groups))
    terms.append(-group_size * lzero * rzero)
  return functools.reduce(jnp.add, terms)


# A grouped matmul materialises one (batch, groups, lhs free, rhs free)
# partial product per group before scaling and summing them. Past this many
# elements the contraction runs as a loop over chunks of groups instead:
# memory stays O(output) however many groups there are, and on CPU one plain
# int8 matmul per group is 2-7x faster than the batched one (see
# benchmarks/matmul.py); small products (decoding one token) stay batched.
MAX_GROUPED_ELEMENTS = 1 << 16


def _chunk_plan(lhs: _Operand, rhs: _Operand, layout: _DotLayout
                ) -> tuple[int, int, int] | None:
  """``(pair, length, count)``: run contraction pair ``pair`` as ``count``
  chunks of ``length`` elements; None when the grouped matmul fits."""
  if not layout.num_grouped:
    return None
  out_size = (math.prod(layout.lhs_shape[a] for a in layout.lhs_batch) *
              math.prod(layout.lhs_shape[a] for a in layout.lhs_free) *
              math.prod(layout.rhs_shape[a] for a in layout.rhs_free))
  total_groups = math.prod(layout.groups)
  if out_size * total_groups <= MAX_GROUPED_ELEMENTS:
    return None
  best = None
  for pair, (la, ra) in enumerate(zip(layout.lhs_contract,
                                      layout.rhs_contract)):
    size = layout.lhs_shape[la]
    # A chunk must hold whole groups of each side whose scale varies here.
    varying = [size // o.scale.shape[a] for o, a in ((lhs, la), (rhs, ra))
               if o.scale is not None and o.scale.shape[a] > 1]
    unit = max(varying, default=size)
    if size // unit > 1 and (best is None or size // unit > best[1]):
      best = (pair, size // unit, unit)
  if best is None:
    return None
  pair, units, unit = best
  groups_per_unit = layout.groups[pair] // units
  others = total_groups // layout.groups[pair]
  per_unit = out_size * others * groups_per_unit
  chunk = max([c for c in range(1, units + 1) if units % c == 0 and
               c * per_unit <= MAX_GROUPED_ELEMENTS], default=1)
  return pair, chunk * unit, units // chunk


def _slice_operand(operand: _Operand, axis: int, start: Array, length: int
                   ) -> _Operand:
  """``length`` elements of ``axis`` from ``start``, with their scales."""
  size = operand.values.shape[axis]

  def part(t: Array | None) -> Array | None:
    if t is None or t.shape[axis] == 1:
      return t
    group = size // t.shape[axis]
    return lax.dynamic_slice_in_dim(t, start // group, length // group, axis)

  return dataclasses.replace(
      operand,
      values=lax.dynamic_slice_in_dim(operand.values, start, length, axis),
      scale=part(operand.scale), zero_point=part(operand.zero_point))


def _chunked_dot(op: str, lhs: _Operand, rhs: _Operand,
                 dimension_numbers: DotDimensionNumbers, layout: _DotLayout,
                 pair: int, length: int, count: int) -> Array:
  """`_grouped_dot` summed over ``count`` chunks of contraction ``pair``."""
  la, ra = layout.lhs_contract[pair], layout.rhs_contract[pair]
  out_shape = (tuple(layout.lhs_shape[a] for a in layout.lhs_batch) +
               tuple(layout.lhs_shape[a] for a in layout.lhs_free) +
               tuple(layout.rhs_shape[a] for a in layout.rhs_free))

  def body(i, acc):
    start = i * length
    part_lhs = _slice_operand(lhs, la, start, length)
    part_rhs = _slice_operand(rhs, ra, start, length)
    part = _dot_layout(op, part_lhs, part_rhs, dimension_numbers)
    return acc + _grouped_dot(part_lhs, part_rhs, part)

  return lax.fori_loop(0, count, body, jnp.zeros(out_shape, jnp.float32))
