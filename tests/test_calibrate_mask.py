"""`jaxq.calibrate` with a padding mask (`jaxq.flax.Batch(..., mask=)`).

The reference is the same calibration on the same data with the padding
rows removed: the models are token-wise MLPs, so every layer sees the same
real rows either way, and the recorded statistics (max states and
histograms) must be equal, not just close. Padding positions hold values
far larger than the data, so a mask that went missing anywhere would show.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxq
from jaxq import PerChannel, PerTensor, QuantSpec

FEATURES, HIDDEN, OUT = 8, 16, 4
BATCH, SEQ = 4, 6
W8 = QuantSpec("int8", PerChannel(axis=-1))
A8 = QuantSpec("int8", PerTensor(), dynamic=False)
A8_AFFINE = QuantSpec("uint8", PerTensor(), symmetric=False, dynamic=False)
A8_CHANNEL = QuantSpec("int8", PerChannel(axis=-1), dynamic=False)
HISTOGRAMS = ("max", "entropy", "percentile:99.9", "mse")


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(OUT)(nn.relu(nn.Dense(HIDDEN)(x)))


class LinenPooled(nn.Module):
  """A token-wise layer, then mean pooling over the sequence, then a head."""

  @nn.compact
  def __call__(self, x):
    hidden = nn.relu(nn.Dense(HIDDEN, name="body")(x))
    return nn.Dense(OUT, name="head")(hidden.mean(axis=1))


class NnxMLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(FEATURES, HIDDEN, rngs=rngs)
    self.fc2 = nnx.Linear(HIDDEN, OUT, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


def _model(framework: str, act: QuantSpec = A8):
  rules = (jaxq.Rule(r".*", weight=W8, act=act),)
  if framework == "linen":
    model = LinenMLP()
    variables = model.init(jax.random.key(0), jnp.zeros((1, FEATURES)))
    return jaxq.quantize_model(model, rules, "calibrate"), variables
  return jaxq.quantize_model(NnxMLP(nnx.Rngs(0)), rules, "calibrate"), None


# Each batch's sequence lengths, shuffled: every batch pads other positions
# but keeps the same number of real rows, so the references of `_removed`
# share one shape (one compiled program, not one per batch).
LENGTHS = (1, 3, 5, 6)


def _data(n: int = 3, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
  """``(x, mask)`` pairs: Laplace rows of growing scale (histogram ranges
  must grow), padding rows (mask False) at 1000 times that."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    x = rng.laplace(scale=1.0 + i, size=(BATCH, SEQ, FEATURES))
    lengths = rng.permutation(LENGTHS)
    mask = np.arange(SEQ)[None, :] < lengths[:, None]
    x = np.where(mask[..., None], x, 1000.0 * (1.0 + i))
    out.append((x.astype(np.float32), mask))
  return out


def _masked(data) -> list[jaxq.flax.Batch]:
  return [jaxq.flax.Batch((jnp.asarray(x),), {}, jnp.asarray(m))
          for x, m in data]


def _removed(data) -> list[jax.Array]:
  """The real rows alone, one ``(1, n, features)`` batch per batch."""
  return [jnp.asarray(x[m][None]) for x, m in data]


def _assert_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# The mask reaches the observers the same way whatever their spec: each
# framework's plumbing with the symmetric observer, and each other observer
# (affine, per channel) through one framework; not every pair (each case
# compiles three calibration passes).
@pytest.mark.parametrize(
    "framework, act",
    [("linen", A8), ("nnx", A8), ("linen", A8_AFFINE), ("nnx", A8_CHANNEL)],
    ids=["linen-symmetric", "nnx-symmetric", "linen-affine",
         "nnx-per_channel"])
def test_masked_max_equals_max_without_the_padding_rows(framework, act):
  cal, variables = _model(framework, act)
  data = _data()
  masked = jaxq.calibrate(cal, variables, _masked(data), progress=False)
  removed = jaxq.calibrate(cal, variables, _removed(data), progress=False)
  _assert_equal(masked.ranges(), removed.ranges())
  _assert_equal(masked.stats, removed.stats)
  # Without the mask the padding would have set every range.
  unmasked = jaxq.calibrate(cal, variables, [x for x, _ in data],
                            progress=False)
  amax = lambda ranges: [np.asarray(leaf) for path, leaf in
                          jax.tree_util.tree_leaves_with_path(ranges)
                          if "amax" in jax.tree_util.keystr(path)]
  assert len(amax(masked.ranges())) == 2
  for got, padded in zip(amax(masked.ranges()), amax(unmasked.ranges())):
    assert np.max(got) < np.max(padded) / 10


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_masked_histograms_equal_histograms_without_the_padding_rows(
    framework):
  cal, variables = _model(framework)
  data = _data()
  masked = jaxq.calibrate(cal, variables, _masked(data), HISTOGRAMS,
                          progress=False)
  removed = jaxq.calibrate(cal, variables, _removed(data), HISTOGRAMS,
                           progress=False)
  states = jax.tree.leaves(
      masked.stats, is_leaf=lambda s: isinstance(
          s, jaxq.calibration.HistogramState))
  assert any(isinstance(s, jaxq.calibration.HistogramState) for s in states)
  _assert_equal(masked.stats, removed.stats)  # Counts, ranges, maxima.
  for method in HISTOGRAMS:
    _assert_equal(masked.ranges(method), removed.ranges(method))


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_an_all_masked_batch_changes_no_statistic(framework):
  cal, variables = _model(framework)
  data = _data()
  nothing = (data[1][0], np.zeros_like(data[1][1]))
  with_empty = _masked([data[0], nothing, data[2]])
  without = _masked([data[0], data[2]])
  for methods in (None, HISTOGRAMS):
    a = jaxq.calibrate(cal, variables, with_empty, methods, progress=False)
    b = jaxq.calibrate(cal, variables, without, methods, progress=False)
    _assert_equal(a.stats, b.stats)
  # First: the empty batch leaves the empty states as they were.
  first = jaxq.calibrate(cal, variables, [with_empty[1], with_empty[0]],
                         progress=False)
  _assert_equal(first.stats, jaxq.calibrate(cal, variables, with_empty[:1],
                                            progress=False).stats)


def test_an_integer_attention_mask_is_a_padding_mask():
  cal, variables = _model("linen")
  data = _data()
  as_ints = [jaxq.flax.Batch((jnp.asarray(x),), {},
                             jnp.asarray(m, jnp.int32)) for x, m in data]
  _assert_equal(
      jaxq.calibrate(cal, variables, as_ints, progress=False).stats,
      jaxq.calibrate(cal, variables, _masked(data), progress=False).stats)


def test_nonfinite_padding_is_neither_observed_nor_counted():
  cal, variables = _model("nnx")
  data = _data()
  x, mask = data[0]
  poisoned = [(np.where(mask[..., None], x, np.nan).astype(np.float32), mask)]
  result = jaxq.calibrate(cal, variables, _masked(poisoned), progress=False)
  assert result.nonfinite == {"fc1": 0, "fc2": 0}
  _assert_equal(result.stats, jaxq.calibrate(
      cal, variables, _removed(data[:1]), progress=False).stats)


def test_a_layer_whose_rows_do_not_match_the_mask_is_named():
  model = LinenPooled()
  variables = model.init(jax.random.key(0), jnp.zeros((1, SEQ, FEATURES)))
  cal = jaxq.quantize_model(model, (jaxq.Rule(r".*", weight=W8, act=A8),),
                            "calibrate")
  with pytest.raises(ValueError, match=r"'head'.*\(4, 6\).*\(4, 16\)|"
                     r"\(4, 6\).*'head'.*\(4, 16\)"):
    jaxq.calibrate(cal, variables, _masked(_data(1)), progress=False)
  # A dynamic head records nothing and needs no mask.
  cal = jaxq.quantize_model(model, (
      jaxq.Rule(r"head", weight=W8, act=A8.replace(dynamic=True)),
      jaxq.Rule(r".*", weight=W8, act=A8)), "calibrate")
  result = jaxq.calibrate(cal, variables, _masked(_data(1)), progress=False)
  assert set(result.nonfinite) == {"body"}


def test_a_mask_of_another_batch_shape_is_named_with_the_layer():
  cal, variables = _model("nnx")
  x, mask = _data(1)[0]
  with pytest.raises(ValueError, match=r"'fc1'.*\(4, 5\)"):
    jaxq.calibrate(cal, variables,
                   [jaxq.flax.Batch((jnp.asarray(x),), {},
                                    jnp.asarray(mask[:, :5]))],
                   progress=False)


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_sharded_masked_batches_give_single_device_stats(framework):
  mesh = Mesh(np.array(jax.devices()), ("data",))
  cal, variables = _model(framework)
  data = _data(2)
  data = [(np.concatenate([x, x[::-1]]), np.concatenate([m, m[::-1]]))
          for x, m in data]  # A batch of 8 rows: one per device.
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  sharded = [jax.device_put(b, sharding) for b in _masked(data)]
  for methods in (None, ("entropy",)):
    single = jaxq.calibrate(cal, variables, _masked(data), methods,
                            progress=False)
    spread = jaxq.calibrate(cal, variables, sharded, methods, progress=False)
    _assert_equal(spread.stats, single.stats)


class _Block(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return x + nn.Dense(FEATURES, name="mix")(x), None


class LinenScanned(nn.Module):
  """Two blocks as one ``nn.scan``: the mask reaches layers inside it."""

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(_Block, variable_axes={"params": 0, **jaxq.flax.SCAN_AXES},
                    split_rngs={"params": True}, length=2)
    return stack(name="layers")(x, None)[0]


def test_masked_calibration_inside_nn_scan_equals_the_real_rows():
  model = LinenScanned()
  variables = model.init(jax.random.key(0), jnp.zeros((1, FEATURES)))
  cal = jaxq.quantize_model(model, (jaxq.Rule(r".*", weight=W8, act=A8),),
                            "calibrate")
  data = _data(2)
  masked = jaxq.calibrate(cal, variables, _masked(data), progress=False)
  removed = jaxq.calibrate(cal, variables, _removed(data), progress=False)
  assert masked.ranges()["layers"]["mix"]["act"]["amax"].shape == (2, 1, 1, 1)
  _assert_equal(masked.ranges(), removed.ranges())


def test_an_observer_without_a_mask_argument_is_refused_naming_the_layer():
  cal, variables = _model("linen")
  plain = jaxq.calibration.max()
  no_mask = plain._replace(update=lambda state, x: plain.update(state, x))
  with pytest.raises(ValueError, match=r"'Dense_1'.*takes no mask"):
    jaxq.calibrate(cal, variables, _masked(_data(1)), {"mine": no_mask},
                   progress=False)
  # Without a mask it is used as before.
  result = jaxq.calibrate(cal, variables, _removed(_data(1)),
                          {"mine": no_mask}, progress=False)
  assert result.methods == ("mine",)
