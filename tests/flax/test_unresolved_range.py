"""A histogram range the histogram cannot resolve warns naming the layer.

One batch of ordinary values and then one with two 1e30 outliers grow the
|x| histogram to 1e30, bins about 5e26 wide: the 99th percentile lands in
the first bin, every ordinary input would quantize to 0, and
`jaxq.act_ranges` says so, naming the layer (`jaxq.flax.core.finalize_range`).
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import numpy as np
import pytest

import jaxq
from jaxq import PerTensor, QuantSpec

ACT = QuantSpec("int8", PerTensor(), dynamic=False, calibration="percentile",
                percentile=99.0)


class _Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="fc")(x)


@pytest.fixture(scope="module")
def calibrated():
  model = _Model()
  ordinary = jax.random.normal(jax.random.key(0), (64, 4))
  cal = jaxq.quantize_model(model, [jaxq.Rule(".*", act=ACT)],
                            mode="calibrate")
  variables = cal.init(jax.random.key(1), ordinary)
  outliers = ordinary.at[0, :2].set(1e30)
  return cal, variables, ordinary, outliers


def _stats(cal, variables, batches):
  return jaxq.calibrate(cal, variables, batches, progress=False).stats


def test_a_range_inside_the_first_bin_warns_naming_the_layer(calibrated):
  cal, variables, ordinary, outliers = calibrated
  stats = _stats(cal, variables, [ordinary * 1e-3, outliers])
  with pytest.warns(UserWarning, match="range of 'fc'.*first bin"):
    ranges = jaxq.act_ranges(cal, stats)
  amax = float(np.asarray(ranges["fc"]["act"]["amax"]).ravel()[0])
  assert amax > 1e25  # What the warning is about: far above every input.


def test_a_resolved_range_does_not_warn(calibrated):
  cal, variables, ordinary, _ = calibrated
  stats = _stats(cal, variables, [ordinary * 1e-3, ordinary])
  with warnings.catch_warnings():
    warnings.simplefilter("error", UserWarning)
    ranges = jaxq.act_ranges(cal, stats)
  assert 0 < float(np.asarray(ranges["fc"]["act"]["amax"]).ravel()[0]) < 5
