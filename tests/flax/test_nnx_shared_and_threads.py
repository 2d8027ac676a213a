"""nnx: shared layers (one layer reachable by two paths) and calls from threads.

A shared nnx layer is quantized at every use, as linen quantizes every call
of a shared submodule: `jaxq.layers` lists it once, at the path where
``nnx.state`` keeps its parameters (its first path), calibration records
every call, and serve equals QAT. A quantized model is safe to call from
several threads at once: a call never changes the module's attributes.
"""

from __future__ import annotations

import concurrent.futures

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxq
from jaxq import PerChannel, PerTensor, QuantSpec
from jaxq.flax import QuantStat

_W = QuantSpec("int8", PerChannel(axis=-1))
_STATIC = [jaxq.Rule(r".*", weight=_W,
                     act=QuantSpec("int8", PerTensor(), dynamic=False))]
_DYNAMIC = [jaxq.Rule(r".*", weight=_W, act=QuantSpec("int8", PerTensor()))]
_D = 8


class _Alias(nnx.Module):
  """``b`` is ``a``: one layer, two attribute paths, called twice."""

  def __init__(self, rngs: nnx.Rngs):
    self.a = nnx.Linear(_D, _D, rngs=rngs)
    self.b = self.a
    self.head = nnx.Linear(_D, 3, rngs=rngs)

  def __call__(self, x):
    # The second call's inputs are the larger: its range must be recorded.
    return self.head(jnp.tanh(self.b(4.0 * jnp.tanh(self.a(x)))))


class _Twice(nnx.Module):
  """The same layer twice in a list."""

  def __init__(self, rngs: nnx.Rngs):
    layer = nnx.Linear(_D, _D, rngs=rngs)
    self.blocks = nnx.List([layer, layer])

  def __call__(self, x):
    for block in self.blocks:
      x = 4.0 * jnp.tanh(block(x))
    return x


def _x(seed: int = 1, batch: int = 4) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, _D))


def _reference(model: nnx.Module, x: jax.Array, act_amax: dict[str, float]
               ) -> jax.Array:
  """The model's float forward with every Linear fake-quantized by hand."""

  def linear(layer, path, x):
    kernel = jaxq.fake_quant(layer.kernel.get_value(), _W)
    x = jaxq.fake_quant(x, _STATIC[0].act, amax=jnp.asarray(act_amax[path]))
    return x @ kernel + layer.bias.get_value()

  if isinstance(model, _Alias):
    h = 4.0 * jnp.tanh(linear(model.a, "a", x))
    h = jnp.tanh(linear(model.a, "a", h))
    return linear(model.head, "head", h)
  for _ in range(2):
    x = 4.0 * jnp.tanh(linear(model.blocks[0], "blocks/0", x))
  return x


def _act_inputs(model: nnx.Module, x: jax.Array) -> dict[str, jax.Array]:
  """Every input of every call of each distinct layer, concatenated."""
  if isinstance(model, _Alias):
    h1 = 4.0 * jnp.tanh(model.a(x))
    h2 = jnp.tanh(model.a(h1))
    return {"a": jnp.concatenate([x, h1]), "head": h2}
  h1 = 4.0 * jnp.tanh(model.blocks[0](x))
  return {"blocks/0": jnp.concatenate([x, h1])}


@pytest.mark.parametrize("model_cls", [_Alias, _Twice])
def test_shared_layer_is_quantized_at_every_use(model_cls):
  """Calibrate records both calls; QAT and serve quantize both uses."""
  model = model_cls(nnx.Rngs(0))
  x = _x()
  expected_paths = ["a", "head"] if model_cls is _Alias else ["blocks/0"]

  cal = jaxq.quantize_model(model, _STATIC, "calibrate")
  assert sorted(jaxq.layers(cal)) == expected_paths
  cal(x)
  stats = nnx.state(cal, QuantStat)
  ranges = jaxq.act_ranges(cal, stats)
  flat_ranges = dict(nnx.to_flat_state(ranges))
  inputs = _act_inputs(model, x)
  amax = {}
  for path in expected_paths:
    key = tuple(int(p) if p.isdigit() else p for p in path.split("/"))
    got = flat_ranges[key + ("jaxq_act_range",)].get_value()["amax"]
    want = jnp.max(jnp.abs(inputs[path]))
    if path != "head":  # The second call's inputs set the range.
      assert want > jnp.max(jnp.abs(x))
    np.testing.assert_allclose(np.ravel(got), [want], rtol=1e-6)
    amax[path] = float(np.ravel(got)[0])

  # The jitted calibration pass records both calls the same way.
  result = jaxq.calibrate(jaxq.quantize_model(model, _STATIC, "calibrate"),
                          None, [x])
  jax.tree.map(np.testing.assert_array_equal, result.ranges(), ranges)

  qat = jaxq.quantize_model(model, _STATIC, "qat")
  nnx.update(qat, ranges)
  reference = _reference(model, x, amax)
  np.testing.assert_allclose(qat(x), reference, rtol=1e-5, atol=1e-6)

  serve = jaxq.quantize_model(model, _STATIC, "serve")
  serving, report = jaxq.convert(serve, nnx.state(model), stats)
  assert [layer.path for layer in report.layers] == expected_paths
  nnx.update(serve, serving)
  np.testing.assert_allclose(serve(x), reference, rtol=1e-4, atol=1e-5)
  # Both uses hold the one quantized layer.
  if model_cls is _Alias:
    assert serve.a is serve.b and type(serve.b).__name__ == "QuantizedLinear"
  else:
    assert serve.blocks[0] is serve.blocks[1]


def test_shared_layer_with_rules_that_disagree_between_paths_raises():
  """A rule that would treat two paths of one layer differently refuses."""
  model = _Alias(nnx.Rngs(0))
  rules = [jaxq.Rule(r"b", skip=True), *_DYNAMIC]
  with pytest.raises(ValueError, match=r"'a'.*also reachable as 'b'"):
    jaxq.quantize_model(model, rules)


def _hammer(fn, inputs, workers: int = 4) -> list[jax.Array]:
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    return list(pool.map(fn, inputs))


@pytest.mark.parametrize("mode", ["qat", "serve"])
def test_quantized_model_is_safe_to_call_from_threads(mode):
  """Concurrent eager calls give the single-threaded outputs and leave the
  model unchanged (no hook or held weight left installed)."""
  model = _Alias(nnx.Rngs(0))
  qmodel = jaxq.quantize_model(model, _DYNAMIC, mode)
  if mode == "serve":
    serving, _ = jaxq.convert(qmodel, nnx.state(model))
    nnx.update(qmodel, serving)
  inputs = [_x(seed, batch=2) for seed in range(8)]
  alone = [qmodel(x) for x in inputs]
  together = _hammer(qmodel, inputs)
  for want, got in zip(alone, together):
    np.testing.assert_array_equal(got, want)
  after = [qmodel(x) for x in inputs]
  for want, got in zip(alone, after):
    np.testing.assert_array_equal(got, want)
  for name in ("promote_dtype", "dot_general", "kernel"):
    assert vars(qmodel.a)[name] is vars(model.a)[name] or name == "kernel"
  assert isinstance(vars(qmodel.a)["kernel"], nnx.Param)


def test_adapter_reads_a_state_changed_in_place():
  """The nnx adapter reads a state as it is now, not as it was first read."""
  model = _Alias(nnx.Rngs(0))
  qmodel = jaxq.quantize_model(model, _DYNAMIC)
  adapter = jaxq.flax.adapt(qmodel)
  state = nnx.state(qmodel)
  kernel, _ = adapter.get_weight("head", state)
  np.testing.assert_array_equal(kernel, model.head.kernel.get_value())
  state["head"]["kernel"] = nnx.Param(2.0 * kernel)
  np.testing.assert_array_equal(adapter.get_weight("head", state)[0],
                                2.0 * kernel)
  serving, _ = jaxq.convert(qmodel, state)
  nnx.update(qmodel, serving)
  np.testing.assert_allclose(
      jaxq.dequantize(qmodel.head.kernel.get_value()), 2.0 * kernel,
      atol=float(jnp.max(jnp.abs(kernel))) / 64)


@pytest.mark.parametrize("quantized", [False, True])
def test_capture_records_every_call_of_a_shared_layer(quantized):
  """capture_inputs gives one entry per call of a shared layer, in order."""
  model = _Alias(nnx.Rngs(0))
  if quantized:
    model = jaxq.quantize_model(model, _DYNAMIC)
  x = _x()
  inputs = jaxq.flax.adapt(model).capture_inputs([x], ["a"]).inputs["a"]
  assert len(inputs) == 2
  np.testing.assert_array_equal(inputs[0][0], x)
  np.testing.assert_allclose(inputs[1][0], 4.0 * jnp.tanh(model.a(x)),
                             rtol=1e-6, atol=1e-6)


class _Block(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Linear(_D, 2 * _D, rngs=rngs)
    self.down = nnx.Linear(2 * _D, _D, rngs=rngs)

  def __call__(self, x):
    return self.down(jnp.tanh(self.up(x)))


class _SharedBlock(nnx.Module):
  """A block shared by two paths: its layers are reachable as ``enc/...``
  and ``dec/...``, and through a dict."""

  def __init__(self, rngs: nnx.Rngs):
    self.enc = _Block(rngs)
    self.dec = self.enc
    self.table = nnx.Dict({"again": self.enc.up})

  def __call__(self, x):
    h = self.dec(jnp.tanh(self.enc(x)))
    return self.table["again"](h)


@pytest.mark.parametrize("mode", ["qat", "serve"])
def test_layers_of_a_shared_block_are_quantized_at_every_path(mode):
  """Every call of every layer of a shared block is quantized: the model
  equals a float model whose kernels are the fake-quantized ones, run on
  fake-quantized inputs (dynamic per-tensor ranges)."""
  model = _SharedBlock(nnx.Rngs(0))
  qmodel = jaxq.quantize_model(model, _DYNAMIC, mode)
  # Listed once, at the path nnx.state keeps (the first in nnx's order of
  # sorted attribute names: "dec" before "enc").
  assert sorted(jaxq.layers(qmodel)) == ["dec/down", "dec/up"]
  assert sorted(tuple(p) for p, _ in nnx.to_flat_state(
      nnx.state(qmodel, nnx.Param))
                ) == [("dec", "down", "bias"), ("dec", "down", "kernel"),
                      ("dec", "up", "bias"), ("dec", "up", "kernel")]
  if mode == "serve":
    serving, report = jaxq.convert(qmodel, nnx.state(model))
    assert len(report.layers) == 2
    nnx.update(qmodel, serving)
  x = _x()

  def linear(layer, x):
    x = jaxq.fake_quant(x, _DYNAMIC[0].act)
    return x @ jaxq.fake_quant(layer.kernel.get_value(), _W) + (
        layer.bias.get_value())

  def block(x):
    return linear(model.enc.down, jnp.tanh(linear(model.enc.up, x)))

  reference = linear(model.enc.up, block(jnp.tanh(block(x))))
  np.testing.assert_allclose(qmodel(x), reference, rtol=1e-4, atol=1e-5)
  assert not np.allclose(model(x), reference, rtol=1e-4, atol=1e-5)
