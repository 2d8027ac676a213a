"""The batch convention: how one batch of data becomes one call of a model.

Every workflow (`jaxq.calibrate`, `jaxq.sensitivity`, `jaxq.partial_quantize`,
`jaxq.report`, the capture of `jaxq.flax.adapt`) runs a batch through a
model with `call_model`, so a batch means the same thing everywhere:

* an array (or any pytree that is not one of the below): the single
  positional argument, ``model(batch)``;
* a tuple or a list: the positional arguments, ``model(*batch)``;
* a mapping: the keyword arguments, ``model(**batch)``;
* a `Batch`: ``model(*batch.args, **batch.kwargs)``, plus an optional
  ``mask`` that is not passed to the model: ``mask[...]`` is True where the
  position is real data and False where it is padding (bool, or 0/1
  integers such as a tokenizer's attention mask), shaped like the leading
  (batch, sequence...) axes of the layer inputs. Every workflow that
  gathers per-position statistics reads it with `batch_mask`, and padding
  counts in none of them: `jaxq.calibrate`'s observers (ranges, histograms;
  each layer gets it through `jaxq.flax.calibration_mask`, and a layer
  whose input does not start with the mask's axes, e.g. after pooling,
  raises naming it), the per-layer capture and the PTQ algorithms'
  statistics (SmoothQuant, AWQ, GPTQ Hessians). The model never sees it.

"model" is linen's ``apply`` with the variables bound (``lambda *a, **k:
qmodel.apply(variables, *a, **k)``) or an nnx module. A workflow's
``forward=(model, batch) -> output`` argument, where one exists, replaces
`call_model` for models called another way (a method, a ``train=False``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

import jax


@dataclasses.dataclass(frozen=True)
class Batch:
  """One batch spelled out: positional and keyword arguments and a mask.

  Attributes:
    args: the model's positional arguments.
    kwargs: its keyword arguments.
    mask: None, or a boolean (or 0/1 integer) array, True at real
      positions and False at padding, shaped like the leading axes of the
      layer inputs (e.g. ``(batch, seq)`` for a ``(batch, seq, features)``
      activation) and broadcast over the rest. Never passed to the model.
  """

  args: tuple[Any, ...] = ()
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  mask: jax.Array | None = None


jax.tree_util.register_dataclass(Batch, data_fields=["args", "kwargs", "mask"],
                                 meta_fields=[])


def batch_arguments(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
  """The ``(args, kwargs)`` a batch stands for (see the module docstring)."""
  if isinstance(batch, Batch):
    return tuple(batch.args), dict(batch.kwargs)
  if isinstance(batch, Mapping):
    return (), dict(batch)
  if isinstance(batch, (tuple, list)):
    return tuple(batch), {}
  return (batch,), {}


def batch_mask(batch: Any) -> jax.Array | None:
  """The padding mask of a `Batch` (True at real positions), else None."""
  return batch.mask if isinstance(batch, Batch) else None


def call_model(model: Callable[..., Any], batch: Any) -> Any:
  """``model(*args, **kwargs)`` of one batch, the convention of every
  workflow: ``model`` is linen's bound ``apply`` or an nnx module."""
  args, kwargs = batch_arguments(batch)
  return model(*args, **kwargs)


def check_batches(data: Iterable[Any], what: str) -> list[Any]:
  """``data`` as a list (it is read several times); raises if empty."""
  batches = list(data)
  if not batches:
    raise ValueError(f"{what}: data holds no batches; pass at least one "
                     f"calibration batch (an array, a tuple of arrays, a "
                     f"mapping of keyword arguments or a jaxq.flax.Batch).")
  return batches
