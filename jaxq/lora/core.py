"""LoRA on one layer, no Flax: rules, adapter init, the forward, the merge.

A LoRA layer keeps its base kernel ``W`` (in, out) frozen, stored low-bit
as a `QArray` (a `PackedQArray`, two values per byte, for 4-bit formats;
or in float for LoRA on a float base), and adds two
trainable matrices ``A`` (in, rank) and ``B`` (rank, out)::

    y = x @ dequantize(W) + (dropout(x) @ A) @ B * (alpha / rank)  (+ bias)

``B`` starts at zero, so a fresh adapter leaves the layer's output exactly
the base's; ``A`` starts Gaussian with standard deviation ``1 / sqrt(in)``.
The base takes no gradient (`jax.lax.stop_gradient`). Every function here
is pure and works under ``jit`` and ``grad``; `jaxq.flax.lora` applies them
to linen and nnx models.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxq.granularity import PerChannel, PerGroup
from jaxq.quantize import dequantize, quantize
from jaxq.spec import PackedQArray, QArray, QuantSpec, packable

# Base formats of QLoRA and its usual alternatives, for (in, out) kernels.
NF4_DQ = QuantSpec("nf4", PerGroup(axis=0, size=64), double_quant=256)
NF4 = QuantSpec("nf4", PerGroup(axis=0, size=64))
INT4_G64 = QuantSpec("int4", PerGroup(axis=0, size=64))
INT8_CHANNEL = QuantSpec("int8", PerChannel(axis=-1))
FP8_CHANNEL = QuantSpec("float8_e4m3fn", PerChannel(axis=-1))

ADAPTER_NAMES: tuple[str, str] = ("lora_a", "lora_b")

Base = PackedQArray | QArray | jax.Array


@dataclasses.dataclass(frozen=True)
class LoraRule:
  """Which layers get adapters, and how.

  Attributes:
    pattern: a regex that must match a layer's whole "/"-joined module path
      (``re.fullmatch``; e.g. ``r".*(q|k|v|o|gate|up|down)_proj"``). The
      first rule that matches a layer applies to it.
    rank: the adapters' inner dimension ``r``; at most ``min(in, out)``.
    alpha: the adapters' output is scaled by ``alpha / rank``.
    base: how the frozen base kernel is stored: a `QuantSpec` for its
      (in, out) kernel (`NF4_DQ`, `INT4_G64`, `INT8_CHANNEL`,
      `FP8_CHANNEL`, ...) or None to keep it in float (plain LoRA).
    dropout: dropout rate on the adapters' input during training (0: none).
  """

  pattern: str
  rank: int = 8
  alpha: float = 16.0
  base: QuantSpec | None = None
  dropout: float = 0.0

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or (
        self.rank < 1):
      raise ValueError(f"LoraRule({self.pattern!r}): rank must be a positive "
                       f"integer, got {self.rank!r}.")
    if not self.alpha > 0:
      raise ValueError(f"LoraRule({self.pattern!r}): alpha must be positive, "
                       f"got {self.alpha!r}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoraRule({self.pattern!r}): dropout must be in "
                       f"[0, 1), got {self.dropout!r}.")
    if self.base is not None and not isinstance(self.base, QuantSpec):
      raise ValueError(f"LoraRule({self.pattern!r}): base must be a "
                       f"jaxq.QuantSpec or None, got {self.base!r}.")
    re.compile(self.pattern)


@dataclasses.dataclass(frozen=True)
class LoraLayer:
  """One chosen layer: its path, kernel shape (in, out) and its rule's
  settings."""

  path: str
  in_features: int
  out_features: int
  rank: int
  alpha: float
  base: QuantSpec | None
  dropout: float

  @property
  def scale(self) -> float:
    """``alpha / rank``, what the adapters' output is multiplied by."""
    return self.alpha / self.rank

  @property
  def adapter_shapes(self) -> dict[str, tuple[int, int]]:
    return {"lora_a": (self.in_features, self.rank),
            "lora_b": (self.rank, self.out_features)}


def choose_layers(kernel_shapes: Mapping[str, tuple[int, ...]],
                  rules: Sequence[LoraRule]) -> dict[str, LoraLayer]:
  """The layers the rules choose, in the order of ``kernel_shapes``.

  Args:
    kernel_shapes: path -> (in, out) kernel shape of every candidate layer
      (linen ``nn.Dense``, nnx ``nnx.Linear``).
    rules: first match wins.

  Raises:
    ValueError: a rule that matches no layer (listing some paths), or a
      rank above ``min(in, out)`` (naming the layer and its shape).
  """
  if not rules:
    raise ValueError("jaxq.lora: no rules given.")
  chosen: dict[str, LoraLayer] = {}
  used = [False] * len(rules)
  for path, shape in kernel_shapes.items():
    for i, rule in enumerate(rules):
      if re.fullmatch(rule.pattern, path) is None:
        continue
      used[i] = True
      d_in, d_out = (int(d) for d in shape)
      if rule.rank > min(d_in, d_out):
        raise ValueError(f"jaxq.lora: rank {rule.rank} of "
                         f"LoraRule({rule.pattern!r}) is larger than "
                         f"min(in, out) = {min(d_in, d_out)} of the layer "
                         f"{path!r} (kernel {d_in} x {d_out}).")
      chosen[path] = LoraLayer(path, d_in, d_out, rule.rank,
                               float(rule.alpha), rule.base, rule.dropout)
      break
  for rule, hit in zip(rules, used):
    if not hit:
      some = ", ".join(repr(p) for p in list(kernel_shapes)[:8])
      raise ValueError(f"jaxq.lora: LoraRule({rule.pattern!r}) matches no "
                       f"layer; the dense layers are {some}"
                       f"{', ...' if len(kernel_shapes) > 8 else ''} "
                       f"({len(kernel_shapes)} in all).")
  return chosen


def init_adapter(key: jax.Array, layer: LoraLayer,
                 dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
  """``(A, B)``: A (in, rank) ~ N(0, 1 / in), B (rank, out) zeros."""
  a = jax.random.normal(key, (layer.in_features, layer.rank), dtype)
  a = a * jnp.asarray(1.0 / np.sqrt(layer.in_features), dtype)
  return a, jnp.zeros((layer.rank, layer.out_features), dtype)


def quantize_base(kernel: jax.Array, spec: QuantSpec | None) -> Base:
  """The frozen base of an (in, out) kernel: a `QArray` by ``spec`` (RTN,
  its calibration's range), a `PackedQArray` when its values are 4-bit
  (NF4, int4, fp4; ``out`` even: two per byte in memory, where XLA would
  hold one per byte), or the kernel itself when ``spec`` is None."""
  if spec is None:
    return kernel
  qa = quantize(jnp.asarray(kernel, jnp.float32), spec)
  return PackedQArray.of(qa) if packable(qa) else qa


def base_kernel(base: Base, dtype=None) -> jax.Array:
  """The base's float (in, out) kernel (dequantized), without gradient."""
  quantized = isinstance(base, (QArray, PackedQArray))
  kernel = dequantize(base) if quantized else base
  kernel = jax.lax.stop_gradient(kernel)
  return kernel if dtype is None else kernel.astype(dtype)


def base_bytes(base: Base) -> int:
  """Bytes the frozen base takes stored: `QArray.nbytes` (sub-byte values
  packed, double-quantized scales one byte each) or the array's."""
  if isinstance(base, (QArray, PackedQArray)):
    return base.nbytes
  return int(np.prod(base.shape)) * np.dtype(base.dtype).itemsize


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout at ``rate`` (identity when ``key`` is None or the
  rate 0)."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def lora_dense(x: jax.Array, base: Base, a: jax.Array, b: jax.Array,
               bias: jax.Array | None = None, *, scale: float,
               dropout_rate: float = 0.0, key: jax.Array | None = None,
               dtype=None) -> jax.Array:
  """``x @ dequantize(base) + (dropout(x) @ a) @ b * scale + bias``.

  Args:
    x: (..., in).
    base: the frozen (in, out) kernel, a `QArray` or a float array.
    a, b: (in, rank) and (rank, out) adapters.
    bias: (out,) or None.
    scale: ``alpha / rank``.
    dropout_rate, key: dropout on the adapters' input (none without key).
    dtype: the computation dtype of the base matmul (default: ``x``'s and
      the kernel's promoted); the adapters compute in their own dtype.

  Returns:
    (..., out) in ``dtype``.
  """
  kernel = base_kernel(base)
  if dtype is None:
    dtype = jnp.promote_types(x.dtype, kernel.dtype)
  y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
  h = dropout(x, dropout_rate, key).astype(a.dtype)
  y = y + ((h @ a) @ b * jnp.asarray(scale, a.dtype)).astype(dtype)
  if bias is not None:
    y = y + bias.astype(dtype)
  return y


def merged_kernel(base: Base, a: jax.Array, b: jax.Array, scale: float
                  ) -> jax.Array:
  """``dequantize(base) + a @ b * scale``: the float (in, out) kernel that
  computes what base plus adapters compute (before any re-quantization)."""
  kernel = base_kernel(base, jnp.float32)
  return kernel + (a.astype(jnp.float32) @ b.astype(jnp.float32)) * scale


def check_adapter(layer: LoraLayer, name: str, shape: tuple[int, ...],
                  where: str) -> None:
  """Raises naming the layer, the adapter and both shapes unless ``shape``
  is the adapter's shape for ``layer``."""
  expected = layer.adapter_shapes[name]
  if tuple(shape) != expected:
    raise ValueError(f"{where}: {name} of layer {layer.path!r} has shape "
                     f"{tuple(shape)}, but the model's layer (kernel "
                     f"{layer.in_features} x {layer.out_features}, rank "
                     f"{layer.rank}) needs {expected}.")
