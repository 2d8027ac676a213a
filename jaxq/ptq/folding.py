"""Smoothing factors applied to a model: kernels scaled, ``1 / s`` folded.

SmoothQuant and AWQ (`jaxq.ptq.algorithms`) find per-input-channel factors
``s`` for a layer, or for the layers that ``fold_into`` says read one op's
output (`fold_groups`); `apply_factors` multiplies the layers' kernel rows
by ``s`` and either folds ``1 / s`` into that op's outputs (a Dense's
kernel columns and bias, a norm's scale and bias) or stores it as the
layers' ``act_smooth``. A fold keeps the model's function only when the
op's output feeds those layers and nothing else: `check_folds` applies
every fold with power-of-two factors (exact when it fits) before any
work, and raises naming the op whose fold moves the float output.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import algorithms
from jaxq.flax import batch as batch_lib
from jaxq.flax import core
from jaxq.flax.adapter import ModelAdapter
from jaxq.flax.rules import LayerInfo
from jaxq.ptq import layers as ptq_layers


def fold_groups(targets: Sequence[LayerInfo],
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


def apply_factors(adapter: ModelAdapter, variables: Any, op: str | None,
                   views: Sequence[ptq_layers.MatmulView], factors: jax.Array,
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

# A fold that fits the data flow changes the float output by float noise at
# most (none with `_probe_factors`); a misplaced one by 10% and more.
_FOLD_TOLERANCE = 1e-3


def _probe_factors(size: int) -> jax.Array:
  """(size,) factors to try a fold with: powers of two in [1/4, 4], uneven
  across channels, so that a fold that fits changes nothing (exactly)."""
  return jnp.exp2(jnp.asarray(np.arange(size) * 7 % 5 - 2, jnp.float32))


def _output_change(reference: Any, output: Any) -> float:
  """``||output - reference|| / ||reference||`` over the float leaves; NaN
  or inf in the same places (padding) count as equal, elsewhere as inf."""
  diff_sq, ref_sq = 0.0, 0.0
  for ref, out in zip(jax.tree.leaves(reference), jax.tree.leaves(output)):
    if not jnp.issubdtype(jnp.result_type(ref), jnp.floating):
      continue
    ref = np.asarray(ref, np.float64)
    out = np.asarray(out, np.float64)
    same = (ref == out) | (np.isnan(ref) & np.isnan(out))
    with np.errstate(invalid="ignore"):
      diff = np.where(same, 0.0, out - ref)
    if not np.all(np.isfinite(diff)):
      return float("inf")
    diff_sq += float(np.sum(diff ** 2))
    ref_sq += float(np.sum(np.where(np.isfinite(ref), ref, 0.0) ** 2))
  return (diff_sq / max(ref_sq, np.finfo(np.float64).tiny)) ** 0.5


def check_folds(adapter: ModelAdapter, variables: Any,
                 groups: Sequence[tuple[str | None, Sequence[LayerInfo]]],
                 captured: Any, batch: Any, what: str) -> None:
  """Raises naming the op of a ``fold_into`` that does not fit the model.

  Dividing an op's outputs by ``s`` and multiplying its layers' kernel rows
  by ``s`` keeps the model's function only when the op's output feeds
  those layers and nothing else. Before any work, every fold is applied
  with `_probe_factors` and the float (calibrate-mode) output on ``batch``
  compared with the model's; when it changed, each fold alone finds the
  op to blame.
  """
  folds = [(op, members) for op, members in groups if op is not None]
  if not folds:
    return

  def folded(selected: Sequence[tuple[str, Sequence[LayerInfo]]]) -> Any:
    probe = variables
    for op, members in selected:
      stacked = ptq_layers.stack_of(adapter, members, op, probe, what)
      for part in ptq_layers.parts(adapter, stacked):
        part_captured = part.inputs(captured) if stacked else captured
        kernels = [part.get_weight(i.path, probe)[0] for i in members]
        views = [ptq_layers.matmul_view(
            i, k, part_captured.inputs[i.path][0][0], what)
                 for i, k in zip(members, kernels)]
        probe = apply_factors(part, probe, op, views,
                               _probe_factors(views[0].d_in), kernels,
                               [None] * len(views), what)
    return probe

  apply_fn = adapter.apply_fn()  # Compiled once: folds keep the structure.
  run = lambda v: batch_lib.call_model(
      lambda *args, **kwargs: apply_fn(v, *args, **kwargs), batch)
  reference = run(variables)
  if _output_change(reference, run(folded(folds))) <= _FOLD_TOLERANCE:
    return
  for op, members in folds:
    change = _output_change(reference, run(folded([(op, members)])))
    if change > _FOLD_TOLERANCE:
      raise ValueError(
          f"{what}: folding into {op!r} changes the float model (its output "
          f"on the first calibration batch moves by {change:.1%} with test "
          f"factors, float noise is below {_FOLD_TOLERANCE:.1%}): "
          f"fold_into says {op!r} makes the input of "
          f"{[i.path for i in members]} and nothing else, but its output "
          f"reaches the model another way. Fold into the op that produces "
          f"their input (not a sibling), with every layer that reads it; "
          f"leave out a norm that also feeds a residual sum (those layers "
          f"scale their own input).")
  raise ValueError(
      f"{what}: the folds {dict((i.path, op) for op, m in folds for i in m)} "
      f"together change the float model, though none alone does; fold "
      f"fewer of them.")
