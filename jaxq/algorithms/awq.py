"""AWQ (Lin et al., 2024): activation-aware per-input-channel weight scaling.

Shapes: ``kernel`` (d_in, d_out) float (a Flax ``Dense`` kernel); the
calibration inputs enter as `InputStats` (``abs_mean`` (d_in,) and ``gram``
``X^T X`` (d_in, d_in) over the kept rows, so padding never counts); the
weight's ``spec`` is any symmetric or affine quantizer whose granularity fits
the kernel (per-channel ``PerChannel(-1)``, per-group ``PerGroup(axis=0)``,
``MX(axis=0)``, per-tensor, per-block).

The algorithm, per layer:

1. Factors ``s = abs_mean**a``, normalised so ``sqrt(max s * min s) = 1``
   (channels that never fire get ``s = 1``), for every exponent ``a`` in a
   grid over [0, 1]; the layer computes ``(X / s) Q(W * s)``.
2. The output error ``||X W - (X / s) Q(W * s)||^2 = trace(D^T X^T X D)``
   with ``D = W - Q(W * s) / s`` is evaluated from the Gram matrix, all
   exponents in one ``jit`` (`jax.lax.map`); the smallest wins. The search
   quantizes with abs-max ranges.
3. Optionally (``clip_ratios > 0``), per scale (channel, group, block), the
   clipping ratio ``r`` in a grid over ``[min_clip, 1]`` of the scaled
   weight's range minimising that scale's share of the output error
   ``d^T (X_g^T X_g / s s^T) d`` (``d`` the block's weight error, ``X_g``
   the block's input channels). Without clipping, the range is
   `weight_range` of the scaled weight (honouring ``spec.calibration``; an
   ``"mse"`` search weights each squared error by the scaled input's
   ``diag(X^T X) / s^2``, the output error's diagonal).

Use of the result: divide the layer's input by ``factors`` (or fold
``1 / factors`` into the op before), multiply the kernel rows by them
(`jaxq.algorithms.scale_kernel`) and quantize the scaled kernel with
``amax``/``amin`` (the spec's scale shape).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxq.algorithms import channel_scale
from jaxq.algorithms.stats import InputStats
from jaxq.algorithms.weight_range import weight_range
from jaxq.quantize import compute_range, fake_quant
from jaxq.spec import QuantSpec

_HI = jax.lax.Precision.HIGHEST


class AWQResult(NamedTuple):
  """AWQ's choice for one layer.

  Attributes:
    factors: (d_in,) per-input-channel scales; the kernel rows are
      multiplied by them, the input divided.
    exponent: () the chosen exponent ``a``.
    clip_ratio: the chosen clipping ratio per scale (spec's scale shape);
      ones without the clipping search.
    amin: the scaled kernel's range lower end (affine) or None.
    amax: the scaled kernel's range, the spec's scale shape.
    errors: (num_exponents,) the output error of every exponent tried.
  """
  factors: jax.Array
  exponent: jax.Array
  clip_ratio: jax.Array
  amin: jax.Array | None
  amax: jax.Array
  errors: jax.Array


def awq_factors(abs_mean: jax.Array, exponent: jax.Array) -> jax.Array:
  """``abs_mean**exponent`` normalised to geometric mid-range 1, (d_in,)."""
  abs_mean = jnp.asarray(abs_mean, jnp.float32)
  alive = abs_mean > 0
  log_s = exponent * jnp.log(jnp.where(alive, abs_mean, 1.0))
  hi = jnp.max(jnp.where(alive, log_s, -jnp.inf))
  lo = jnp.min(jnp.where(alive, log_s, jnp.inf))
  mid = jnp.where(jnp.any(alive), 0.5 * (hi + lo), 0.0)
  return channel_scale.finite_positive(log_s - mid, alive)


def output_error(gram: jax.Array, diff: jax.Array) -> jax.Array:
  """``||X diff||^2 = sum(diff * (gram @ diff))`` for diff (d_in, d_out)."""
  return jnp.sum(diff * jnp.matmul(gram, diff, precision=_HI))


def block_output_error(gram: jax.Array, diff: jax.Array,
                       blocks: tuple[int, int]) -> jax.Array:
  """Each weight block's share ``d^T gram_gg d`` of the output error.

  Args:
    gram: (d_in, d_in).
    diff: (d_in, d_out) weight error.
    blocks: the (b_in, b_out) block shape of the weight's scales.

  Returns:
    (ceil(d_in / b_in), ceil(d_out / b_out)), the scale shape; a ragged
    last block counts its own rows and columns.
  """
  d_in, d_out = diff.shape
  b_in, b_out = blocks
  groups, columns = -(-d_in // b_in), -(-d_out // b_out)
  # Zero rows and columns pad ragged blocks whole; they add no error.
  pad_in, pad_out = groups * b_in - d_in, columns * b_out - d_out
  gram = jnp.pad(gram, ((0, pad_in), (0, pad_in)))
  diff = jnp.pad(diff, ((0, pad_in), (0, pad_out)))
  diag = gram.reshape(groups, b_in, groups, b_in)[
      jnp.arange(groups), :, jnp.arange(groups), :]  # (groups, b_in, b_in)
  diff3 = diff.reshape(groups, b_in, columns * b_out)
  per_column = jnp.einsum("gko,gkl,glo->go", diff3, diag, diff3,
                          precision=_HI)
  return per_column.reshape(groups, columns, b_out).sum(-1)


@functools.partial(jax.jit, static_argnames=(
    "spec", "num_exponents", "clip_ratios", "min_clip"))
def _awq(kernel, abs_mean, gram, spec, num_exponents, clip_ratios, min_clip):
  kernel = kernel.astype(jnp.float32)
  exponents = jnp.linspace(0.0, 1.0, num_exponents, dtype=jnp.float32)
  # The exponent is chosen at the abs-max range; clipping is searched after.
  max_spec = spec.replace(calibration="max")

  def error(exponent):
    factors = awq_factors(abs_mean, exponent)
    w_s = kernel * factors[:, None]
    w_q = fake_quant(w_s, max_spec)
    return output_error(gram, kernel - w_q / factors[:, None])

  errors = jax.lax.map(error, exponents)
  exponent = exponents[jnp.argmin(errors)]
  factors = awq_factors(abs_mean, exponent)
  w_s = kernel * factors[:, None]
  if not clip_ratios:
    # An "mse" range weighs each error by its scaled input's E[x^2] (the
    # output error's diagonal), as GPTQ and `jaxq.convert` do.
    error_weight = None
    if spec.calibration == "mse":
      error_weight = (jnp.diagonal(gram) / jnp.square(factors))[:, None]
    amin, amax = weight_range(w_s, spec, error_weight=error_weight)
    return AWQResult(factors, exponent, jnp.ones_like(amax), amin, amax,
                     errors)

  blocks = spec.granularity.block_shape(tuple(kernel.shape))
  gram_s = gram / (factors[:, None] * factors[None, :])
  amin0, amax0 = compute_range(w_s, max_spec)
  ratios = jnp.linspace(1.0, min_clip, clip_ratios, dtype=jnp.float32)

  def clip_error(ratio):
    lo = None if amin0 is None else amin0 * ratio
    w_q = fake_quant(w_s, spec, amax=amax0 * ratio, amin=lo,
                     range_from_data=True)
    return block_output_error(gram_s, w_s - w_q, blocks)

  clip_errors = jax.lax.map(clip_error, ratios, batch_size=min(clip_ratios, 4))
  clip_ratio = jnp.take(ratios, jnp.argmin(clip_errors, axis=0))
  amin = None if amin0 is None else amin0 * clip_ratio
  return AWQResult(factors, exponent, clip_ratio, amin, amax0 * clip_ratio,
                   errors)


def awq(kernel: jax.Array, input_stats: InputStats, spec: QuantSpec, *,
        num_exponents: int = 20, clip_ratios: int = 0,
        min_clip: float = 0.5) -> AWQResult:
  """AWQ's per-input-channel factors and weight range for one layer.

  Args:
    kernel: (d_in, d_out) float.
    input_stats: the layer's calibration `InputStats` (masked rows excluded
      when they were accumulated).
    spec: the weight quantizer; its granularity must fit (d_in, d_out).
    num_exponents: grid size over [0, 1] for the exponent (>= 1).
    clip_ratios: grid size of the clipping search; 0 turns it off.
    min_clip: the smallest clipping ratio, in (0, 1].

  Returns:
    `AWQResult`.

  Raises:
    ValueError: for shapes that do not match, a granularity that does not
      fit the kernel (naming the sizes), empty statistics or bad grids.
  """
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 2:
    raise ValueError(f"awq expects a 2-D (d_in, d_out) kernel, got shape "
                     f"{tuple(kernel.shape)}; reshape DenseGeneral/Einsum "
                     f"kernels to 2-D first.")
  d_in = kernel.shape[0]
  if input_stats.gram.shape != (d_in, d_in):
    raise ValueError(f"awq: statistics for {input_stats.abs_sum.shape[0]} "
                     f"input features do not match a kernel of shape "
                     f"{tuple(kernel.shape)}.")
  if num_exponents < 1 or clip_ratios < 0 or not 0.0 < min_clip <= 1.0:
    raise ValueError(f"awq: need num_exponents >= 1, clip_ratios >= 0 and "
                     f"min_clip in (0, 1], got {num_exponents}, "
                     f"{clip_ratios}, {min_clip}.")
  if float(input_stats.count) <= 0:
    raise ValueError("awq: the input statistics hold no rows (the layer was "
                     "never reached, or every row was masked).")
  spec.granularity.block_shape(tuple(kernel.shape))  # Raises, naming sizes.
  return _awq(kernel, input_stats.abs_mean, input_stats.gram, spec,
              num_exponents, clip_ratios, min_clip)
