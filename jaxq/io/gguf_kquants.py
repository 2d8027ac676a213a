"""ggml's K-quants (``Q4_K``, ``Q5_K``, ``Q6_K``) split into codes and
one-level group scales, the form a jaxq `QArray` holds.

A K-quant super-block holds 256 consecutive elements of a row with two
levels of scales: a float16 ``d`` (and ``dmin``) per super-block times a
small integer per sub-block. Their product is exact in float32 (an 11-bit
mantissa times a 6- or 8-bit integer), so each sub-block's scale and
offset are single float32 numbers and the super-block level disappears:

* ``Q6_K`` (210 bytes: ``ql[128]``, ``qh[64]``, int8 ``scales[16]``,
  ``d``): 16 sub-blocks of 16; ``q`` 6-bit, ``x = (d * scales[i]) * (q -
  32)``.
* ``Q4_K`` (144 bytes: ``d``, ``dmin``, 12 bytes of 6-bit ``sc[8]`` and
  ``m[8]``, ``qs[128]``): 8 sub-blocks of 32; ``q`` 4-bit, ``x = (d *
  sc[i]) * q - dmin * m[i]``.
* ``Q5_K`` (176 bytes: as ``Q4_K`` with ``qh[32]`` before ``qs``): ``q``
  5-bit, the fifth bit from ``qh``.

The nibble and bit orders follow ggml's ``dequantize_row_q*_K``; the tests
check them against the ``gguf`` package's own dequantization.
"""

from __future__ import annotations

import numpy as np

from jaxq.io.tensors import CheckpointError

QK_K = 256
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
GROUP = {"Q4_K": 32, "Q5_K": 32, "Q6_K": 16}


def _scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(n, 12) bytes -> the 6-bit ``sc`` and ``m`` of 8 sub-blocks, (n, 8)."""
  n = packed.shape[0]
  d, m, m_d = np.split(packed.reshape(n, 3, 4), 3, axis=1)
  sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
  mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
  return sc.reshape(n, 8), mn.reshape(n, 8)


def _half(b: np.ndarray) -> np.ndarray:
  """(n, 2) bytes -> (n, 1) float32 of the little-endian float16."""
  return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def decode(data: np.ndarray, kind: str, shape: tuple[int, int],
           name: str = "tensor"
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """Splits a K-quant matrix into ``(codes, scale, offset)``.

  Args:
    data: the tensor's bytes, uint8, ``rows * cols / 256`` super-blocks.
    kind: ``"Q4_K"``, ``"Q5_K"`` or ``"Q6_K"``.
    shape: ``(rows, cols)`` in elements (PyTorch's ``(out, in)``).
    name: the tensor's name, for errors.

  Returns:
    ``codes`` (rows, cols) uint8, ``q`` as stored (``Q6_K``: in [0, 63],
    ``x = scale * (q - 32)``; ``Q4_K``/``Q5_K``: in [0, 15]/[0, 31], ``x =
    scale * q - offset``); ``scale`` (rows, cols / g) float32, ``d`` times
    the sub-block's integer (exact); ``offset`` the same shape, ``dmin *
    m`` (exact), None for ``Q6_K``. ``g = GROUP[kind]``.

  Raises:
    CheckpointError: for columns that are not whole super-blocks or bytes
      that do not make ``shape`` (truncated or inconsistent), naming the
      tensor.
  """
  rows, cols = shape
  if cols % QK_K:
    raise CheckpointError(f"gguf: tensor {name}: {cols} columns are not "
                          f"whole {kind} super-blocks of {QK_K}.")
  data = np.asarray(data, np.uint8).reshape(-1)
  n = rows * cols // QK_K
  expected = n * BLOCK_BYTES[kind]
  if data.size != expected:
    raise CheckpointError(f"gguf: tensor {name}: {data.size} bytes, expected "
                          f"{expected} for {kind} {list(shape)} (truncated "
                          f"or inconsistent).")
  blocks = data.reshape(n, BLOCK_BYTES[kind])
  if kind == "Q6_K":
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    sub = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = _half(blocks[:, 208:210])
    low = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(
        1, 1, 2, 1)) & 0x0F
    high = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)
            .reshape(1, 1, 4, 1)) & 0x03
    codes = low.reshape(n, 8, 32) | (high.reshape(n, 8, 32) << 4)
    scale = d * sub  # (n, 16)
    return (codes.reshape(rows, cols), scale.reshape(rows, -1), None)
  d, dmin = _half(blocks[:, 0:2]), _half(blocks[:, 2:4])
  sc, mn = _scale_min(blocks[:, 4:16])
  qs = blocks[:, -128:]
  codes = ((qs.reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(
      1, 1, 2, 1)) & 0x0F).reshape(n, 8, 32)
  if kind == "Q5_K":
    qh = blocks[:, 16:48]
    bit = (qh.reshape(n, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(
        1, 1, 8, 1)) & 0x01
    codes = codes | (bit.reshape(n, 8, 32) << 4)
  scale = d * sc.astype(np.float32)
  offset = dmin * mn.astype(np.float32)
  return (codes.reshape(rows, cols), scale.reshape(rows, -1),
          offset.reshape(rows, -1))


__all__ = ["BLOCK_BYTES", "GROUP", "QK_K", "decode"]
