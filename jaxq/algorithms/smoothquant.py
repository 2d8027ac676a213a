"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into weights.

Shapes: ``kernel`` (d_in, d_out) float (a Flax ``Dense`` kernel; other
kernels reshaped to 2-D by the caller); ``act_amax`` (d_in,) the per-channel
``max |X_j|`` over the calibration rows (`jaxq.algorithms.InputStats.
abs_max`); ``x`` (..., d_in) captured inputs with an optional row ``mask``
of shape ``x.shape[:-1]`` (padding rows excluded from every statistic).

The factors are ``s_j = max|X_j|**alpha / max|W_j|**(1 - alpha)`` (``W_j``
the kernel's row j), computed in log space and always finite and positive:
a channel whose activation or weight is all zero gets ``s_j = 1``. The layer
then computes ``(X / s) (W * s)`` (`scale_input`, `scale_kernel`), equal in
float, with the outliers moved from X into W.

`search_alpha` picks ``alpha`` from a grid per layer: the one whose W8A8
layer output ``fake_quant(X / s) @ fake_quant(W * s)`` (static per-tensor
activation range from the calibration rows by default) is closest to the
float ``X @ W`` in squared error over the kept rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.algorithms import channel_scale
from jaxq.algorithms import stats as stats_lib
from jaxq.algorithms.weight_range import weight_range
from jaxq.granularity import PerChannel, PerTensor
from jaxq.quantize import compute_range, fake_quant
from jaxq.spec import QuantSpec

DEFAULT_WEIGHT_SPEC = QuantSpec("int8", PerChannel(axis=-1))
DEFAULT_ACT_SPEC = QuantSpec("int8", PerTensor(), dynamic=False)
DEFAULT_ALPHAS: tuple[float, ...] = tuple(
    float(a) for a in np.round(np.linspace(0.0, 1.0, 21), 4))


class SmoothQuantResult(NamedTuple):
  """The chosen ``alpha`` (() float32), its ``factors`` (d_in,), and the
  squared output ``errors`` (len(alphas),) of every alpha tried."""
  alpha: jax.Array
  factors: jax.Array
  errors: jax.Array


def check_alpha(alpha: float, where: str = "smoothquant") -> None:
  """Raises ValueError unless ``0 <= alpha <= 1``."""
  if not 0.0 <= float(alpha) <= 1.0:
    raise ValueError(f"{where}: alpha must be in [0, 1], got {alpha}.")


def _factors(act_amax: jax.Array, kernel: jax.Array,
             alpha: jax.Array) -> jax.Array:
  w_amax = jnp.max(jnp.abs(kernel.astype(jnp.float32)), axis=1)
  act_amax = jnp.asarray(act_amax, jnp.float32)
  valid = (act_amax > 0) & (w_amax > 0)
  safe = lambda v: jnp.log(jnp.where(valid, v, 1.0))
  return channel_scale.finite_positive(
      alpha * safe(act_amax) - (1.0 - alpha) * safe(w_amax), valid)


def smoothing_factors(act_amax: jax.Array, kernel: jax.Array,
                      alpha: float = 0.5) -> jax.Array:
  """``s_j = act_amax_j**alpha / max_k |kernel[j, k]|**(1 - alpha)``, (d_in,).

  Raises:
    ValueError: for alpha outside [0, 1], or mismatched shapes.
  """
  check_alpha(alpha, "smoothing_factors")
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 2 or jnp.shape(act_amax) != (kernel.shape[0],):
    raise ValueError(f"smoothing_factors: act_amax of shape "
                     f"{tuple(jnp.shape(act_amax))} and kernel of shape "
                     f"{tuple(kernel.shape)} need act_amax (d_in,) and kernel "
                     f"(d_in, d_out).")
  return _factors(act_amax, kernel, jnp.float32(alpha))


def smoothed_output_error(kernel: jax.Array, flat: jax.Array,
                          factors: jax.Array, weight_spec: QuantSpec,
                          act_spec: QuantSpec) -> jax.Array:
  """``||X W - Q(X / s) Q(W * s)||^2`` over the rows of ``flat`` (n, d_in)
  (masked rows are zero rows, which quantize to zero and add nothing)."""
  x_s = flat / factors
  # The smoothed inputs' own abs-max range, whatever the act spec's
  # calibration (entropy needs a histogram of many batches).
  act_amin, act_amax = compute_range(x_s, act_spec.replace(calibration="max"))
  x_q = fake_quant(x_s, act_spec, amax=act_amax, amin=act_amin,
                   range_from_data=True)
  w_s = kernel * factors[:, None]
  w_amin, w_amax = weight_range(w_s, weight_spec)
  w_q = fake_quant(w_s, weight_spec, amax=w_amax, amin=w_amin,
                   range_from_data=True)
  hi = jax.lax.Precision.HIGHEST
  diff = (jnp.matmul(flat, kernel, precision=hi) -
          jnp.matmul(x_q, w_q, precision=hi))
  return jnp.sum(jnp.square(diff))


@functools.partial(jax.jit,
                   static_argnames=("weight_spec", "act_spec", "alphas"))
def _search(kernel, x, mask, weight_spec, act_spec, alphas):
  kernel = kernel.astype(jnp.float32)
  flat = stats_lib.rows(x, mask)
  act_amax = jnp.max(jnp.abs(flat), axis=0)
  grid = jnp.asarray(alphas, jnp.float32)

  def error(alpha):
    factors = _factors(act_amax, kernel, alpha)
    return smoothed_output_error(kernel, flat, factors, weight_spec, act_spec)

  errors = jax.lax.map(error, grid)
  best = jnp.argmin(errors)
  alpha = grid[best]
  return SmoothQuantResult(alpha, _factors(act_amax, kernel, alpha), errors)


def search_alpha(kernel: jax.Array, x: jax.Array, *,
                 mask: jax.Array | None = None,
                 weight_spec: QuantSpec = DEFAULT_WEIGHT_SPEC,
                 act_spec: QuantSpec = DEFAULT_ACT_SPEC,
                 alphas: tuple[float, ...] = DEFAULT_ALPHAS
                 ) -> SmoothQuantResult:
  """The ``alpha`` in ``alphas`` minimising the layer's quantized output error.

  Args:
    kernel: (d_in, d_out) float.
    x: the layer's calibration inputs (..., d_in).
    mask: optional bool of shape ``x.shape[:-1]``; False rows are ignored.
    weight_spec: the weight quantizer (its ``calibration`` is honoured).
    act_spec: the activation quantizer; its range is computed once from all
      kept calibration rows of ``X / s`` (static, as served).
    alphas: the grid, each in [0, 1].

  Returns:
    `SmoothQuantResult`; ties go to the first alpha in ``alphas``.

  Raises:
    ValueError: an alpha outside [0, 1], an empty grid, or shapes that do
      not match.
  """
  alphas = tuple(float(a) for a in alphas)
  if not alphas:
    raise ValueError("search_alpha: alphas is empty.")
  for a in alphas:
    check_alpha(a, "search_alpha")
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 2 or x.shape[-1] != kernel.shape[0]:
    raise ValueError(f"search_alpha: inputs of shape {tuple(x.shape)} do not "
                     f"match a (d_in, d_out) kernel of shape "
                     f"{tuple(kernel.shape)}.")
  return _search(kernel, x, mask, weight_spec, act_spec, alphas)
