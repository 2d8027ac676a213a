"""The searched layers, their groups, candidates and input statistics.

* `searched_layers`: the model's matmul layers (Dense, DenseGeneral, Einsum;
  nnx Linear, LinearGeneral, Einsum) and convolutions (Conv: round to
  nearest and float candidates) whose path matches a regex, with their
  `LayerInfo` (a scanned stack is one path, ``stacked = L``).
* `group_layers`: layers that must share a format: those matching one regex
  with the same captured groups (``r"(layers_\\d+)/attn/[qkv]"``: q, k and v of
  each block) form one group; other layers are groups of one.
* `candidates_of` / `check_candidates`: a layer's candidates (one list for
  all, or regex -> list, first match), checked.
* `input_stats`: per layer, the float inputs' statistics (`InputStats`: the
  ``(d_in, d_in)`` Gram matrix and moments) per stack slice, which GPTQ and
  AWQ candidates are built from; one capture pass per batch.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax.numpy as jnp

from jaxq import algorithms
from jaxq.ptq import layers as ptq_layers
from jaxq.autoquant.candidates import Candidate
from jaxq.flax import adapter as adapter_lib
from jaxq.flax import batch as batch_lib
from jaxq.flax.adapter import ModelAdapter
from jaxq.flax.rules import LayerInfo
from jaxq.flax.rules import Rule
from jaxq.granularity import PerToken
from jaxq.spec import QuantSpec

Candidates = Sequence[Candidate] | Mapping[str, Sequence[Candidate]]
WHAT = "auto_quantize"
# Convolutions: searched with round-to-nearest and float candidates.
CONV_TYPES = ("Conv",)


def searched_layers(adapter: ModelAdapter, batch: Any, layers: str | None
                    ) -> dict[str, LayerInfo]:
  """The searched layers, in model order: matmul and convolution layers
  matching ``layers`` (their LayerInfo from an act-only probe, which
  changes no weight). GPTQ and AWQ candidates take matmul layers only (a
  convolution's raises naming it); round to nearest and float take both."""
  probe = adapter.quantize([Rule(r".*", act=QuantSpec("int8", PerToken()))],
                           "calibrate")
  every = probe.ordered_layers(batch)
  chosen = {}
  for path, info in every.items():
    if layers is not None and re.fullmatch(layers, path) is None:
      continue
    kinds = ptq_layers.MATMUL_TYPES + CONV_TYPES
    if info.module_type in kinds or any(info.module_type.endswith(t)
                                        for t in kinds):
      chosen[path] = info
  if not chosen:
    raise ValueError(f"{WHAT}: no matmul or convolution layer (Dense, "
                     f"DenseGeneral, Einsum, Linear, LinearGeneral, Conv) "
                     f"matches layers={layers!r}; the model's layers are "
                     f"{sorted(every)}.")
  return chosen


def candidates_of(candidates: Candidates, path: str
                  ) -> tuple[Candidate, ...] | None:
  """The candidates of the layer at ``path`` (None: not searched)."""
  if isinstance(candidates, Mapping):
    for regex, cands in candidates.items():
      if re.fullmatch(regex, path):
        return tuple(cands)
    return None
  return tuple(candidates)


def check_candidates(cands: Sequence[Candidate], where: str) -> None:
  """Raises a ValueError naming ``where`` for an empty list, a non-Candidate
  or repeated names."""
  if not cands:
    raise ValueError(f"{WHAT}: no candidates for {where}.")
  for c in cands:
    if not isinstance(c, Candidate):
      raise ValueError(f"{WHAT}: candidates must be "
                       f"jaxq.autoquant.Candidate, got {c!r} for {where}.")
  names = [c.name for c in cands]
  if len(set(names)) != len(names):
    raise ValueError(f"{WHAT}: candidate names must be unique, got {names} "
                     f"for {where}.")


def group_layers(layers: Mapping[str, LayerInfo], groups: Sequence[str]
                 ) -> list[tuple[str, tuple[str, ...]]]:
  """``(name, paths)`` per group, in the order of each group's first layer."""
  compiled = [re.compile(g) for g in groups]
  keyed: dict[Any, list[str]] = {}
  names: dict[Any, str] = {}
  for path in layers:
    key, name = ("layer", path), path
    for i, regex in enumerate(compiled):
      m = regex.fullmatch(path)
      if m is not None:
        key = ("group", i, m.groups())
        name = ("/".join(str(x) for x in m.groups()) + f" ({regex.pattern})"
                if m.groups() else regex.pattern)
        break
    keyed.setdefault(key, []).append(path)
    names[key] = name
  return [(names[k], tuple(v)) for k, v in keyed.items()]


def input_stats(adapter: ModelAdapter, batches: Sequence[Any],
                layers: Mapping[str, LayerInfo], paths: Sequence[str]
                ) -> tuple[dict[str, tuple[algorithms.InputStats, ...]],
                           dict[str, tuple[int, ...]]]:
  """Per layer: float input statistics per stack slice, and one input's
  shape; one capture pass per batch (nothing held across batches)."""
  capture = adapter.capture(paths)
  stats: dict[str, list[algorithms.InputStats]] = {}
  shapes: dict[str, tuple[int, ...]] = {}
  for batch in batches:
    captured = capture(adapter.variables, batch)
    one = adapter_lib.collect_inputs(capture.calls, [captured], paths,
                                     (batch_lib.batch_mask(batch),))
    for path in paths:
      info = layers[path]
      kernel_shape = tuple(info.weight_shape)
      for call in one.inputs[path]:
        x = call[0]
        xs = list(x) if info.stacked else [x]
        shapes.setdefault(path, tuple(xs[0].shape))
        num_in = ptq_layers.num_in_axes(info, kernel_shape,
                                        tuple(xs[0].shape), WHAT)
        d_in = math.prod(kernel_shape[:num_in])
        per = stats.setdefault(path, [algorithms.init_input_stats(d_in)
                                      for _ in xs])
        for i, xi in enumerate(xs):
          lead = tuple(xi.shape[:xi.ndim - num_in])
          rows = jnp.reshape(xi, lead + (d_in,))
          mask = one.masks[0]
          if mask is not None:
            mask = jnp.asarray(mask, bool)
            if mask.shape != lead:
              mask = jnp.broadcast_to(jnp.reshape(
                  mask, mask.shape + (1,) * (len(lead) - mask.ndim)), lead)
          if not bool(jnp.all(jnp.isfinite(
              rows if mask is None else jnp.where(mask[..., None], rows,
                                                  0.0)))):
            raise ValueError(f"{WHAT}: the calibration inputs of {path!r} "
                             f"hold NaN or inf.")
          per[i] = algorithms.update_input_stats(per[i], rows, mask)
  return {p: tuple(s) for p, s in stats.items()}, shapes
