"""`convert`: from a calibrated float model to its serving variables.

``serving, report = jaxq.convert(qmodel, variables, stats)`` quantizes every
weight a rule of ``qmodel`` quantizes into a `QArray` (int8, int4, fp8, ...
values plus scales and zero points) at the same place in the variables, and
turns the calibration statistics of static activation specs into ranges
with the observers' ``finalize``. Load the result into the serve-mode model:

```python
serve = jaxq.quantize_model(model, rules, mode="serve")
# linen: stats = the "quant_stats" collection from calibrate mode.
serving, report = jaxq.convert(qmodel, variables, stats)
y = serve.apply(serving, x)
# nnx: stats = nnx.state(calibrated, jaxq.flax.QuantStat).
serving, report = jaxq.convert(serve, nnx.state(model), stats)
nnx.update(serve, serving)
```

A masked convolution's kernel (linen and nnx ``Conv``/``ConvTranspose``
with ``mask``) is quantized as ``kernel * mask``, the kernel that QAT
fake-quantizes, so the `QArray` holds the mask and serve mode runs the layer
without multiplying by it again (a float kernel is still masked there).

A weight's range is the one `jaxq.flax.core.weight_range` gives: a range
stored by GPTQ or AWQ (linen ``quant_fixed/<layer>/weight_range``, nnx
``jaxq_weight_range``; the serving variables drop it, as the QArray's
scales and zero points hold it), else its spec's ``calibration`` (``"max"``,
``"percentile"`` or the ``"mse"`` clipping search of
`jaxq.algorithms.weight_range`), as the serve and qat modes do, with one
difference: given ``stats`` from `jaxq.calibrate`, an ``"mse"`` weight's
search minimises the layer's output error, each squared weight error
weighted by ``E[x^2]`` of its input channel as calibration recorded it
(`jaxq.flax.core`'s docstring says why; serve and qat, quantizing on the
fly without data, keep the plain weight MSE).

Weights of learned specs (``learn="lsq"``/``"pact"``) are quantized with
their trained scales, read from the variables (linen
``params/<layer>/jaxq/weight_scale``, nnx ``jaxq_weight_scale``), which
stay in the serving variables for the activations' learned scales.

The report counts bytes before and after; sub-byte formats (int4, fp4) are
counted packed, two per byte, as `jaxq.save` stores them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import flax as jaxq_flax
from jaxq import learned
from jaxq.algorithms.stats import InputMoment
from jaxq.flax import checks
from jaxq.flax import core
from jaxq.flax.adapter import ModelAdapter
from jaxq.quantize import quantize
from jaxq.spec import QArray

@dataclasses.dataclass(frozen=True)
class LayerBytes:
  """Bytes of one layer's weight before and after conversion."""

  path: str
  float_bytes: int
  quantized_bytes: int


@dataclasses.dataclass(frozen=True)
class ConvertReport:
  """What `convert` did.

  Attributes:
    float_bytes: bytes of every array of the input variables.
    quantized_bytes: bytes of every array of the serving variables, QArrays
      counted with `QArray.nbytes` (values packed, scales, zero points).
    layers: per converted weight, its bytes before and after.
  """

  float_bytes: int
  quantized_bytes: int
  layers: tuple[LayerBytes, ...]

  @property
  def ratio(self) -> float:
    """``quantized_bytes / float_bytes``."""
    return self.quantized_bytes / max(self.float_bytes, 1)


def tree_bytes(tree: Any) -> int:
  """Bytes of all arrays in ``tree``; QArrays as stored (int4 packed)."""
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QArray))
  return sum(x.nbytes if isinstance(x, QArray)
             else int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
             for x in leaves)


def _layer_quant(info: jaxq_flax.LayerInfo) -> core.LayerQuant:
  """The serve-mode `LayerQuant` of a layer, for its weight's range."""
  return core.LayerQuant(path=info.path, module_type=info.module_type,
                         weight=info.weight, act=info.act, mode="serve")


def _quantize_weight(info: jaxq_flax.LayerInfo, value: Any,
                     learned_param: Any | None = None,
                     mask: jax.Array | None = None,
                     stored_range: core.ActRange | None = None,
                     moment: InputMoment | None = None) -> QArray:
  """``info``'s weight quantized; a masked layer's as ``value * mask``,
  the kernel its QAT fake-quantizes (so serving skips the mask); an "mse"
  range weighted by the input ``moment`` when given."""
  if isinstance(value, QArray):
    raise ValueError(f"convert: the weight {info.weight_name!r} of "
                     f"{info.path!r} is already a QArray; pass the float "
                     f"variables.")
  if tuple(value.shape) != info.weight_shape:
    raise ValueError(
        f"convert: the weight {info.weight_name!r} of {info.path!r} has shape "
        f"{tuple(value.shape)} but the model's is {info.weight_shape}.")
  checks.check_finite_weight("convert", info.path, info.weight_name, value)
  if mask is not None:
    if isinstance(mask, jax.core.Tracer):
      raise ValueError(
          f"convert: the mask of {info.path!r} was only seen as a tracer (the "
          f"model built it inside jax.jit or jax.eval_shape); run "
          f"qmodel.init or qmodel.apply once outside a transformation so "
          f"that jaxq records it.")
    if tuple(mask.shape) != info.weight_shape:
      raise ValueError(
          f"convert: the mask of {info.path!r} has shape {tuple(mask.shape)} "
          f"but its weight {info.weight_name!r} has {info.weight_shape}.")
    value = value * mask
  if info.weight.learn is None:
    amin, amax = core.weight_range(_layer_quant(info), value, stored_range,
                                   moment)
    return quantize(value, info.weight, amax=amax, amin=amin,
                    range_from_data=True)
  if learned_param is None:
    raise ValueError(
        f"convert: {info.path!r} has a learned weight range "
        f"(learn={info.weight.learn!r}) but the variables lack its "
        f"{core.learned_name('weight', info.weight)!r}; pass the variables "
        f"of the trained QAT model (see jaxq.qat.init_learned).")
  return learned.quantize_with_scale(
      value, learned.scale_of(learned_param, info.weight), info.weight)


def _quantize_stacked(info: jaxq_flax.LayerInfo, value: Any,
                      learned_param: Any | None, mask: jax.Array | None,
                      stored_range: core.ActRange | None = None,
                      moment: InputMoment | None = None) -> QArray:
  """`_quantize_weight`, per layer for a weight stacked by ``nn.scan`` over
  layers: ``(L, *weight_shape)`` values quantized slice by slice, so the
  QArray's values, scales (and learned scales) all lead with ``L`` and the
  scan slices them as it slices the float params."""
  shape = tuple(getattr(value, "shape", ()))
  if len(shape) != len(info.weight_shape) + 1 or shape[1:] != info.weight_shape:
    return _quantize_weight(info, value, learned_param, mask, stored_range,
                            moment)
  # Slice by slice on concrete arrays (not vmap), so that every check of
  # `_quantize_weight` sees real values; then the leaves are stacked.
  one = lambda tree, i: None if tree is None else jax.tree.map(
      lambda a: a[i], tree)
  slices = [_quantize_weight(info, value[i], one(learned_param, i), mask,
                             one(stored_range, i), one(moment, i))
            for i in range(shape[0])]
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *slices)


def _serving_weights(adapter: ModelAdapter, variables: Any,
                     stats: Any | None
                     ) -> tuple[Any, tuple[LayerBytes, ...]]:
  """``variables`` with each quantized layer's weight a `QArray`; ``stats``
  give the "mse" weights' input moments."""
  adapter.check_convertible(variables)
  moments = adapter.input_moments(stats)
  quantized, missing, report = {}, [], []
  for info in adapter.layers().values():
    if info.weight is None:
      continue
    value = adapter.read(info.path, info.weight_name, variables)
    if value is None:
      missing.append(f"{info.path}/{info.weight_name}")
      continue
    learned_param = None
    if info.weight.learn is not None:
      learned_param = adapter.read(
          info.path, core.learned_name("weight", info.weight), variables)
    stored_range = adapter.read(info.path, core.WEIGHT_RANGE, variables)
    qa = _quantize_stacked(info, value, learned_param,
                           adapter.mask(info.path, variables), stored_range,
                           moments.get(info.path))
    report.append(LayerBytes(info.path, tree_bytes(value), qa.nbytes))
    quantized[(info.path, info.weight_name)] = qa
    if stored_range is not None:
      # The QArray's scales (and zero points) now hold it.
      quantized[(info.path, core.WEIGHT_RANGE)] = None
  if missing:
    raise ValueError(f"convert: the params lack the weights of quantized "
                     f"layers: {missing}; were they made by another model?")
  return adapter.write(quantized, variables), tuple(report)


def convert(qmodel: Any, variables: Any,
            stats: Any | None = None, *, ranges: Any | None = None
            ) -> tuple[Any, ConvertReport]:
  """The serving variables of a quantized model, and a `ConvertReport`.

  Args:
    qmodel: a model from `jaxq.quantize_model`, any mode (for linen, traced
      at least once so its layers are known).
    variables: the float variables: linen ``{"params": ...}`` (other
      collections pass through; ``quant_stats`` is dropped), or an nnx
      ``nnx.State`` with the model's ``Param`` paths.
    stats: the calibration statistics (`jaxq.CalibrationResult.stats`:
      linen's ``"quant_stats"`` collection or ``nnx.state(calibrated,
      QuantStat)``), needed when a rule has a static activation spec and
      ``variables`` hold no ranges yet, and read by ``"mse"`` weights for
      their input's ``E[x^2]`` (their output-error search; without stats,
      the weight's own MSE). Without ``stats`` and ``ranges``, the ranges
      already in ``variables`` (linen's ``"quant_ranges"``, nnx
      `QuantRange`s, as QAT trains with) are kept.
    ranges: static activation ranges already finalized, as
      `jaxq.act_ranges` or `jaxq.CalibrationResult.ranges` (one per
      calibration method) return them; they replace those of ``stats``,
      which then serve the ``"mse"`` weights alone.

  Returns:
    ``(serving, report)``: the variables with each quantized weight replaced
    by a `QArray` and, for static act specs, the ranges (linen: a
    ``"quant_ranges"`` collection; nnx: `QuantRange` variables), and the
    bytes before and after.

  Raises:
    ValueError: naming the paths when the variables lack a quantized layer's
      weight or have a different shape (nnx: any missing or extra ``Param``),
      or when a static act spec has no statistics.
  """
  adapter = jaxq_flax.adapt(qmodel, what="convert")
  adapter.check_stats(stats, "convert")
  serving, layers = _serving_weights(adapter, variables, stats)
  serving = adapter.serving(serving, None if ranges is not None else stats,
                            ranges)
  before = adapter.without_stats(variables)
  return serving, ConvertReport(float_bytes=tree_bytes(before),
                                quantized_bytes=tree_bytes(serving),
                                layers=layers)
