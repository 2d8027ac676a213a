"""Calibration losses for `jaxq.auto_quantize`: ``(output, reference, batch)
-> scalar``, lower is better, ``reference`` the float model's output.

* `kl_loss`: mean KL(float || quantized) of softmax outputs (logits on the
  last axis): zero at the float model, the distribution shift a language
  model's perplexity feels; the measured proxy of choice for LMs.
* `nll_loss`: next-token negative log-likelihood of ``tokens`` (the batch
  itself); its gradient is informative at the float model, so it is the
  loss for ``proxy="fisher"``.
* `cosine_loss`: mean ``1 - cos(output, reference)`` over the rows of the
  last axis (embeddings, MiniLM's metric).
* `mse_loss`: mean squared error to the float output.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def kl_loss(output: jax.Array, reference: jax.Array, batch: Any = None
            ) -> jax.Array:
  """Mean over positions of ``KL(softmax(reference) || softmax(output))``."""
  del batch
  log_p = jax.nn.log_softmax(jnp.asarray(reference, jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(jnp.asarray(output, jnp.float32), axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def nll_loss(output: jax.Array, reference: Any, batch: jax.Array
             ) -> jax.Array:
  """Mean next-token NLL: ``output`` (B, T, V) logits of the tokens ``batch``
  (B, T); ``reference`` unused."""
  del reference
  logits = jnp.asarray(output, jnp.float32)[:, :-1]
  targets = jnp.asarray(batch)[:, 1:]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)
  return -jnp.mean(picked)


def cosine_loss(output: jax.Array, reference: jax.Array, batch: Any = None
                ) -> jax.Array:
  """Mean ``1 - cos`` between rows (last axis) of output and reference."""
  del batch
  a = jnp.asarray(output, jnp.float32)
  b = jnp.asarray(reference, jnp.float32)
  cos = jnp.sum(a * b, -1) / jnp.maximum(
      jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)
  return jnp.mean(1.0 - cos)


def mse_loss(output: Any, reference: Any, batch: Any = None) -> jax.Array:
  """Mean squared error over every leaf of the output."""
  del batch
  leaves = zip(jax.tree.leaves(output), jax.tree.leaves(reference))
  return sum(jnp.mean(jnp.square(jnp.asarray(o, jnp.float32) -
                                 jnp.asarray(r, jnp.float32)))
             for o, r in leaves)
