"""`KVCacheSpec`: what a quantized KV cache stores, as a frozen value.

A spec is hashable (a static ``jit`` argument, and the static part of a
`jaxq.kvcache.KVCache`). It names the element format and, for keys and
values separately, which elements share a scale. Each choice maps onto a
jaxq granularity on the cache's ``(batch, tokens, kv_heads, head_dim)``
layout, so writes go through `jaxq.quantize` and reads through
`jaxq.dequantize`, with jaxq's numerics (narrow int8, full-range int4 with
``scale = amax / 7.5``, saturating fp8 casts):

==============  =====================================  ==================
granularity     scale shape for (B, T, H, D)           jaxq granularity
==============  =====================================  ==================
``"token"``     ``(B, T, H, 1)``: per token per head,  ``PerToken()``
                dynamic (from the written tokens)
``"channel"``   ``(B, T / group_size, H, D)``: keys    ``PerGroup(axis=1,
                per channel over groups of tokens       size=group_size)``
                (KIVI), dynamic
``"head"``      ``(1, 1, H, 1)``: one static scale per  ``PerChannel(2)``
                head, from a calibrated ``amax`` given
                to `jaxq.kvcache.init`
values          ``(B, T, H, D / value_group_size)``:    ``PerGroup(axis=-1,
``"token"``     per token per head per channel group    size=value_group_
+ groups        (KIVI's values), dynamic                size)``
==============  =====================================  ==================

int4 on SmolLM2-135M (``examples/smollm.py``: perplexity of 8 held-out
windows of 256 tokens, teacher-forced through the decode loop; float
20.347; see the README's KV cache section for the table and bytes):
per token-head +27.9%, KIVI (``"channel"`` keys, groups of 32) +3.94%;
with ``value_group_size=32`` +5.08%, and ``value_hadamard`` +3.26%; KIVI
with ``float_residual`` +2.29%, and ``value_hadamard`` +1.43%, and
``hadamard`` too +0.71% (all int4 but the residual group's 0 .. 31 float
tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from jaxq import formats as formats_lib
from jaxq import granularity as granularity_lib
from jaxq.spec import QuantSpec

# Symmetric formats a cache can store; uint8 needs a zero point and fp4
# loses too much for keys.
FORMATS: tuple[str, ...] = ("int8", "int4", "float8_e4m3fn", "float8_e5m2")
KEY_GRANULARITIES: tuple[str, ...] = ("token", "channel", "head")
VALUE_GRANULARITIES: tuple[str, ...] = ("token", "head")

KeyGranularity = Literal["token", "channel", "head"]
ValueGranularity = Literal["token", "head"]


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
  """How one attention layer's keys and values are cached.

  Attributes:
    format: the element format, one of `FORMATS` (or its jnp dtype), or
      None for a plain float cache in the ``dtype`` given to
      `jaxq.kvcache.init` (the same code path, no scales). int4 is stored
      packed, two per byte along ``head_dim``.
    key_granularity: ``"token"`` (one scale per token per head, computed at
      write; the default), ``"channel"`` (KIVI: one scale per channel per
      group of ``group_size`` tokens, which keeps outlier channels from
      inflating every other channel's step) or ``"head"`` (one static
      scale per head from a calibrated range).
    value_granularity: ``"token"`` (default) or ``"head"``.
    group_size: tokens per key group for ``key_granularity="channel"``; the
      cache length must be a multiple of it.
    hadamard: rotate keys (and, in `jaxq.kvcache.attend`, queries) by the
      orthonormal Hadamard matrix of size ``head_dim`` before quantizing,
      which leaves ``q . k`` unchanged and spreads an outlier channel over
      all channels. ``head_dim`` must be a power of two.
    integer_qk: compute ``q . k`` as int8 x int8 -> int32 (`jaxq.einsum`)
      on the stored keys (int4 widened), with the queries quantized to int8
      per token per head at each `jaxq.kvcache.attend`; the scales rescale
      the integer logits exactly. For int8 and int4 keys whose scales do
      not vary along ``head_dim`` (``"token"`` or ``"head"``). Values are
      dequantized either way.
    block_size: keys dequantized per step of `jaxq.kvcache.attend`'s
      online-softmax loop (the largest float copy of the cache it makes);
      rounded down to a multiple of ``group_size`` (at least one group) for
      ``"channel"`` keys, and capped at the cache length (`attention_block`).
    value_group_size: with ``value_granularity="token"``, one scale per
      token per head per ``value_group_size`` consecutive channels (KIVI's
      values: scales ``(B, T, H, D / value_group_size)``), so one outlier
      channel widens the step of its group only; None (default): one scale
      per token per head. ``head_dim`` must be a multiple of it.
    value_hadamard: rotate values by the Hadamard matrix before quantizing;
      `jaxq.kvcache.attend` rotates its output back (``P (V H) H = P V``, as
      ``H H = I``), one ``(D, D)`` product per query, not per key.
      ``head_dim`` must be a power of two.
    float_residual: ``"channel"`` keys only: attention reads the tokens of
      each row's incomplete key group (the last ``0 .. group_size - 1``
      tokens, KIVI's full-precision residual) in float, keys and values,
      instead of quantized; the cache keeps their float values
      (``KVCache.value_residual``, counted by `jaxq.kvcache.nbytes` like
      ``key_residual``). Stored keys and values are as without it.
  """

  format: str | np.dtype | type | None = "int8"
  key_granularity: KeyGranularity = "token"
  value_granularity: ValueGranularity = "token"
  group_size: int = 32
  hadamard: bool = False
  integer_qk: bool = False
  block_size: int = 128
  value_group_size: int | None = None
  value_hadamard: bool = False
  float_residual: bool = False

  def __post_init__(self):
    if self.format is not None:
      try:
        name = formats_lib.canonical_name(self.format)
      except ValueError:
        name = None
      if name not in FORMATS:
        raise ValueError(
            f"KVCacheSpec: unknown KV cache format {self.format!r}; expected "
            f"one of {', '.join(FORMATS)} (or None for a float cache).")
      object.__setattr__(self, "format", name)
    if self.key_granularity not in KEY_GRANULARITIES:
      raise ValueError(f"KVCacheSpec: unknown key_granularity "
                       f"{self.key_granularity!r}; expected one of "
                       f"{KEY_GRANULARITIES}.")
    if self.value_granularity not in VALUE_GRANULARITIES:
      raise ValueError(f"KVCacheSpec: unknown value_granularity "
                       f"{self.value_granularity!r}; expected one of "
                       f"{VALUE_GRANULARITIES}.")
    if self.integer_qk and (self.format not in ("int8", "int4") or
                            self.key_granularity == "channel"):
      raise ValueError(
          f"KVCacheSpec: integer_qk multiplies int8 queries by integer keys "
          f"whose scales are constant along head_dim: it needs format int8 "
          f"or int4 and key_granularity 'token' or 'head', got format "
          f"{self.format!r} and key_granularity {self.key_granularity!r}.")
    if self.float_residual and (not self.quantized or
                                self.key_granularity != "channel"):
      raise ValueError(
          f"KVCacheSpec: float_residual reads KIVI's residual key group in "
          f"float; it needs a quantized format and key_granularity "
          f"'channel', got format {self.format!r} and key_granularity "
          f"{self.key_granularity!r}.")
    if self.value_group_size is not None and (
        self.value_granularity != "token"):
      raise ValueError(
          f"KVCacheSpec: value_group_size groups channels of per-token value "
          f"scales; it needs value_granularity 'token', got "
          f"{self.value_granularity!r}.")
    sizes = ("group_size", "block_size") + (
        ("value_group_size",) if self.value_group_size is not None else ())
    for name in sizes:
      size = getattr(self, name)
      if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (
          size <= 0):
        raise ValueError(f"KVCacheSpec: {name} must be a positive integer, "
                         f"got {size!r}.")

  def query_quant_spec(self) -> QuantSpec:
    """The queries' `QuantSpec` for ``integer_qk``: int8 per token per head
    (``(B, S, H_kv, groups, D)`` -> scales ``(B, S, H_kv, groups, 1)``)."""
    return QuantSpec("int8", granularity_lib.PerToken(contraction_axis=-1))

  def attention_block(self, max_length: int) -> int:
    """The tokens `jaxq.kvcache.attend` dequantizes per step in a cache of
    ``max_length``: ``block_size``, whole key groups, at most the cache."""
    block = self.block_size
    if self.quantized and self.key_granularity == "channel":
      block = max(self.group_size, block - block % self.group_size)
    return min(block, max_length)

  @property
  def static_parts(self) -> tuple[str, ...]:
    """``"key"`` and/or ``"value"``: the parts written with a static
    per-head range (``"head"`` granularity), which calibration measures."""
    if not self.quantized:
      return ()
    return tuple(part for part, granularity in (
        ("key", self.key_granularity), ("value", self.value_granularity))
                 if granularity == "head")

  def part_quant_spec(self, part: str) -> QuantSpec:
    """`key_quant_spec` (``part="key"``) or `value_quant_spec`."""
    return self.key_quant_spec() if part == "key" else self.value_quant_spec()

  @property
  def quantized(self) -> bool:
    """Whether keys and values are stored low-bit (False: a float cache)."""
    return self.format is not None

  @property
  def packed(self) -> bool:
    """Whether values are stored two per byte (int4)."""
    return (self.quantized and
            np.dtype(formats_lib.get_format(self.format).dtype)
            in formats_lib.NIBBLE_DTYPES)

  def key_quant_spec(self) -> QuantSpec:
    """The jaxq `QuantSpec` keys are written with (quantized specs only)."""
    return self._quant_spec(self.key_granularity)

  def value_quant_spec(self) -> QuantSpec:
    """The jaxq `QuantSpec` values are written with (quantized specs only)."""
    if self.value_granularity == "token" and self.value_group_size:
      return QuantSpec(self.format, granularity_lib.PerGroup(
          axis=-1, size=self.value_group_size))
    return self._quant_spec(self.value_granularity)

  def _quant_spec(self, granularity: str) -> QuantSpec:
    if granularity == "token":
      g = granularity_lib.PerToken(contraction_axis=-1)
    elif granularity == "channel":
      g = granularity_lib.PerGroup(axis=1, size=self.group_size)
    else:
      g = granularity_lib.PerChannel(axis=2)
    return QuantSpec(self.format, g, dynamic=granularity != "head")
