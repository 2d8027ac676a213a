"""GPTQ (Frantar et al., 2023): rounding with inverse-Hessian error feedback.

Shapes: ``kernel`` (d_in, d_out) float (a Flax ``Dense`` kernel; other
kernels reshaped to 2-D by the caller); ``hessian`` (d_in, d_in), the sum of
``2 X^T X`` over the layer's calibration rows, accumulated batch by batch
with `hessian_update` (masked rows excluded). The paper's weight rows are
our kernel's columns: GPTQ walks the *input* channels (the kernel's rows)
one at a time, rounds all d_out weights of that row and spreads the rounding
error over the rows not yet rounded, weighted by the inverse Hessian.

Algorithm (the paper's, in ``jit``):

* dead inputs (``H_ii == 0``) get ``H_ii = 1`` and a zero kernel row;
  when every input is dead (a zero Hessian: all-zero calibration inputs)
  nothing weights the rounding, and zeroing the whole kernel would serve a
  layer that outputs only its bias: H is taken as the identity instead,
  whose error feedback is zero, so the kernel is rounded to nearest on the
  range below (`jaxq.gptq` warns, naming the layer);
* dampening adds ``percdamp * mean(diag H)`` to the diagonal; a Hessian
  whose Cholesky factorisation still fails raises ValueError;
* ``act_order`` processes rows by decreasing ``H_ii`` and un-permutes after;
* the inverse Hessian's upper Cholesky factor drives the updates; rows are
  processed in blocks of ``block_size`` with the paper's lazy batch update
  (one ``(d_in, block) x (block, d_out)`` matmul per block), the rows of a
  block one by one in a `jax.lax.fori_loop`. Memory: one (d_in, d_in)
  matrix and a few (d_in, d_out) ones.

Scales (the spec's granularity on (d_in, d_out)):

* per-tensor and per-channel (``PerChannel(-1)``): fixed up front from the
  (dead-row-zeroed) kernel by `weight_range`, honouring ``spec.calibration``;
* per-group along the input axis (``PerGroup(axis=0, size=g)``,
  ``MX(axis=0)``): each group's range is chosen when the first of its rows
  is reached, from the group's current, error-updated rows (`weight_range`
  again), as the paper's "groups chosen as the columns are processed". With
  ``act_order`` the groups stay the spec's contiguous groups of the
  original order, so the result is an ordinary jaxq per-group weight. A
  ``g`` that does not divide ``d_in`` leaves a shorter last group (576
  inputs in groups of 128: four of 128, one of 64), ranged over its own
  rows (the padding of its row list enters as NaN, which `weight_range`
  skips).

On a symmetric full-range integer grid (int4's default [-8, 7]) the "max"
range is the step that clips neither end, ``max(max w / 7, -min w / 8)``,
not the abs-max step ``amax / 7.5``, which saturates +amax half a step low:
GPTQ would spread that clip, amplified by the Hessian, as it spreads
rounding error (`_unclipped_amax`). An "mse" search that keeps its ratio at
1 takes the same step.

``calibration="mse"`` searches each range's clipping by the layer's output
error, not the weight's: each row's squared error is weighted by its
(dampened) Hessian diagonal ``H_ii``, the output error when the inputs are
uncorrelated. The plain weight error clips the weights that multiply a
transformer's outlier input channels (|x| 30 against 1 to 8 on MiniLM's
``layers_1/ffn_in``, ``H_ii`` 130 times the mean) as readily as any other;
GPTQ then pushes that clipping error, large and mostly from one input, onto
the other inputs, which cancels it only on the calibration inputs: a
held-out sentence lost most of its embedding (cosine 0.59).

The result is exactly representable: ``jaxq.quantize(result.kernel, spec,
amax=result.amax, amin=result.amin)`` dequantizes to ``result.kernel``.
Pass these ranges to the converter: an abs-max recomputed from the result
can differ (the largest weight need not land on ``qmax``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxq.algorithms import stats as stats_lib
from jaxq.algorithms.weight_range import weight_range
from jaxq.granularity import MX, PerChannel
from jaxq.quantize import compute_range
from jaxq.quantize import fake_quant
from jaxq.spec import QuantSpec

_HI = jax.lax.Precision.HIGHEST


class GPTQResult(NamedTuple):
  """GPTQ's weight for one layer.

  Attributes:
    kernel: (d_in, d_out) float32, the dequantized weight.
    amin: the range's lower end (affine specs) or None; the spec's scale
      shape.
    amax: the range, the spec's scale shape: (1, d_out) per-channel,
      (ceil(d_in / g), d_out) per-group, (1, 1) per-tensor.
  """
  kernel: jax.Array
  amin: jax.Array | None
  amax: jax.Array


def hessian_update(hessian: jax.Array, x: jax.Array,
                   mask: jax.Array | None = None) -> jax.Array:
  """``hessian + 2 X^T X`` over the rows of ``x`` (..., d_in) kept by
  ``mask`` (shape ``x.shape[:-1]``; padding False). Start from zeros."""
  return hessian + 2.0 * stats_lib.gram_update(
      jnp.zeros_like(hessian), x, mask)


def _group_size(spec: QuantSpec, shape: tuple[int, int]) -> int:
  """Rows sharing a scale; d_in for the fixed (per-tensor/channel) scales."""
  blocks = spec.granularity.block_shape(shape)
  d_in, d_out = shape
  if blocks in ((d_in, 1), (d_in, d_out)):
    return d_in
  if blocks[1] == 1:
    return blocks[0]
  raise ValueError(
      f"gptq: granularity {spec.granularity} makes blocks {blocks} on a "
      f"(d_in, d_out) kernel of shape {shape}; GPTQ supports per-tensor, "
      f"per-channel PerChannel(axis=-1) and groups along the input axis "
      f"(PerGroup(axis=0, size=g), MX(axis=0)).")


def _range(w: jax.Array, spec: QuantSpec, row_weight: jax.Array
           ) -> tuple[jax.Array | None, jax.Array]:
  """`weight_range` of (rows, d_out) ``w``; an "mse" search weights each
  row's squared error by ``row_weight`` (rows,), its Hessian diagonal."""
  unclipped = spec.symmetric and spec.fmt.is_full_range
  if spec.calibration == "mse":
    amin, amax = weight_range(w, spec, error_weight=row_weight[:, None])
    if unclipped:  # A search that chose not to clip: clip neither end.
      max_spec = spec.replace(calibration="max")
      amax = jnp.where(amax >= compute_range(w, max_spec)[1],
                       _unclipped_amax(w, spec), amax)
    return amin, amax
  if spec.calibration == "max" and unclipped:
    return None, _unclipped_amax(w, spec)
  return weight_range(w, spec)


def _unclipped_amax(w: jax.Array, spec: QuantSpec) -> jax.Array:
  """The full-range symmetric amax whose step puts neither end of ``w``'s
  blocks beyond the grid: ``step = max(max w / qmax, -min w / -qmin)``.

  The abs-max step ``amax / (qmax + 0.5)`` saturates a weight at +amax half
  a step low; GPTQ would treat that clipping like rounding and spread it,
  amplified by the Hessian, over the rows it has not reached, which fits
  the calibration inputs only (an outlier input's weight is clipped most).
  """
  fmt = spec.fmt
  if fmt.kind == "lut":  # Levels reach +-1 exactly: the abs-max.
    return compute_range(w, spec.replace(calibration="max"))[1]
  amin, amax = compute_range(w, spec.replace(symmetric=False,
                                             calibration="max"))
  step = jnp.maximum(amax / fmt.qmax, amin / fmt.qmin)
  return step * jnp.float32(fmt.amax_level)


def _inverse_hessian_factor(hessian: jax.Array
                            ) -> tuple[jax.Array, jax.Array]:
  """Upper ``U`` with ``H^-1 = U^T U``, and whether H was positive definite.

  One Cholesky factorisation of H with its index order reversed,
  ``J H J = L L^T``, gives ``H = R R^T`` with ``R = J L J`` upper
  triangular, so ``H^-1 = R^-T R^-1`` and ``U = R^-1`` (one triangular
  solve; no explicit inverse). A pivot below ``4 eps`` of its diagonal entry
  means H is singular to float32 precision: an exactly rank-deficient
  ``X^T X`` rounds to that rather than to a failed factorisation.
  """
  n = hessian.shape[0]
  lower = jnp.linalg.cholesky(hessian[::-1, ::-1])
  upper_root = lower[::-1, ::-1]
  pivots = jnp.square(jnp.diagonal(upper_root))
  tolerance = 4 * jnp.finfo(jnp.float32).eps
  definite = jnp.all(pivots > tolerance * jnp.diagonal(hessian))
  factor = jnp.triu(jax.scipy.linalg.solve_triangular(
      upper_root, jnp.eye(n, dtype=hessian.dtype), lower=False))
  ok = definite & jnp.all(jnp.isfinite(factor)) & jnp.all(
      jnp.diagonal(factor) > 0)
  return factor, ok


@functools.partial(jax.jit, static_argnames=(
    "spec", "percdamp", "block_size", "act_order"))
def _gptq(kernel, hessian, amin, amax, spec, percdamp, block_size,
          act_order):
  d_in, d_out = kernel.shape
  w = kernel.astype(jnp.float32)
  h = hessian.astype(jnp.float32)
  dead = jnp.diagonal(h) == 0
  h = h + jnp.diag(jnp.where(dead, 1.0, 0.0))
  # With every input dead, H is now I: rounding to nearest (module doc).
  w = jnp.where((dead & ~jnp.all(dead))[:, None], 0.0, w)
  h = h + percdamp * jnp.mean(jnp.diagonal(h)) * jnp.eye(d_in)

  group_size = _group_size(spec, (d_in, d_out))
  num_groups = -(-d_in // group_size)  # The last group may be shorter.
  grouped = group_size < d_in
  # One kernel row (1, d_out) with one range per element: the spec's own
  # numerics (MX's power-of-two scales included) applied row by row.
  row_spec = spec.replace(granularity=MX(axis=0, size=1) if spec.is_mx
                          else PerChannel(axis=-1))

  # Ranges per group (+1 dummy group for padding rows), each (d_out,).
  amax_all = jnp.ones((num_groups + 1, d_out), jnp.float32)
  amin_all = jnp.zeros((num_groups + 1, d_out), jnp.float32)
  if grouped:
    done = jnp.zeros((num_groups + 1,), bool).at[num_groups].set(True)
  else:
    amin0, amax0 = (_range(w, spec, jnp.diagonal(h)) if amax is None
                    else (amin, amax))
    amax_all = amax_all.at[0].set(jnp.broadcast_to(amax0[0], (d_out,)))
    if amin0 is not None:
      amin_all = amin_all.at[0].set(jnp.broadcast_to(amin0[0], (d_out,)))
    done = jnp.ones((num_groups + 1,), bool)

  perm = (jnp.argsort(-jnp.diagonal(h), stable=True) if act_order
          else jnp.arange(d_in))
  inv_perm = jnp.argsort(perm)
  w = w[perm]
  h = h[perm][:, perm]

  # Pad to whole blocks with inert rows: zero weight, unit Hessian diagonal.
  num_blocks = -(-d_in // block_size)
  d_pad = num_blocks * block_size
  pad = d_pad - d_in
  w = jnp.pad(w, ((0, pad), (0, 0)))
  h = jnp.pad(h, ((0, pad), (0, pad))) + jnp.diag(
      jnp.concatenate([jnp.zeros(d_in), jnp.ones(pad)]))
  h_diag = jnp.diagonal(h)  # Each row's weight in a group's "mse" search.
  u, ok = _inverse_hessian_factor(h)
  u = jnp.where(ok, u, jnp.eye(d_pad))  # Keep the loop finite; we raise.

  row_group = jnp.concatenate([
      (perm // group_size).astype(jnp.int32),
      jnp.full((pad,), num_groups, jnp.int32)])
  # Each group's rows (positions in the processing order), a short last
  # group padded with row 0, which `row_in_group` masks out of its range.
  short = num_groups * group_size - d_in
  group_rows = jnp.concatenate([
      jnp.pad(inv_perm, (0, short)).reshape(num_groups,
                                            group_size).astype(jnp.int32),
      jnp.zeros((1, group_size), jnp.int32)])
  row_in_group = jnp.concatenate([
      (jnp.arange(num_groups * group_size) < d_in).reshape(num_groups,
                                                           group_size),
      jnp.ones((1, group_size), bool)])

  def block_step(b, carry):
    w, amin_all, amax_all, done = carry
    start = b * block_size
    u_block = jax.lax.dynamic_slice(u, (start, 0), (block_size, d_pad))
    u_inner = jax.lax.dynamic_slice(u_block, (0, start),
                                    (block_size, block_size))
    w_block = jax.lax.dynamic_slice(w, (start, 0), (block_size, d_out))

    def row_step(k, inner):
      w_block, q_block, err_block, amin_all, amax_all, done = inner
      g = row_group[start + k]

      if grouped:
        # The group's rows now: the block-start values minus the pending
        # (lazy) updates from this block's rows rounded so far. Gathered
        # outside the cond so that its operands stay small.
        rows, real = group_rows[g], row_in_group[g]
        w_rows, u_rows, h_rows = w[rows], u_block[:, rows], h_diag[rows]

        def first_row_of_group(operands):
          amin_all, amax_all, w_rows, u_rows, h_rows, err_block = operands
          current = w_rows - jnp.matmul(u_rows.T, err_block, precision=_HI)
          # NaN rows are not the group's: every range skips them.
          current = jnp.where(real[:, None], current, jnp.nan)
          amin, amax = _range(current, spec, h_rows)
          amax_all = amax_all.at[g].set(amax[0])
          if amin is not None:
            amin_all = amin_all.at[g].set(amin[0])
          return amin_all, amax_all

        amin_all, amax_all = jax.lax.cond(
            done[g], lambda operands: operands[:2], first_row_of_group,
            (amin_all, amax_all, w_rows, u_rows, h_rows, err_block))
      done = done.at[g].set(True)
      row = w_block[k]
      q = fake_quant(row[None], row_spec, amax=amax_all[g][None],
                     amin=None if spec.symmetric else amin_all[g][None],
                     range_from_data=True)[0]
      err = (row - q) / u_inner[k, k]
      w_block = w_block - u_inner[k][:, None] * err[None, :]
      q_block = q_block.at[k].set(q)
      err_block = err_block.at[k].set(err)
      return w_block, q_block, err_block, amin_all, amax_all, done

    zeros = jnp.zeros((block_size, d_out), jnp.float32)
    _, q_block, err_block, amin_all, amax_all, done = jax.lax.fori_loop(
        0, block_size, row_step,
        (w_block, zeros, zeros, amin_all, amax_all, done))
    # Lazy batch update of every later row; u is upper triangular, so
    # earlier rows are untouched, and this block's rows become q.
    w = w - jnp.matmul(u_block.T, err_block, precision=_HI)
    w = jax.lax.dynamic_update_slice(w, q_block, (start, 0))
    return w, amin_all, amax_all, done

  w, amin_all, amax_all, _ = jax.lax.fori_loop(
      0, num_blocks, block_step, (w, amin_all, amax_all, done))
  out = w[:d_in][inv_perm]
  if grouped:
    amax, amin = amax_all[:num_groups], amin_all[:num_groups]
  else:
    amax, amin = amax0, amin0
  return GPTQResult(out.astype(jnp.float32),
                    None if spec.symmetric else amin, amax), ok


def gptq(kernel: jax.Array, hessian: jax.Array, spec: QuantSpec, *,
         percdamp: float = 0.01, block_size: int = 128,
         act_order: bool = False, amax: jax.Array | None = None,
         amin: jax.Array | None = None) -> GPTQResult:
  """GPTQ-quantizes one (d_in, d_out) kernel given its input Hessian.

  Args:
    kernel: (d_in, d_out) float.
    hessian: (d_in, d_in), ``2 X^T X`` over the calibration rows
      (`hessian_update`); its overall scale does not matter.
    spec: the weight quantizer (per-tensor, per-channel ``PerChannel(-1)``,
      ``PerGroup(axis=0, size=g)`` or ``MX(axis=0)``); ``calibration``
      chooses each range (``"mse"`` searches the clipping per scale by the
      Hessian-diagonal-weighted error, see the module docstring).
    percdamp: dampening, as a fraction of the mean diagonal (>= 0).
    block_size: rows per lazy update (>= 1); d_in need not divide by it.
    act_order: process rows by decreasing Hessian diagonal.
    amax: optional fixed range for per-tensor and per-channel specs (the
      spec's scale shape), e.g. an output-aware clipping from `awq`; by
      default `weight_range` of the kernel. Groups choose their own.
    amin: the fixed range's lower end, affine specs only.

  Returns:
    `GPTQResult`: the dequantized kernel and the ranges that reproduce it;
    a zero Hessian (no nonzero input) gives the kernel rounded to nearest.

  Raises:
    ValueError: mismatched shapes, an unsupported granularity (or an MX
      block size not dividing d_in, naming the sizes), a non-finite
      Hessian, or one still singular after dampening.
  """
  kernel = jnp.asarray(kernel)
  hessian = jnp.asarray(hessian)
  if kernel.ndim != 2:
    raise ValueError(f"gptq expects a 2-D (d_in, d_out) kernel, got shape "
                     f"{tuple(kernel.shape)}; reshape DenseGeneral/Einsum "
                     f"kernels to 2-D first.")
  d_in = kernel.shape[0]
  if hessian.shape != (d_in, d_in):
    raise ValueError(f"gptq: Hessian of shape {tuple(hessian.shape)} does not "
                     f"match a kernel of shape {tuple(kernel.shape)}; it must "
                     f"be ({d_in}, {d_in}).")
  if spec.double_quant is not None:
    raise ValueError(f"gptq: double_quant={spec.double_quant} rounds the "
                     f"scales of the whole kernel together, which GPTQ's "
                     f"row-by-row ranges cannot reproduce; run GPTQ with "
                     f"spec.replace(double_quant=None).")
  if percdamp < 0 or block_size < 1:
    raise ValueError(f"gptq: need percdamp >= 0 and block_size >= 1, got "
                     f"{percdamp} and {block_size}.")
  group_size = _group_size(spec, tuple(kernel.shape))  # Raises, naming sizes.
  if amax is not None or amin is not None:
    expected = (1, 1) if spec.granularity.block_shape(
        tuple(kernel.shape)) == tuple(kernel.shape) else (1, kernel.shape[1])
    if group_size < d_in:
      raise ValueError(f"gptq: a fixed amax is for per-tensor and per-channel "
                       f"specs; {spec.granularity} chooses each group's range "
                       f"as GPTQ reaches it.")
    if amax is None or jnp.shape(amax) != expected or (
        (amin is None) != spec.symmetric or
        (amin is not None and jnp.shape(amin) != expected)):
      raise ValueError(f"gptq: a fixed range needs amax (and amin for affine "
                       f"specs) of the scale shape {expected}, got amax "
                       f"{None if amax is None else jnp.shape(amax)} and amin "
                       f"{None if amin is None else jnp.shape(amin)}.")
    amax = jnp.asarray(amax, jnp.float32)
    amin = None if amin is None else jnp.asarray(amin, jnp.float32)
  if not bool(jnp.all(jnp.isfinite(hessian))):
    raise ValueError("gptq: the Hessian holds NaN or inf; the calibration "
                     "inputs of this layer were not finite.")
  result, ok = _gptq(kernel, hessian, amin, amax, spec, float(percdamp),
                     int(min(block_size, d_in)), bool(act_order))
  if not bool(ok):
    raise ValueError(f"gptq: the ({d_in}, {d_in}) Hessian is singular after "
                     f"dampening (percdamp={percdamp}); use percdamp > 0 or "
                     f"more calibration rows.")
  return result
