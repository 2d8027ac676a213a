"""Tests for the observer protocol and the max observer (numpy references)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import calibration
from jaxq import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec


def _batches(seed: int, n: int, shape: tuple[int, ...]) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  # Per-channel scales that differ, so a per-tensor answer would be wrong.
  channel_scale = np.linspace(0.5, 4.0, shape[-1], dtype=np.float32)
  return [(rng.standard_normal(shape) * channel_scale).astype(np.float32)
          for _ in range(n)]


def _run(obs, spec, batches):
  state = obs.init(jnp.asarray(batches[0]), spec)
  update = jax.jit(obs.update)
  for x in batches:
    state = update(state, jnp.asarray(x))
  return state


def test_per_channel_max_over_batches_matches_numpy():
  batches = _batches(0, 4, (6, 5, 8))
  spec = QuantSpec("int8", PerChannel(axis=-1))
  state = _run(jaxq.observers.max(), spec, batches)
  expected = np.max(np.abs(np.stack(batches)), axis=(0, 1, 2))[None, None, :]
  amax = jaxq.observers.max().finalize(state)
  assert amax.shape == (1, 1, 8)
  np.testing.assert_array_equal(np.asarray(amax), expected)


@pytest.mark.parametrize("granularity, reduce_axes", [
    (PerTensor(), (0, 1)),
    (PerToken(), (1,)),
    (PerChannel(axis=0), (1,)),
])
def test_granularities_match_numpy(granularity, reduce_axes):
  batches = _batches(1, 3, (4, 16))
  spec = QuantSpec("int8", granularity)
  amax = jaxq.observers.max().finalize(
      _run(jaxq.observers.max(), spec, batches))
  expected = np.max(np.abs(np.stack(batches)), axis=0).max(
      axis=reduce_axes, keepdims=True)
  np.testing.assert_array_equal(np.asarray(amax), expected)


def test_per_group_max_matches_numpy():
  batches = _batches(2, 3, (4, 16))
  spec = QuantSpec("int4", PerGroup(axis=-1, size=4))
  amax = jaxq.observers.max().finalize(
      _run(jaxq.observers.max(), spec, batches))
  stacked = np.stack(batches)
  # int4's full range counts negative values at 7.5 / 8.5 (its grid reaches
  # -8): the range of all batches is the max of each batch's.
  magnitude = np.maximum(stacked, -stacked * np.float32(7.5 / 8.5))
  expected = magnitude.max(axis=0).reshape(4, 4, 4).max(-1)
  np.testing.assert_array_equal(np.asarray(amax), expected)
  narrow = jaxq.observers.max().finalize(_run(
      jaxq.observers.max(), spec.replace(narrow_range=True), batches))
  np.testing.assert_array_equal(
      np.asarray(narrow), np.abs(stacked).max(axis=0).reshape(4, 4, 4).max(-1))


@pytest.mark.parametrize("symmetric", [True, False])
def test_ragged_per_group_range_matches_numpy(symmetric):
  # 16 features in groups of 5: 5 + 5 + 5 + 1, the last group one column.
  batches = _batches(4, 3, (4, 16))
  spec = QuantSpec("int8" if symmetric else "uint8", PerGroup(axis=-1, size=5),
                   symmetric=symmetric)
  chosen = jaxq.observers.max().finalize(
      _run(jaxq.observers.max(), spec, batches))
  stacked = np.stack(batches)
  groups = [stacked[..., start:start + 5] for start in range(0, 16, 5)]
  if symmetric:
    assert chosen.shape == (4, 4)
    expected = np.stack([np.abs(g).max(axis=(0, 2)) for g in groups], -1)
    np.testing.assert_array_equal(np.asarray(chosen), expected)
  else:
    amin, amax = chosen
    np.testing.assert_array_equal(
        np.asarray(amin), np.stack([g.min(axis=(0, 2)) for g in groups], -1))
    np.testing.assert_array_equal(
        np.asarray(amax), np.stack([g.max(axis=(0, 2)) for g in groups], -1))


def test_affine_tracks_min_and_max():
  batches = [b + 1.5 for b in _batches(3, 3, (5, 8))]
  spec = QuantSpec("uint8", PerChannel(axis=-1), symmetric=False)
  obs = jaxq.observers.observer_for(spec)
  amin, amax = obs.finalize(_run(obs, spec, batches))
  stacked = np.stack(batches)
  np.testing.assert_array_equal(np.asarray(amin),
                                stacked.min(axis=(0, 1))[None])
  np.testing.assert_array_equal(np.asarray(amax),
                                stacked.max(axis=(0, 1))[None])


def test_affine_without_finite_data_finalizes_to_zero():
  spec = QuantSpec("uint8", symmetric=False)
  obs = jaxq.observers.max()
  state = obs.update(obs.init(jnp.zeros((3,)), spec),
                     jnp.array([jnp.nan, jnp.inf, -jnp.inf]))
  amin, amax = obs.finalize(state)
  np.testing.assert_array_equal(np.asarray(amin), [0.0])
  np.testing.assert_array_equal(np.asarray(amax), [0.0])
  assert int(calibration.nonfinite_count(state)) == 3


def test_nonfinite_values_are_counted_and_excluded():
  x = np.array([[1.0, -2.0], [np.nan, 0.5], [np.inf, -np.inf]], np.float32)
  spec = QuantSpec("int8", PerChannel(axis=-1))
  obs = jaxq.observers.max()
  state = _run(obs, spec, [x, x])
  np.testing.assert_array_equal(np.asarray(obs.finalize(state)), [[1.0, 2.0]])
  assert calibration.nonfinite_count(state).dtype == jnp.int32
  assert int(calibration.nonfinite_count(state)) == 6


def test_merge_equals_one_pass():
  batches = _batches(4, 4, (3, 8))
  spec = QuantSpec("int8", PerChannel(axis=-1))
  obs = jaxq.observers.max()
  merged = jaxq.observers.merge(_run(obs, spec, batches[:2]),
                                _run(obs, spec, batches[2:]))
  chex.assert_trees_all_equal(merged, _run(obs, spec, batches))


def test_state_is_a_pytree_that_jit_returns():
  spec = QuantSpec("int8", PerChannel(axis=-1))
  obs = jaxq.observers.max()
  state = obs.init(jnp.zeros((2, 4)), spec)
  leaves = jax.tree_util.tree_leaves(state)
  assert len(leaves) == 2  # amax and nonfinite; amin is None when symmetric
  out = jax.jit(obs.update)(state, jnp.ones((2, 4)))
  assert isinstance(out, calibration.MaxState) and out.spec == spec


def test_batch_of_a_different_shape_is_rejected():
  spec = QuantSpec("int8", PerToken())
  obs = jaxq.observers.max()
  state = obs.init(jnp.zeros((2, 4)), spec)
  with pytest.raises(ValueError, match=r"scale shape \(3, 1\).*\(2, 1\)"):
    obs.update(state, jnp.zeros((3, 4)))


def test_integer_batch_is_rejected():
  spec = QuantSpec("int8")
  obs = jaxq.observers.max()
  with pytest.raises(ValueError, match="floating-point"):
    obs.init(jnp.zeros((2,), jnp.int32), spec)


def test_observer_for_max_and_protocol_fields():
  obs = jaxq.observers.observer_for(QuantSpec("int8"))
  assert isinstance(obs, calibration.Observer)
  assert obs._fields == ("init", "update", "finalize")


def test_init_needs_only_shape_and_dtype():
  spec = QuantSpec("int8", PerChannel(axis=-1), calibration="entropy")
  template = jax.ShapeDtypeStruct((2, 4), jnp.bfloat16)
  for obs in (jaxq.observers.max(), jaxq.observers.observer_for(spec)):
    state = obs.init(template, spec)
    state = obs.update(state, jnp.ones((2, 4), jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(state.amax), [[1.0] * 4])
