"""`jaxq.flax.checks`: a layer's static range is valid exactly when the
primitives' `jaxq.range_checks.check_range` says so, named by the layer."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxq import PerChannel, QuantSpec
from jaxq.flax import checks
from jaxq.range_checks import check_range

SYMMETRIC = QuantSpec("int8", PerChannel(axis=-1))
AFFINE = QuantSpec("uint8", PerChannel(axis=-1), symmetric=False)

_RANGES = [
    (SYMMETRIC, {"amax": jnp.array([0.0, 1.0])}),
    (SYMMETRIC, {"amax": jnp.array([1.0, jnp.nan])}),
    (SYMMETRIC, {"amax": jnp.array([jnp.inf, 1.0])}),
    (SYMMETRIC, {"amax": jnp.array([1.0, -2.0])}),
    (SYMMETRIC, {"amin": jnp.array([5.0, 5.0]), "amax": jnp.array([1.0, 1.0])}),
    (AFFINE, {"amin": jnp.array([-1.0, 0.0]), "amax": jnp.array([1.0, 0.0])}),
    (AFFINE, {"amin": jnp.array([0.0, 3.0]), "amax": jnp.array([1.0, 2.0])}),
    (AFFINE, {"amin": jnp.array([-jnp.inf, 0.0]),
              "amax": jnp.array([1.0, 1.0])}),
    (AFFINE, {"amax": jnp.array([1.0, 1.0])}),
]


def _error(fn) -> str | None:
  try:
    fn()
  except ValueError as e:
    return str(e)
  return None


@pytest.mark.parametrize("spec,act_range", _RANGES)
def test_act_range_check_is_check_range_naming_the_layer(spec, act_range):
  expected = _error(lambda: check_range(spec, act_range["amax"],
                                        act_range.get("amin")))
  got = _error(lambda: checks.check_act_range("convert", "enc/Dense_1",
                                              act_range, spec))
  if expected is None:
    assert got is None
  else:
    assert got == (f"convert: the static activation range of layer "
                   f"'enc/Dense_1' is invalid: {expected}")


def test_range_without_a_spec_is_affine_when_it_holds_amin():
  bad = {"amin": jnp.array([2.0]), "amax": jnp.array([1.0])}
  with pytest.raises(ValueError, match=r"'fc'.*greater than amax"):
    checks.check_act_range("jaxq", "fc", bad, None)
  checks.check_act_range("jaxq", "fc", {"amax": np.array([3.0])}, None)
  with pytest.raises(ValueError, match=r"'fc'.*non-negative"):
    checks.check_act_range("jaxq", "fc", {"amax": np.array([-3.0])}, None)
