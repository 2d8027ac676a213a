"""`jaxq.calibrate`: the jitted PTQ pass on linen and nnx models.

References are numpy forward passes written here: a two-layer MLP whose
layers' inputs are ``x`` and ``relu(x @ w0 + b0)``.
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
from jaxq import PerChannel, PerTensor, PerToken, QuantSpec

W8 = QuantSpec("int8", PerChannel(axis=-1))
A8_STATIC = QuantSpec("int8", PerTensor(), dynamic=False)
STATIC_RULES = (jaxq.Rule(r".*", weight=W8, act=A8_STATIC),)
FEATURES, HIDDEN, OUT = 8, 16, 4
METHODS = ("max", "entropy", "percentile:99.99", "percentile:99.999", "mse")


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    hidden = nn.relu(nn.Dense(HIDDEN)(x))
    return nn.Dense(OUT)(hidden)


class NnxMLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(FEATURES, HIDDEN, rngs=rngs)
    self.fc2 = nnx.Linear(HIDDEN, OUT, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.fc1(x)))


def _batches(n: int = 3, rows: int = 16, seed: int = 0) -> list[jax.Array]:
  """Laplace batches whose scale grows, so histogram ranges must grow."""
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.laplace(scale=1.0 + i, size=(rows, FEATURES)),
                      jnp.float32) for i in range(n)]


def _linen(rules=STATIC_RULES, **kwargs):
  model = LinenMLP()
  variables = model.init(jax.random.key(0), jnp.zeros((1, FEATURES)))
  return (jaxq.quantize_model(model, rules, "calibrate", **kwargs), variables,
          model)


def _nnx(rules=STATIC_RULES, **kwargs):
  model = NnxMLP(nnx.Rngs(0))
  return jaxq.quantize_model(model, rules, "calibrate", **kwargs), model


def _layer_inputs(w0, b0, x) -> tuple[np.ndarray, np.ndarray]:
  x = np.asarray(x, np.float64)
  return x, np.maximum(x @ np.asarray(w0) + np.asarray(b0), 0.0)


def _reference_amax(w0, b0, batches) -> tuple[float, float]:
  inputs = [_layer_inputs(w0, b0, x) for x in batches]
  return (max(np.abs(a).max() for a, _ in inputs),
          max(np.abs(h).max() for _, h in inputs))


def _amax(ranges, *path) -> np.ndarray:
  node = ranges
  for name in path:
    node = node[name]
  return np.asarray(node.get_value()["amax"] if hasattr(node, "get_value")
                    else node["amax"])


def test_calibrate_linen_records_max_of_every_layer_input():
  cal, variables, _ = _linen()
  batches = _batches()
  result = jaxq.calibrate(cal, variables, batches, progress=False)
  params = variables["params"]
  first, second = _reference_amax(params["Dense_0"]["kernel"],
                                  params["Dense_0"]["bias"], batches)
  ranges = result.ranges()
  np.testing.assert_allclose(_amax(ranges, "Dense_0", "act"), [[first]],
                             rtol=1e-6)
  np.testing.assert_allclose(_amax(ranges, "Dense_1", "act"), [[second]],
                             rtol=1e-5)
  assert result.num_batches == 3
  assert result.nonfinite == {"Dense_0": 0, "Dense_1": 0}
  # The stats are what jaxq.convert consumes.
  serving, _ = jaxq.convert(cal, variables, result.stats)
  jax.tree.map(np.testing.assert_array_equal, serving["quant_ranges"], ranges)


def test_calibrate_nnx_records_max_of_every_layer_input():
  cal, model = _nnx()
  batches = _batches()
  result = jaxq.calibrate(cal, None, batches, progress=False)
  first, second = _reference_amax(model.fc1.kernel.get_value(),
                                  model.fc1.bias.get_value(), batches)
  ranges = result.ranges()
  np.testing.assert_allclose(_amax(ranges, "fc1", "jaxq_act_range"),
                             [[first]], rtol=1e-6)
  np.testing.assert_allclose(_amax(ranges, "fc2", "jaxq_act_range"),
                             [[second]], rtol=1e-5)
  assert result.nonfinite == {"fc1": 0, "fc2": 0}
  assert not nnx.state(cal, jaxq.flax.QuantStat)  # The model is untouched.
  # Variables given explicitly are the ones calibrated.
  doubled = jax.tree.map(lambda p: 2 * p, nnx.state(model, nnx.Param))
  result = jaxq.calibrate(cal, doubled, batches, progress=False)
  _, second_doubled = _reference_amax(2 * model.fc1.kernel.get_value(),
                                      2 * model.fc1.bias.get_value(), batches)
  np.testing.assert_allclose(
      _amax(result.ranges(), "fc2", "jaxq_act_range"), [[second_doubled]],
      rtol=1e-5)


def _spec_for(method: str) -> QuantSpec:
  kind, _, q = method.partition(":")
  if kind == "percentile":
    return A8_STATIC.replace(calibration="percentile", percentile=float(q))
  return A8_STATIC.replace(calibration=kind)


@pytest.mark.parametrize("framework,methods", [("linen", METHODS),
                                               ("nnx", ("mse", "max"))])
def test_one_pass_with_several_methods_equals_a_pass_per_method(framework,
                                                                 methods):
  batches = _batches()
  if framework == "linen":
    cal, variables, _ = _linen()
    make = lambda rules: _linen(rules)[0]
  else:
    (cal, _), variables = _nnx(), None
    make = lambda rules: _nnx(rules)[0]
  result = jaxq.calibrate(cal, variables, batches, methods, progress=False)
  assert result.methods == methods
  chosen = {}
  for method in methods:
    rules = (jaxq.Rule(r".*", weight=W8, act=_spec_for(method)),)
    alone = jaxq.calibrate(make(rules), variables, batches, progress=False)
    jax.tree.map(np.testing.assert_array_equal, result.ranges(method),
                 alone.ranges())
    chosen[method] = jax.tree.leaves(result.ranges(method))
  # The methods disagree on Laplace data: max is the largest range.
  for method in methods:
    assert np.all(np.asarray(chosen[method]) <= np.asarray(chosen["max"]))
  assert len({tuple(np.ravel(c)) for c in chosen.values()}) > 1
  # The rules' own method (max here) finalizes the histograms too.
  jax.tree.map(np.testing.assert_array_equal, result.ranges(),
               result.ranges("max"))


def test_methods_as_observers_and_convert_with_ranges():
  cal, variables, model = _linen()
  batches = _batches()
  observers = {"p99": jaxq.observers.percentile(99.0, num_bins=256),
               "kl": jaxq.observers.entropy(num_bins=256, start_bin=32)}
  result = jaxq.calibrate(cal, variables, batches, observers, progress=False)
  state = result.stats["Dense_0"]["act"]
  assert state.num_bins == 256
  for name, observer in observers.items():
    np.testing.assert_array_equal(
        _amax(result.ranges(name), "Dense_0", "act"), observer.finalize(state))
  serving, _ = jaxq.convert(cal, variables, ranges=result.ranges("kl"))
  jax.tree.map(np.testing.assert_array_equal, serving["quant_ranges"],
               result.ranges("kl"))
  serve = jaxq.quantize_model(model, STATIC_RULES, "serve")
  clipped = serve.apply(serving, batches[-1])
  assert clipped.shape == (batches[-1].shape[0], OUT)
  # Stats beside ranges serve "mse" weights only: the act ranges are kl's.
  both, _ = jaxq.convert(cal, variables, result.stats,
                         ranges=result.ranges("kl"))
  jax.tree.map(np.testing.assert_array_equal, both["quant_ranges"],
               result.ranges("kl"))


def test_bad_methods_raise():
  cal, variables, _ = _linen()
  batches = _batches(1)
  with pytest.raises(ValueError, match="unknown method 'kl'"):
    jaxq.calibrate(cal, variables, batches, ("kl",), progress=False)
  with pytest.raises(ValueError, match="string 'entropy'"):
    jaxq.calibrate(cal, variables, batches, "entropy", progress=False)
  with pytest.raises(ValueError, match="bin counts differ"):
    jaxq.calibrate(cal, variables, batches,
                   {"a": jaxq.observers.entropy(num_bins=256),
                    "b": jaxq.observers.mse(num_bins=512)}, progress=False)
  result = jaxq.calibrate(cal, variables, batches, ("max",), progress=False)
  with pytest.raises(ValueError, match="unknown method 'mse'"):
    result.ranges("mse")
  # An affine static layer cannot keep the methods' shared histogram.
  rules = (jaxq.Rule(r"Dense_1", weight=W8,
                     act=A8_STATIC.replace(format="uint8", symmetric=False)),
           jaxq.Rule(r".*", weight=W8, act=A8_STATIC))
  cal, variables, model = _linen(rules)
  with pytest.raises(ValueError, match=r"\{'Dense_1': QuantSpec\(format='uint8"):
    jaxq.calibrate(cal, variables, batches, ("entropy",), progress=False)
  qat = jaxq.quantize_model(model, STATIC_RULES, "qat")
  with pytest.raises(ValueError, match="mode='calibrate'.*'qat'"):
    jaxq.calibrate(qat, variables, batches, progress=False)


def test_empty_batches_raise():
  cal, variables, _ = _linen()
  for empty in ([], iter([])):
    with pytest.raises(ValueError, match="batch iterator is empty"):
      jaxq.calibrate(cal, variables, empty, progress=False)


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_nonfinite_batch_raises_naming_batch_and_layer(framework):
  batches = _batches()
  batches[1] = batches[1].at[3, 2].set(jnp.nan)
  if framework == "linen":
    cal, variables, _ = _linen()
    first, second = "Dense_0", "Dense_1"
  else:
    (cal, _), variables = _nnx(), None
    first, second = "fc1", "fc2"
  with pytest.raises(ValueError, match=(
      rf"batch 1 holds non-finite.*'{first}' \(1\), '{second}' "
      rf"\({HIDDEN}\).*on_nonfinite='count'")):
    jaxq.calibrate(cal, variables, batches, progress=False)


def test_nonfinite_counted_on_request():
  batches = _batches()
  batches[1] = batches[1].at[3, 2].set(jnp.nan).at[5, 0].set(jnp.nan)
  cal, variables, _ = _linen()
  counted = jaxq.calibrate(cal, variables, batches, ("max", "entropy"),
                           progress=False, on_nonfinite="count")
  # The NaN rows reach the whole hidden layer: 2 rows of HIDDEN values.
  assert counted.nonfinite == {"Dense_0": 2, "Dense_1": 2 * HIDDEN}
  finite = [np.where(np.isfinite(x), x, 0.0) for x in batches]
  np.testing.assert_allclose(
      _amax(counted.ranges("max"), "Dense_0", "act"),
      [[max(np.abs(x).max() for x in finite)]], rtol=1e-6)
  # The model's own setting is the default.
  model_counts, _ = _nnx(on_nonfinite="count")
  assert jaxq.calibrate(model_counts, None, batches, progress=False
                        ).nonfinite == {"fc1": 2, "fc2": 2 * HIDDEN}


def test_progress_false_prints_nothing(capfd):
  cal, variables, _ = _linen()
  jaxq.calibrate(cal, variables, _batches(2), progress=False)
  out, err = capfd.readouterr()
  assert out == "" and err == ""


def test_one_trace_for_all_batches_of_one_shape():
  cal, variables, _ = _linen()
  traces = []

  def forward(model, batch):
    traces.append(batch.shape)
    return model(batch)

  jaxq.calibrate(cal, variables, _batches(6), forward=forward,
                 progress=False)
  # One abstract trace for the stats' shapes, one for the compiled step.
  assert traces == [(16, FEATURES)] * 2
  traces.clear()
  jaxq.calibrate(cal, variables, _batches(3) + _batches(3, rows=8),
                 forward=forward, progress=False)
  assert traces == [(16, FEATURES)] * 2 + [(8, FEATURES)]


def _reference_serve(w0, b0, w1, b1, x, amax0):
  """Dense_0 with a static input range, Dense_1 per-token dynamic."""

  def fake_quant(a, amax):
    scale = np.maximum(amax, 1e-30) / 127.0
    return np.clip(np.round(a / scale), -127, 127) * scale

  def weight(w):
    return fake_quant(np.asarray(w, np.float64),
                      np.abs(np.asarray(w)).max(axis=0, keepdims=True))

  x = np.asarray(x, np.float64)
  h = np.maximum(fake_quant(x, amax0) @ weight(w0) + np.asarray(b0), 0.0)
  token_amax = np.abs(h).max(axis=-1, keepdims=True)
  return fake_quant(h, token_amax) @ weight(w1) + np.asarray(b1)


def test_static_and_dynamic_act_ranges_chosen_per_rule():
  rules = (jaxq.Rule(r"Dense_0", weight=W8, act=A8_STATIC),
           jaxq.Rule(r"Dense_1", weight=W8, act=QuantSpec("int8", PerToken())))
  cal, variables, model = _linen(rules)
  batches = _batches()
  result = jaxq.calibrate(cal, variables, batches, progress=False)
  assert set(result.stats["Dense_0"]) == {"weight", "act"}
  assert set(result.stats["Dense_1"]) == {"weight"}  # Dynamic: no act stats.
  assert set(result.ranges()) == {"Dense_0"}
  serving, _ = jaxq.convert(cal, variables, result.stats)
  serve = jaxq.quantize_model(model, rules, "serve")
  params = variables["params"]
  amax0 = float(_amax(result.ranges(), "Dense_0", "act")[0, 0])
  # A batch beyond the calibrated range: the static input clips.
  for x in (batches[0], 3.0 * batches[-1]):
    expected = _reference_serve(params["Dense_0"]["kernel"],
                                params["Dense_0"]["bias"],
                                params["Dense_1"]["kernel"],
                                params["Dense_1"]["bias"], x, amax0)
    np.testing.assert_allclose(serve.apply(serving, x), expected, rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("methods", [None, ("entropy",)])
@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_sharded_batches_give_single_device_stats(framework, methods):
  mesh = Mesh(np.array(jax.devices()), ("data",))
  assert mesh.size == 8
  batches = _batches(3, rows=32)
  sharded = [jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
             for x in batches]
  if framework == "linen":
    cal, variables, _ = _linen()
  else:
    (cal, _), variables = _nnx(), None
  single = jaxq.calibrate(cal, variables, batches, methods, progress=False)
  spread = jaxq.calibrate(cal, variables, sharded, methods, progress=False)
  assert len(jax.tree.leaves(spread.stats)) == len(
      jax.tree.leaves(single.stats))
  jax.tree.map(np.testing.assert_array_equal, spread.stats, single.stats)
  leaf = jax.tree.leaves(spread.stats)[0]
  assert len(leaf.sharding.device_set) == 8
