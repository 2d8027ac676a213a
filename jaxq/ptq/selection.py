"""The layers a model-level PTQ algorithm processes, and what they share.

`setup` adapts a calibrate-mode model (`jaxq.flax.adapt`), checks the
batches and picks the quantized matmul layers in first-call order (raising
for a model in another mode, unknown or never-reached layers, layer types
the algorithms cannot view as a 2-D matmul); `progress_bar` is their tqdm
bar; `stack_ranges` stacks the per-layer ranges of a scanned stack.
"""

from __future__ import annotations

from typing import Any, Collection, Iterable, Sequence

import jax
import jax.numpy as jnp
import tqdm

from jaxq import flax as jaxq_flax
from jaxq.flax import batch as batch_lib
from jaxq.flax import core
from jaxq.flax.adapter import ModelAdapter
from jaxq.flax.rules import LayerInfo
from jaxq.ptq import layers as ptq_layers


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
    ptq_layers.check_layer_type(info, what)
  if not chosen:
    raise ValueError(f"{what}: no quantized matmul layer to process.")
  return chosen


def progress_bar(total: int, what: str, progress: bool) -> tqdm.tqdm:
  return tqdm.tqdm(total=total, desc=f"jaxq {what}", unit="layer",
                   disable=None if progress else True)


def setup(qmodel: Any, variables: Any, data: Iterable[Any],
           layers: Collection[str] | None, what: str
           ) -> tuple[ModelAdapter, list[Any], list[LayerInfo], Any]:
  adapter = jaxq_flax.adapt(qmodel, variables, what=what)
  batches = batch_lib.check_batches(data, what)
  targets = _targets(adapter, batches, layers, what)
  return adapter, batches, targets, adapter.variables


def stack_ranges(layer_ranges: Sequence[core.ActRange]) -> core.ActRange:
  """One range per layer of a stack, stacked ``(L, ...)``."""
  return jax.tree.map(lambda *a: jnp.stack(a), *layer_ranges)
