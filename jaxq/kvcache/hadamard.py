"""The orthonormal Hadamard matrix that rotates keys and queries.

``H = hadamard_matrix(n)`` is Sylvester's ``n x n`` matrix of +-1 divided by
``sqrt(n)``: orthonormal and symmetric (``H @ H = I``), so ``(q @ H) . (k @
H) = q . k``. Rotating a key spreads an outlier channel evenly over all
``n`` channels, which shrinks the per-token range a low-bit format must
cover (QuaRot, SpinQuant).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def _sylvester(n: int) -> np.ndarray:
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h / np.float32(np.sqrt(n))


def hadamard_matrix(n: int) -> np.ndarray:
  """The orthonormal ``(n, n)`` float32 Hadamard matrix.

  Raises:
    ValueError: unless ``n`` is a power of two.
  """
  if n < 1 or n & (n - 1):
    raise ValueError(f"hadamard_matrix: size {n} is not a power of two; the "
                     f"Hadamard rotation needs head_dim = 2**k.")
  return _sylvester(int(n))


def rotate(x: jax.Array) -> jax.Array:
  """``x @ H`` over the last axis, in float32; ``rotate(rotate(x)) == x``
  (up to rounding), as ``H`` is symmetric and orthonormal."""
  return jnp.einsum("...d,de->...e", x.astype(jnp.float32),
                    jnp.asarray(hadamard_matrix(x.shape[-1])))
