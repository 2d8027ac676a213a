"""Per-input-channel scales (SmoothQuant, AWQ): ``X W = (X / s) (W * s)``.

``s`` has shape (d_in,), positive and finite. The layer's input is divided
by it (or the division is folded into the op before: a LayerNorm's scale and
bias, a preceding Dense's output columns) and the kernel (d_in, d_out) is
multiplied row by row, which leaves the float product unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check(factors: jax.Array, d_in: int, what: str) -> None:
  if factors.shape != (d_in,):
    raise ValueError(f"{what}: per-input-channel factors have shape "
                     f"{tuple(factors.shape)}, expected ({d_in},).")


def scale_input(x: jax.Array, factors: jax.Array) -> jax.Array:
  """``x / factors`` over the last (feature) axis of ``x`` (..., d_in)."""
  _check(factors, x.shape[-1], "scale_input")
  return (x / factors.astype(x.dtype)).astype(x.dtype)


def scale_kernel(kernel: jax.Array, factors: jax.Array) -> jax.Array:
  """``kernel * factors[:, None]`` for a (d_in, d_out) kernel."""
  if kernel.ndim != 2:
    raise ValueError(f"scale_kernel expects a 2-D (d_in, d_out) kernel, got "
                     f"shape {tuple(kernel.shape)}.")
  _check(factors, kernel.shape[0], "scale_kernel")
  return (kernel * factors[:, None].astype(kernel.dtype)).astype(kernel.dtype)


def finite_positive(log_factors: jax.Array, valid: jax.Array,
                    limit: float = 40.0) -> jax.Array:
  """``exp(log_factors)`` clipped to ``[e**-limit, e**limit]``; 1 where not
  ``valid`` (a dead channel), so factors are always finite and positive."""
  log_factors = jnp.where(valid, log_factors, 0.0)
  return jnp.exp(jnp.clip(log_factors, -limit, limit))
