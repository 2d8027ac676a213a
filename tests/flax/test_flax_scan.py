"""linen ``nn.scan`` (and ``nn.remat``) over layers: stacked kernels.

Large models scan one block over ``L`` layers, so each kernel is stored
``(L, d_in, d_out)`` and the layer sees one ``(d_in, d_out)`` slice per
iteration. With ``jaxq.flax.SCAN_AXES`` in the scan's ``variable_axes``,
calibration records one range per layer (stacked ``(L, ...)``), QAT equals
an unrolled twin with the same weights, convert quantizes per layer slice
and serve equals QAT. Without it, the error says what to add.
"""

from __future__ import annotations

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import PerChannel, PerTensor, QuantSpec

# Two layers are enough to tell per-layer ranges and kernels from one shared
# across the stack, and each extra layer is one more unrolled-twin layer
# (and its programs) to compile.
L, D, HIDDEN = 2, 8, 16
RULES = (jaxq.Rule(r".*", weight=QuantSpec("int8", PerChannel(axis=-1)),
                   act=QuantSpec("int8", PerTensor(), dynamic=False)),)


class Block(nn.Module):
  """A residual MLP block: ``x + down(relu(up(x)))``."""

  @nn.compact
  def __call__(self, x, _):
    h = nn.relu(nn.Dense(HIDDEN, name="up")(x))
    return x + nn.Dense(D, name="down")(h), None


class Scanned(nn.Module):
  """``L`` blocks as one ``nn.scan``, the way large models are written."""

  axes: tuple = tuple(jaxq.flax.SCAN_AXES.items())
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="inp")(x)
    block = nn.remat(Block) if self.remat else Block
    stack = nn.scan(block, variable_axes={"params": 0, **dict(self.axes)},
                    split_rngs={"params": True}, length=L)
    x, _ = stack(name="layers")(x, None)
    return nn.Dense(2, name="head")(x)


class Unrolled(nn.Module):
  """The same blocks one by one (``layers_0`` ...)."""

  remat: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(D, name="inp")(x)
    block = nn.remat(Block) if self.remat else Block
    for i in range(L):
      x, _ = block(name=f"layers_{i}")(x, None)
    return nn.Dense(2, name="head")(x)


def _unrolled_params(params):
  """The scanned params laid out for `Unrolled` (layer ``i``'s slices)."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(L):
    out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
  return out


def _x(seed=1):
  return jax.random.normal(jax.random.key(seed), (4, D))


@pytest.fixture(scope="module")
def scanned():
  model = Scanned()
  variables = model.init(jax.random.key(0), _x())
  cal = jaxq.quantize_model(model, RULES, "calibrate")
  result = jaxq.calibrate(cal, variables, [_x(), 3.0 * _x(2)], progress=False)
  return model, variables, cal, result.ranges()


def test_calibrate_records_one_range_per_layer_stacked(scanned):
  model, variables, _, ranges = scanned
  twin = Unrolled()
  twin_vars = {"params": _unrolled_params(variables["params"])}
  twin_cal = jaxq.quantize_model(twin, RULES, "calibrate")
  twin_ranges = jaxq.calibrate(twin_cal, twin_vars, [_x(), 3.0 * _x(2)],
                               progress=False).ranges()
  for name in ("up", "down"):
    amax = ranges["layers"][name]["act"]["amax"]
    assert amax.shape == (L, 1, 1)
    for i in range(L):
      np.testing.assert_array_equal(
          amax[i], twin_ranges[f"layers_{i}"][name]["act"]["amax"])
  # Layers differ, so the ranges are per layer, not one shared range.
  assert len(set(np.asarray(ranges["layers"]["up"]["act"]["amax"]).ravel())
             ) == L
  del model


def test_histogram_calibration_is_per_layer_too(scanned):
  # Histogram states are stacked and finalized layer by layer. Percentile
  # is the histogram method with the cheapest finalization to compile (the
  # stacking and per-layer finalization are the same for every method).
  rules = (jaxq.Rule(
      r".*", weight=RULES[0].weight,
      act=QuantSpec("int8", PerTensor(), dynamic=False,
                    calibration="percentile", percentile=90.0)),)
  model, variables, _, max_ranges = scanned
  batches = [_x(), 3.0 * _x(2)]
  ranges = jaxq.calibrate(jaxq.quantize_model(model, rules, "calibrate"),
                          variables, batches, progress=False).ranges()
  twin = jaxq.calibrate(
      jaxq.quantize_model(Unrolled(), rules, "calibrate"),
      {"params": _unrolled_params(variables["params"])}, batches,
      progress=False).ranges()
  amax = ranges["layers"]["down"]["act"]["amax"]
  # A histogram's percentile, not the running max.
  assert not np.allclose(amax, max_ranges["layers"]["down"]["act"]["amax"])
  for i in range(L):
    np.testing.assert_allclose(amax[i],
                               twin[f"layers_{i}"]["down"]["act"]["amax"],
                               rtol=1e-6)


def test_layers_lists_the_per_layer_shape_and_the_stack(scanned):
  _, _, cal, _ = scanned
  layers = jaxq.layers(cal)
  assert layers["layers/up"].weight_shape == (D, HIDDEN)
  assert layers["layers/up"].stacked == L
  assert layers["layers/down"].stacked == L
  assert layers["inp"].stacked is None


def test_qat_equals_unrolled_twin_and_serve_equals_qat(scanned):
  model, variables, cal, ranges = scanned
  x = _x(5)
  qat = cal.with_mode("qat")
  y_qat = jax.jit(qat.apply)({**variables, "quant_ranges": ranges}, x)
  twin_qat = jaxq.quantize_model(Unrolled(), RULES, "qat")
  twin_ranges = _unrolled_params(ranges)
  twin_vars = {"params": _unrolled_params(variables["params"]),
               "quant_ranges": twin_ranges}
  y_twin = jax.jit(twin_qat.apply)(twin_vars, x)
  np.testing.assert_allclose(y_qat, y_twin, rtol=1e-6, atol=1e-6)
  assert not np.allclose(y_qat, jax.jit(model.apply)(variables, x),
                         atol=1e-5)

  serving, report = jaxq.convert(qat, variables, ranges=ranges)
  kernel = serving["params"]["layers"]["up"]["kernel"]
  assert isinstance(kernel, jaxq.QArray)
  assert kernel.values.shape == (L, D, HIDDEN)
  assert kernel.values.dtype == jnp.int8
  assert kernel.scale.shape == (L, 1, HIDDEN)
  for i in range(L):  # Each slice is that layer's own quantization.
    alone = jaxq.quantize(variables["params"]["layers"]["up"]["kernel"][i],
                          RULES[0].weight)
    np.testing.assert_array_equal(kernel.values[i], alone.values)
    np.testing.assert_array_equal(kernel.scale[i], alone.scale)
  assert report.quantized_bytes < report.float_bytes
  y_serve = jax.jit(qat.with_mode("serve").apply)(serving, x)
  np.testing.assert_allclose(y_serve, y_qat, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(y_qat))))


def test_forgotten_scan_axes_say_what_to_add():
  model = Scanned(axes=())
  variables = model.init(jax.random.key(0), _x())
  cal = jaxq.quantize_model(model, RULES, "calibrate")
  with pytest.raises(ValueError, match=r"'layers/up'.*nn.scan.*variable_axes"
                     r".*'quant_stats'.*\*\*jaxq.flax.SCAN_AXES"):
    jaxq.calibrate(cal, variables, [_x()], progress=False)
  with pytest.raises(ValueError, match=r"'inp'.*mutable=\['quant_stats'\]"):
    # Not a scan problem: the caller did not make the stats mutable.
    cal.apply(variables, _x())
  # QAT with the ranges in the variables, but not in the scan's axes.
  ranges = {"layers": {n: {"act": {"amax": jnp.ones((L, 1, 1))}}
                       for n in ("up", "down")},
            **{n: {"act": {"amax": jnp.ones((1, 1))}} for n in ("inp", "head")}}
  with pytest.raises(ValueError, match=r"'quant_ranges'.*SCAN_AXES"):
    cal.with_mode("qat").apply({**variables, "quant_ranges": ranges}, _x())


@pytest.mark.parametrize("scan", [False, True], ids=["remat", "scan_remat"])
def test_remat_layers_in_every_mode(scan):
  model = Scanned(remat=True) if scan else Unrolled(remat=True)
  variables = model.init(jax.random.key(0), _x())
  cal = jaxq.quantize_model(model, RULES, "calibrate")
  ranges = jaxq.calibrate(cal, variables, [_x(), 3.0 * _x(2)],
                          progress=False).ranges()
  qat = cal.with_mode("qat")
  x = _x(5)
  y_qat = jax.jit(qat.apply)({**variables, "quant_ranges": ranges}, x)
  plain = Scanned() if scan else Unrolled()
  y_plain = jax.jit(jaxq.quantize_model(plain, RULES, "qat").apply)(
      {**variables, "quant_ranges": ranges}, x)
  np.testing.assert_allclose(y_qat, y_plain, rtol=1e-6, atol=1e-6)
  serving, _ = jaxq.convert(qat, variables, ranges=ranges)
  y_serve = jax.jit(qat.with_mode("serve").apply)(serving, x)
  np.testing.assert_allclose(y_serve, y_qat, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(y_qat))))
  grads = jax.jit(jax.grad(lambda p: jnp.sum(qat.apply(
      {"params": p, "quant_ranges": ranges}, x))))(variables["params"])
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_learned_ranges_stack_with_the_params():
  rules = (jaxq.Rule(r".*", weight=QuantSpec("int8", PerChannel(axis=-1),
                                             learn="lsq"),
                     act=QuantSpec("int8", PerTensor(), learn="lsq")),)
  qat = jaxq.quantize_model(Scanned(), rules, "qat")
  x = _x()
  # Jitted: one program instead of one per eager op of the learned inits.
  variables = jax.jit(qat.init)(jax.random.key(0), x)
  learned = variables["params"]["layers"]["up"]["jaxq"]
  assert learned["weight_scale"].shape == (L, 1, HIDDEN)
  assert learned["act_scale"].shape == (L, 1)
  y_qat = jax.jit(qat.apply)(variables, x)
  serving, _ = jaxq.convert(qat, variables)
  scale = serving["params"]["layers"]["up"]["kernel"].scale
  assert scale.shape == (L, 1, HIDDEN)
  y_serve = jax.jit(qat.with_mode("serve").apply)(serving, x)
  np.testing.assert_allclose(y_serve, y_qat, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(y_qat))))


# PTQ algorithms and sensitivity on linen scanned layers.


def test_scan_axes_name_every_per_layer_collection():
  assert jaxq.flax.SCAN_AXES == {"quant_stats": 0, "quant_ranges": 0,
                                 "quant_fixed": 0, "jaxq_capture": 0}


@pytest.fixture(scope="module")
def twin_cal():
  model = Scanned()
  variables = model.init(jax.random.key(0), _x())
  twin_vars = {"params": _unrolled_params(variables["params"])}
  return (jaxq.quantize_model(model, RULES, "calibrate"), variables,
          jaxq.quantize_model(Unrolled(), RULES, "calibrate"), twin_vars)


@pytest.mark.parametrize("algorithm", ["smoothquant", "awq", "gptq"])
def test_ptq_algorithm_per_layer_of_the_stack_equals_unrolled(twin_cal,
                                                              algorithm):
  # Each layer of the stack is processed on its own inputs (GPTQ block by
  # block, in the order the scan runs them), and its kernel and fixed
  # variables land in its slice: the unrolled twin's, stacked.
  cal, variables, twin, twin_vars = twin_cal
  run = getattr(jaxq, algorithm)
  batches = [_x(), 3.0 * _x(2)]
  out = run(cal, variables, batches, progress=False)
  twin_out = run(twin, twin_vars, batches, progress=False)
  fixed = out["quant_fixed"]["layers"]
  for name in ("up", "down"):
    kernel = out["params"]["layers"][name]["kernel"]
    assert kernel.shape[0] == L
    for i in range(L):
      np.testing.assert_allclose(
          kernel[i], twin_out["params"][f"layers_{i}"][name]["kernel"],
          rtol=1e-6, atol=1e-7)
      jax.tree.map(lambda a, b, i=i: np.testing.assert_allclose(
          a[i], b, rtol=1e-6, atol=1e-7), fixed[name],
                   twin_out["quant_fixed"][f"layers_{i}"][name])
  assert not np.allclose(out["params"]["layers"]["up"]["kernel"],
                         variables["params"]["layers"]["up"]["kernel"])
  # The scan hands each layer its fixed variables: QAT equals the twin's.
  ranges = jaxq.calibrate(cal, out, batches, progress=False).ranges()
  twin_ranges = jaxq.calibrate(twin, twin_out, batches, progress=False
                               ).ranges()
  x = _x(5)
  y = jax.jit(cal.with_mode("qat").apply)({**out, "quant_ranges": ranges}, x)
  y_twin = jax.jit(twin.with_mode("qat").apply)(
      {**twin_out, "quant_ranges": twin_ranges}, x)
  np.testing.assert_allclose(y, y_twin, rtol=1e-5, atol=1e-5)


def test_forgotten_fixed_axis_says_what_to_add(twin_cal):
  cal, variables, _, _ = twin_cal
  out = jaxq.smoothquant(cal, variables, [_x()], progress=False)
  old_axes = Scanned(axes=(("quant_stats", 0), ("quant_ranges", 0)))
  with pytest.raises(ValueError, match=r"'layers/up'.*'quant_fixed'.*"
                     r"\*\*jaxq.flax.SCAN_AXES"):
    jaxq.quantize_model(old_axes, RULES, "calibrate").apply(
        out, _x(), mutable=["quant_stats"])


def test_sensitivity_switches_a_stack_as_one_layer():
  # One flag per path: the row of 'layers/up' quantizes every layer of the
  # stack, as rules quantizing `layers_<i>/up` of the twin do.
  model = Scanned()
  variables = model.init(jax.random.key(0), _x())
  batches = [_x(), 3.0 * _x(2)]
  x = _x(7)

  def metric(apply_fn, v):
    return -float(jnp.mean(jnp.square(apply_fn(v, x))))

  table = jaxq.sensitivity(model, variables, RULES, metric, batches,
                           progress=False)
  assert set(table.paths) == {"inp", "layers/up", "layers/down", "head"}
  row = {r.path: r for r in table.rows}["layers/up"]
  twin_vars = {"params": _unrolled_params(variables["params"])}
  up_only = (jaxq.Rule(r"layers_\d+/up", weight=RULES[0].weight,
                       act=RULES[0].act),)
  twin_cal = jaxq.quantize_model(Unrolled(), up_only, "calibrate")
  ranges = jaxq.calibrate(twin_cal, twin_vars, batches,
                          progress=False).ranges()
  twin_qat = twin_cal.with_mode("qat")
  expected = metric(jax.jit(twin_qat.apply),
                    {**twin_vars, "quant_ranges": ranges})
  np.testing.assert_allclose(row.metric, expected, rtol=1e-5)
  assert row.drop != 0.0 and np.isfinite(row.sqnr_db)


# nnx: layers made with nnx.vmap, run with nnx.scan (Flax's scan over layers).


class NnxBlock(nnx.Module):
  """`Block` in nnx."""

  def __init__(self, rngs: nnx.Rngs):
    self.up = nnx.Linear(D, HIDDEN, rngs=rngs)
    self.down = nnx.Linear(HIDDEN, D, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.relu(self.up(x)))


class NnxScanned(nnx.Module):
  """``L`` blocks created by ``nnx.vmap`` (kernels ``(L, ...)``) and run by
  ``nnx.scan``, as Flax's "scan over layers" guide writes them."""

  def __init__(self, rngs: nnx.Rngs):
    self.inp = nnx.Linear(D, D, rngs=rngs)

    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs: nnx.Rngs) -> NnxBlock:
      return NnxBlock(rngs)

    self.layers = create(rngs)
    self.head = nnx.Linear(D, 2, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
      return block(x)

    return self.head(forward(self.inp(x), self.layers))


class NnxUnrolled(nnx.Module):
  """The same blocks in a list (``layers/0/up`` ...)."""

  def __init__(self, rngs: nnx.Rngs):
    self.inp = nnx.Linear(D, D, rngs=rngs)
    self.layers = nnx.List([NnxBlock(rngs) for _ in range(L)])
    self.head = nnx.Linear(D, 2, rngs=rngs)

  def __call__(self, x):
    x = self.inp(x)
    for block in self.layers:
      x = block(x)
    return self.head(x)


def _nnx_unrolled(state: nnx.State) -> nnx.State:
  """A scanned state laid out for `NnxUnrolled` (layer ``i``'s slices)."""
  flat = {}
  for path, var in nnx.to_flat_state(state):
    if path[0] != "layers":
      flat[path] = var
      continue
    for i in range(L):
      flat[("layers", i) + tuple(path[1:])] = var.replace(
          jax.tree.map(lambda a, i=i: a[i], var.get_value()))
  return nnx.from_flat_state(flat)


@pytest.fixture(scope="module")
def nnx_pair():
  model = NnxScanned(nnx.Rngs(0))
  twin = NnxUnrolled(nnx.Rngs(0))
  nnx.update(twin, _nnx_unrolled(nnx.state(model)))
  np.testing.assert_allclose(twin(_x()), model(_x()), rtol=1e-6, atol=1e-6)
  return model, twin


def _nnx_ranges(model, rules=RULES):
  cal = jaxq.quantize_model(model, rules, "calibrate")
  return cal, jaxq.calibrate(cal, None, [_x(), 3.0 * _x(2)],
                             progress=False).ranges()


def test_nnx_calibrate_qat_convert_serve_per_layer(nnx_pair):
  model, twin = nnx_pair
  cal, ranges = _nnx_ranges(model)
  layers = jaxq.layers(cal)
  assert layers["layers/up"].weight_shape == (D, HIDDEN)
  assert layers["layers/up"].stacked == L
  assert layers["inp"].stacked is None
  _, twin_ranges = _nnx_ranges(twin)
  amax = ranges["layers"]["up"]["jaxq_act_range"].get_value()["amax"]
  assert amax.shape == (L, 1, 1)
  for i in range(L):
    np.testing.assert_array_equal(amax[i], twin_ranges["layers"][i]["up"][
        "jaxq_act_range"].get_value()["amax"])

  x = _x(5)
  qat = jaxq.quantize_model(model, RULES, "qat")
  nnx.update(qat, ranges)
  twin_qat = jaxq.quantize_model(twin, RULES, "qat")
  nnx.update(twin_qat, twin_ranges)
  y_qat = nnx.jit(lambda m, x: m(x))(qat, x)
  np.testing.assert_allclose(y_qat, twin_qat(x), rtol=1e-6, atol=1e-6)
  assert not np.allclose(y_qat, model(x), atol=1e-5)

  serve = jaxq.quantize_model(model, RULES, "serve")
  serving, report = jaxq.convert(serve, nnx.state(model), ranges=ranges)
  kernel = serving["layers"]["up"]["kernel"].get_value()
  assert isinstance(kernel, jaxq.QArray)
  assert kernel.values.shape == (L, D, HIDDEN)
  assert kernel.scale.shape == (L, 1, HIDDEN)
  for i in range(L):  # Each slice is that layer's own quantization.
    alone = jaxq.quantize(model.layers.up.kernel.get_value()[i],
                          RULES[0].weight)
    np.testing.assert_array_equal(kernel.values[i], alone.values)
    np.testing.assert_array_equal(kernel.scale[i], alone.scale)
  assert report.quantized_bytes < report.float_bytes
  nnx.update(serve, serving)
  y_serve = nnx.jit(lambda m, x: m(x))(serve, x)
  np.testing.assert_allclose(y_serve, y_qat, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(y_qat))))


def test_nnx_learned_ranges_stack_per_layer(nnx_pair):
  model, _ = nnx_pair
  rules = (jaxq.Rule(r".*", weight=QuantSpec("int8", PerChannel(axis=-1),
                                             learn="lsq"),
                     act=QuantSpec("int8", PerTensor(), learn="lsq")),)
  qat = jaxq.quantize_model(model, rules, "qat")
  x = _x()
  y_qat = qat(x)  # Creates the learned ranges, inside the scan too.
  assert qat.layers.up.jaxq_weight_scale.get_value().shape == (L, 1, HIDDEN)
  assert qat.layers.up.jaxq_act_scale.get_value().shape == (L, 1)
  serve = jaxq.quantize_model(model, rules, "serve")
  serving, _ = jaxq.convert(serve, nnx.state(qat))
  assert serving["layers"]["up"]["kernel"].get_value().scale.shape == (
      L, 1, HIDDEN)
  nnx.update(serve, serving)
  np.testing.assert_allclose(serve(x), y_qat, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(y_qat))))


def test_nnx_smoothquant_and_sensitivity_equal_unrolled(nnx_pair):
  model, twin = nnx_pair
  batches = [_x(), 3.0 * _x(2)]
  cal = jaxq.quantize_model(model, RULES, "calibrate")
  smoothed = jaxq.smoothquant(cal, None, batches, progress=False)
  twin_smoothed = jaxq.smoothquant(
      jaxq.quantize_model(twin, RULES, "calibrate"), None, batches,
      progress=False)
  factors = smoothed["layers"]["down"]["jaxq_act_smooth"].get_value()
  assert factors.shape == (L, HIDDEN)
  for i in range(L):
    np.testing.assert_allclose(factors[i], twin_smoothed["layers"][i]["down"][
        "jaxq_act_smooth"].get_value(), rtol=1e-6)
    np.testing.assert_allclose(
        smoothed["layers"]["down"]["kernel"].get_value()[i],
        twin_smoothed["layers"][i]["down"]["kernel"].get_value(), rtol=1e-6)

  x = _x(7)

  def metric(apply_fn, state):
    return -float(jnp.mean(jnp.square(apply_fn(state, x))))

  table = jaxq.sensitivity(model, None, RULES, metric, batches,
                           progress=False)
  row = {r.path: r for r in table.rows}["layers/down"]
  down_only = (jaxq.Rule(r"layers/\d+/down", weight=RULES[0].weight,
                         act=RULES[0].act),)
  twin_cal, twin_ranges = _nnx_ranges(twin, down_only)
  twin_qat = jaxq.quantize_model(twin, down_only, "qat")
  nnx.update(twin_qat, twin_ranges)
  np.testing.assert_allclose(row.metric, metric(
      lambda s, x: twin_qat(x), None), rtol=1e-5)
  assert row.drop != 0.0
  del twin_cal


def test_nnx_nested_stack_is_refused_naming_the_layer():
  @nnx.vmap(in_axes=(0,), out_axes=0)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def create(key):
    return nnx.Linear(D, D, rngs=nnx.Rngs(params=key))

  keys = jax.random.split(jax.random.key(0), (2, 3))

  class Nested(nnx.Module):

    def __init__(self):
      self.stack = create(keys)

  with pytest.raises(ValueError, match=r"'stack'.*\(2, 3, 8, 8\).*one stack "
                     r"axis"):
    jaxq.quantize_model(Nested(), RULES, "calibrate")


def test_report_measures_each_layer_of_the_stack_on_its_own():
  model = Scanned()
  variables = model.init(jax.random.key(0), _x())
  rows = {r.path: r for r in jaxq.report(model, variables, [_x()],
                                         rules=RULES).rows}
  kernel = variables["params"]["layers"]["up"]["kernel"]
  signal = noise = 0.0
  for i in range(L):  # One scale per column of each layer, not of the stack.
    deq = jaxq.dequantize(jaxq.quantize(kernel[i], RULES[0].weight))
    signal += float(jnp.sum(jnp.square(kernel[i])))
    noise += float(jnp.sum(jnp.square(deq - kernel[i])))
  np.testing.assert_allclose(rows["layers/up"].weight_sqnr_db,
                             10.0 * np.log10(signal / noise), rtol=1e-5)
  assert np.isfinite(rows["layers/up"].act_sqnr_db)


def test_nnx_scan_without_graph_updates_says_why_stats_are_missing():
  class NoUpdates(NnxScanned):

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
                graph_updates=False)
      def forward(x, block):
        return block(x)

      return self.head(forward(self.inp(x), self.layers))

  cal = jaxq.quantize_model(NoUpdates(nnx.Rngs(0)), RULES, "calibrate")
  with pytest.raises(ValueError, match=rf"'layers/\w+'.*stack of {L} layers"
                     r".*graph_updates=False"):
    jaxq.calibrate(cal, None, [_x()], progress=False).ranges()


def test_a_layer_of_the_stack_that_saw_only_zeros_is_named():
  # Layer 1's `up` is zero, so its `down` only ever sees relu(0) = 0: the
  # stacked range is valid overall, but that layer's own slice is 0.
  model = Scanned()
  variables = model.init(jax.random.key(0), _x())
  params = jax.tree.map(lambda a: a, variables["params"])
  up = dict(params["layers"]["up"])
  up = {k: v.at[1].set(0.0) for k, v in up.items()}
  params["layers"] = {**params["layers"], "up": up}
  cal = jaxq.quantize_model(model, RULES, "calibrate")
  result = jaxq.calibrate(cal, {"params": params}, [_x()], progress=False)
  with pytest.raises(jaxq.ZeroRangeError, match=r"layers/down\[1\]"):
    result.ranges()
