"""Observers with a padding ``mask``: False positions count in no statistic.

References: the same observer on the batch with the masked rows removed
(exactly equal states), or numpy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq import calibration
from jaxq import PerChannel, PerGroup, PerTensor, PerToken, QuantSpec

SYMMETRIC = QuantSpec("int8", PerTensor())
AFFINE = QuantSpec("uint8", PerTensor(), symmetric=False)
PER_CHANNEL = QuantSpec("int8", PerChannel(axis=-1))
OBSERVERS = {
    "max": calibration.max(),
    "entropy": calibration.entropy(num_bins=256, start_bin=64),
}


def _batches(n: int = 3, seed: int = 0):
  """``(x, mask)``: (4, 5, 6) Laplace batches of growing scale, padding
  (mask False) at 1000 times the scale."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    x = rng.laplace(scale=1.0 + 2 * i, size=(4, 5, 6))
    mask = rng.random((4, 5)) < 0.6
    mask[0, 0] = True
    out.append((np.where(mask[..., None], x, 1e3 * (1 + i)).astype(
        np.float32), mask))
  return out


def _run(observer, spec, batches, masked: bool):
  update = jax.jit(observer.update)
  if masked:
    state = observer.init(jnp.asarray(batches[0][0]), spec)
    for x, mask in batches:
      state = update(state, jnp.asarray(x), jnp.asarray(mask))
  else:  # The real rows alone, as (1, n, features).
    rows = [x[mask][None] for x, mask in batches]
    state = observer.init(jnp.asarray(rows[0]), spec)
    for x in rows:
      state = update(state, jnp.asarray(x))
  return state


def _assert_same(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("spec", [SYMMETRIC, AFFINE, PER_CHANNEL],
                         ids=["symmetric", "affine", "per_channel"])
def test_masked_max_equals_max_of_the_real_rows(spec):
  batches = _batches()
  observer = calibration.max()
  masked = _run(observer, spec, batches, masked=True)
  _assert_same(masked, _run(observer, spec, batches, masked=False))
  real = np.concatenate([x[m] for x, m in batches])
  if spec.symmetric:
    np.testing.assert_array_equal(
        np.asarray(observer.finalize(masked)).reshape(-1),
        np.abs(real).max(axis=0 if spec is PER_CHANNEL else None).reshape(-1))
  else:
    amin, amax = observer.finalize(masked)
    assert float(amin.reshape(())) == real.min()
    assert float(amax.reshape(())) == real.max()


@pytest.mark.parametrize("spec", [SYMMETRIC, PER_CHANNEL],
                         ids=["per_tensor", "per_channel"])
def test_masked_histogram_equals_histogram_of_the_real_rows(spec):
  batches = _batches(2)  # The second one grows the range.
  observer = OBSERVERS["entropy"]
  masked = _run(observer, spec, batches, masked=True)
  _assert_same(masked, _run(observer, spec, batches, masked=False))
  # Equal states finalize equally; the counts hold the real values alone.
  assert int(np.asarray(masked.counts).sum()) == sum(
      int(m.sum()) * 6 for _, m in batches)


def test_masked_per_token_max_leaves_padding_slots_empty():
  spec = QuantSpec("int8", PerToken())
  x, mask = _batches(1)[0]
  observer = calibration.max()
  state = observer.update(observer.init(jnp.asarray(x), spec),
                          jnp.asarray(x), jnp.asarray(mask))
  expected = np.where(mask, np.abs(x).max(axis=-1), 0.0)[..., None]
  np.testing.assert_array_equal(np.asarray(state.amax), expected)


def test_masked_per_group_max_reduces_only_the_real_rows():
  spec = QuantSpec("int8", PerGroup(axis=0, size=2))
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, 3)).astype(np.float32)
  mask = np.array([True, False, False, True])
  observer = calibration.max()
  state = observer.update(observer.init(jnp.asarray(x), spec),
                          jnp.asarray(x), jnp.asarray(mask))
  expected = np.abs(np.where(mask[:, None], x, 0.0)).reshape(2, 2, 3).max(1)
  np.testing.assert_array_equal(np.asarray(state.amax).reshape(2, 3),
                                expected)


@pytest.mark.parametrize("name,spec", [
    ("max", SYMMETRIC), ("max", AFFINE), ("max", PER_CHANNEL),
    ("entropy", SYMMETRIC), ("entropy", PER_CHANNEL)])
def test_an_all_false_mask_leaves_the_state_unchanged(name, spec):
  observer = OBSERVERS[name]
  batches = _batches(2)
  update = jax.jit(observer.update)
  x, mask = batches[1]
  for start in (observer.init(jnp.asarray(x), spec),  # Empty, then not.
                _run(observer, spec, batches, masked=True)):
    _assert_same(update(start, jnp.asarray(x), jnp.zeros(mask.shape, bool)),
                 start)


@pytest.mark.parametrize("name", ["max", "entropy"])
def test_an_all_true_mask_equals_no_mask(name):
  observer = OBSERVERS[name]
  x, mask = _batches(1)[0]
  state = observer.init(jnp.asarray(x), SYMMETRIC)
  update = jax.jit(observer.update)
  _assert_same(update(state, jnp.asarray(x), jnp.ones(mask.shape, bool)),
               update(state, jnp.asarray(x)))


@pytest.mark.parametrize("name", ["max", "entropy"])
def test_masked_nonfinite_values_are_not_counted(name):
  observer = OBSERVERS[name]
  x, mask = _batches(1)[0]
  x = x.copy()
  x[~mask] = np.nan
  x[0, 0, 0] = np.inf  # A real position: skipped and counted.
  state = jax.jit(observer.update)(observer.init(jnp.asarray(x), SYMMETRIC),
                                   jnp.asarray(x), jnp.asarray(mask))
  assert int(calibration.nonfinite_count(state)) == 1
  assert np.isfinite(np.asarray(observer.finalize(state))).all()


@pytest.mark.parametrize("name", ["max", "entropy"])
def test_a_mask_that_is_not_a_leading_shape_or_not_boolean_raises(name):
  observer = OBSERVERS[name]
  x = jnp.ones((4, 5, 6))
  state = observer.init(x, SYMMETRIC)
  with pytest.raises(ValueError, match=r"mask of shape \(5,\).*\(4, 5, 6\)"):
    observer.update(state, x, jnp.ones((5,), bool))
  with pytest.raises(ValueError, match="boolean.*float32"):
    observer.update(state, x, jnp.ones((4, 5), jnp.float32))
