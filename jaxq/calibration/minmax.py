"""The "max" observer: the running range of every scale block.

Shapes: for a batch ``x`` of shape ``S`` and a spec with granularity ``g``,
the state's ``amax`` (and ``amin``) have the keepdims scale shape
``jaxq.granularity.scale_shape(g, S)``. Any granularity works: per-tensor,
per-channel, per-token (one range per token slot of a fixed-shape batch),
per-group, per-block and MX.

Semantics:

* Symmetric specs track ``amax = max |x|`` per block, starting from 0 (in
  the full integer range, int4's default, the block maximum of
  `jaxq.formats.range_magnitude`, as `jaxq.compute_range` gives: the
  maximum over batches of each batch's range is the range of all of them).
* Affine specs track ``amin = min x`` and ``amax = max x`` per block,
  starting from ``+inf`` / ``-inf`` (the identities of min / max, so states
  merge by plain min / max); a block that has seen no finite value
  finalizes to ``(0, 0)``.
* NaN and +-inf are excluded and counted in ``nonfinite``.
* A ``mask`` over the leading axes (`jaxq.calibration.base.broadcast_mask`)
  leaves its False positions out of every block's range and of the count;
  a block with no position left keeps its old range.

Two states over the same spec and shape merge by ``max(amax)``,
``min(amin)`` and ``sum(nonfinite)`` (`merge_max_states`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxq import formats as formats_lib
from jaxq import granularity as granularity_lib
from jaxq.calibration import base
from jaxq.spec import QuantSpec


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["amax", "amin", "nonfinite"],
    meta_fields=["spec"])
@dataclasses.dataclass(frozen=True)
class MaxState:
  """Running range per scale block.

  Attributes:
    amax: float32 of the scale shape; ``max |x|`` (symmetric) or ``max x``
      (affine, ``-inf`` before any finite value).
    amin: float32 of the scale shape, ``min x`` (``+inf`` before any finite
      value); None for symmetric specs.
    nonfinite: int32 scalar, NaN/Inf elements seen and skipped.
    spec: the quantizer (static).
  """

  amax: jax.Array
  amin: jax.Array | None
  nonfinite: jax.Array
  spec: QuantSpec


def _init(x: jax.Array, spec: QuantSpec) -> MaxState:
  base.check_float(x, "max observer init")
  shape = granularity_lib.scale_shape(spec.granularity, tuple(x.shape))
  if spec.symmetric:
    return MaxState(amax=jnp.zeros(shape, jnp.float32), amin=None,
                    nonfinite=jnp.zeros((), jnp.int32), spec=spec)
  return MaxState(amax=jnp.full(shape, -jnp.inf, jnp.float32),
                  amin=jnp.full(shape, jnp.inf, jnp.float32),
                  nonfinite=jnp.zeros((), jnp.int32), spec=spec)


def _batch_range(x: jax.Array, blocks: tuple[int, ...], spec: QuantSpec,
                 finite: jax.Array | None) -> tuple[jax.Array | None, jax.Array]:
  """``(amin, amax)`` of every block (``amin`` None when symmetric), as
  `jaxq.compute_range` defines them.

  With a ``finite`` mask, non-finite values are left out; without one, they
  propagate (NaN and inf win every max/min).
  """
  keep = lambda a, fill: a if finite is None else jnp.where(finite, a, fill)
  if spec.symmetric:
    magnitude = formats_lib.range_magnitude(x, spec.negative_reach)
    return None, granularity_lib.block_reduce(keep(magnitude, 0.0), blocks,
                                              jnp.max)
  return (granularity_lib.block_reduce(keep(x, jnp.inf), blocks, jnp.min),
          granularity_lib.block_reduce(keep(x, -jnp.inf), blocks, jnp.max))


def _update(state: MaxState, x: jax.Array,
            mask: jax.Array | None = None) -> MaxState:
  spec = state.spec
  base.check_float(x, "max observer update")
  shape = tuple(x.shape)
  base.check_shape("max observer update",
                   granularity_lib.scale_shape(spec.granularity, shape), x,
                   spec, tuple(state.amax.shape))
  keep = (None if mask is None else
          base.broadcast_mask(mask, x, "max observer update"))
  if x.size == 0:  # Nothing to observe.
    return state
  blocks = spec.granularity.block_shape(shape)
  x = x.astype(jnp.float32)
  if keep is not None:
    # Masked positions are not data: they enter no range and no count.
    finite = jnp.isfinite(x)
    batch_amin, batch_amax = _batch_range(x, blocks, spec,
                                          keep & finite)
    return _combined(state, batch_amin, batch_amax,
                     jnp.sum(keep & ~finite, dtype=jnp.int32))
  # Plain reductions propagate NaN/inf, so finite block ranges prove a clean
  # batch; only a batch with non-finite values pays for masking and counting
  # (a mask fused into the reduction costs far more than the reduction).
  plain = _batch_range(x, blocks, spec, finite=None)

  def masked() -> tuple[tuple[jax.Array | None, jax.Array], jax.Array]:
    return (_batch_range(x, blocks, spec, jnp.isfinite(x)),
            base.count_nonfinite(x))

  clean = jnp.all(jnp.stack([jnp.all(jnp.isfinite(r)) for r in plain
                             if r is not None]))
  (batch_amin, batch_amax), count = jax.lax.cond(
      clean, lambda: (plain, jnp.zeros((), jnp.int32)), masked)
  return _combined(state, batch_amin, batch_amax, count)


def _combined(state: MaxState, batch_amin: jax.Array | None,
              batch_amax: jax.Array, count: jax.Array) -> MaxState:
  """``state`` with one batch's block ranges and non-finite count added."""
  spec = state.spec
  nonfinite = state.nonfinite + count
  if spec.symmetric:
    return MaxState(amax=jnp.maximum(state.amax, batch_amax), amin=None,
                    nonfinite=nonfinite, spec=spec)
  return MaxState(amax=jnp.maximum(state.amax, batch_amax),
                  amin=jnp.minimum(state.amin, batch_amin),
                  nonfinite=nonfinite, spec=spec)


def finalize_max(state: MaxState) -> base.Range:
  """``amax`` (symmetric) or ``(amin, amax)`` (affine) of the scale shape."""
  if state.spec.symmetric:
    return state.amax
  seen = state.amin <= state.amax
  return (jnp.where(seen, state.amin, 0.0), jnp.where(seen, state.amax, 0.0))


def merge_max_states(a: MaxState, b: MaxState) -> MaxState:
  """Combines two states of the same spec and shape (batches or devices)."""
  if a.spec != b.spec or a.amax.shape != b.amax.shape:
    raise ValueError(
        f"merge: max states differ: spec {a.spec} with scale shape "
        f"{tuple(a.amax.shape)} vs spec {b.spec} with scale shape "
        f"{tuple(b.amax.shape)}.")
  amin = None if a.amin is None else jnp.minimum(a.amin, b.amin)
  return MaxState(amax=jnp.maximum(a.amax, b.amax), amin=amin,
                  nonfinite=a.nonfinite + b.nonfinite, spec=a.spec)


def max_observer() -> base.Observer:
  """The running max (symmetric) or min/max (affine) of every scale block."""
  return base.Observer(init=_init, update=_update, finalize=finalize_max)
