"""GGUF: llama.cpp's quantized tensors as jaxq `QArray`s, still quantized.

```python
reader = gguf.GGUFReader(path)
qa = jaxq.io.gguf.qarray(reader_tensor)       # (out, in), groups of 32
kernel = jaxq.io.gguf.to_kernel(qa)           # Flax's (in, out)
```

The block formats (ggml's, each block 32 consecutive elements of a row,
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
* ``F32``, ``F16``, ``BF16``: float arrays.

Every quantized tensor loads as ``PerGroup(axis=1, size=32)`` on its
``(out, in)`` rows (`to_kernel` gives ``PerGroup(axis=0, size=32)`` on the
Flax kernel); scales are float32 holding the float16 values exactly.

K-quants (``Q4_K``, ``Q6_K``, ...) have two-level scales (6-bit sub-block
scales times a float16 super-block scale) that jaxq's one-level groups hold
only after dequantizing: `qarray` raises for them (naming the tensor), so
a K-quant file is read as float (``gguf.quants.dequantize``) and quantized
again by jaxq's rules, explicitly, never silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxq import granularity as granularity_lib
from jaxq.io.tensors import CheckpointError
from jaxq.spec import QArray
from jaxq.spec import QuantSpec
from jaxq.spec import check_qarray

BLOCK = 32
_BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
_FLOATS = {"F32": np.float32, "F16": np.float16}


def _nibbles(qs: np.ndarray) -> np.ndarray:
  """(..., 16) bytes -> (..., 32) codes in [0, 15]: low nibbles, then high."""
  return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def decode_blocks(data: np.ndarray, kind: str, shape: tuple[int, int],
                  name: str = "tensor") -> tuple[np.ndarray, np.ndarray,
                                                 np.ndarray | None]:
  """Splits raw ggml blocks into ``(codes, d, m)``.

  Args:
    data: the tensor's bytes, uint8, ``rows * row_bytes`` of them.
    kind: ``"Q8_0"``, ``"Q4_0"`` or ``"Q4_1"``.
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
                          f"form (Q8_0, Q4_0, Q4_1, F32, F16 do).")
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


def from_blocks(data: np.ndarray, kind: str, shape: tuple[int, int],
                name: str = "tensor", dtype: Any = jnp.float32) -> QArray:
  """A `QArray` (rows, cols) of raw ggml blocks, groups of 32 along axis 1.

  See the module docstring for each format's mapping; ``dtype`` is the
  float dtype the QArray dequantizes to.
  """
  codes, d, m = decode_blocks(data, kind, shape, name)
  granularity = granularity_lib.PerGroup(axis=1, size=BLOCK)
  scale = d.astype(np.float32)
  if not np.all(np.isfinite(scale)):
    raise CheckpointError(f"gguf: tensor {name}: non-finite block scales.")
  zero_point = None
  if kind == "Q8_0":
    spec = QuantSpec("int8", granularity, narrow_range=False)
    values = codes
  else:
    values = (codes.astype(np.int8) - 8).astype(
        QuantSpec("int4").fmt.dtype)
    if kind == "Q4_0":
      spec = QuantSpec("int4", granularity)
    else:
      spec = QuantSpec("int4", granularity, symmetric=False)
      safe = np.where(scale == 0, np.float32(1), scale)
      # A block with d == 0 dequantizes to 0 whatever its zero point: exact
      # only when m == 0 too.
      zero_point = (-(m.astype(np.float32) / safe) - np.float32(8)
                    ).astype(np.float32)
      if np.any((scale == 0) & (m != 0)):
        raise CheckpointError(f"gguf: tensor {name}: a Q4_1 block with d = 0 "
                              f"and m != 0 has no (values - zero_point) * "
                              f"scale form.")
  qa = QArray(values=jnp.asarray(values), scale=jnp.asarray(scale),
              zero_point=None if zero_point is None else
              jnp.asarray(zero_point), spec=spec, dtype=np.dtype(dtype))
  try:
    check_qarray(qa, "gguf", name)
  except ValueError as e:
    raise CheckpointError(f"gguf: tensor {name}: {e}") from None
  return qa


def qarray(tensor: Any, dtype: Any = jnp.float32) -> QArray | np.ndarray:
  """One tensor of a ``gguf.GGUFReader``, in PyTorch's (out, in) layout.

  Quantized tensors (``Q8_0``, ``Q4_0``, ``Q4_1``) come back as `QArray`s
  (exact; see the module docstring), ``F32``/``F16`` as NumPy arrays.

  Raises:
    CheckpointError: for another type (K-quants included) or bytes that do
      not make whole blocks of the tensor's shape, naming the tensor.
  """
  kind = tensor.tensor_type.name
  shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF: fastest first
  if kind in _FLOATS:
    array = np.asarray(tensor.data)
    if array.size != int(np.prod(shape)):
      raise CheckpointError(f"gguf: tensor {tensor.name}: {array.size} "
                            f"elements, expected {list(shape)}.")
    return array.reshape(shape)
  if len(shape) != 2:
    raise CheckpointError(f"gguf: tensor {tensor.name}: {kind} of rank "
                          f"{len(shape)}; only matrices are supported.")
  return from_blocks(tensor.data, kind, shape, tensor.name, dtype)


def take_rows(qa: QArray, index: np.ndarray) -> QArray:
  """The QArray's rows (axis 0) ``index`` (a permutation of output rows),
  with their scales and zero points: exact for groups along axis 1."""
  index = np.asarray(index)
  take = lambda a: None if a is None else jnp.take(a, index, axis=0)
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
  t = lambda a: None if a is None else jnp.asarray(a).T
  return QArray(values=t(qa.values), scale=t(qa.scale),
                zero_point=t(qa.zero_point), spec=spec, dtype=qa.dtype)


__all__ = ["BLOCK", "decode_blocks", "from_blocks", "qarray", "take_rows",
           "to_kernel"]
