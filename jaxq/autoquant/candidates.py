"""Candidate formats of one layer: what each costs and what weight it gives.

A `Candidate` is one way to store a layer: float (float32 or bfloat16), or
a weight `QuantSpec` (optionally with an activation spec, W8A8) built by a
PTQ algorithm (round to nearest, GPTQ or AWQ). For a layer whose kernel has
shape ``(*in, *out)`` (a Dense: ``(d_in, d_out)``):

* `nbytes(candidate, shape)`: the bytes the layer's weight takes stored in
  that format, as `jaxq.convert` stores it (values, int4 packed two per
  byte, scales and zero points: `jaxq.QArray.nbytes`, found with
  ``jax.eval_shape``, so nothing is allocated);
* `check_fits(candidate, path, shape)`: a ValueError naming the layer, the
  axis and its size when the candidate's granularity cannot apply;
* `build(candidate, info, kernel, stats)`: the candidate's weight for the
  layer (`LayerWeight`): its quantized kernel (`QArray`) and, for AWQ, the
  per-input-channel factors, from which `effective` gives the float kernel
  the layer computes with, and `fixed` the variables `jaxq.gptq` and
  `jaxq.awq` would store (``weight_range``, ``act_smooth``).

GPTQ and AWQ run on each layer alone, on its float-model input statistics
(not sequentially, as `jaxq.gptq` does): a layer's candidates then depend on
that layer only, which is what makes the scores of different layers add up
(`jaxq.autoquant.scoring`) and the choice a knapsack.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import algorithms
from jaxq import granularity as granularity_lib
from jaxq.ptq import layers as ptq_layers
from jaxq.flax import core
from jaxq.flax.rules import LayerInfo
from jaxq.granularity import PerChannel
from jaxq.granularity import PerGroup
from jaxq.granularity import PerToken
from jaxq.quantize import dequantize
from jaxq.quantize import quantize
from jaxq.spec import QArray
from jaxq.spec import QuantSpec

Algorithm = Literal["rtn", "gptq", "awq"]
ALGORITHMS = ("rtn", "gptq", "awq")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One format a layer may take.

  Attributes:
    name: a short unique name ("W4 g64 gptq"), used in reports and tables.
    weight: the weight's `QuantSpec`, or None to keep it in float.
    act: the input activation's `QuantSpec` (W8A8), or None (weight-only).
    algorithm: how the quantized weight is built: ``"rtn"`` (round to
      nearest on the spec's range), ``"gptq"`` or ``"awq"``
      (`jaxq.algorithms`, on the layer's float inputs).
    float_dtype: for ``weight=None``, the dtype the kernel is stored in
      (``"float32"``, ``"bfloat16"``, ``"float16"``); a narrower one rounds
      the kernel to it.
    options: keyword arguments of the algorithm (GPTQ ``percdamp``,
      ``act_order``, ``block_size``; AWQ ``num_exponents``,
      ``clip_ratios``, ``min_clip``), as ``((name, value), ...)``.
  """

  name: str
  weight: QuantSpec | None = None
  act: QuantSpec | None = None
  algorithm: Algorithm = "rtn"
  float_dtype: str = "float32"
  options: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    if self.algorithm not in ALGORITHMS:
      raise ValueError(f"Candidate {self.name!r}: algorithm must be one of "
                       f"{ALGORITHMS}, got {self.algorithm!r}.")
    if self.weight is None:
      if self.act is not None or self.algorithm != "rtn":
        raise ValueError(f"Candidate {self.name!r}: a float candidate "
                         f"(weight=None) takes no act spec and no algorithm.")
      if self.float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"Candidate {self.name!r}: float_dtype must be one "
                         f"of {FLOAT_DTYPES}, got {self.float_dtype!r}.")
    for field, spec in (("weight", self.weight), ("act", self.act)):
      if spec is not None and not isinstance(spec, QuantSpec):
        raise ValueError(f"Candidate {self.name!r}: {field} must be a "
                         f"QuantSpec or None, got {spec!r}.")
    if self.algorithm == "awq" and self.act is not None:
      raise ValueError(f"Candidate {self.name!r}: AWQ candidates are "
                       f"weight-only here (its factors would change what the "
                       f"act quantizer sees); use rtn or gptq with an act "
                       f"spec.")
    object.__setattr__(self, "options", tuple(dict(self.options).items()))

  @property
  def is_float(self) -> bool:
    """Whether the candidate keeps the weight in float."""
    return self.weight is None

  @property
  def exact(self) -> bool:
    """Whether the candidate changes nothing (float32, no act spec)."""
    return self.weight is None and self.float_dtype == "float32"


# --------------------------------------------------------------------------
# Presets.

FLOAT32 = Candidate("float32")
BF16 = Candidate("bf16", float_dtype="bfloat16")
INT8_CHANNEL = QuantSpec("int8", PerChannel(axis=-1))


def w8(algorithm: Algorithm = "rtn") -> Candidate:
  """Int8 weights, one scale per output channel (weight-only)."""
  return Candidate(f"W8 {algorithm}", INT8_CHANNEL, algorithm=algorithm)


def w8a8(algorithm: Algorithm = "rtn") -> Candidate:
  """Int8 weights per output channel, int8 activations per token (dynamic)."""
  return Candidate(f"W8A8 {algorithm}", INT8_CHANNEL,
                   act=QuantSpec("int8", PerToken()), algorithm=algorithm)


def w4(group: int | None = None, algorithm: Algorithm = "rtn", *,
       affine_mse: bool = False) -> Candidate:
  """Int4 weights per group of ``group`` input channels (None: one scale per
  output channel), weight-only; ``affine_mse``: a scale and an int8 zero
  point per group, each group's range by the ``"mse"`` clipping search."""
  granularity = (PerChannel(axis=-1) if group is None
                 else PerGroup(axis=0, size=group))
  label = "per-channel" if group is None else f"g{group}"
  if affine_mse:
    return Candidate(f"W4 {label} affine mse {algorithm}",
                     QuantSpec("int4", granularity, symmetric=False,
                               calibration="mse"), algorithm=algorithm)
  return Candidate(f"W4 {label} {algorithm}", QuantSpec("int4", granularity),
                   algorithm=algorithm)


def default_candidates(algorithm: Algorithm = "gptq"
                       ) -> tuple[Candidate, ...]:
  """bf16, W8 per channel, W4 g32, W4 g64, W4 per channel: the issue's five
  (the W4 ones built by ``algorithm``; W8 by round to nearest)."""
  return (BF16, w8("rtn"), w4(32, algorithm), w4(64, algorithm),
          w4(None, algorithm))


# --------------------------------------------------------------------------
# Bytes and shapes.


def check_fits(candidate: Candidate, path: str, shape: tuple[int, ...]
               ) -> None:
  """Raises a ValueError naming the layer, axis and size when the candidate's
  weight granularity cannot apply to a kernel of ``shape`` (one layer's)."""
  spec = candidate.weight
  if spec is None:
    return
  g = spec.granularity
  axis = getattr(g, "axis", None)
  where = (f"auto_quantize: candidate {candidate.name!r} does not fit layer "
           f"{path!r} (kernel shape {tuple(shape)})")
  if axis is not None:
    if not -len(shape) <= axis < len(shape):
      raise ValueError(f"{where}: its {type(g).__name__} axis {axis} is out "
                       f"of range for a {len(shape)}-d kernel.")
    size = getattr(g, "size", None)
    if spec.is_mx and size and shape[axis] % size:
      raise ValueError(f"{where}: axis {axis} has size {shape[axis]}, which "
                       f"MX blocks of {size} do not divide.")
    if isinstance(g, PerGroup) and candidate.algorithm != "rtn" and (
        axis % len(shape)) != 0:
      raise ValueError(f"{where}: {candidate.algorithm} needs groups along "
                       f"the input axis 0, got axis {axis} (size "
                       f"{shape[axis]}, groups of {size}).")
  try:
    jax.eval_shape(lambda w: quantize(w, spec),
                   jax.ShapeDtypeStruct(tuple(shape), jnp.float32))
  except Exception as e:  # The granularity's own message names the rest.
    raise ValueError(f"{where}: {e}") from None


def nbytes(candidate: Candidate, shape: tuple[int, ...],
           stacked: int | None = None) -> int:
  """Bytes of one layer's weight of ``shape`` stored as ``candidate``
  (times ``stacked`` for a stack of layers): values (sub-byte packed),
  scales and zero points, as `jaxq.convert` stores them."""
  copies = stacked or 1
  if candidate.weight is None:
    return copies * math.prod(shape) * np.dtype(
        jnp.dtype(candidate.float_dtype)).itemsize
  abstract = jax.eval_shape(lambda w: quantize(w, candidate.weight),
                            jax.ShapeDtypeStruct(tuple(shape), jnp.float32))
  return copies * int(abstract.nbytes)


# --------------------------------------------------------------------------
# Building the candidates' weights.


@dataclasses.dataclass(frozen=True)
class LayerWeight:
  """A layer's weight in one candidate format.

  Attributes:
    slices: one entry per layer of the stack (one for an ordinary layer):
      a `QArray` of the kernel as quantized (GPTQ: on the 2-D ``(d_in,
      d_out)`` view; AWQ: of the kernel times its factors), or the float
      kernel (float candidates).
    factors: AWQ's per-input-channel factors ``(d_in,)`` per slice, else
      None: the layer divides its input by them, so its effective kernel
      is the dequantized one with row ``j`` divided by ``factors[j]``.
    ranges: the ``weight_range`` `jaxq.gptq`/`jaxq.awq` would store per
      slice (the spec's scale shape of one kernel), or None (round to
      nearest: the layer computes its range itself).
    shape: one layer's kernel shape.
    dtype: the stored kernel's dtype.
    stacked: whether the layer is a stack (its kernel leads with ``L``).
  """

  slices: tuple[QArray | jax.Array, ...]
  factors: tuple[jax.Array, ...] | None
  ranges: tuple[core.ActRange, ...] | None
  shape: tuple[int, ...]
  dtype: Any
  stacked: bool = False

  def _one(self, i: int, scaled: bool) -> jax.Array:
    value = self.slices[i]
    kernel = dequantize(value) if isinstance(value, QArray) else value
    kernel = jnp.reshape(kernel, self.shape)
    if self.factors is not None and not scaled:
      f = self.factors[i]
      kernel = kernel / jnp.reshape(f, f.shape + (1,) * (len(self.shape) -
                                                        f.ndim))
    return kernel.astype(self.dtype)

  def effective(self) -> jax.Array:
    """The float kernel the layer computes with: ``shape`` or, stacked,
    ``(L, *shape)``."""
    kernels = [self._one(i, False) for i in range(len(self.slices))]
    return jnp.stack(kernels) if self.stacked else kernels[0]

  def stored(self) -> jax.Array:
    """The kernel to store beside `fixed` (AWQ: the scaled kernel; GPTQ: the
    dequantized kernel; round to nearest: the float kernel)."""
    kernels = [self._one(i, True) for i in range(len(self.slices))]
    return jnp.stack(kernels) if self.stacked else kernels[0]


def fixed(weight: LayerWeight) -> dict[str, Any]:
  """The fixed variables (`jaxq.flax.core.FIXED_NAMES`) of ``weight``:
  ``weight_range`` and ``act_smooth``, stacked for a stack of layers."""
  out: dict[str, Any] = {}
  stack = weight.stacked
  if weight.ranges is not None:
    out[core.WEIGHT_RANGE] = (jax.tree.map(lambda *a: jnp.stack(a),
                                           *weight.ranges) if stack
                              else weight.ranges[0])
  if weight.factors is not None:
    out[core.ACT_SMOOTH] = (jnp.stack(weight.factors) if stack
                            else weight.factors[0])
  return out


def build(candidate: Candidate, info: LayerInfo, kernel: jax.Array,
          stats: tuple[algorithms.InputStats, ...] | None,
          x_shape: tuple[int, ...] | None) -> LayerWeight:
  """The layer's weight as ``candidate``.

  Args:
    candidate: the format.
    info: the layer (its ``stacked`` size says whether ``kernel`` leads
      with a stack axis).
    kernel: the stored float kernel: ``info.weight_shape``, or ``(L,
      *weight_shape)`` for a stack.
    stats: the layer's float input statistics per slice (GPTQ, AWQ), or
      None for round to nearest and float candidates.
    x_shape: the shape of one captured input (to view the kernel as a 2-D
      matmul), or None when ``stats`` is.
  """
  stacked = info.stacked is not None
  kernels = list(kernel) if stacked else [kernel]
  shape = tuple(info.weight_shape)
  dtype = kernel.dtype
  if candidate.weight is None:
    # Stored in its own dtype (half the memory of bf16 as float32); the
    # effective kernel casts back.
    dt = jnp.dtype(candidate.float_dtype)
    return LayerWeight(tuple(k.astype(dt) for k in kernels),
                       None, None, shape, dtype, stacked)
  spec = candidate.weight
  if candidate.algorithm == "rtn":
    return LayerWeight(
        tuple(quantize(k.astype(jnp.float32), spec, range_from_data=True)
              for k in kernels), None, None, shape, dtype, stacked)
  what = f"auto_quantize ({candidate.name})"
  layer = dataclasses.replace(info, weight=spec)
  view = ptq_layers.matmul_view(layer, kernels[0], jnp.zeros(x_shape), what)
  options = dict(candidate.options)
  slices, factors, ranges = [], [], []
  for k, st in zip(kernels, stats):
    k2 = view.to_2d(k)
    if candidate.algorithm == "gptq":
      result = algorithms.gptq(
          k2, 2.0 * st.gram, view.spec,
          percdamp=options.get("percdamp", 0.1),
          block_size=options.get("block_size", 128),
          act_order=options.get("act_order", True))
      slices.append(quantize(result.kernel, view.spec, amax=result.amax,
                             amin=result.amin))
    else:
      result = algorithms.awq(
          k2, st, view.spec, num_exponents=options.get("num_exponents", 20),
          clip_ratios=options.get("clip_ratios", 20),
          min_clip=options.get("min_clip", 0.5))
      scaled = k2 * result.factors[:, None]
      slices.append(quantize(scaled, view.spec, amax=result.amax,
                             amin=result.amin))
      factors.append(jnp.reshape(result.factors, view.in_shape))
    ranges.append(view.range_from_2d(result.amin, result.amax))
  return LayerWeight(tuple(slices), tuple(factors) or None, tuple(ranges),
                     shape, dtype, stacked)


def needs_stats(candidates: Mapping[str, Any] | Any) -> bool:
  """Whether any candidate needs input statistics (GPTQ, AWQ)."""
  return any(c.algorithm != "rtn" for c in candidates)


def scale_shape(candidate: Candidate, shape: tuple[int, ...]
                ) -> tuple[int, ...]:
  """The scale shape of ``candidate``'s weight spec on ``shape``."""
  return tuple(granularity_lib.scale_shape(candidate.weight.granularity,
                                           shape))
