"""Per-layer input statistics for SmoothQuant, AWQ and GPTQ, with a row mask.

A layer's captured inputs ``x`` have shape (..., d_in) (for a Flax ``Dense``,
(batch, seq, d_in)); every leading position is a *row*. An optional boolean
``mask`` of the leading shape (e.g. a text batch's attention mask) marks the
rows that count: masked-out rows (padding) add to no statistic, and their
values, even inf or NaN, never reach the arithmetic (they are replaced by 0
with ``where``, not multiplied by 0).

`InputStats` accumulates, over any number of batches:

* ``count``: () float32, the number of rows kept;
* ``abs_sum``: (d_in,) the sum of ``|x_j|`` (AWQ's mean magnitude);
* ``abs_max``: (d_in,) the max of ``|x_j|`` (SmoothQuant's ``max|X_j|``);
* ``gram``: (d_in, d_in) ``X^T X`` (GPTQ's Hessian is ``2 * gram``; AWQ's
  output error ``||X D||^2 = trace(D^T gram D)``).

`InputMoment` keeps only the diagonal of ``gram`` and the row count:
``count`` () and ``square_sum`` (d_in,), bounded memory whatever d_in (what
`jaxq.calibrate` records for a weight's data-aware ``"mse"`` range, see
`jaxq.algorithms.weight_range`). Its rows skip non-finite values (taken as
0), so one NaN cannot spoil a whole channel's statistic.

Everything is float32 and jit-friendly; `update_input_stats` is pure.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class InputStats(NamedTuple):
  """Statistics of a layer's input rows; see the module docstring."""
  count: jax.Array
  abs_sum: jax.Array
  abs_max: jax.Array
  gram: jax.Array

  @property
  def abs_mean(self) -> jax.Array:
    """Mean ``|x_j|`` over the kept rows, (d_in,); 0 before any row."""
    return self.abs_sum / jnp.maximum(self.count, 1.0)


def rows(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """``x`` as (n_rows, d_in) float32 with masked-out rows set to 0.

  Raises:
    ValueError: when ``mask``'s shape is not ``x``'s leading shape.
  """
  x = jnp.asarray(x)
  if x.ndim < 1:
    raise ValueError("layer inputs must have a feature axis, got a scalar.")
  flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  if mask is None:
    return flat
  mask = jnp.asarray(mask)
  if tuple(mask.shape) != tuple(x.shape[:-1]):
    raise ValueError(f"row mask has shape {tuple(mask.shape)} but the inputs "
                     f"of shape {tuple(x.shape)} need {tuple(x.shape[:-1])} "
                     f"(one entry per row, i.e. every axis but the last).")
  return jnp.where(mask.reshape(-1, 1).astype(bool), flat, 0.0)


def row_count(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """The number of kept rows as float32."""
  if mask is None:
    return jnp.asarray(x.size // x.shape[-1], jnp.float32)
  return jnp.sum(jnp.asarray(mask).astype(jnp.float32))


def init_input_stats(d_in: int) -> InputStats:
  """Empty statistics for inputs with ``d_in`` features."""
  return InputStats(count=jnp.zeros((), jnp.float32),
                    abs_sum=jnp.zeros((d_in,), jnp.float32),
                    abs_max=jnp.zeros((d_in,), jnp.float32),
                    gram=jnp.zeros((d_in, d_in), jnp.float32))


def gram_update(gram: jax.Array, x: jax.Array,
                mask: jax.Array | None = None) -> jax.Array:
  """``gram + X^T X`` over the kept rows of ``x`` (..., d_in)."""
  flat = rows(x, mask)
  return gram + jnp.matmul(flat.T, flat, precision=jax.lax.Precision.HIGHEST)


class InputMoment(NamedTuple):
  """The second moment of a layer's input per channel; see the module
  docstring. Fields lead with ``L`` for a stack of layers (``nn.scan``)."""
  count: jax.Array
  square_sum: jax.Array

  @property
  def mean_square(self) -> jax.Array:
    """``E[x_j^2]`` over the kept rows, (d_in,); 0 before any row."""
    return self.square_sum / jnp.maximum(self.count, 1.0)[..., None]


def init_input_moment(d_in: int) -> InputMoment:
  """An empty `InputMoment` for inputs with ``d_in`` features."""
  return InputMoment(count=jnp.zeros((), jnp.float32),
                     square_sum=jnp.zeros((d_in,), jnp.float32))


def update_input_moment(moment: InputMoment, x: jax.Array,
                        mask: jax.Array | None = None) -> InputMoment:
  """Adds the kept rows of ``x`` (..., d_in) to ``moment``; ``mask`` as for
  `rows` (one entry per row); non-finite values count as 0."""
  if x.shape[-1] != moment.square_sum.shape[-1]:
    raise ValueError(f"inputs have {x.shape[-1]} features (shape "
                     f"{tuple(x.shape)}) but the moment was made for "
                     f"{moment.square_sum.shape[-1]}.")
  flat = rows(x, mask)
  squares = jnp.where(jnp.isfinite(flat), jnp.square(flat), 0.0)
  return InputMoment(count=moment.count + row_count(x, mask),
                     square_sum=moment.square_sum + jnp.sum(squares, axis=0))


@jax.jit
def update_input_stats(stats: InputStats, x: jax.Array,
                       mask: jax.Array | None = None) -> InputStats:
  """Adds the kept rows of ``x`` (..., d_in) to ``stats``."""
  if x.shape[-1] != stats.abs_sum.shape[0]:
    raise ValueError(f"inputs have {x.shape[-1]} features (shape "
                     f"{tuple(x.shape)}) but the statistics were made for "
                     f"{stats.abs_sum.shape[0]}.")
  flat = jnp.abs(rows(x, mask))
  return InputStats(count=stats.count + row_count(x, mask),
                    abs_sum=stats.abs_sum + jnp.sum(flat, axis=0),
                    abs_max=jnp.maximum(stats.abs_max, jnp.max(flat, axis=0)),
                    gram=gram_update(stats.gram, x, mask))
