"""One matmul layer as the PTQ algorithms see it: a 2-D kernel and its rows.

`MatmulView` views a Dense/DenseGeneral/Einsum (nnx Linear/LinearGeneral/
Einsum) kernel as a 2-D ``(d_in, d_out)`` matmul operand, with the weight
spec mapped onto that view (`spec_2d`); `capture` records the layers' inputs
through the model adapter, and `input_rows` / `layer_rows` flatten them to
``(n, d_in)`` rows with the padding rows of a `jaxq.flax.Batch` mask
dropped (and divided by the layer's stored smoothing factors), the input of
every statistic of `jaxq.ptq.algorithms`.

Layers scanned over a stack of ``L`` (linen ``nn.scan`` with
``jaxq.flax.SCAN_AXES``) store ``(L, *kernel)`` weights and are captured
with ``(L, *lead, d_in)`` inputs: `LayerSlice` is layer ``i`` of such a
stack, an adapter whose reads give slice ``i`` and whose writes set it, and
`LayerSlice.inputs` slices the captured inputs likewise, so the algorithms
process each layer of the stack on its own inputs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxq import algorithms
from jaxq import granularity as granularity_lib
from jaxq.flax import core
from jaxq.flax.adapter import LayerInputs
from jaxq.flax.adapter import ModelAdapter
from jaxq.flax.rules import LayerInfo
from jaxq.spec import QuantSpec

# Module types whose kernel is one matmul's right operand.
MATMUL_TYPES = ("Dense", "DenseGeneral", "Einsum", "Linear",
                 "LinearGeneral")


@dataclasses.dataclass(frozen=True)
class MatmulView:
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


def num_in_axes(info: LayerInfo, kernel_shape: tuple[int, ...],
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


def spec_2d(info: LayerInfo, kernel_shape: tuple[int, ...], num_in: int,
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


def check_layer_type(info: LayerInfo, what: str) -> None:
  if info.module_type not in MATMUL_TYPES and not any(
      info.module_type.endswith(t) for t in MATMUL_TYPES):
    raise ValueError(
        f"{what}: {info.path!r} is a {info.module_type}, which {what} cannot "
        f"handle (it supports {', '.join(MATMUL_TYPES)}); leave it out with "
        f"layers=[...] or a skip rule.")


def capture(adapter: ModelAdapter, batches: Sequence[Any],
            paths: Sequence[str], variables: Any, what: str,
            capture_pass: Any = None) -> Any:
  """The inputs of the layers at ``paths`` (`ModelAdapter.capture_inputs`;
  ``capture_pass`` a compiled pass to reuse), a missing layer named."""
  try:
    return adapter.capture_inputs(batches, paths, variables,
                                  capture=capture_pass)
  except ValueError as e:
    raise ValueError(f"{what}: calibration never reached a layer: {e}"
                     ) from None


def matmul_view(info: LayerInfo, kernel: jax.Array, x: jax.Array,
          what: str) -> MatmulView:
  shape = tuple(kernel.shape)
  num_in = num_in_axes(info, shape, tuple(x.shape), what)
  return MatmulView(info, shape, num_in, spec_2d(info, shape, num_in, what))


def input_rows(view: MatmulView, captured: Any, what: str) -> jax.Array:
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


def layer_rows(adapter: ModelAdapter, variables: Any, view: MatmulView,
                captured: Any, what: str) -> jax.Array:
  """`input_rows` as the layer's matmul sees them: divided by the smoothing
  factors an earlier `smoothquant`/`awq` stored on the layer (the capture
  records the layer's arguments, before the layer divides them)."""
  rows = input_rows(view, captured, what)
  factors = adapter.read(view.info.path, core.ACT_SMOOTH, variables)
  return rows if factors is None else rows / jnp.reshape(factors, (-1,))


def input_stats(rows: jax.Array) -> algorithms.InputStats:
  stats = algorithms.init_input_stats(rows.shape[-1])
  return algorithms.update_input_stats(stats, rows)


@dataclasses.dataclass(frozen=True)
class LayerSlice:
  """Layer ``index`` of stacked layers, as the algorithms read and write it.

  Duck-types the `ModelAdapter` methods the algorithms use (``get_weight``,
  ``read``, ``write``): at the paths of ``stacked`` (path -> ``L``) a read
  returns slice ``index`` of the stored ``(L, ...)`` value and a write sets
  it (a fixed variable written first is created for the whole stack:
  ``act_smooth`` ones, a ``weight_range`` zeros until each layer writes its
  own); other paths pass through.
  """

  adapter: ModelAdapter
  stacked: Mapping[str, int]
  index: int

  def _one(self, path: str, value: Any) -> Any:
    if value is None or path not in self.stacked:
      return value
    return jax.tree.map(lambda a: a[self.index], value)

  def get_weight(self, path: str, variables: Any
                 ) -> tuple[jax.Array, jax.Array | None]:
    kernel, bias = self.adapter.get_weight(path, variables)
    return self._one(path, kernel), self._one(path, bias)

  def read(self, path: str, name: str, variables: Any) -> Any | None:
    return self._one(path, self.adapter.read(path, name, variables))

  def write(self, values: Mapping[tuple[str, str], Any], variables: Any
            ) -> Any:
    full = {}
    for (path, name), value in values.items():
      if path not in self.stacked:
        full[(path, name)] = value
        continue
      old = self.adapter.read(path, name, variables)
      if old is None:
        fill = 1.0 if name == core.ACT_SMOOTH else 0.0
        old = jax.tree.map(lambda a, path=path: jnp.full(
            (self.stacked[path],) + tuple(jnp.shape(a)), fill,
            jnp.asarray(a).dtype), value)
      full[(path, name)] = jax.tree.map(
          lambda o, a: o.at[self.index].set(jnp.asarray(a, o.dtype)),
          old, value)
    return self.adapter.write(full, variables)

  def inputs(self, captured: LayerInputs) -> LayerInputs:
    """The captured inputs and outputs of this layer of the stacks."""
    def one(path: str, calls: Any) -> Any:
      if path not in self.stacked:
        return calls
      return tuple(tuple(jax.tree.map(lambda a: a[self.index], x)
                         for x in call) for call in calls)

    return LayerInputs(
        inputs={p: one(p, c) for p, c in captured.inputs.items()},
        outputs={p: one(p, c) for p, c in captured.outputs.items()},
        masks=captured.masks)


def stack_of(adapter: ModelAdapter, infos: Sequence[LayerInfo],
             op: str | None, variables: Any, what: str) -> dict[str, int]:
  """path -> ``L`` for layers processed together (one fold group) that are
  scanned over a stack of ``L`` (and their fold op, which must be scanned
  with them); {} for ordinary layers. Raises naming the layers when only
  some are stacked, or stacks differ, or the op is outside the scan."""
  sizes = {info.path: info.stacked for info in infos}
  if not any(sizes.values()):
    return {}
  if len(set(sizes.values())) != 1:
    raise ValueError(
        f"{what}: the layers {sorted(sizes)} share one input but are not "
        f"scanned over the same stack of layers (stack sizes {sizes}); fold "
        f"them separately (fold_into=...) or leave some out (layers=...).")
  size = next(iter(sizes.values()))
  stacked = dict(sizes)
  if op is not None:
    kernel = adapter.read(op, "kernel", variables)
    target = kernel if kernel is not None else adapter.read(
        op, "scale", variables)
    ndim = 3 if kernel is not None else 2
    if target is None or jnp.ndim(target) < ndim or (
        jnp.shape(target)[0] != size):
      raise ValueError(
          f"{what}: {sorted(sizes)} run in a scan over {size} layers, so the "
          f"op they fold into, {op!r}, must run in the same scan (its "
          f"parameters stacked ({size}, ...)), but its "
          f"{'kernel' if kernel is not None else 'scale'} has shape "
          f"{None if target is None else tuple(jnp.shape(target))}; leave "
          f"the layers out of fold_into.")
    stacked[op] = size
  return stacked


def parts(adapter: ModelAdapter, stacked: Mapping[str, int]
          ) -> list[ModelAdapter | LayerSlice]:
  """The adapter itself for ordinary layers, else one `LayerSlice` per
  layer of the stack."""
  if not stacked:
    return [adapter]
  size = next(iter(stacked.values()))
  return [LayerSlice(adapter, dict(stacked), i) for i in range(size)]
