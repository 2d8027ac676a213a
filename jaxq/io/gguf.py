"""GGUF: llama.cpp's quantized tensors as jaxq `QArray`s, still quantized.

```python
reader = jaxq.io.gguf.read(path)              # checked: errors name tensors
qa = jaxq.io.gguf.qarray(reader.tensors[i])   # (out, in), groups of 32/16
kernel = jaxq.io.gguf.to_kernel(qa)           # Flax's (in, out)
```

The block formats (ggml's, each block consecutive elements of a row,
little-endian; a GGUF matrix of shape ``[in, out]`` (fastest first) is
PyTorch's ``(out, in)``, one row per output):

* ``Q8_0``: 34 bytes: ``d`` float16, 32 int8 ``q``; ``x = d * q``. Loaded
  as ``int8`` symmetric (full range, ``narrow_range=False``), values ``q``,
  scale ``d``: exact.
* ``Q4_0``: 18 bytes: ``d`` float16, 16 bytes of nibbles, element ``j <
  16`` the low nibble of byte ``j``, element ``j + 16`` its high nibble
  (``q`` in [0, 15]); ``x = d * (q - 8)``. Loaded as ``int4`` symmetric,
  values ``q - 8``, scale ``d``: exact.
* ``Q4_1``: 20 bytes: ``d`` and ``m`` float16, then the nibbles as in
  ``Q4_0``; ``x = d * q + m``. The minimum ``m`` is not on the integer
  grid of ``d``, so it is loaded as ``int4`` affine with a float32 zero
  point: values ``q - 8`` (exact), scale ``d`` (exact), ``zero_point =
  -m / d - 8`` rounded to float32, so ``(values - zero_point) * scale``
  equals ``d * q + m`` within float32 rounding (a few ulps), and serves
  weight-only (see `jaxq.QArray`).
* K-quants (`jaxq.io.gguf_kquants` has their layout): the two-level scales
  multiply out exactly in float32, so they load as one-level groups too.
  ``Q6_K``: ``int8`` symmetric groups of 16, values ``q - 32`` (sign-folded
  where a sub-block scale is negative), scale ``d * scales[i]``: exact.
  ``Q4_K`` / ``Q5_K``: ``int4`` / ``int8`` affine groups of 32, values ``q
  - 8`` / ``q - 16``, scale ``d * sc[i]``, float32 zero point ``dmin * m[i]
  / scale - 8`` (or ``- 16``): within float32 rounding, as ``Q4_1``.
* ``F32``, ``F16``, ``BF16``: float arrays.

Every quantized tensor loads as ``PerGroup(axis=1, size)`` on its ``(out,
in)`` rows (`to_kernel` gives ``PerGroup(axis=0, size)`` on the Flax
kernel); scales are float32 holding the file's products exactly.

Other types (``Q2_K``, ``Q3_K``, ``Q5_0``, the ``IQ`` family, ...) have no
exact form here: `qarray` dequantizes them with the ``gguf`` package and
quantizes them again with ``requantize`` (int8 groups of 32 by default),
warning with a `RequantizedWarning` that names the tensor, or raises with
``requantize=None``. Corrupt, truncated or inconsistent files raise a
`CheckpointError` naming the tensor (`read` checks the index first with
`jaxq.io.gguf_file.read_index`; `from_blocks` checks each tensor's bytes).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import warnings
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxq import granularity as granularity_lib
from jaxq.io import gguf_file
from jaxq.io import gguf_kquants
from jaxq.io.tensors import CheckpointError
from jaxq.quantize import quantize
from jaxq.spec import QArray
from jaxq.spec import QuantSpec
from jaxq.spec import check_qarray

BLOCK = 32
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
_FLOATS = ("F32", "F16", "BF16")
EXACT = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
"""The quantized types that load as `QArray`s holding the file's values."""
REQUANTIZE = QuantSpec("int8", granularity_lib.PerGroup(axis=1, size=BLOCK))
"""`qarray`'s default spec for the types with no exact form."""


class RequantizedWarning(UserWarning):
  """A GGUF tensor was dequantized and quantized again (not exact)."""


def _gguf() -> Any:
  """The ``gguf`` package (an optional dependency: ``pip install gguf``)."""
  try:
    return importlib.import_module("gguf")
  except ImportError as e:
    raise ImportError("jaxq.io.gguf.read needs the gguf package: pip install "
                      "gguf") from e


def _gguf_quants() -> Any:
  _gguf()
  return importlib.import_module("gguf.quants")


def _nibbles(qs: np.ndarray) -> np.ndarray:
  """(..., 16) bytes -> (..., 32) codes in [0, 15]: low nibbles, then high."""
  return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def decode_blocks(data: np.ndarray, kind: str, shape: tuple[int, int],
                  name: str = "tensor") -> tuple[np.ndarray, np.ndarray,
                                                 np.ndarray | None]:
  """Splits raw ggml blocks into ``(codes, d, m)``.

  Args:
    data: the tensor's bytes, uint8, ``rows * row_bytes`` of them.
    kind: ``"Q8_0"``, ``"Q4_0"`` or ``"Q4_1"`` (K-quants:
      `jaxq.io.gguf_kquants.decode`).
    shape: ``(rows, cols)`` in elements (PyTorch's ``(out, in)``).
    name: the tensor's name, for errors.

  Returns:
    ``codes`` (rows, cols) int8 (``Q8_0``'s ``q``) or uint8 (the 4-bit
    ``q`` in [0, 15]); ``d`` (rows, cols / 32) float16; ``m`` the same for
    ``Q4_1``, else None.

  Raises:
    CheckpointError: for a size that is not whole blocks of ``shape``.
  """
  rows, cols = shape
  if kind not in _BLOCK_BYTES:
    raise CheckpointError(f"gguf: tensor {name}: {kind} has no exact jaxq "
                          f"form ({', '.join(EXACT)} do).")
  if cols % BLOCK:
    raise CheckpointError(f"gguf: tensor {name}: {cols} columns are not "
                          f"whole blocks of {BLOCK}.")
  block_bytes = _BLOCK_BYTES[kind]
  data = np.asarray(data, np.uint8).reshape(-1)
  expected = rows * cols // BLOCK * block_bytes
  if data.size != expected:
    raise CheckpointError(f"gguf: tensor {name}: {data.size} bytes, "
                          f"expected {expected} for {kind} {list(shape)} "
                          f"(truncated or inconsistent).")
  blocks = data.reshape(rows, cols // BLOCK, block_bytes)
  d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
  if kind == "Q8_0":
    codes = blocks[..., 2:].copy().view(np.int8)
    return codes.reshape(rows, cols), d, None
  if kind == "Q4_0":
    return _nibbles(blocks[..., 2:]).reshape(rows, cols), d, None
  m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
  return _nibbles(blocks[..., 4:]).reshape(rows, cols), d, m


def _affine(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray,
            middle: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``x = scale * codes - offset`` as ``(values, scale, zero_point)`` with
  ``(values - zero_point) * scale == x`` within float32 rounding.

  codes (rows, cols) and scale, offset (rows, groups) float32. A group with
  scale 0 holds the constant ``-offset``: it becomes values 0, scale
  ``|offset|``, zero point ``sign(offset)`` (exact).
  """
  group = codes.shape[1] // scale.shape[1]
  constant = (scale == 0) & (offset != 0)
  values = codes.astype(np.int16) - middle
  values = np.where(np.repeat(constant, group, axis=1), 0, values)
  safe = np.where(scale == 0, np.float32(1), scale)
  zero_point = np.where(constant, np.sign(offset),
                        offset / safe - np.float32(middle))
  scale = np.where(constant, np.abs(offset), scale)
  return (values.astype(np.int8), scale.astype(np.float32),
          zero_point.astype(np.float32))


def from_blocks(data: np.ndarray, kind: str, shape: tuple[int, int],
                name: str = "tensor", dtype: Any = jnp.float32) -> QArray:
  """A `QArray` (rows, cols) of raw ggml blocks, groups along axis 1.

  See the module docstring for each format's mapping; ``dtype`` is the
  float dtype the QArray dequantizes to.

  Raises:
    CheckpointError: for a type with no exact form (`EXACT` lists those
      that have one), or bytes that do not make ``shape``, naming the
      tensor.
  """
  int4 = np.dtype(QuantSpec("int4").fmt.dtype)
  zero_point = None
  if kind in gguf_kquants.BLOCK_BYTES:
    codes, scale, offset = gguf_kquants.decode(data, kind, shape, name)
    granularity = granularity_lib.PerGroup(axis=1,
                                           size=gguf_kquants.GROUP[kind])
    if kind == "Q6_K":
      # Sub-block scales are signed: a negative one is folded into values.
      sign = np.where(scale < 0, -1, 1).astype(np.int8)
      sign = np.repeat(sign, gguf_kquants.GROUP[kind], axis=1)
      values = ((codes.astype(np.int16) - 32) * sign).astype(np.int8)
      scale = np.abs(scale)
      spec = QuantSpec("int8", granularity, narrow_range=False)
    else:
      middle = 8 if kind == "Q4_K" else 16
      values, scale, zero_point = _affine(codes, scale, offset, middle)
      fmt = "int4" if kind == "Q4_K" else "int8"
      values = values.astype(int4) if fmt == "int4" else values
      spec = QuantSpec(fmt, granularity, symmetric=False)
  else:
    codes, d, m = decode_blocks(data, kind, shape, name)
    granularity = granularity_lib.PerGroup(axis=1, size=BLOCK)
    scale = d.astype(np.float32)
    if kind == "Q8_0":
      spec = QuantSpec("int8", granularity, narrow_range=False)
      values = codes
    elif kind == "Q4_0":
      spec = QuantSpec("int4", granularity)
      values = (codes.astype(np.int8) - 8).astype(int4)
    else:
      spec = QuantSpec("int4", granularity, symmetric=False)
      values, scale, zero_point = _affine(codes, scale,
                                          -m.astype(np.float32), 8)
      values = values.astype(int4)
  if not np.all(np.isfinite(scale)):
    raise CheckpointError(f"gguf: tensor {name}: non-finite block scales.")
  if zero_point is not None and not np.all(np.isfinite(zero_point)):
    raise CheckpointError(f"gguf: tensor {name}: non-finite block minima.")
  qa = QArray(values=jnp.asarray(values), scale=jnp.asarray(scale),
              zero_point=None if zero_point is None else
              jnp.asarray(zero_point), spec=spec, dtype=np.dtype(dtype))
  try:
    check_qarray(qa, "gguf", name)
  except ValueError as e:
    raise CheckpointError(f"gguf: tensor {name}: {e}") from None
  return qa


def qarray(tensor: Any, dtype: Any = jnp.float32, *,
           requantize: QuantSpec | None = REQUANTIZE
           ) -> QArray | np.ndarray:
  """One tensor of a ``gguf.GGUFReader``, in PyTorch's (out, in) layout.

  Args:
    tensor: a ``ReaderTensor`` (``reader.tensors[i]``).
    dtype: the float dtype the QArray dequantizes to.
    requantize: for a quantized type with no exact form (`EXACT`): the
      spec to quantize its dequantized values with, with a
      `RequantizedWarning` naming the tensor; None to raise instead.

  Returns:
    Types in `EXACT`: a `QArray` (see the module docstring); ``F32``,
    ``F16``, ``BF16``: a NumPy array; others: ``jaxq.quantize`` of the
    ``gguf`` package's dequantization with ``requantize``.

  Raises:
    CheckpointError: for bytes that do not make whole blocks of the
      tensor's shape, or a type with no exact form when ``requantize`` is
      None, naming the tensor.
  """
  kind = tensor.tensor_type.name
  shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF: fastest first
  if kind in _FLOATS:
    array = np.asarray(tensor.data)
    if kind == "BF16":
      array = array.view(ml_dtypes.bfloat16)
    if array.size != int(np.prod(shape)):
      raise CheckpointError(f"gguf: tensor {tensor.name}: {array.size} "
                            f"elements, expected {list(shape)}.")
    return array.reshape(shape)
  if len(shape) != 2:
    raise CheckpointError(f"gguf: tensor {tensor.name}: {kind} of rank "
                          f"{len(shape)}; only matrices are supported.")
  if kind in EXACT:
    return from_blocks(tensor.data, kind, shape, tensor.name, dtype)
  if requantize is None:
    raise CheckpointError(f"gguf: tensor {tensor.name}: {kind} has no exact "
                          f"jaxq form ({', '.join(EXACT)} do); pass "
                          f"requantize=QuantSpec(...) to dequantize and "
                          f"quantize it again.")
  warnings.warn(f"gguf: tensor {tensor.name}: {kind} has no exact jaxq form; "
                f"it is dequantized to float32 and quantized again as "
                f"{requantize} (not the file's values).", RequantizedWarning,
                stacklevel=2)
  dense = _gguf_quants().dequantize(tensor.data, tensor.tensor_type)
  dense = np.asarray(dense, np.float32).reshape(shape)
  return quantize(jnp.asarray(dense, dtype), requantize)


def read(path: str | os.PathLike) -> Any:
  """A ``gguf.GGUFReader`` of ``path``, its tensor index checked first.

  Raises:
    CheckpointError: for a missing, truncated or inconsistent file, naming
      the tensor (see `jaxq.io.gguf_file.read_index`).
  """
  gguf_file.read_index(path)
  try:
    return _gguf().GGUFReader(os.fspath(path))
  except (ValueError, IndexError, KeyError) as e:
    raise CheckpointError(f"gguf: {os.fspath(path)!r} cannot be read: "
                          f"{e}") from None


def take_rows(qa: QArray, index: np.ndarray) -> QArray:
  """The QArray's rows (axis 0) ``index`` (a permutation of output rows),
  with their scales and zero points: exact for groups along axis 1."""
  index = np.asarray(index)
  take = lambda a: None if a is None else jnp.asarray(
      np.take(np.asarray(a), index, axis=0))  # NumPy: no compile per shape
  return dataclasses.replace(qa, values=take(qa.values), scale=take(qa.scale),
                             zero_point=take(qa.zero_point))


def to_kernel(qa: QArray) -> QArray:
  """A 2-D (out, in) QArray with groups along ``in`` as a Flax (in, out)
  kernel: everything transposed, ``PerGroup(axis=0)``."""
  g = qa.spec.granularity
  if not (isinstance(g, granularity_lib.PerGroup) and g.axis % 2 == 1):
    raise ValueError(f"to_kernel: expected groups along axis 1, got {g}.")
  spec = qa.spec.replace(granularity=granularity_lib.PerGroup(
      axis=0, size=g.size))
  t = lambda a: None if a is None else jnp.asarray(
      np.ascontiguousarray(np.asarray(a).T))  # NumPy: no compile per shape
  return QArray(values=t(qa.values), scale=t(qa.scale),
                zero_point=t(qa.zero_point), spec=spec, dtype=qa.dtype)


__all__ = ["BLOCK", "EXACT", "REQUANTIZE", "RequantizedWarning",
           "decode_blocks", "from_blocks", "qarray", "read", "take_rows",
           "to_kernel"]
