"""Every `QuantSpec` field takes effect at every entry point it is accepted by.

A table lists, per field, a changed value and the entry points it applies
to; each row must change that entry point's result (values, range, or
gradient), or raise naming the field where the combination means nothing.
Fields that cannot apply to an entry point are listed with the reason, and
`test_the_table_covers_every_field` fails when a new field is missing, so
an option cannot be accepted silently.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import PerChannel, PerTensor, QuantSpec

BASE = QuantSpec("int8", PerTensor())
X = jnp.asarray(np.random.default_rng(0).standard_t(3, (8, 16)),
                jnp.float32).at[0, 0].set(-9.0)  # Negative end dominates.
KEY = jax.random.key(0)
STATIC_AMAX = jnp.float32(1.0)  # Clips X: the ste rows need elements outside.

# field -> (changed spec, entry points where it changes the result).
CHANGES = {
    "format": (BASE.replace(format="int4"),
               ("quantize", "fake_quant", "compute_range")),
    "granularity": (BASE.replace(granularity=PerChannel(-1)),
                    ("quantize", "fake_quant", "compute_range")),
    "symmetric": (QuantSpec("int8", symmetric=False),
                  ("quantize", "fake_quant", "compute_range")),
    "calibration": (BASE.replace(format="int4", calibration="mse"),
                    ("quantize", "fake_quant", "compute_range")),
    "percentile": (BASE.replace(calibration="percentile", percentile=90.0),
                   ("quantize", "fake_quant", "compute_range")),
    "narrow_range": (BASE.replace(narrow_range=False),
                     ("quantize", "fake_quant", "compute_range")),
    "rounding": (BASE.replace(rounding="stochastic"),
                 ("quantize", "fake_quant")),
    "ste": (BASE.replace(ste="identity"), ("fake_quant_grad",)),
    # The scales themselves on an 8-bit grid; the range is not theirs.
    "double_quant": (BASE.replace(granularity=PerChannel(-1), double_quant=4),
                     ("quantize", "fake_quant")),
}
# field -> why the primitives take no notice of it (it says where a layer's
# range comes from; the primitives take the range as an argument).
NOT_PRIMITIVE = {
    "dynamic": "a layer's act range per batch or calibrated; tested below",
    "learn": "a layer's trained range (jaxq.learned); tested below",
}
# Where the changed spec is compared to another than BASE: int4, whose
# coarse grid makes clipping the outlier pay (int8's mse keeps the max);
# the default percentile.
REFERENCE = {"calibration": BASE.replace(format="int4"),
             "double_quant": BASE.replace(granularity=PerChannel(-1)),
             "percentile": BASE.replace(calibration="percentile")}


def _entry(name: str, spec: QuantSpec):
  if name == "quantize":
    key = KEY if spec.rounding == "stochastic" else None
    qa = jaxq.quantize(X, spec, key=key)
    return [qa.values.astype(jnp.float32), qa.scale.astype(jnp.float32)]
  if name == "fake_quant":
    key = KEY if spec.rounding == "stochastic" else None
    return [jaxq.fake_quant(X, spec, key=key)]
  if name == "compute_range":
    return [r for r in jaxq.compute_range(X, spec) if r is not None]
  assert name == "fake_quant_grad"
  grad = jax.grad(lambda x: jnp.sum(jaxq.fake_quant(x, spec,
                                                    amax=STATIC_AMAX)))
  return [grad(X)]


def _differs(a, b) -> bool:
  if len(a) != len(b):
    return True
  return any(x.shape != y.shape or not np.array_equal(x, y)
             for x, y in zip(a, b))


def test_the_table_covers_every_field():
  fields = {f.name for f in dataclasses.fields(QuantSpec)}
  assert set(CHANGES) | set(NOT_PRIMITIVE) == fields


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_every_field_changes_the_primitives(field):
  changed, entries = CHANGES[field]
  reference = REFERENCE.get(field, BASE)
  for name in entries:
    assert _differs(_entry(name, changed), _entry(name, reference)), (
        f"{field} accepted by {name} without effect")


@pytest.mark.parametrize("calibration", ["percentile", "mse"])
def test_a_calibrated_range_is_what_quantize_uses(calibration):
  """quantize and fake_quant without amax use compute_range's clipped
  range, the same as jaxq.algorithms.weight_range, and fake_quant's
  clipped gradient then stops at it (the range no longer holds x)."""
  spec = QuantSpec("int4", PerChannel(-1), calibration=calibration,
                   percentile=90.0 if calibration == "percentile" else 99.99)
  amin, amax = jaxq.compute_range(X, spec)
  np.testing.assert_array_equal(amax, jaxq.algorithms.weight_range(X, spec)[1])
  max_amax = jaxq.compute_range(X, spec.replace(calibration="max"))[1]
  assert np.all(amax <= max_amax) and np.any(amax < max_amax)
  given = jaxq.quantize(X, spec, amax=amax, range_from_data=True)
  own = jaxq.quantize(X, spec)
  np.testing.assert_array_equal(own.values, given.values)
  np.testing.assert_array_equal(own.scale, given.scale)
  grad = jax.grad(lambda x: jnp.sum(jaxq.fake_quant(x, spec)))(X)
  assert np.any(np.asarray(grad) == 0.0)  # Clipped elements pass nothing.


def test_meaningless_combinations_raise_naming_the_field():
  with pytest.raises(ValueError, match="percentile=90.0 applies to "
                     "calibration='percentile' only"):
    QuantSpec("int8", calibration="max", percentile=90.0)
  entropy = QuantSpec("int8", calibration="entropy")
  for entry in (jaxq.quantize, jaxq.fake_quant, jaxq.compute_range):
    with pytest.raises(ValueError, match="calibration='entropy'"):
      entry(X, entropy)
  # With a given range the calibration has done its work already.
  jaxq.quantize(X, entropy, amax=STATIC_AMAX)
  # Changing the calibration drops a percentile that no longer applies.
  assert (QuantSpec(calibration="percentile", percentile=90.0)
          .replace(calibration="max").percentile == 99.99)


class _Dense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="fc")(x)


@pytest.fixture(scope="module")
def dense():
  model = _Dense()
  return model, model.init(jax.random.key(1), X)


def _served(model, variables, rule, mode="serve"):
  qmodel = jaxq.quantize_model(model, [rule], mode=mode)
  return np.asarray(qmodel.apply(variables, X))


def test_flax_layers_honour_every_range_field(dense):
  """Weight calibration (serve and convert alike), a dynamic act's
  calibration, ``dynamic`` and ``learn``: each changes the layer."""
  model, variables = dense
  w8 = QuantSpec("int4", PerChannel(-1))
  a8 = QuantSpec("int8", PerTensor())
  plain = _served(model, variables, jaxq.Rule(".*", weight=w8, act=a8))
  mse_w = w8.replace(calibration="mse")
  assert not np.array_equal(
      plain, _served(model, variables, jaxq.Rule(".*", weight=mse_w, act=a8)))
  # convert stores what jaxq.quantize gives for the spec.
  cal = jaxq.quantize_model(model, [jaxq.Rule(".*", weight=mse_w)],
                            mode="calibrate")
  cal.init(jax.random.key(1), X)  # linen learns its layers by tracing.
  serving, _ = jaxq.convert(cal, variables)
  stored = serving["params"]["fc"]["kernel"]
  np.testing.assert_array_equal(
      stored.values,
      jaxq.quantize(variables["params"]["fc"]["kernel"], mse_w).values)
  # A dynamic act spec's calibration is applied to each batch.
  pct_a = a8.replace(calibration="percentile", percentile=90.0)
  assert not np.array_equal(
      plain, _served(model, variables, jaxq.Rule(".*", weight=w8, act=pct_a)))
  # dynamic=False: the calibrated (here: too small) static range is used.
  static = jaxq.quantize_model(
      model, [jaxq.Rule(".*", weight=w8, act=a8.replace(dynamic=False))])
  ranges = {"quant_ranges": {"fc": {"act": {"amax": jnp.ones((1, 1))}}}}
  assert not np.array_equal(plain, np.asarray(static.apply(
      {**variables, **ranges}, X)))
  # learn="lsq": a trainable scale parameter appears.
  learned = jaxq.quantize_model(
      model, [jaxq.Rule(".*", weight=w8.replace(learn="lsq"), act=a8)],
      mode="qat")
  params = learned.init(jax.random.key(1), X)
  assert "weight_scale" in str(jax.tree_util.tree_structure(params))


@pytest.mark.parametrize("rule,match", [
    (jaxq.Rule(".*", act=QuantSpec("int8", calibration="entropy")),
     "act spec of 'fc'.*dynamic.*calibration='entropy'"),
    (jaxq.Rule(".*", weight=QuantSpec("int8", rounding="stochastic")),
     "weight spec of 'fc'.*rounding='stochastic'"),
    (jaxq.Rule(".*", weight=QuantSpec("int8", calibration="entropy")),
     "weight spec of 'fc'.*calibration='entropy'"),
    (jaxq.Rule(".*", weight=QuantSpec("int8", dynamic=False)),
     "weight spec of 'fc'.*dynamic=False"),
])
def test_flax_layers_refuse_a_field_they_cannot_honour(dense, rule, match):
  model, variables = dense
  with pytest.raises(ValueError, match=match):
    _served(model, variables, rule, mode="qat")


def test_int8_forward_honours_clipped_ranges_in_its_ste_gradient(dense):
  """A clipped weight range (mse) and a clipped dynamic act range
  (percentile): the int8 forward quantizes with them and its exact STE
  gradient masks what they clip, as fake-quant does."""
  model, variables = dense
  rule = jaxq.Rule(".*", weight=QuantSpec("int4", PerChannel(-1),
                                          calibration="mse"),
                   act=QuantSpec("int8", calibration="percentile",
                                 percentile=90.0))
  cotangent = jax.random.normal(jax.random.key(5), (X.shape[0], 4))

  def loss_and_grads(**options):
    qmodel = jaxq.quantize_model(model, [rule], mode="qat", **options)
    loss = lambda params, x: jnp.sum(cotangent * qmodel.apply(
        {"params": params}, x))
    return jax.value_and_grad(loss, argnums=(0, 1))(variables["params"], X)

  (loss, grads), (loss8, grads8) = (
      loss_and_grads(), loss_and_grads(int8_forward=True, backward="ste"))
  np.testing.assert_allclose(loss8, loss, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads8), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The masks do clip: some input element passes no gradient.
  assert np.any(np.asarray(grads[1]) == 0.0)
