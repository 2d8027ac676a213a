"""Tests for `jaxq.flax.adapt`: one interface to linen and nnx models.

Twin models (the nnx one holds the linen one's weights) must give the same
layers, the same captured inputs, and kernels written back must round-trip
and change what the next capture sees.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq
from jaxq import PerChannel, QuantSpec

RULES = (jaxq.Rule(r".*", weight=QuantSpec("int8", PerChannel(axis=-1))),)


class LinenNet(nn.Module):
  """fc1, then ``shared`` twice (a shared layer), then fc2."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8, name="fc1")(x))
    shared = nn.Dense(8, name="shared")
    x = shared(nn.relu(shared(x)))
    return nn.Dense(3, name="fc2")(x)


class NnxNet(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(4, 8, rngs=rngs)
    self.shared = nnx.Linear(8, 8, rngs=rngs)
    self.fc2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.fc1(x))
    x = self.shared(nnx.relu(self.shared(x)))
    return self.fc2(x)


def _twins():
  x = jax.random.normal(jax.random.key(0), (5, 4))
  linen = LinenNet()
  variables = linen.init(jax.random.key(1), x)
  net = NnxNet(nnx.Rngs(0))
  for name in ("fc1", "shared", "fc2"):
    layer = getattr(net, name)
    layer.kernel.set_value(variables["params"][name]["kernel"])
    layer.bias.set_value(variables["params"][name]["bias"])
  batches = [x, jax.random.normal(jax.random.key(2), (3, 4))]
  return linen, variables, net, batches


def _adapters():
  linen, variables, net, batches = _twins()
  linen_adapter = jaxq.flax.adapt(linen, variables).quantize(RULES, "qat")
  linen_adapter.ordered_layers(batches[0])  # linen knows layers once traced.
  nnx_adapter = jaxq.flax.adapt(net).quantize(RULES, "qat")
  return linen_adapter, nnx_adapter, batches


def test_linen_and_nnx_give_the_same_layers():
  linen_adapter, nnx_adapter, batches = _adapters()
  linen_layers = linen_adapter.layers()
  nnx_layers = nnx_adapter.ordered_layers(batches[0])
  assert list(linen_layers) == list(nnx_layers) == ["fc1", "shared", "fc2"]
  for path in linen_layers:
    assert linen_layers[path].weight_shape == nnx_layers[path].weight_shape
    assert linen_layers[path].weight == nnx_layers[path].weight


def test_captured_inputs_agree_and_shared_layers_are_call_by_call():
  linen_adapter, nnx_adapter, batches = _adapters()
  paths = ["fc1", "shared", "fc2"]
  from_linen = linen_adapter.capture_inputs(batches, paths)
  from_nnx = nnx_adapter.capture_inputs(batches, paths)
  for path in paths:
    assert len(from_linen.inputs[path]) == len(from_nnx.inputs[path])
    for calls_l, calls_n in zip(from_linen.inputs[path],
                                from_nnx.inputs[path]):
      assert len(calls_l) == len(calls_n) == len(batches)
      for a, b in zip(calls_l, calls_n):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert len(from_linen.inputs["shared"]) == 2  # Two calls of one layer.
  assert from_linen.inputs["fc1"][0][1].shape == (3, 4)
  # The first layer sees the batch itself; its output feeds the relu.
  np.testing.assert_array_equal(from_nnx.inputs["fc1"][0][0], batches[0])
  kernel, bias = nnx_adapter.get_weight("fc1")
  np.testing.assert_allclose(
      from_nnx.outputs["fc1"][0][0],
      batches[0] @ jaxq.fake_quant(kernel, RULES[0].weight) + bias,
      rtol=1e-5, atol=1e-5)
  assert from_linen.masks == (None, None)


def test_batch_mask_is_returned_not_passed_to_the_model():
  linen_adapter, _, batches = _adapters()
  mask = jnp.array([True, True, False, True, False])
  batch = jaxq.flax.Batch(args=(batches[0],), mask=mask)
  captured = linen_adapter.capture_inputs([batch], ["fc1"])
  np.testing.assert_array_equal(captured.masks[0], mask)
  np.testing.assert_array_equal(captured.inputs["fc1"][0][0], batches[0])


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_kernel_write_back_round_trips_and_feeds_the_next_capture(api):
  linen_adapter, nnx_adapter, batches = _adapters()
  adapter = linen_adapter if api == "linen" else nnx_adapter
  kernel, bias = adapter.get_weight("fc1")
  assert kernel.shape == (4, 8) and bias.shape == (8,)
  new = 2.0 * kernel
  variables = adapter.set_kernel("fc1", new)
  got, got_bias = adapter.get_weight("fc1", variables)
  np.testing.assert_array_equal(got, new)
  np.testing.assert_array_equal(got_bias, bias)
  # The adapter's own variables are untouched.
  np.testing.assert_array_equal(adapter.get_weight("fc1")[0], kernel)
  # The next layer's captured input follows the new kernel.
  before = adapter.capture_inputs(batches[:1], ["shared"])
  after = adapter.capture_inputs(batches[:1], ["shared"], variables)
  w = jaxq.fake_quant(new, RULES[0].weight)
  np.testing.assert_allclose(after.inputs["shared"][0][0],
                             jax.nn.relu(batches[0] @ w + bias),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(before.inputs["shared"][0][0],
                         after.inputs["shared"][0][0])


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_unknown_paths_and_shapes_raise_naming_the_path(api):
  linen_adapter, nnx_adapter, batches = _adapters()
  adapter = linen_adapter if api == "linen" else nnx_adapter
  with pytest.raises(ValueError, match="no layer 'fc9'"):
    adapter.get_weight("fc9")
  with pytest.raises(ValueError, match="no layer 'fc9'"):
    adapter.set_kernel("fc9", jnp.zeros((4, 8)))
  with pytest.raises(ValueError, match=r"no layer at \['fc9'\]"):
    adapter.capture_inputs(batches, ["fc9"])
  with pytest.raises(ValueError, match=r"'fc1' has shape \(8, 4\)"):
    adapter.set_kernel("fc1", jnp.zeros((8, 4)))


def test_adapt_refuses_other_objects_and_wrong_variables():
  with pytest.raises(ValueError, match="expected a flax.linen or flax.nnx"):
    jaxq.flax.adapt(object())
  _, variables, net, _ = _twins()
  with pytest.raises(ValueError, match="variables must be an nnx.State"):
    jaxq.flax.adapt(net, variables)


class TwoInputs(nn.Module):

  @nn.compact
  def __call__(self, x, y, scale=1.0):
    return nn.Dense(3, name="fc")(x * scale + y)


def test_every_workflow_reads_a_batch_the_same_way():
  """Tuple: positional arguments; mapping: keyword arguments; Batch: both,
  its mask never reaching the model. calibrate follows the convention."""
  model = TwoInputs()
  x, y = (jax.random.normal(jax.random.key(i), (4, 5)) for i in (0, 1))
  variables = model.init(jax.random.key(2), x, y)
  rules = (jaxq.Rule(r".*", weight=QuantSpec("int8"),
                     act=QuantSpec("int8", dynamic=False)),)
  cal = jaxq.quantize_model(model, rules, mode="calibrate")
  expected = float(jnp.max(jnp.abs(2.0 * x + y)))
  batches = {
      "tuple": (x, y, 2.0),
      "mapping": {"x": x, "y": y, "scale": 2.0},
      "Batch": jaxq.flax.Batch(args=(x,), kwargs={"y": y, "scale": 2.0},
                               mask=jnp.ones((4,), bool)),
  }
  for kind, batch in batches.items():
    result = jaxq.calibrate(cal, variables, [batch], progress=False)
    amax = result.ranges()["fc"]["act"]["amax"]
    np.testing.assert_allclose(np.max(amax), expected, rtol=1e-6,
                               err_msg=kind)
    adapter = jaxq.flax.adapt(model, variables)
    np.testing.assert_allclose(adapter.apply(batch),
                               model.apply(variables, x, y, scale=2.0),
                               rtol=1e-6, err_msg=kind)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_float_model_sequential_pattern(api):
  """The loop of GPTQ-like algorithms on the FLOAT model: capture a layer's
  inputs under the variables modified so far, write its new kernel back."""
  linen, variables, net, batches = _twins()
  adapter = (jaxq.flax.adapt(linen, variables) if api == "linen"
             else jaxq.flax.adapt(net))
  assert not adapter.quantized
  current = adapter.variables
  for path in ("fc1", "shared"):
    inputs = adapter.capture_inputs(batches, [path], current)
    kernel, _ = adapter.get_weight(path, current)
    current = adapter.set_kernel(path, 0.5 * kernel, current)
  # fc1 halved: shared's first call sees relu(0.5 * (x @ w1) + b1).
  w1, b1 = adapter.get_weight("fc1", current)
  np.testing.assert_allclose(inputs.inputs["shared"][0][0],
                             jax.nn.relu(batches[0] @ w1 + b1),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(w1, 0.5 * adapter.get_weight("fc1")[0])
  if api == "nnx":  # The new state loads into the user's model.
    nnx.update(net, current)
    np.testing.assert_allclose(net.shared.kernel[...],
                               adapter.get_weight("shared", current)[0])
