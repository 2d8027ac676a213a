"""Low-bit ops: `dot_general`, `einsum` and `conv` on `QArray` operands.

Each op computes the float op on the dequantized operands (the fake-quant
reference) up to float32 rounding, but multiplies the stored low-bit values:

* int x int (int8, int4, uint8) accumulates in int32 through
  ``lax.dot_general(..., preferred_element_type=int32)``; fp8 x fp8 (fp8,
  fp4, MX) accumulates in float32. int4 is computed as int8 and fp4
  (e2m1) as ``float8_e4m3fn`` (both exact), since XLA has no int4 or fp4
  matmul on CPU or on most GPUs. Mixing an integer with a float element
  format is refused.
* Scales constant along the contraction (T, C, K) multiply the accumulated
  result: ``out[m, n] = acc[m, n] * s_lhs[m] * s_rhs[n]``.
* Scales that vary along the contraction (G, B, MX and pairings such as
  T-CG or K-G) split each contraction axis of size ``d`` into
  ``(d / g, g)`` with ``g`` the finer of the two sides' group sizes (one
  must divide the other). Each group's partial sum is scaled and the
  groups are summed in float32: for a (m, k) x (k, n) matmul,
  ``out[m, n] = sum_j acc[j, m, n] * s_lhs[m, j] * s_rhs[j, n]``. Small
  products compute every ``acc[j]`` at once (the groups become a batch
  dimension of one ``lax.dot_general``); beyond `MAX_GROUPED_ELEMENTS`
  elements of ``acc`` a ``fori_loop`` runs one low-bit matmul per chunk of
  groups and accumulates the scaled results, so memory stays O(output).
* Zero points (affine, e.g. uint8 activations) are never dequantized:
  ``sum_k (a - z_a)(b - z_b) = sum_k a b - z_a sum_k b - z_b sum_k a
  + g z_a z_b``, per group, all in int32. uint8 values are first recentred
  to int8 (``a - 128``, with the zero point moved by 128), so every integer
  matmul and convolution runs int8 x int8.
* Float x QArray is weight-only: when the weight's scale (and zero point) is
  constant along the contraction, the float dot runs on the weight's values
  cast to the float operand's dtype, accumulating in float32, and the scale
  multiplies the result; otherwise the weight is dequantized first.

Shapes: scales and zero points have the rank of their values (see
`jaxq.granularity`); a size-1 scale axis means "constant along that axis".
Outputs are float: ``preferred_element_type`` when given, else the float
operand's dtype, else the QArrays' ``dtype``. int32 accumulation is exact
while ``|sum|`` stays below 2**31 (e.g. a contraction of 130k int8 terms).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from jaxq.spec import QArray, check_qarray

Array = jax.Array
Operand = QArray | Array
DotDimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]],
                            tuple[Sequence[int], Sequence[int]]]

# Element dtypes the matmuls run on, per stored dtype (exact conversions).
_COMPUTE_DTYPE = {
    np.dtype(ml_dtypes.int4): np.dtype(np.int8),
    np.dtype(ml_dtypes.float4_e2m1fn): np.dtype(ml_dtypes.float8_e4m3fn),
}
_UINT8_SHIFT = 128


@dataclasses.dataclass(frozen=True)
class _Operand:
  """One side of an op, ready for the matmul.

  Attributes:
    values: int8 (``kind == "int"``), fp8 (``"fp8"``) or a float array
      (``"float"``, unquantized or weight-only).
    scale: float32 of the values' rank, or None for a unit scale.
    zero_point: int32 of the scale's shape, or None (integer kinds only).
    kind: ``"int"``, ``"fp8"`` or ``"float"``.
    name: the format, for error messages.
  """

  values: Array
  scale: Array | None
  zero_point: Array | None
  kind: str
  name: str


def _check_qarray(op: str, side: str, qa: QArray) -> None:
  shape, scale_shape = qa.shape, tuple(qa.scale.shape)
  if len(scale_shape) != len(shape) or any(
      d % s for d, s in zip(shape, scale_shape)):
    raise ValueError(
        f"{op}: {side} QArray has values of shape {shape} and a scale of shape "
        f"{scale_shape}; the scale must have the same rank and each of its "
        f"sizes must divide the values' size on that axis.")
  if qa.zero_point is not None and tuple(qa.zero_point.shape) != scale_shape:
    raise ValueError(
        f"{op}: {side} QArray has a zero point of shape "
        f"{tuple(qa.zero_point.shape)} but a scale of shape {scale_shape}.")


def _operand(op: str, side: str, x: Operand) -> _Operand:
  """Converts a QArray or a float array into an `_Operand`."""
  if isinstance(x, QArray):
    _check_qarray(op, side, x)
    check_qarray(x, op, side)
    values = x.values
    zero_point = (None if x.zero_point is None
                  else x.zero_point.astype(jnp.int32))
    if values.dtype == np.uint8:
      # [0, 255] -> [-128, 127], exactly: (a - z) == (a - 128) - (z - 128).
      values = (values.astype(jnp.int16) - _UINT8_SHIFT).astype(jnp.int8)
      zero_point = zero_point - _UINT8_SHIFT
    values = values.astype(_COMPUTE_DTYPE.get(np.dtype(values.dtype),
                                              values.dtype))
    kind = "int" if x.spec.fmt.kind == "int" else "fp8"
    return _Operand(values, x.scale.astype(jnp.float32), zero_point, kind,
                    x.spec.format)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f"{op}: {side} must be a QArray or a floating-point array, got dtype "
        f"{x.dtype} with shape {tuple(x.shape)}; quantize integer data with "
        f"jaxq.quantize first.")
  return _Operand(x, None, None, "float", str(x.dtype))


def _as_float(qa: _Operand, dtype: np.dtype, constant_axes: Sequence[int]
              ) -> _Operand:
  """The weight-only form of a quantized operand, in float ``dtype``.

  When the scale is constant along ``constant_axes`` (the contraction) the
  integer values (less the zero point) are exact in ``dtype`` and the scale
  is kept for after the matmul; otherwise the operand is dequantized.
  """
  if all(qa.scale.shape[a] == 1 for a in constant_axes):
    values = qa.values
    if qa.zero_point is not None:
      # |values - zero_point| <= 255 is exact in every float dtype.
      values = (values.astype(jnp.int32) -
                _broadcast_blocks(qa.zero_point, values.shape))
    return _Operand(values.astype(dtype), qa.scale, None, "float", qa.name)
  shape = tuple(qa.values.shape)
  values = qa.values.astype(jnp.float32)
  if qa.zero_point is not None:
    values = values - _broadcast_blocks(qa.zero_point, shape).astype(
        jnp.float32)
  values = values * _broadcast_blocks(qa.scale, shape)
  return _Operand(values.astype(dtype), None, None, "float", qa.name)


def _broadcast_blocks(x: Array, shape: Sequence[int]) -> Array:
  """Repeats a keepdims scale to the size of each of its blocked axes."""
  for axis, (size, target) in enumerate(zip(x.shape, shape)):
    if size not in (1, target):
      x = jnp.repeat(x, target // size, axis=axis)
  return x


def _resolve_kinds(op: str, lhs: _Operand, rhs: _Operand,
                   lhs_constant: Sequence[int], rhs_constant: Sequence[int]
                   ) -> tuple[_Operand, _Operand]:
  """Makes the two operands computable together; refuses int x fp8."""
  if "float" in (lhs.kind, rhs.kind):
    dtype = functools.reduce(jnp.promote_types, [
        o.values.dtype for o in (lhs, rhs) if o.kind == "float"])
    lhs = _as_float(lhs, dtype, lhs_constant) if lhs.kind != "float" else lhs
    rhs = _as_float(rhs, dtype, rhs_constant) if rhs.kind != "float" else rhs
    return (dataclasses.replace(lhs, values=lhs.values.astype(dtype)),
            dataclasses.replace(rhs, values=rhs.values.astype(dtype)))
  if lhs.kind != rhs.kind:
    raise ValueError(
        f"{op}: cannot multiply {lhs.name} (lhs) by {rhs.name} (rhs): an "
        f"integer format needs an integer partner (int32 accumulation) and a "
        f"float format a float partner (float32 accumulation). Quantize both "
        f"operands to integer formats or both to float formats.")
  return lhs, rhs


def _output_dtype(op: str, lhs: Operand, rhs: Operand, preferred_element_type
                  ) -> np.dtype:
  if preferred_element_type is not None:
    dtype = np.dtype(preferred_element_type)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f"{op}: preferred_element_type must be a float dtype (the output is "
          f"rescaled), got {dtype}; integer accumulation is internal.")
    return dtype
  floats = [jnp.asarray(x).dtype for x in (lhs, rhs)
            if not isinstance(x, QArray)] or [lhs.dtype, rhs.dtype]
  return np.dtype(functools.reduce(jnp.promote_types, floats))


def _accumulation_dtype(kind: str) -> np.dtype:
  return np.dtype(jnp.int32 if kind == "int" else jnp.float32)


# dot_general


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
    lgroup = size // (1 if lhs.scale is None else lhs.scale.shape[la])
    rgroup = size // (1 if rhs.scale is None else rhs.scale.shape[ra])
    fine, coarse = sorted((lgroup, rgroup))
    if coarse % fine:
      raise ValueError(
          f"{op}: the scales split contraction axis of size {size} into "
          f"groups of {lgroup} (lhs axis {la}, scale shape "
          f"{tuple(lhs.scale.shape)}) and of {rgroup} (rhs axis {ra}, scale "
          f"shape {tuple(rhs.scale.shape)}); one group size must divide the "
          f"other.")
    groups.append(size // fine)
  return _DotLayout(lshape, rshape, lc, rc, lb, rb, tuple(groups))


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


def _to_output_layout(x: Array, layout: _DotLayout, lhs: bool) -> Array:
  """Lays out a scale-like array of one side like the grouped matmul output.

  ``x`` has the operand's rank, size 1 or the group count on contraction
  axes and size 1, a divisor or the full size elsewhere. The result
  broadcasts against (batch..., groups..., lhs free..., rhs free...).
  """
  shape, contract, batch, free = layout.side(lhs)
  num_groups = dict(zip(contract, layout.groups))
  target = [num_groups.get(a, d) for a, d in enumerate(shape)]
  x = _broadcast_blocks(x, target)
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
      out = out * _to_output_layout(operand.scale, layout, lhs=side)
  if not layout.num_grouped:
    return out
  first = len(layout.lhs_batch)
  return jnp.sum(out, axis=tuple(range(first, first + layout.num_grouped)))


def _zero_point_correction(lhs: _Operand, rhs: _Operand, layout: _DotLayout
                           ) -> Array:
  """``z_a sum b + z_b sum a - g z_a z_b`` per group, in int32."""
  terms = []
  if lhs.zero_point is not None:
    lzero = _to_output_layout(lhs.zero_point, layout, lhs=True)
    terms.append(lzero * _to_output_layout(
        _contraction_sums(rhs.values, layout, lhs=False), layout, lhs=False))
  if rhs.zero_point is not None:
    rzero = _to_output_layout(rhs.zero_point, layout, lhs=False)
    terms.append(rzero * _to_output_layout(
        _contraction_sums(lhs.values, layout, lhs=True), layout, lhs=True))
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


def dot_general(lhs: Operand, rhs: Operand,
                dimension_numbers: DotDimensionNumbers,
                preferred_element_type=None) -> Array:
  """``lax.dot_general`` on QArrays (or floats), with low-bit accumulation.

  Args:
    lhs: a `QArray` or a float array.
    rhs: a `QArray` or a float array.
    dimension_numbers: ``((lhs_contract, rhs_contract), (lhs_batch,
      rhs_batch))`` exactly as for ``jax.lax.dot_general``.
    preferred_element_type: the float output dtype; by default the float
      operand's dtype, else the QArrays' ``dtype`` (promoted).

  Returns:
    The float array ``lax.dot_general(dequantize(lhs), dequantize(rhs),
    dimension_numbers)`` (up to float32 rounding), laid out as batch, lhs
    free, rhs free axes.

  Raises:
    ValueError: for mismatched axis sizes, group sizes that do not nest,
      integer-by-float element formats, malformed QArrays or a non-float
      ``preferred_element_type``.
  """
  op = "jaxq.dot_general"
  out_dtype = _output_dtype(op, lhs, rhs, preferred_element_type)
  lop, rop = _operand(op, "lhs", lhs), _operand(op, "rhs", rhs)
  (lc, rc), _ = dimension_numbers
  lc = _normalize_axes(op, "lhs", lc, lop.values.shape)
  rc = _normalize_axes(op, "rhs", rc, rop.values.shape)
  lop, rop = _resolve_kinds(op, lop, rop, lc, rc)
  layout = _dot_layout(op, lop, rop, dimension_numbers)
  plan = _chunk_plan(lop, rop, layout)
  if plan is None:
    return _grouped_dot(lop, rop, layout).astype(out_dtype)
  return _chunked_dot(op, lop, rop, dimension_numbers, layout,
                      *plan).astype(out_dtype)


# einsum


def _parse_einsum(subscripts: str, lhs_ndim: int, rhs_ndim: int
                  ) -> tuple[DotDimensionNumbers, tuple[int, ...]]:
  """The dot_general dimension numbers and the output permutation."""
  op = f"jaxq.einsum({subscripts!r})"
  spec = subscripts.replace(" ", "")
  inputs, arrow, out = spec.partition("->")
  operands = inputs.split(",")
  if "." in spec or len(operands) != 2 or not all(
      s.isalpha() for s in operands + ([out] if out else [])):
    raise ValueError(f"{op}: expected two operands spelled with letters, "
                     f"like 'btd,df->btf' (no ellipsis).")
  lsub, rsub = operands
  for name, sub, ndim in (("lhs", lsub, lhs_ndim), ("rhs", rsub, rhs_ndim)):
    if len(sub) != ndim:
      raise ValueError(f"{op}: {name} subscripts {sub!r} name {len(sub)} axes "
                       f"but the {name} has rank {ndim}.")
    if len(set(sub)) != len(sub):
      raise ValueError(f"{op}: {name} subscripts {sub!r} repeat an index "
                       f"(traces and diagonals are not a dot_general).")
  if not arrow:
    # numpy's implicit output: the indices that appear once, sorted.
    out = "".join(sorted(c for c in set(lsub + rsub)
                         if (lsub + rsub).count(c) == 1))
  if len(set(out)) != len(out) or set(out) - set(lsub + rsub):
    raise ValueError(f"{op}: output subscripts {out!r} must be distinct "
                     f"indices of the operands.")
  lonely = (set(lsub) ^ set(rsub)) - set(out)
  if lonely:
    raise ValueError(f"{op}: indices {sorted(lonely)} appear in one operand "
                     f"only and not in the output; summing one operand is not "
                     f"a dot_general.")
  batch = [c for c in lsub if c in rsub and c in out]
  contract = [c for c in lsub if c in rsub and c not in out]
  lfree = [c for c in lsub if c not in rsub]
  rfree = [c for c in rsub if c not in lsub]
  dimension_numbers = (
      (tuple(lsub.index(c) for c in contract),
       tuple(rsub.index(c) for c in contract)),
      (tuple(lsub.index(c) for c in batch),
       tuple(rsub.index(c) for c in batch)))
  result = batch + lfree + rfree
  return dimension_numbers, tuple(result.index(c) for c in out)


def einsum(subscripts: str, lhs: Operand, rhs: Operand,
           preferred_element_type=None) -> Array:
  """Two-operand einsum on QArrays (or floats), through `dot_general`.

  Any two-operand einsum that is one ``dot_general`` plus a transpose:
  indices in both operands and the output are batch axes, in both operands
  only are contracted, in one operand and the output are free. Covers e.g.
  ``"btd,df->btf"``, ``"bthd,bshd->bhts"`` and ``"bhts,bshd->bthd"``.

  Raises:
    ValueError: for ellipses, repeated indices within one operand, indices
      summed over a single operand, or anything `dot_general` refuses.
  """
  ndims = [x.ndim if isinstance(x, QArray) else jnp.ndim(x)
           for x in (lhs, rhs)]
  dimension_numbers, permutation = _parse_einsum(subscripts, *ndims)
  out = dot_general(lhs, rhs, dimension_numbers, preferred_element_type)
  if permutation == tuple(range(out.ndim)):
    return out
  return jnp.transpose(out, permutation)


# conv


def _conv_scale(op: str, side: str, operand: _Operand, kept_axis: int,
                what: str) -> None:
  """Checks that a conv scale varies along ``kept_axis`` at most."""
  for tensor, label in ((operand.scale, "scale"),
                        (operand.zero_point, "zero point")):
    if tensor is None:
      continue
    if any(s != 1 for a, s in enumerate(tensor.shape) if a != kept_axis):
      raise ValueError(
          f"{op}: the {side} {label} has shape {tuple(tensor.shape)} for "
          f"values of shape {tuple(operand.values.shape)}; a low-bit "
          f"convolution needs it per tensor or per {what} (axis "
          f"{kept_axis}).")


def _to_conv_output(x: Array, axis: int, size: int, out_axis: int,
                    out_ndim: int) -> Array:
  """Places a per-axis scale (size 1 or ``size``) on ``out_axis``."""
  x = _broadcast_blocks(x, [size if a == axis else 1 for a in range(x.ndim)])
  shape = [1] * out_ndim
  shape[out_axis] = x.shape[axis]
  return x.reshape(shape)


def conv(lhs: Operand, rhs: Operand, window_strides: Sequence[int],
         padding: str | Sequence[tuple[int, int]],
         lhs_dilation: Sequence[int] | None = None,
         rhs_dilation: Sequence[int] | None = None,
         dimension_numbers=None, feature_group_count: int = 1,
         preferred_element_type=None) -> Array:
  """``lax.conv_general_dilated`` on QArrays (or floats).

  Args:
    lhs: the input: a `QArray` with a per-tensor (or per-example) scale and
      optional zero point, or a float array (weight-only).
    rhs: the kernel: a `QArray` with per-output-channel or per-tensor
      scales, or a float array.
    window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count: as for ``jax.lax.conv_general_dilated``;
      depthwise convolutions set ``feature_group_count`` to the input
      features.
    preferred_element_type: the float output dtype (defaults as for
      `dot_general`).

  Integer operands accumulate in int32 (fp8 in float32); a zero point on
  the input is corrected with the convolution of a one-example all-ones
  input, which zero-pads exactly as the dequantized input does. Weight-only
  kernels with other scales are dequantized.

  Raises:
    ValueError: for scales that vary along an axis the convolution sums
      over, integer-by-float formats or a zero point on the kernel.
  """
  op = "jaxq.conv"
  out_dtype = _output_dtype(op, lhs, rhs, preferred_element_type)
  lop, rop = _operand(op, "lhs", lhs), _operand(op, "rhs", rhs)
  dn = lax.conv_dimension_numbers(lop.values.shape, rop.values.shape,
                                  dimension_numbers)
  lhs_batch, rhs_out = dn.lhs_spec[0], dn.rhs_spec[0]
  lop, rop = _resolve_kinds(
      op, lop, rop, [a for a in range(lop.values.ndim) if a != lhs_batch],
      [a for a in range(rop.values.ndim) if a != rhs_out])
  if rop.zero_point is not None:
    raise ValueError(f"{op}: the kernel ({rop.name}) must be symmetric; got "
                     f"a zero point of shape {tuple(rop.zero_point.shape)}.")
  _conv_scale(op, "lhs", lop, lhs_batch, "example")
  _conv_scale(op, "rhs", rop, rhs_out, "output channel")

  def convolve(x: Array, accumulation: np.dtype) -> Array:
    return lax.conv_general_dilated(
        x, rop.values, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dn,
        feature_group_count=feature_group_count,
        preferred_element_type=accumulation)

  accumulation = _accumulation_dtype(lop.kind)
  acc = convolve(lop.values, accumulation)
  out_ndim, out_batch, out_feature = acc.ndim, dn.out_spec[0], dn.out_spec[1]
  if lop.zero_point is not None:
    ones_shape = list(lop.values.shape)
    ones_shape[lhs_batch] = 1
    window_sums = convolve(jnp.ones(ones_shape, lop.values.dtype),
                           accumulation)
    zero_point = _to_conv_output(lop.zero_point, lhs_batch,
                                 lop.values.shape[lhs_batch], out_batch,
                                 out_ndim)
    acc = acc - zero_point * window_sums
  out = acc.astype(jnp.float32)
  if lop.scale is not None:
    out = out * _to_conv_output(lop.scale, lhs_batch,
                                lop.values.shape[lhs_batch], out_batch,
                                out_ndim)
  if rop.scale is not None:
    out = out * _to_conv_output(rop.scale, rhs_out, rop.values.shape[rhs_out],
                                out_feature, out_ndim)
  return out.astype(out_dtype)


__all__ = ["conv", "dot_general", "einsum"]
