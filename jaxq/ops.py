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
  must divide the other). A ragged last group (``g`` not dividing ``d``)
  is first padded to whole groups with elements that multiply to 0 (the
  values' zero point). Each group's partial sum is scaled and the
  groups are summed in float32: for a (m, k) x (k, n) matmul,
  ``out[m, n] = sum_j acc[j, m, n] * s_lhs[m, j] * s_rhs[j, n]``. Small
  products compute every ``acc[j]`` at once (the groups become a batch
  dimension of one ``lax.dot_general``); beyond
  `jaxq.grouped_dot.MAX_GROUPED_ELEMENTS` elements of ``acc`` a
  ``fori_loop`` runs one low-bit matmul per chunk of groups and accumulates
  the scaled results, so memory stays O(output).
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

This module holds `dot_general` and `einsum`; the operand handling shared by
all three ops is `jaxq.operand`, the dot layout and the grouped (and chunked)
matmul `jaxq.grouped_dot`, and `conv` is `jaxq.convolution` (re-exported).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxq.convolution import conv
from jaxq.grouped_dot import _chunk_plan
from jaxq.grouped_dot import _chunked_dot
from jaxq.grouped_dot import _dot_layout
from jaxq.grouped_dot import _grouped_dot
from jaxq.grouped_dot import _normalize_axes
from jaxq.grouped_dot import _pad_ragged_groups
from jaxq.grouped_dot import DotDimensionNumbers
from jaxq.operand import _operand
from jaxq.operand import _output_dtype
from jaxq.operand import _resolve_kinds
from jaxq.operand import Operand
from jaxq.spec import QArray

Array = jax.Array


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
  lop, rop, layout = _pad_ragged_groups(op, lop, rop, layout,
                                        dimension_numbers)
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


__all__ = ["conv", "dot_general", "einsum"]
