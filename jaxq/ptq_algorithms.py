"""SmoothQuant, AWQ and GPTQ over a whole model, as new jaxq variables.

``variables = jaxq.gptq(qmodel, variables, batches)`` (likewise
`smoothquant`, `awq`) runs the array-level algorithms of `jaxq.algorithms`
on every quantized Dense/DenseGeneral/Einsum layer (linen) or
Linear/LinearGeneral/Einsum layer (nnx) of a calibrate-mode model from
`jaxq.quantize_model`, through the model adapter (`jaxq.flax.adapt`), and
returns ordinary jaxq variables that `jaxq.calibrate`, `jaxq.convert`, the
qat and serve modes, `jaxq.save`/`load`, `jaxq.sensitivity` and
`jaxq.report` use unchanged:

* the layer's kernel replaced (GPTQ: the dequantized kernel, on the grid;
  AWQ, SmoothQuant: the kernel times the per-input-channel factors ``s``);
* ``weight_range`` ``{"amax"[, "amin"]}`` (GPTQ, AWQ): the range the kernel
  must be quantized with, in the weight spec's scale shape;
* ``act_smooth`` ``s`` (AWQ, SmoothQuant) for a layer whose factors are not
  folded into a preceding op: the layer divides its input by it.

These are the fixed variables of `jaxq.flax.core` (linen collection
``quant_fixed``, nnx `jaxq.flax.QuantFixed`). The variables belong to the
quantized model: the float model on them differs where ``act_smooth`` is
set.

Folding: ``fold_into={layer_path: op_path}`` names the op that produces a
layer's input, whose output channels absorb ``1 / s``: a norm (``scale``
and ``bias`` divided by ``s``, LayerNorm/RMSNorm) or a Dense (kernel
columns and bias divided; a stored weight range per output channel too).
Layers folded into one op share one input, so they share one ``s``, found
from their kernels concatenated along the output axis (attention's query,
key and value after one LayerNorm). The op's output must feed only the
layers folded into it: in a post-LayerNorm transformer (BERT) the norm's
output also feeds the residual sum, and folding there changes the model;
leave such layers out of ``fold_into`` (they scale their own input).

Kernels are viewed as 2-D ``(d_in, d_out)``: the contraction axes are the
kernel's leading axes that equal the input's trailing axes (one for Dense;
ambiguous or non-trailing contractions, and convolutions, raise naming the
layer). The weight spec must map onto the 2-D view (per tensor, per output
channel over all output axes, or groups along a single input axis).

Masks: the inputs are captured batch by batch (`ModelAdapter.
capture_inputs`), and the rows that a `jaxq.flax.Batch`'s mask marks as
padding are dropped before any statistic (abs-max, mean magnitude, ``X^T
X``), so padding never counts.

GPTQ is sequential, as in the paper: each layer's inputs are captured with
the kernels of the layers before it already quantized. Defaults chosen on
MiniLM, calibrated on 32 sentences and scored on held-out ones (mean
cosine to float): ``percdamp=0.1``, since the paper's 0.01 fits a small
calibration set (W4 per-channel 0.955 against 0.966 with 0.1; g128 0.973
against 0.978), and ``act_order=True`` (0.947 without it, W4
per-channel, percdamp 0.01).

Combinations: each pass starts from the variables of the one before.
Inputs are captured as the layer receives them and divided by the layer's
stored ``act_smooth`` before any statistic, so GPTQ or AWQ after
`smoothquant` see the smoothed inputs its kernels multiply, and a second
smoothing pass multiplies ``act_smooth`` by its own factors.

Statistics of static activation ranges: `jaxq.calibrate` observes every
position, padding included; ``smoothquant(..., act_ranges=True)`` writes
the ranges from the unmasked rows instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Collection, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxq import algorithms
from jaxq import flax as jaxq_flax
from jaxq import granularity as granularity_lib
from jaxq.algorithms import smoothquant as smoothquant_lib
from jaxq.flax import batch as batch_lib
from jaxq.flax import core
from jaxq.flax.adapter import ModelAdapter
from jaxq.flax.rules import LayerInfo
from jaxq.spec import QuantSpec

# Module types whose kernel is one matmul's right operand.
_MATMUL_TYPES = ("Dense", "DenseGeneral", "Einsum", "Linear",
                 "LinearGeneral")


@dataclasses.dataclass(frozen=True)
class _View:
  """A layer's kernel as a 2-D ``(d_in, d_out)`` matmul operand."""

  info: LayerInfo
  kernel_shape: tuple[int, ...]
  num_in: int  # The kernel's leading axes that contract with the input.
  spec: QuantSpec  # The weight spec on the 2-D view.

  @property
  def d_in(self) -> int:
    return math.prod(self.kernel_shape[:self.num_in])

  @property
  def d_out(self) -> int:
    return math.prod(self.kernel_shape[self.num_in:])

  @property
  def in_shape(self) -> tuple[int, ...]:
    return self.kernel_shape[:self.num_in]

  def to_2d(self, kernel: jax.Array) -> jax.Array:
    return jnp.reshape(kernel, (self.d_in, self.d_out)).astype(jnp.float32)

  def from_2d(self, kernel: jax.Array, dtype: Any) -> jax.Array:
    return jnp.reshape(kernel, self.kernel_shape).astype(dtype)

  def range_from_2d(self, amin: jax.Array | None, amax: jax.Array
                    ) -> core.ActRange:
    """A 2-D range as the weight spec's keepdims scale shape."""
    shape = granularity_lib.scale_shape(self.info.weight.granularity,
                                        self.kernel_shape)
    out = {"amax": jnp.reshape(amax, shape).astype(jnp.float32)}
    if amin is not None:
      out["amin"] = jnp.reshape(amin, shape).astype(jnp.float32)
    return out


def _num_in(info: LayerInfo, kernel_shape: tuple[int, ...],
            x_shape: tuple[int, ...], what: str) -> int:
  """How many leading kernel axes contract with the input's trailing ones."""
  if info.module_type in ("Dense", "Linear"):
    return 1
  candidates = [n for n in range(1, len(kernel_shape))
                if n <= len(x_shape) - 1 and
                tuple(kernel_shape[:n]) == tuple(x_shape[len(x_shape) - n:])]
  if len(candidates) != 1:
    raise ValueError(
        f"{what}: cannot view the kernel of {info.path!r} "
        f"({info.module_type}, shape {kernel_shape}) on inputs of shape "
        f"{x_shape} as one (d_in, d_out) matmul: "
        f"{'no' if not candidates else 'several'} leading kernel axes match "
        f"the input's trailing axes; skip the layer (layers=...).")
  return candidates[0]


def _spec_2d(info: LayerInfo, kernel_shape: tuple[int, ...], num_in: int,
             what: str) -> QuantSpec:
  """The weight spec on the 2-D view, or a ValueError naming the layer."""
  spec = info.weight
  if len(kernel_shape) == 2:
    return spec
  blocks = spec.granularity.block_shape(kernel_shape)
  in_shape, out_shape = kernel_shape[:num_in], kernel_shape[num_in:]
  in_blocks, out_blocks = blocks[:num_in], blocks[num_in:]
  d_in, d_out = math.prod(in_shape), math.prod(out_shape)
  if spec.is_mx or not (all(b == 1 for b in out_blocks) or
                        tuple(out_blocks) == tuple(out_shape)):
    granularity = None
  elif tuple(in_blocks) == tuple(in_shape):
    granularity = (granularity_lib.PerTensor() if tuple(out_blocks) ==
                   tuple(out_shape) else granularity_lib.PerChannel(axis=-1))
  elif num_in == 1 and all(b == 1 for b in out_blocks):
    granularity = granularity_lib.PerGroup(axis=0, size=in_blocks[0])
  else:
    granularity = None
  if granularity is None or (d_in, d_out) == (0, 0):
    raise ValueError(
        f"{what}: the weight spec {spec.granularity} of {info.path!r} "
        f"(kernel {kernel_shape}) has blocks {tuple(blocks)}, which do not "
        f"map onto its (d_in, d_out) = ({d_in}, {d_out}) view; use per "
        f"tensor, one scale per output element, or groups along one input "
        f"axis.")
  return spec.replace(granularity=granularity)


def _check_layer_type(info: LayerInfo, what: str) -> None:
  if info.module_type not in _MATMUL_TYPES and not any(
      info.module_type.endswith(t) for t in _MATMUL_TYPES):
    raise ValueError(
        f"{what}: {info.path!r} is a {info.module_type}, which {what} cannot "
        f"handle (it supports {', '.join(_MATMUL_TYPES)}); leave it out with "
        f"layers=[...] or a skip rule.")


def _targets(adapter: ModelAdapter, batches: Sequence[Any],
             layers: Collection[str] | None, what: str) -> list[LayerInfo]:
  """The layers to process, in first-call order."""
  if adapter.settings().mode != "calibrate":
    raise ValueError(f"{what}: expected a model from jaxq.quantize_model(..., "
                     f"mode='calibrate'), got mode "
                     f"{adapter.settings().mode!r}.")
  ordered = adapter.ordered_layers(batches[0])
  known = adapter.layers()
  if layers is not None:
    unknown = sorted(set(layers) - set(known))
    if unknown:
      raise ValueError(f"{what}: no quantized layer {unknown}; the model's "
                       f"layers are {sorted(known)}.")
    never = sorted(set(layers) - set(ordered))
    if never:
      raise ValueError(f"{what}: calibration never reached {never}: the model "
                       f"does not call them on these batches.")
  chosen = [info for info in ordered.values()
            if info.weight is not None and info.module_type != "Embed" and
            (layers is None or info.path in layers)]
  for info in chosen:
    _check_layer_type(info, what)
  if not chosen:
    raise ValueError(f"{what}: no quantized matmul layer to process.")
  return chosen


def _capture(adapter: ModelAdapter, batches: Sequence[Any],
             paths: Sequence[str], variables: Any, what: str,
             capture: Any = None) -> Any:
  try:
    return adapter.capture_inputs(batches, paths, variables, capture=capture)
  except ValueError as e:
    raise ValueError(f"{what}: calibration never reached a layer: {e}"
                     ) from None


def _view(info: LayerInfo, kernel: jax.Array, x: jax.Array,
          what: str) -> _View:
  shape = tuple(kernel.shape)
  num_in = _num_in(info, shape, tuple(x.shape), what)
  return _View(info, shape, num_in, _spec_2d(info, shape, num_in, what))


def _rows(view: _View, captured: Any, what: str) -> jax.Array:
  """The layer's input rows ``(n, d_in)`` over every call and batch, with
  the masked (padding) rows dropped."""
  path = view.info.path
  out = []
  for call in captured.inputs[path]:
    for x, mask in zip(call, captured.masks):
      lead = tuple(x.shape[:x.ndim - view.num_in])
      flat = np.asarray(jnp.reshape(x, (-1, view.d_in)), np.float32)
      if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != lead:
          try:
            mask = np.broadcast_to(mask.reshape(
                mask.shape + (1,) * (len(lead) - mask.ndim)), lead)
          except ValueError:
            raise ValueError(
                f"{what}: the batch mask of shape {mask.shape} does not fit "
                f"the inputs of {path!r} of shape {tuple(x.shape)} (leading "
                f"axes {lead}).") from None
        flat = flat[mask.reshape(-1)]
      out.append(flat)
  rows = np.concatenate(out, axis=0)
  if not np.all(np.isfinite(rows)):
    raise ValueError(f"{what}: the calibration inputs of {path!r} hold NaN or "
                     f"inf at unmasked positions.")
  if rows.shape[0] == 0:
    raise ValueError(f"{what}: every input row of {path!r} is masked out; "
                     f"calibration never reached it with real data.")
  return jnp.asarray(rows)


def _layer_rows(adapter: ModelAdapter, variables: Any, view: _View,
                captured: Any, what: str) -> jax.Array:
  """`_rows` as the layer's matmul sees them: divided by the smoothing
  factors an earlier `smoothquant`/`awq` stored on the layer (the capture
  records the layer's arguments, before the layer divides them)."""
  rows = _rows(view, captured, what)
  factors = adapter.read(view.info.path, core.ACT_SMOOTH, variables)
  return rows if factors is None else rows / jnp.reshape(factors, (-1,))


def _input_stats(rows: jax.Array) -> algorithms.InputStats:
  stats = algorithms.init_input_stats(rows.shape[-1])
  return algorithms.update_input_stats(stats, rows)


def _groups(targets: Sequence[LayerInfo],
            fold_into: Mapping[str, str] | None, what: str
            ) -> list[tuple[str | None, list[LayerInfo]]]:
  """``(fold op or None, layers)`` sharing one set of factors, in order."""
  fold_into = dict(fold_into or {})
  paths = {info.path for info in targets}
  stray = sorted(set(fold_into) - paths)
  if stray:
    raise ValueError(f"{what}: fold_into names {stray}, which are not among "
                     f"the layers processed ({sorted(paths)}).")
  groups: dict[Any, list[LayerInfo]] = {}
  for info in targets:
    key = fold_into.get(info.path) or ("", info.path)
    groups.setdefault(key, []).append(info)
  return [(key if isinstance(key, str) else None, members)
          for key, members in groups.items()]


def _fold(adapter: ModelAdapter, variables: Any, op: str,
          factors: jax.Array, what: str) -> Any:
  """``variables`` with ``1 / factors`` folded into the outputs of ``op``."""
  scale = adapter.read(op, "scale", variables)
  kernel = adapter.read(op, "kernel", variables)
  bias = adapter.read(op, "bias", variables)
  target = kernel if kernel is not None else scale
  if target is None:
    raise ValueError(f"{what}: cannot fold into {op!r}: it has neither a "
                     f"kernel (Dense) nor a scale (LayerNorm/RMSNorm).")
  size = int(factors.size)
  out_size = (int(np.prod(target.shape)) if kernel is None
              else int(target.shape[-1]))
  if out_size != size:
    raise ValueError(f"{what}: cannot fold {size} factors into {op!r}, whose "
                     f"output has {out_size} channels.")
  inv = (1.0 / factors).reshape(-1)
  values = {}
  if kernel is not None:
    values[(op, "kernel")] = (kernel * inv.astype(kernel.dtype))
    stored = adapter.read(op, core.WEIGHT_RANGE, variables)
    if stored is not None:
      if stored["amax"].shape[-1] != size:
        raise ValueError(f"{what}: cannot fold into {op!r}: its stored weight "
                         f"range of shape {tuple(stored['amax'].shape)} is not "
                         f"per output channel.")
      values[(op, core.WEIGHT_RANGE)] = {k: v * inv for k, v in stored.items()}
  else:
    values[(op, "scale")] = (scale * inv.reshape(scale.shape).astype(
        scale.dtype))
  if bias is not None:
    values[(op, "bias")] = bias * inv.reshape(bias.shape).astype(bias.dtype)
  return adapter.write(values, variables)


def _apply_factors(adapter: ModelAdapter, variables: Any, op: str | None,
                   views: Sequence[_View], factors: jax.Array,
                   kernels: Sequence[jax.Array],
                   ranges: Sequence[core.ActRange | None], what: str) -> Any:
  """Writes the scaled kernels (and ranges), and folds or stores ``1/s``."""
  values = {}
  for view, kernel, kernel_range in zip(views, kernels, ranges):
    old, _ = adapter.get_weight(view.info.path, variables)
    scaled = algorithms.scale_kernel(view.to_2d(kernel), factors)
    values[(view.info.path, view.info.weight_name)] = view.from_2d(
        scaled, old.dtype)
    if kernel_range is not None:
      values[(view.info.path, core.WEIGHT_RANGE)] = kernel_range
    if op is None:  # Stacks on the factors of an earlier pass, if any.
      earlier = adapter.read(view.info.path, core.ACT_SMOOTH, variables)
      total = factors if earlier is None else factors * jnp.reshape(
          earlier, (-1,))
      values[(view.info.path, core.ACT_SMOOTH)] = jnp.reshape(
          total, view.in_shape).astype(jnp.float32)
  variables = adapter.write(values, variables)
  if op is not None:
    variables = _fold(adapter, variables, op, factors, what)
  return variables


def _bar(items: Sequence[Any], what: str, progress: bool) -> Iterable[Any]:
  return tqdm.tqdm(items, desc=f"jaxq {what}", unit="layer",
                   disable=None if progress else True)


def _setup(qmodel: Any, variables: Any, data: Iterable[Any],
           layers: Collection[str] | None, what: str
           ) -> tuple[ModelAdapter, list[Any], list[LayerInfo], Any]:
  adapter = jaxq_flax.adapt(qmodel, variables, what=what)
  batches = batch_lib.check_batches(data, what)
  targets = _targets(adapter, batches, layers, what)
  return adapter, batches, targets, adapter.variables


def _act_range(view: _View, rows: jax.Array, x_shape: tuple[int, ...],
               what: str) -> core.ActRange:
  """The static act range of a layer from its unmasked (smoothed) rows."""
  spec = view.info.act
  if spec is None or spec.dynamic:
    raise ValueError(f"{what}: act_ranges needs a static act spec on "
                     f"{view.info.path!r}, whose rule has {spec}.")
  if not isinstance(spec.granularity, granularity_lib.PerTensor) or (
      spec.calibration not in ("max", "percentile")):
    raise ValueError(
        f"{what}: act_ranges computes per-tensor 'max' or 'percentile' "
        f"ranges, but {view.info.path!r} has {spec.granularity} with "
        f"calibration={spec.calibration!r}; calibrate it with jaxq.calibrate.")
  shape = granularity_lib.scale_shape(spec.granularity, x_shape)
  values = np.asarray(rows)
  if spec.calibration == "max":
    amax = np.max(values) if not spec.symmetric else np.max(np.abs(values))
    amin = np.min(values)
  else:
    q = spec.percentile
    amax = (np.percentile(np.abs(values), q) if spec.symmetric
            else np.percentile(values, q))
    amin = np.percentile(values, 100.0 - q)
  out = {"amax": jnp.full(shape, amax, jnp.float32)}
  if not spec.symmetric:
    out["amin"] = jnp.full(shape, min(float(amin), 0.0), jnp.float32)
  return out


def smoothquant(qmodel: Any, variables: Any, data: Iterable[Any], *,
                alpha: float | Mapping[str, float] | None = 0.5,
                alphas: Sequence[float] = smoothquant_lib.DEFAULT_ALPHAS,
                fold_into: Mapping[str, str] | None = None,
                layers: Collection[str] | None = None,
                act_ranges: bool = False,
                progress: bool = True) -> Any:
  """SmoothQuant (Xiao et al., 2023) on every quantized matmul layer.

  Per layer (or group sharing one fold op), factors ``s_j = max|X_j|**alpha
  / max|W_j|**(1 - alpha)`` from the unmasked calibration rows; the kernel
  rows are multiplied by ``s``, the input divided (folded, or the layer's
  ``act_smooth``). Calibrate the act ranges afterwards, on the returned
  variables (`jaxq.calibrate` then sees ``X / s``).

  Args:
    qmodel: a calibrate-mode model from `jaxq.quantize_model`.
    variables: its variables (linen dict, nnx ``State`` or None).
    data: calibration batches (`jaxq.flax.batch` convention; a
      `jaxq.flax.Batch` mask drops padding rows).
    alpha: one alpha in [0, 1], a mapping path -> alpha (a group takes its
      first layer's; missing layers are searched), or None to search each
      layer's (group's) alpha over ``alphas`` by its W8A8 output error
      (`jaxq.algorithms.search_alpha`, with the layer's weight and act specs).
    alphas: the search grid.
    fold_into: ``{layer_path: op_path}``, see the module docstring.
    layers: the paths to smooth (default: every quantized matmul layer).
    act_ranges: also write each smoothed layer's static activation range
      (its act spec's per-tensor ``"max"`` or ``"percentile"``) from the
      unmasked rows of ``X / s``, so `jaxq.convert` needs no further
      calibration and padding enters no range (`jaxq.calibrate` observes
      every position).
    progress: a tqdm bar per layer group.

  Returns:
    New variables (see the module docstring).

  Raises:
    ValueError: naming the layer for an alpha outside [0, 1], a layer the
      calibration never reached, a layer type or spec it cannot handle.
  """
  what = "smoothquant"
  per_layer = dict(alpha) if isinstance(alpha, Mapping) else {}
  for a in [alpha] if not isinstance(alpha, Mapping) else per_layer.values():
    if a is not None:
      smoothquant_lib.check_alpha(a, what)
  for a in alphas:
    smoothquant_lib.check_alpha(a, what)
  adapter, batches, targets, variables = _setup(qmodel, variables, data,
                                                layers, what)
  captured = _capture(adapter, batches, [i.path for i in targets], variables,
                      what)
  ranges: dict[str, core.ActRange] = {}
  for op, members in _bar(_groups(targets, fold_into, what), what, progress):
    kernels = [adapter.get_weight(i.path, variables)[0] for i in members]
    views = [_view(i, k, captured.inputs[i.path][0][0], what)
             for i, k in zip(members, kernels)]
    rows = _layer_rows(adapter, variables, views[0], captured, what)
    kernel_cat = jnp.concatenate([v.to_2d(k) for v, k in zip(views, kernels)],
                                 axis=1)
    chosen = (per_layer.get(members[0].path) if isinstance(alpha, Mapping)
              else alpha)
    if chosen is None:
      act = members[0].act
      if act is None:
        raise ValueError(f"{what}: searching alpha for {members[0].path!r} "
                         f"needs an act spec; its rule has none.")
      factors = algorithms.search_alpha(
          kernel_cat, rows, weight_spec=views[0].spec, act_spec=act,
          alphas=tuple(alphas)).factors
    else:
      factors = algorithms.smoothing_factors(
          jnp.max(jnp.abs(rows), axis=0), kernel_cat, chosen)
    variables = _apply_factors(adapter, variables, op, views, factors,
                               kernels, [None] * len(views), what)
    if act_ranges:
      smoothed = rows / factors
      for view in views:
        ranges[view.info.path] = _act_range(
            view, smoothed, tuple(captured.inputs[view.info.path][0][0].shape),
            what)
  if act_ranges:
    variables = adapter.with_variables(variables).with_ranges(
        ranges).variables
  return variables


def awq(qmodel: Any, variables: Any, data: Iterable[Any], *,
        num_exponents: int = 20, clip_ratios: int = 20, min_clip: float = 0.5,
        fold_into: Mapping[str, str] | None = None,
        layers: Collection[str] | None = None,
        progress: bool = True) -> Any:
  """AWQ (Lin et al., 2024) on every quantized matmul layer.

  Per layer (or group sharing one fold op): the per-input-channel factors
  and, with ``clip_ratios > 0``, the per-scale clipping of
  `jaxq.algorithms.awq`, from the unmasked calibration rows. Writes the
  scaled kernel, its ``weight_range`` and the factors (folded or
  ``act_smooth``).

  Args:
    qmodel, variables, data, fold_into, layers, progress: as `smoothquant`.
    num_exponents: grid of the factors' exponent over [0, 1].
    clip_ratios: grid of the clipping search (0: the spec's calibration).
    min_clip: the smallest clipping ratio.

  Returns:
    New variables (see the module docstring).
  """
  what = "awq"
  adapter, batches, targets, variables = _setup(qmodel, variables, data,
                                                layers, what)
  captured = _capture(adapter, batches, [i.path for i in targets], variables,
                      what)
  for op, members in _bar(_groups(targets, fold_into, what), what, progress):
    kernels = [adapter.get_weight(i.path, variables)[0] for i in members]
    views = [_view(i, k, captured.inputs[i.path][0][0], what)
             for i, k in zip(members, kernels)]
    specs = {v.spec for v in views}
    if len(specs) != 1:
      raise ValueError(f"{what}: {[i.path for i in members]} share one input "
                       f"(fold_into {op!r}) but have different weight specs "
                       f"{sorted(map(str, specs))}.")
    stats = _input_stats(_layer_rows(adapter, variables, views[0], captured,
                                     what))
    kernel_cat = jnp.concatenate([v.to_2d(k) for v, k in zip(views, kernels)],
                                 axis=1)
    try:
      result = algorithms.awq(kernel_cat, stats, views[0].spec,
                              num_exponents=num_exponents,
                              clip_ratios=clip_ratios, min_clip=min_clip)
    except ValueError as e:
      raise ValueError(f"{what}: {members[0].path!r}: {e}") from None
    ranges, start = [], 0
    for view in views:
      cols = slice(start, start + view.d_out)
      start += view.d_out
      amin = None if result.amin is None else result.amin[:, cols]
      ranges.append(view.range_from_2d(amin, result.amax[:, cols]))
    variables = _apply_factors(adapter, variables, op, views, result.factors,
                               kernels, ranges, what)
  return variables


def gptq(qmodel: Any, variables: Any, data: Iterable[Any], *,
         percdamp: float = 0.1, block_size: int = 128,
         act_order: bool = True, layers: Collection[str] | None = None,
         progress: bool = True) -> Any:
  """GPTQ (Frantar et al., 2023), layer by layer in model order.

  Each layer's Hessian ``2 X^T X`` comes from its unmasked inputs captured
  with the earlier layers' kernels already replaced by their GPTQ kernels
  (sequential, as in the paper). Writes the dequantized kernel and its
  ``weight_range``. Runs after `awq` or `smoothquant` too (their kernels and
  factors are the starting point; a stored AWQ range of a per-tensor or
  per-channel spec stays the grid).

  Args:
    qmodel, variables, data, layers, progress: as `smoothquant`.
    percdamp: dampening as a fraction of the mean Hessian diagonal.
    block_size: rows per lazy update.
    act_order: process input channels by decreasing Hessian diagonal.

  Returns:
    New variables (see the module docstring).

  Raises:
    ValueError: naming the layer for a singular Hessian after dampening,
      a layer never reached, a layer type or spec GPTQ cannot handle.
  """
  what = "gptq"
  adapter, batches, targets, variables = _setup(qmodel, variables, data,
                                                layers, what)
  # One compiled capture of every target for the whole loop: the loop
  # writes only kernels (same shapes), and the weight ranges at the end, so
  # the variables keep their structure and the capture compiles once.
  capturing = adapter.with_variables(variables)
  paths = [info.path for info in targets]
  capture = capturing.capture(paths)
  ranges = {}
  for info in _bar(targets, what, progress):
    captured = _capture(capturing, batches, paths, variables, what, capture)
    kernel, _ = adapter.get_weight(info.path, variables)
    view = _view(info, kernel, captured.inputs[info.path][0][0], what)
    rows = _layer_rows(adapter, variables, view, captured, what)
    hessian = algorithms.hessian_update(
        jnp.zeros((view.d_in, view.d_in), jnp.float32), rows)
    stored = adapter.read(info.path, core.WEIGHT_RANGE, variables)
    fixed = {}
    if stored is not None and view.spec.granularity.block_shape(
        (view.d_in, view.d_out))[0] == view.d_in:
      shape = (1, 1) if view.spec.granularity.block_shape(
          (view.d_in, view.d_out)) == (view.d_in, view.d_out) else (
              1, view.d_out)
      fixed = {"amax": jnp.reshape(stored["amax"], shape)}
      if "amin" in stored:
        fixed["amin"] = jnp.reshape(stored["amin"], shape)
    try:
      result = algorithms.gptq(view.to_2d(kernel), hessian, view.spec,
                               percdamp=percdamp, block_size=block_size,
                               act_order=act_order, **fixed)
    except ValueError as e:
      raise ValueError(f"{what}: {info.path!r}: {e}") from None
    variables = adapter.write({
        (info.path, info.weight_name): view.from_2d(result.kernel,
                                                    kernel.dtype)}, variables)
    ranges[(info.path, core.WEIGHT_RANGE)] = view.range_from_2d(result.amin,
                                                                result.amax)
  return adapter.write(ranges, variables)
