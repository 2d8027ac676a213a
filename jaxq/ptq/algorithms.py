"""SmoothQuant and AWQ over a whole model, as new jaxq variables.

``variables = jaxq.awq(qmodel, variables, batches)`` (likewise
`smoothquant`, and `gptq` of `jaxq.ptq.gptq`; the layer selection they
share is `jaxq.ptq.selection`, the factors' folding `jaxq.ptq.folding`)
runs the array-level algorithms of `jaxq.algorithms`
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
key and value after one LayerNorm); under a per-tensor weight spec AWQ's
range is that of the concatenation, shared by the layers. The op's output
must feed only the layers folded into it: in a post-LayerNorm transformer
(BERT) the norm's output also feeds the residual sum, and folding there
changes the model; leave such layers out of ``fold_into`` (they scale
their own input). This is checked before any work
(`jaxq.ptq.folding.check_folds`):
every fold is applied with power-of-two factors (exact: a fold that fits
changes nothing) and the float output on the first calibration batch
compared; a fold that moves it (a sibling op, a norm another layer reads
too, a norm feeding a residual) raises naming the op.

Kernels are viewed as 2-D ``(d_in, d_out)``: the contraction axes are the
kernel's leading axes that equal the input's trailing axes (one for Dense;
ambiguous or non-trailing contractions, and convolutions, raise naming the
layer). The weight spec must map onto the 2-D view (per tensor, per output
channel over all output axes, or groups along a single input axis).

Masks: the inputs are captured batch by batch (`ModelAdapter.
capture_inputs`), and the rows that a `jaxq.flax.Batch`'s mask marks as
padding are dropped before any statistic (abs-max, mean magnitude, ``X^T
X``), so padding never counts, NaN in it included; NaN or inf left in a
layer's unmasked rows raises a ValueError naming the layer.

Combinations: each pass starts from the variables of the one before.
Inputs are captured as the layer receives them and divided by the layer's
stored ``act_smooth`` before any statistic, so GPTQ or AWQ after
`smoothquant` see the smoothed inputs its kernels multiply, and a second
smoothing pass multiplies ``act_smooth`` by its own factors.

Scanned layers (linen ``nn.scan`` with ``jaxq.flax.SCAN_AXES``, nnx
``nnx.vmap`` + ``nnx.scan``): each layer of the stack is processed on its
own inputs (`jaxq.ptq.layers.LayerSlice`), its kernel and fixed variables
written to its slice, as for the unrolled model; GPTQ runs a scanned block
layer by layer (``(a, 0), (b, 0), (a, 1), ...``), capturing before each.

Depth (``blocks=``): a deep model repeats one block (``layers_0`` ...
``layers_29``, linen; ``layers/0`` ..., nnx). Capturing through the whole
model holds every layer's inputs and, for GPTQ, runs the whole model once
per layer: time quadratic in depth. By default the algorithms walk such a
model block by block, as the GPTQ paper's code does (`jaxq.ptq.blocks`):
the first block's call arguments (``x``, positions, masks...) come from one
whole-model pass, each block runs alone on its arguments
(`jaxq.flax.ModelAdapter.run_module`) for its layers' inputs, and its
outputs are the next block's ``x``. GPTQ reruns a block before each layer
whose input the layers just quantized could change (once for q, k, v on
one input) and takes the next block's input from the quantized block; AWQ
and SmoothQuant take every input from the original block, as the
whole-model capture does. Time is linear in depth and memory one block's
inputs; the results equal the whole-model path (``blocks=False``) up to
float rounding of the separately compiled blocks. Models without blocks,
or whose blocks do not feed each other directly (checked on the trace),
or with scanned stacks, take the whole-model path.

Static activation ranges: `jaxq.calibrate` on the same masked batches
leaves the padding out too; ``smoothquant(..., act_ranges=True)`` writes
ranges from the unmasked rows without a separate pass.
"""
from __future__ import annotations

import warnings
from typing import Any, Collection, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp

from jaxq import algorithms
from jaxq import granularity as granularity_lib
from jaxq import range_search
from jaxq.quantize import compute_range
from jaxq.algorithms import smoothquant as smoothquant_lib
from jaxq.flax import core
from jaxq.flax.adapter import ModelAdapter
from jaxq.flax.rules import LayerInfo
from jaxq.ptq import blocks as ptq_blocks
from jaxq.ptq import folding
from jaxq.ptq import layers as ptq_layers
from jaxq.ptq import selection


def _act_range(view: ptq_layers.MatmulView, rows: jax.Array,
               x_shape: tuple[int, ...],
               what: str) -> core.ActRange:
  """The static act range of a layer from its unmasked (smoothed) rows."""
  spec = view.info.act
  if spec is None or spec.dynamic:
    raise ValueError(f"{what}: act_ranges needs a static act spec on "
                     f"{view.info.path!r}, whose rule has {spec}.")
  if not isinstance(spec.granularity, granularity_lib.PerTensor) or (
      spec.calibration not in range_search.ARRAY_CALIBRATIONS):
    raise ValueError(
        f"{what}: act_ranges computes per-tensor ranges from the captured "
        f"inputs by calibration in {range_search.ARRAY_CALIBRATIONS}, but "
        f"{view.info.path!r} has {spec.granularity} with "
        f"calibration={spec.calibration!r}; calibrate it with jaxq.calibrate.")
  shape = granularity_lib.scale_shape(spec.granularity, x_shape)
  # The rows are the inputs' real positions: their range is the tensor's.
  amin, amax = compute_range(jnp.asarray(rows, jnp.float32), spec)
  out = {"amax": jnp.broadcast_to(amax.reshape(()), shape)}
  if not spec.symmetric:
    out["amin"] = jnp.broadcast_to(jnp.minimum(amin.reshape(()), 0.0), shape)
  return out


def smoothquant(qmodel: Any, variables: Any, data: Iterable[Any], *,
                alpha: float | Mapping[str, float] | None = 0.5,
                alphas: Sequence[float] = smoothquant_lib.DEFAULT_ALPHAS,
                fold_into: Mapping[str, str] | None = None,
                layers: Collection[str] | None = None,
                act_ranges: bool = False,
                blocks: ptq_blocks.Blocks = True,
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
    blocks: how to walk the model (see "Depth" in the module docstring):
      True finds its repeated blocks (``layers_<i>``, ``layers/<i>``) and
      captures block by block, a regex names the block module paths, False
      captures with the whole model. The results are the same.
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
  adapter, batches, targets, variables = selection.setup(
      qmodel, variables, data, layers, what)
  ranges: dict[str, list[core.ActRange]] = {}
  stacked_paths: set[str] = set()

  def process(op: str | None, members: list[LayerInfo], captured: Any,
              variables: Any) -> Any:
    stacked = ptq_layers.stack_of(adapter, members, op, variables, what)
    stacked_paths.update(stacked)
    # A stack of scanned layers: each layer on its own inputs.
    for part in ptq_layers.parts(adapter, stacked):
      part_captured = part.inputs(captured) if stacked else captured
      kernels = [part.get_weight(i.path, variables)[0] for i in members]
      views = [ptq_layers.matmul_view(
          i, k, part_captured.inputs[i.path][0][0], what)
               for i, k in zip(members, kernels)]
      rows = ptq_layers.layer_rows(part, variables, views[0], part_captured,
                                   what)
      kernel_cat = jnp.concatenate(
          [v.to_2d(k) for v, k in zip(views, kernels)], axis=1)
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
      variables = folding.apply_factors(part, variables, op, views, factors,
                                 kernels, [None] * len(views), what)
      if act_ranges:
        smoothed = rows / factors
        for view in views:
          ranges.setdefault(view.info.path, []).append(_act_range(
              view, smoothed,
              tuple(part_captured.inputs[view.info.path][0][0].shape), what))
    return variables

  variables = _each_group(adapter, batches, targets, variables, fold_into,
                          blocks, process, what, progress)
  if act_ranges:
    variables = adapter.with_variables(variables).with_ranges({
        path: selection.stack_ranges(layer_ranges) if path in stacked_paths
        else layer_ranges[0] for path, layer_ranges in ranges.items()
    }).variables
  return variables


def _each_group(adapter: ModelAdapter, batches: Sequence[Any],
                targets: Sequence[LayerInfo], variables: Any,
                fold_into: Mapping[str, str] | None, blocks: ptq_blocks.Blocks,
                process: Any, what: str, progress: bool) -> Any:
  """``process(op, members, captured, variables) -> variables`` on each
  group of layers sharing one set of factors, in model order, ``captured``
  the inputs the original model (``variables`` as given) feeds them: from
  one whole-model capture, or block by block (`jaxq.ptq.blocks`), holding
  one block's inputs at a time."""
  groups = folding.fold_groups(targets, fold_into, what)
  the_plan = ptq_blocks.plan(adapter, batches, targets, blocks, what)
  by_unit = None if the_plan is None else _groups_by_unit(the_plan, groups)
  if by_unit is None:
    captured = ptq_layers.capture(adapter, batches, [i.path for i in targets],
                                  variables, what)
    folding.check_folds(adapter, variables, groups, captured, batches[0], what)
  else:
    folded = [i.path for op, members in groups if op is not None
              for i in members]
    if folded:  # The check needs the folded layers' input shapes only.
      folding.check_folds(adapter, variables, groups, ptq_layers.capture(
          adapter, batches[:1], folded, variables, what), batches[0], what)
  bar = selection.progress_bar(len(groups), what, progress)
  if by_unit is None:
    for op, members in groups:
      variables = process(op, members, captured, variables)
      bar.update()
  else:
    start = variables

    def one_unit(unit: ptq_blocks.Unit, inputs: ptq_blocks.UnitInputs,
                 variables: Any) -> Any:
      # Inputs as the original model computes them, as the whole-model
      # capture has them (smoothing keeps each block's function).
      for op, members in by_unit[unit.name]:
        variables = process(op, members, inputs.inputs(start), variables)
        bar.update()
      return variables

    variables = ptq_blocks.walk(adapter, batches, the_plan, variables,
                                one_unit, sequential=False, what=what)
  bar.close()
  return variables


def _groups_by_unit(the_plan: ptq_blocks.Plan,
                    groups: Sequence[tuple[str | None, list[LayerInfo]]]
                    ) -> dict[str, list[tuple[str | None, list[LayerInfo]]]
                              ] | None:
  """`Unit.name` -> the groups of its layers (in order), or None when a
  group (layers folded into one op) spans several units."""
  unit_of = {info.path: unit.name for unit in the_plan.units
             for info in unit.layers}
  out: dict[str, list[tuple[str | None, list[LayerInfo]]]] = {
      unit.name: [] for unit in the_plan.units}
  for op, members in groups:
    units = {unit_of[info.path] for info in members}
    if len(units) != 1:
      warnings.warn(f"fold_into folds layers of {sorted(units)} into one op "
                    f"({op!r}); capturing with the whole model.",
                    stacklevel=4)
      return None
    out[units.pop()].append((op, members))
  return out


def awq(qmodel: Any, variables: Any, data: Iterable[Any], *,
        num_exponents: int = 20, clip_ratios: int = 20, min_clip: float = 0.5,
        fold_into: Mapping[str, str] | None = None,
        layers: Collection[str] | None = None,
        blocks: ptq_blocks.Blocks = True,
        progress: bool = True) -> Any:
  """AWQ (Lin et al., 2024) on every quantized matmul layer.

  Per layer (or group sharing one fold op): the per-input-channel factors
  and, with ``clip_ratios > 0``, the per-scale clipping of
  `jaxq.algorithms.awq`, from the unmasked calibration rows. Writes the
  scaled kernel, its ``weight_range`` and the factors (folded or
  ``act_smooth``).

  Args:
    qmodel, variables, data, fold_into, layers, blocks, progress: as
      `smoothquant`.
    num_exponents: grid of the factors' exponent over [0, 1].
    clip_ratios: grid of the clipping search (0: the spec's calibration).
    min_clip: the smallest clipping ratio.

  Returns:
    New variables (see the module docstring).
  """
  what = "awq"
  adapter, batches, targets, variables = selection.setup(
      qmodel, variables, data, layers, what)

  def process(op: str | None, members: list[LayerInfo], captured: Any,
              variables: Any) -> Any:
    stacked = ptq_layers.stack_of(adapter, members, op, variables, what)
    # A stack of scanned layers: each layer on its own inputs.
    for part in ptq_layers.parts(adapter, stacked):
      variables = _awq_group(part, variables, op, members,
                             part.inputs(captured) if stacked else captured,
                             num_exponents, clip_ratios, min_clip, what)
    return variables

  return _each_group(adapter, batches, targets, variables, fold_into, blocks,
                     process, what, progress)


def _awq_group(adapter: ModelAdapter | ptq_layers.LayerSlice, variables: Any,
               op: str | None, members: Sequence[LayerInfo], captured: Any,
               num_exponents: int, clip_ratios: int, min_clip: float,
               what: str) -> Any:
  """`awq` on the layers sharing one input (one layer of a stack)."""
  kernels = [adapter.get_weight(i.path, variables)[0] for i in members]
  views = [ptq_layers.matmul_view(i, k, captured.inputs[i.path][0][0], what)
           for i, k in zip(members, kernels)]
  specs = {v.spec for v in views}
  if len(specs) != 1:
    raise ValueError(f"{what}: {[i.path for i in members]} share one input "
                     f"(fold_into {op!r}) but have different weight specs "
                     f"{sorted(map(str, specs))}.")
  stats = ptq_layers.input_stats(ptq_layers.layer_rows(
      adapter, variables, views[0], captured, what))
  kernel_cat = jnp.concatenate([v.to_2d(k) for v, k in zip(views, kernels)],
                               axis=1)
  try:
    result = algorithms.awq(kernel_cat, stats, views[0].spec,
                            num_exponents=num_exponents,
                            clip_ratios=clip_ratios, min_clip=min_clip)
  except ValueError as e:
    raise ValueError(f"{what}: {members[0].path!r}: {e}") from None
  ranges = _member_ranges(views, result.amin, result.amax, what)
  return folding.apply_factors(adapter, variables, op, views, result.factors,
                        kernels, ranges, what)


def _member_ranges(views: Sequence[ptq_layers.MatmulView],
                   amin: jax.Array | None, amax: jax.Array, what: str
                   ) -> list[core.ActRange]:
  """Each layer's share of a range found on the group's kernels
  concatenated along the output axis: its columns' scales, or the one
  scale of a per-tensor spec, shared (the grid the search quantized
  with)."""
  total = sum(view.d_out for view in views)
  per_scale = total // amax.shape[1]  # Output columns per scale column.
  ranges, start = [], 0
  for view in views:
    if amax.shape[1] == 1:
      cols = slice(0, 1)
    elif start % per_scale or view.d_out % per_scale:
      raise ValueError(
          f"{what}: {[v.info.path for v in views]} share one input, but "
          f"their weight spec's blocks of {per_scale} output columns "
          f"straddle two of them ({view.info.path!r} starts at column "
          f"{start} of {total}); fold them separately.")
    else:
      cols = slice(start // per_scale, (start + view.d_out) // per_scale)
    start += view.d_out
    ranges.append(view.range_from_2d(None if amin is None else amin[:, cols],
                                     amax[:, cols]))
  return ranges
