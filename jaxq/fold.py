"""BatchNorm folding: Conv/Dense + BatchNorm (inference) -> one Conv/Dense.

With inference statistics, ``BN(y) = (y - mean) * gamma / sqrt(var + eps) +
beta`` is an affine map per output channel, so for ``y = x * W + b``

    W' = W * s,   b' = beta + (b - mean) * s,   s = gamma / sqrt(var + eps)

with ``s`` broadcast over the output-channel axis, which is the last axis of
every Flax kernel: Dense ``(in, out)``, Conv ``(*window, in / groups, out)``
(depthwise convs included) and ConvTranspose ``(*window, in, out)``. A
missing conv bias counts as ``b = 0``, a missing BN scale as ``gamma = 1``
and a missing BN bias as ``beta = 0``. Folding is exact up to float
rounding; quantizing after folding puts the BN scale into the weights, which
is why per-channel weight scales matter more after folding than before.

The model definition does not change: the BatchNorm stays in place and is
turned into an identity with mean 0, var ``1 - eps``, scale 1 and bias 0, so
``(y - 0) / sqrt(1 - eps + eps) * 1 + 0 == y``. The folded bias goes to the
conv's bias when it has one. A conv built with ``use_bias=False``:

* linen: has no bias parameter and the model definition cannot grow one,
  so the BatchNorm keeps the folded bias as its ``bias`` (an identity-stat
  affine layer: ``y + b'``). Its ``use_bias`` must be True.
* nnx: the module is mutable, so the conv gets a new ``bias`` parameter
  (and ``use_bias = True``) and the BatchNorm becomes a plain identity.

Run the folded model's BatchNorm in inference mode
(``use_running_average=True``); in training mode it would recompute batch
statistics.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxq.flax import batchnorm as batchnorm_lib
from jaxq.flax.batchnorm import Path


def fold_parameters(kernel: jax.Array, bias: jax.Array | None,
                    mean: jax.Array, var: jax.Array,
                    scale: jax.Array | None, offset: jax.Array | None,
                    epsilon: float) -> tuple[jax.Array, jax.Array]:
  """The folded ``(kernel, bias)`` of a layer followed by a BatchNorm.

  Args:
    kernel: ``(..., out)``; the last axis is the output channel.
    bias: ``(out,)`` or None (no bias).
    mean, var: the BatchNorm's running statistics, ``(out,)``.
    scale, offset: the BatchNorm's ``gamma`` and ``beta`` ``(out,)``, or None
      when it has no scale / bias.
    epsilon: the BatchNorm's epsilon.

  Returns:
    ``kernel * s`` in the kernel's dtype and ``beta + (bias - mean) * s`` in
    the bias's dtype (the kernel's when there is no bias), computed in
    float32, ``s = gamma / sqrt(var + epsilon)``.
  """
  mean = jnp.asarray(mean, jnp.float32)
  channel_scale = jax.lax.rsqrt(jnp.asarray(var, jnp.float32) + epsilon)
  if scale is not None:
    channel_scale = channel_scale * jnp.asarray(scale, jnp.float32)
  folded_kernel = (kernel.astype(jnp.float32) * channel_scale).astype(
      kernel.dtype)
  bias_dtype = kernel.dtype if bias is None else bias.dtype
  centred = -mean if bias is None else bias.astype(jnp.float32) - mean
  folded_bias = centred * channel_scale
  if offset is not None:
    folded_bias = folded_bias + jnp.asarray(offset, jnp.float32)
  return folded_kernel, folded_bias.astype(bias_dtype)


def fold_batchnorm_linen(variables: Mapping[str, Any],
                         pairs: Mapping[Path, Path], *,
                         epsilon: float | Mapping[Path, float] | None = None,
                         model: Any = None, batch: Any = None
                         ) -> Mapping[str, Any]:
  """Folds BatchNorms into the preceding Conv/Dense of a linen model.

  See `jaxq.flax.batchnorm.fold_linen`: ``pairs`` maps each conv (or dense)
  module path to the path of the BatchNorm that follows it (tuples of names
  or "/"-joined strings); returns new variables (a FrozenDict for a
  FrozenDict), raising a ValueError naming the path for a missing module or
  variable, different channel counts, or no place for the folded bias.

  Pass ``model=`` and ``batch=`` (one input batch) to read each BatchNorm's
  own ``epsilon``, ``use_scale``/``use_bias`` and axis from the module (a
  given ``epsilon`` must then agree with it); without them ``epsilon``
  defaults to flax's ``1e-5``, with a warning.
  """
  return batchnorm_lib.fold_linen(variables, pairs, fold_parameters,
                                  epsilon=epsilon, model=model, batch=batch)


def fold_batchnorm_nnx(layer: Any, batchnorm: Any) -> None:
  """Folds an nnx BatchNorm into the preceding ``nnx.Conv`` / ``nnx.Linear``
  in place (see `jaxq.flax.batchnorm.fold_nnx`)."""
  batchnorm_lib.fold_nnx(layer, batchnorm, fold_parameters)


def fold_batchnorm(target: Any, pairs_or_batchnorm: Any,
                   **kwargs: Any) -> Mapping[str, Any] | None:
  """Folds BatchNorm into the preceding Conv/Dense, for linen or nnx.

  * linen: ``fold_batchnorm(variables, {"conv": "bn", ...}, model=model,
    batch=x)`` returns new variables (`fold_batchnorm_linen`), each
    BatchNorm's epsilon read from the module (or ``epsilon=`` given).
  * nnx: ``fold_batchnorm(conv, bn)`` folds in place and returns None
    (`fold_batchnorm_nnx`).

  See the module docstring for the arithmetic and the identity BatchNorm
  that is left behind.
  """
  return batchnorm_lib.fold_batchnorm(target, pairs_or_batchnorm,
                                      fold_parameters, **kwargs)
