"""Tests for `jaxq.granularity`: block shapes, scale shapes and block reshapes.

Each granularity is checked against block shapes written out by hand for a
few array shapes, and `block_reduce` against a NumPy reference that slices
every block explicitly, ragged last blocks (a size that does not divide its
axis) included. Bad configurations must raise a ValueError naming the shape,
the axis and the size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq import granularity as gl
from jaxq.granularity import MX, PerBlock, PerChannel, PerGroup, PerTensor
from jaxq.granularity import PerToken

# (granularity, array shape, expected block shape), written out by hand.
BLOCK_CASES = [
    (PerTensor(), (4, 3), (4, 3)),
    (PerTensor(), (2, 3, 5), (2, 3, 5)),
    (PerChannel(axis=-1), (4, 3), (4, 1)),
    (PerChannel(axis=0), (4, 3), (1, 3)),
    (PerChannel(axis=(1, 2)), (6, 4, 2), (6, 1, 1)),
    (PerToken(), (8, 16), (1, 16)),
    (PerToken(), (2, 5, 16), (1, 1, 16)),
    (PerToken(contraction_axis=0), (8, 16), (8, 1)),
    (PerToken(contraction_axis=(-2, -1)), (2, 5, 4, 8), (1, 1, 4, 8)),
    (PerToken(contraction_axis=[1, 3]), (2, 5, 4, 8), (1, 5, 1, 8)),
    (PerGroup(axis=-1, size=4), (3, 16), (1, 4)),
    (PerGroup(axis=0, size=4), (16, 3), (4, 1)),
    (PerGroup(axis=1, size=8), (2, 16, 3), (1, 8, 1)),
    (PerGroup(axis=-1, size=16), (3, 16), (1, 16)),
    (PerBlock(shape=(4, 8)), (8, 16), (4, 8)),
    (PerBlock(shape=(4, 8)), (3, 8, 16), (1, 4, 8)),
    (PerBlock(shape=(2, 2), axes=(0, 2)), (4, 3, 6), (2, 1, 2)),
    (MX(), (4, 64), (1, 32)),
    (MX(axis=0, size=32), (64, 4), (32, 1)),
    # Ragged: the last group (block) is shorter.
    (PerGroup(axis=0, size=8), (20, 3), (8, 1)),
    (PerGroup(axis=-1, size=5), (4, 16), (1, 5)),
    (PerGroup(axis=1, size=3), (2, 7, 2), (1, 3, 1)),
    (PerBlock(shape=(3, 4)), (8, 10), (3, 4)),
    # A group beyond its axis is the whole axis.
    (PerGroup(axis=-1, size=32), (2, 20), (1, 20)),
    (PerBlock(shape=(4, 16)), (6, 8), (4, 8)),
]


def _case_id(case) -> str:
  granularity, shape, _ = case
  return f"{granularity}-{shape}"


def _reference_block_reduce(x: np.ndarray, blocks: tuple[int, ...],
                            reducer) -> np.ndarray:
  """Reduces every block by slicing it out, one block at a time (a ragged
  last block is its own, shorter slice)."""
  out_shape = tuple(-(-d // b) for d, b in zip(x.shape, blocks))
  out = np.empty(out_shape, x.dtype)
  for index in np.ndindex(*out_shape):
    block = x[tuple(slice(i * b, (i + 1) * b) for i, b in zip(index, blocks))]
    out[index] = reducer(block)
  return out


@pytest.mark.parametrize("case", BLOCK_CASES, ids=_case_id)
def test_block_and_scale_shape(case):
  granularity, shape, blocks = case
  assert granularity.block_shape(shape) == blocks
  assert gl.scale_shape(granularity, shape) == tuple(
      -(-d // b) for d, b in zip(shape, blocks))


@pytest.mark.parametrize("case", BLOCK_CASES, ids=_case_id)
@pytest.mark.parametrize("reducer", [jnp.max, jnp.min, jnp.sum],
                         ids=["max", "min", "sum"])
def test_block_reduce_matches_reference(case, reducer):
  granularity, shape, blocks = case
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  # A sum pads a ragged block with zeros; max and min repeat its last element.
  got = gl.block_reduce(jnp.asarray(x), granularity.block_shape(shape),
                        reducer, fill=0.0 if reducer is jnp.sum else None)
  np_reducer = {jnp.max: np.max, jnp.min: np.min, jnp.sum: np.sum}[reducer]
  want = _reference_block_reduce(x, blocks, np_reducer)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", BLOCK_CASES, ids=_case_id)
def test_split_scale_broadcasts_each_block_onto_its_elements(case):
  granularity, shape, blocks = case
  scale_shape = gl.scale_shape(granularity, shape)
  # Tag every block with its own index and expand it back to full shape.
  tags = np.arange(np.prod(scale_shape), dtype=np.float32).reshape(scale_shape)
  x = jnp.zeros(shape, jnp.float32)
  expanded = gl.merge_blocks(
      gl.split_blocks(x, blocks) + gl.split_scale(jnp.asarray(tags), shape,
                                                  blocks), shape)
  want = tags
  for axis, b in enumerate(blocks):
    want = np.repeat(want, b, axis=axis)
  want = want[tuple(slice(0, d) for d in shape)]
  np.testing.assert_array_equal(np.asarray(expanded), want)


@pytest.mark.parametrize("case", BLOCK_CASES, ids=_case_id)
def test_split_then_merge_is_identity(case):
  granularity, shape, blocks = case
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  split = gl.split_blocks(x, granularity.block_shape(shape))
  np.testing.assert_array_equal(np.asarray(gl.merge_blocks(split, shape)),
                                np.asarray(x))


def test_block_reduce_under_jit_and_vmap():
  x = jax.random.normal(jax.random.key(0), (3, 8, 16))
  blocks = PerGroup(axis=-1, size=4).block_shape((8, 16))
  batched = jax.jit(jax.vmap(lambda r: gl.block_reduce(r, blocks)))(x)
  want = np.stack([_reference_block_reduce(np.asarray(r), blocks, np.max)
                   for r in x])
  np.testing.assert_array_equal(np.asarray(batched), want)


def test_granularities_are_hashable_values():
  assert PerGroup(axis=0, size=8) == PerGroup(axis=0, size=8)
  assert hash(PerBlock((4, 4))) == hash(PerBlock([4, 4]))
  assert PerChannel(axis=[1, 2]) == PerChannel(axis=(1, 2))
  assert len({PerTensor(), PerTensor(), MX(), MX(size=32)}) == 2
  for g in (PerTensor(), PerChannel(), PerToken(), PerGroup(), PerBlock(),
            MX()):
    assert isinstance(g, gl.Granularity)


def test_scale_shape_of_ragged_groups_is_the_ceiling():
  # SmolLM2's 576 inputs in groups of 128: four groups of 128, one of 64.
  assert gl.scale_shape(PerGroup(axis=0, size=128), (576, 1536)) == (5, 1536)
  assert gl.scale_shape(PerGroup(axis=0, size=64), (576, 1536)) == (9, 1536)
  assert gl.scale_shape(PerBlock((128, 128)), (576, 200)) == (5, 2)
  x = jnp.arange(20, dtype=jnp.float32)[:, None] - 10.0
  amax = gl.block_reduce(jnp.abs(x), (8, 1))
  np.testing.assert_array_equal(np.asarray(amax)[:, 0], [10.0, 5.0, 9.0])


@pytest.mark.parametrize(
    "granularity,shape,axis,size",
    [(MX(axis=-1, size=32), (4, 48), 1, 32),
     (MX(axis=0, size=32), (16, 4), 0, 32),
     (MX(axis=1, size=8), (2, 20, 3), 1, 8)])
def test_mx_size_not_dividing_axis_names_shape_axis_and_size(
    granularity, shape, axis, size):
  # An OCP MX block is whole: no ragged last block.
  with pytest.raises(ValueError, match="MX block is whole") as info:
    granularity.block_shape(shape)
  message = str(info.value)
  assert f"size {size}" in message
  assert f"axis {axis}" in message
  assert str(shape) in message


@pytest.mark.parametrize(
    "granularity,shape,axis",
    [(PerChannel(axis=2), (4, 3), 2),
     (PerChannel(axis=-3), (4, 3), -3),
     (PerChannel(axis=(0, 5)), (4, 3), 5),
     (PerToken(contraction_axis=3), (2, 4, 3), 3),
     (PerToken(contraction_axis=(-1, -4)), (2, 4, 3), -4),
     (PerGroup(axis=2, size=4), (8, 8), 2),
     (PerBlock(shape=(2, 2), axes=(0, 4)), (8, 8), 4),
     (MX(axis=-3, size=32), (32, 32), -3)])
def test_axis_out_of_range_names_shape_and_axis(granularity, shape, axis):
  with pytest.raises(ValueError, match="out of range") as info:
    granularity.block_shape(shape)
  assert f"axis {axis}" in str(info.value)
  assert str(shape) in str(info.value)


@pytest.mark.parametrize(
    "make",
    [lambda size: PerGroup(axis=-1, size=size),
     lambda size: MX(axis=-1, size=size),
     lambda size: PerBlock(shape=(size, 4)),
     lambda size: PerBlock(shape=(4, size))],
    ids=["PerGroup", "MX", "PerBlock-rows", "PerBlock-cols"])
@pytest.mark.parametrize("size", [0, -4, 2.5, True])
def test_non_positive_or_non_integer_size_is_rejected(make, size):
  with pytest.raises(ValueError, match="positive integer") as info:
    make(size)
  assert f"got {size!r}" in str(info.value)


def test_block_shape_and_axes_must_pair_up():
  with pytest.raises(ValueError, match="same length"):
    PerBlock(shape=(4,), axes=(-2, -1))

