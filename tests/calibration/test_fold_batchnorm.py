"""BatchNorm folding: the folded model reproduces the unfolded one in float."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax.core import frozen_dict

import jaxq

CHANNELS = 6


class ConvBN(nn.Module):
  """Two conv+BN blocks; the second is nested to exercise module paths."""

  groups: int = 1
  use_bias: bool = True
  epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(CHANNELS, (3, 3), feature_group_count=self.groups,
                use_bias=self.use_bias, name="conv")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=True, epsilon=self.epsilon,
                             name="bn")(x))
    x = Block(name="block")(x)
    return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


class Block(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(CHANNELS, use_bias=False, name="dense")(x)
    return nn.BatchNorm(use_running_average=True, name="bn")(x)


def _randomise_batchnorm(tree, key):
  """Non-trivial BN statistics and affine parameters, for every BN leaf."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
  keys = jax.random.split(key, len(paths))
  leaves = []
  for (path, leaf), k in zip(paths, keys):
    name = jax.tree_util.keystr(path)
    if "bn" not in name:
      leaves.append(leaf)
    elif "var" in name:
      leaves.append(jax.random.uniform(k, leaf.shape, minval=0.2, maxval=3.0))
    else:  # mean, scale, bias
      leaves.append(jax.random.normal(k, leaf.shape))
  return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.mark.parametrize("groups, use_bias", [
    (1, True),            # plain conv
    (1, False),           # conv without bias: the BN keeps the folded bias
    (CHANNELS, True),     # depthwise conv
    (CHANNELS, False),
])
def test_linen_folded_model_matches_unfolded(groups, use_bias):
  model = ConvBN(groups=groups, use_bias=use_bias)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, CHANNELS))
  variables = model.init(jax.random.key(1), x)
  variables = _randomise_batchnorm(variables, jax.random.key(2))
  folded = jaxq.fold_batchnorm(
      variables, {"conv": "bn", ("block", "dense"): ("block", "bn")},
      epsilon={"bn": 1e-3, "block/bn": 1e-5})
  np.testing.assert_allclose(model.apply(folded, x), model.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  # The BN that follows a biased conv is now an exact identity.
  bn = folded["batch_stats"]["bn"]
  np.testing.assert_array_equal(bn["mean"], np.zeros(CHANNELS))
  np.testing.assert_allclose(bn["var"], np.full(CHANNELS, 1 - 1e-3))
  np.testing.assert_array_equal(folded["params"]["bn"]["scale"],
                                np.ones(CHANNELS))
  if use_bias:
    np.testing.assert_array_equal(folded["params"]["bn"]["bias"],
                                  np.zeros(CHANNELS))
  # The input variables are untouched.
  assert not np.array_equal(variables["batch_stats"]["bn"]["mean"],
                            np.zeros(CHANNELS))


def test_linen_fold_matches_the_formula():
  rng = np.random.default_rng(3)
  kernel = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)
  bias, mean, gamma, beta = rng.standard_normal((4, 4)).astype(np.float32)
  var = rng.uniform(0.5, 2.0, 4).astype(np.float32)
  variables = {"params": {"c": {"kernel": kernel, "bias": bias},
                          "b": {"scale": gamma, "bias": beta}},
               "batch_stats": {"b": {"mean": mean, "var": var}}}
  folded = jaxq.fold_batchnorm(frozen_dict.freeze(variables), {"c": "b"},
                               epsilon=0.01)
  assert isinstance(folded, frozen_dict.FrozenDict)
  s = gamma / np.sqrt(var + 0.01)
  np.testing.assert_allclose(folded["params"]["c"]["kernel"], kernel * s,
                             rtol=1e-6)
  np.testing.assert_allclose(folded["params"]["c"]["bias"],
                             beta + (bias - mean) * s, rtol=1e-5, atol=1e-6)


def test_linen_errors_name_the_module():
  model = ConvBN()
  x = jnp.zeros((1, 4, 4, CHANNELS))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="'convv'.*modules with params"):
    jaxq.fold_batchnorm(variables, {"convv": "bn"})
  with pytest.raises(ValueError, match="'head'.*3 output channels.*'bn'"):
    jaxq.fold_batchnorm(variables, {"head": "bn"})
  with pytest.raises(ValueError, match="no epsilon given for BatchNorm 'bn'"):
    jaxq.fold_batchnorm(variables, {"conv": "bn"}, epsilon={"block/bn": 1e-5})


class NnxConvBN(nnx.Module):

  def __init__(self, groups: int, use_bias: bool, rngs: nnx.Rngs):
    self.conv = nnx.Conv(CHANNELS, CHANNELS, (3, 3),
                         feature_group_count=groups, use_bias=use_bias,
                         rngs=rngs)
    self.bn = nnx.BatchNorm(CHANNELS, use_running_average=True, epsilon=1e-3,
                            rngs=rngs)
    self.linear = nnx.Linear(CHANNELS, 4, rngs=rngs)
    self.bn2 = nnx.BatchNorm(4, use_running_average=True, use_scale=False,
                             rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    return self.bn2(self.linear(x.mean(axis=(1, 2))))


@pytest.mark.parametrize("groups, use_bias", [
    (1, True), (1, False), (CHANNELS, True), (CHANNELS, False)])
def test_nnx_folded_model_matches_unfolded(groups, use_bias):
  model = NnxConvBN(groups, use_bias, nnx.Rngs(0))
  keys = iter(jax.random.split(jax.random.key(1), 8))
  for bn in (model.bn, model.bn2):
    bn.mean[...] = jax.random.normal(next(keys), bn.mean.shape)
    bn.var[...] = jax.random.uniform(next(keys), bn.var.shape, minval=0.2,
                                     maxval=3.0)
    bn.bias[...] = jax.random.normal(next(keys), bn.bias.shape)
    if bn.scale is not None:
      bn.scale[...] = jax.random.normal(next(keys), bn.scale.shape)
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, CHANNELS))
  expected = model(x)
  folded = nnx.clone(model)
  assert jaxq.fold_batchnorm(folded.conv, folded.bn) is None
  jaxq.fold_batchnorm(folded.linear, folded.bn2)
  np.testing.assert_allclose(folded(x), expected, rtol=1e-5, atol=1e-5)
  assert folded.conv.use_bias and folded.conv.bias.shape == (CHANNELS,)
  np.testing.assert_array_equal(folded.bn.mean[...], np.zeros(CHANNELS))
  np.testing.assert_array_equal(folded.bn.bias[...], np.zeros(CHANNELS))
  # nnx.clone left the original alone.
  np.testing.assert_array_equal(model(x), expected)


def test_nnx_errors():
  rngs = nnx.Rngs(0)
  conv = nnx.Conv(2, 3, (1, 1), rngs=rngs)
  with pytest.raises(ValueError, match="3 output channels"):
    jaxq.fold_batchnorm(conv, nnx.BatchNorm(4, rngs=rngs))
  with pytest.raises(ValueError, match="expected an nnx.BatchNorm"):
    jaxq.fold_batchnorm(conv, nnx.LayerNorm(3, rngs=rngs))
  with pytest.raises(ValueError, match="takes no options"):
    jaxq.fold_batchnorm(conv, nnx.BatchNorm(3, rngs=rngs), epsilon=1e-3)


# Each BatchNorm's own epsilon (issue 13, item 10).


def _small_variance_model():
  model = ConvBN()  # bn: epsilon=1e-3; block/bn: flax's 1e-5.
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, CHANNELS))
  variables = model.init(jax.random.key(1), x)
  variables = _randomise_batchnorm(variables, jax.random.key(2))
  # Running variances near epsilon make the epsilon matter.
  stats = variables["batch_stats"]
  stats = {**stats, "bn": {**stats["bn"], "var": stats["bn"]["var"] * 1e-3}}
  return model, x, {**variables, "batch_stats": stats}


def test_linen_reads_each_batchnorm_epsilon_from_the_model():
  model, x, variables = _small_variance_model()
  pairs = {"conv": "bn", "block/dense": "block/bn"}
  folded = jaxq.fold_batchnorm(variables, pairs, model=model, batch=x)
  expected = model.apply(variables, x)
  np.testing.assert_allclose(model.apply(folded, x), expected, rtol=1e-4,
                             atol=1e-4 * float(jnp.max(jnp.abs(expected))))
  np.testing.assert_allclose(folded["batch_stats"]["bn"]["var"],
                             np.full(CHANNELS, 1 - 1e-3))
  np.testing.assert_allclose(folded["batch_stats"]["block"]["bn"]["var"],
                             np.full(CHANNELS, 1 - 1e-5))
  # The default epsilon (what the model does not use) folds another model,
  # and says so.
  with pytest.warns(UserWarning, match="default epsilon"):
    wrong = jaxq.fold_batchnorm(variables, pairs)
  assert not np.allclose(model.apply(wrong, x), expected, rtol=1e-2)


def test_linen_explicit_epsilon_must_agree_with_the_module():
  model, x, variables = _small_variance_model()
  with pytest.raises(ValueError, match="epsilon 1e-05.*'bn'.*epsilon=0.001"):
    jaxq.fold_batchnorm(variables, {"conv": "bn"}, epsilon=1e-5, model=model,
                        batch=x)
  agreed = jaxq.fold_batchnorm(variables, {"conv": "bn"}, epsilon=1e-3,
                               model=model, batch=x)
  read = jaxq.fold_batchnorm(variables, {"conv": "bn"}, model=model,
                                  batch=x)
  np.testing.assert_array_equal(agreed["params"]["conv"]["kernel"],
                                read["params"]["conv"]["kernel"])
  with pytest.raises(ValueError, match="no nn.BatchNorm at 'bnn'"):
    jaxq.fold_batchnorm(variables, {"conv": "bnn"}, model=model, batch=x)
  with pytest.raises(ValueError, match="model= and batch= together"):
    jaxq.fold_batchnorm(variables, {"conv": "bn"}, model=model)


def test_linen_use_scale_and_axis_come_from_the_module():

  class NoScale(nn.Module):

    axis: int = -1

    @nn.compact
    def __call__(self, x):
      x = nn.Dense(4, name="dense")(x)
      return nn.BatchNorm(use_running_average=True, use_scale=False,
                          axis=self.axis, epsilon=1e-2, name="bn")(x)

  x = jax.random.normal(jax.random.key(0), (3, 4))
  model = NoScale()
  variables = _randomise_batchnorm(model.init(jax.random.key(1), x),
                                   jax.random.key(2))
  folded = jaxq.fold_batchnorm(variables, {"dense": "bn"}, model=model,
                               batch=x)
  np.testing.assert_allclose(model.apply(folded, x), model.apply(variables, x),
                             rtol=1e-5, atol=1e-5)
  # Params from another model (with a scale) disagree with use_scale=False.
  other = {**variables, "params": {**variables["params"], "bn": {
      **variables["params"]["bn"], "scale": jnp.ones(4)}}}
  with pytest.raises(ValueError, match="'bn' has use_scale=False"):
    jaxq.fold_batchnorm(other, {"dense": "bn"}, model=model, batch=x)
  square = NoScale(axis=0)
  y = jnp.ones((4, 4))
  with pytest.raises(ValueError, match="'bn' does not normalise the last"):
    jaxq.fold_batchnorm(square.init(jax.random.key(1), y), {"dense": "bn"},
                        model=square, batch=y)


def test_nnx_small_variance_epsilon_from_the_module():
  model = NnxConvBN(1, True, nnx.Rngs(0))  # bn: epsilon=1e-3.
  model.bn.var[...] = jnp.full((CHANNELS,), 1e-4)
  model.bn.mean[...] = jnp.linspace(-1, 1, CHANNELS)
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, CHANNELS))
  expected = model(x)
  folded = nnx.clone(model)
  jaxq.fold_batchnorm(folded.conv, folded.bn)
  jaxq.fold_batchnorm(folded.linear, folded.bn2)
  np.testing.assert_allclose(folded(x), expected, rtol=1e-4,
                             atol=1e-4 * float(jnp.max(jnp.abs(expected))))
