"""How one array is stored in a jaxq checkpoint, and read back bit for bit.

`_encode` turns a NumPy array into the tensor safetensors stores plus its
manifest entry (logical dtype, logical shape, encoding, SHA-256 of the stored
bytes); `_decode` checks a stored tensor against its entry and gives back the
logical array. Encodings: ``"raw"`` for dtypes the installed safetensors
stores natively, ``"nibbles"`` for int4, uint4 and float4_e2m1fn (packed two
per byte into a flat uint8 tensor of ``ceil(size / 2)`` bytes, element ``2i``
in the low nibble of byte ``i``), and ``"bits"`` for any other dtype, stored
as the unsigned integers of its width. Also the checkpoint errors, which every
layer of `jaxq.io.checkpoint` raises.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

_NIBBLE_DTYPES = frozenset(
    np.dtype(t) for t in (ml_dtypes.int4, ml_dtypes.uint4,
                          ml_dtypes.float4_e2m1fn))


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded exactly as it was saved."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """The checkpoint file does not exist."""


def _safetensors():
  try:
    import safetensors  # pylint: disable=g-import-not-at-top
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("jaxq.save and jaxq.load need safetensors: "
                      "pip install safetensors") from e
  return safetensors


@functools.lru_cache(maxsize=None)
def _native_code(dtype: np.dtype) -> str | None:
  """The safetensors dtype code of ``dtype``, or None if it is not native.

  Asks the installed safetensors by serialising one element, so newer
  versions that learn more dtypes store them natively.
  """
  st = _safetensors()
  try:
    data = st.numpy.save({"x": np.zeros((1,), dtype)})
    return st.deserialize(data)[0][1]["dtype"]
  except Exception:  # pylint: disable=broad-except
    return None


def _unsigned(itemsize: int) -> np.dtype:
  return np.dtype(f"<u{itemsize}")


def _pack_nibbles(x: np.ndarray) -> np.ndarray:
  """Packs a 4-bit array into ``ceil(size / 2)`` bytes, low nibble first."""
  codes = x.reshape(-1).view(np.uint8) & 0x0F
  codes = np.pad(codes, (0, codes.size % 2))
  return codes[0::2] | (codes[1::2] << 4)


def _unpack_nibbles(packed: np.ndarray, dtype: np.dtype,
                    shape: tuple[int, ...]) -> np.ndarray:
  codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(-1)
  return codes[:math.prod(shape)].view(dtype).reshape(shape)


def _stored_form(dtype: np.dtype, shape: tuple[int, ...]
                 ) -> tuple[str, np.dtype, tuple[int, ...]] | None:
  """``(encoding, stored dtype, stored shape)`` of a logical array.

  None for dtypes that cannot be stored and named again: objects, strings,
  structured dtypes, and widths with no unsigned integer to carry the bits.
  """
  if dtype.kind not in "biufcV" or _dtype(dtype.name) != dtype:
    return None
  if dtype in _NIBBLE_DTYPES:
    return "nibbles", np.dtype(np.uint8), ((math.prod(shape) + 1) // 2,)
  if _native_code(dtype) is not None:
    return "raw", dtype, shape
  if dtype.itemsize in (1, 2, 4, 8):
    return "bits", _unsigned(dtype.itemsize), shape
  return None


def _encode(x: np.ndarray, where: str) -> tuple[np.ndarray, dict[str, Any]]:
  """The stored tensor and manifest entry of the array ``x``."""
  if _stored_form(x.dtype, x.shape) is None:
    raise ValueError(f"jaxq.save: cannot store the {x.dtype} array at "
                     f"{where!r}.")
  if x.dtype.byteorder == ">":  # safetensors is little-endian
    x = x.astype(x.dtype.newbyteorder("<"))
  x = np.asarray(x, order="C")  # ascontiguousarray would make 0-d 1-d
  encoding, _, _ = _stored_form(x.dtype, x.shape)
  stored = {"raw": lambda: x,
            "bits": lambda: x.view(_unsigned(x.dtype.itemsize)),
            "nibbles": lambda: _pack_nibbles(x)}[encoding]()
  entry = {"dtype": x.dtype.name, "shape": list(x.shape),
           "encoding": encoding, "sha256": _sha256(stored)}
  return stored, entry


def _sha256(stored: np.ndarray | bytes) -> str:
  if isinstance(stored, np.ndarray):
    stored = np.asarray(stored, order="C").reshape(-1).view(np.uint8)
  return hashlib.sha256(stored).hexdigest()


def _dtype(name: str) -> np.dtype | None:
  """A numpy dtype from its name, ml_dtypes included; None if unknown."""
  try:
    return np.dtype(name)
  except TypeError:
    return np.dtype(getattr(ml_dtypes, name)) if hasattr(
        ml_dtypes, name) else None


def _decode(name: str, code: str, shape: list[int], data: bytes,
            entry: Mapping[str, Any]) -> np.ndarray:
  """Checks a stored tensor against its manifest entry and decodes it."""
  dtype, logical_shape = _dtype(entry["dtype"]), tuple(entry["shape"])
  form = None if dtype is None else _stored_form(dtype, logical_shape)
  if form is None:
    raise CheckpointError(f"tensor {name!r}: unknown dtype "
                          f"{entry['dtype']!r}.")
  encoding, stored_dtype, stored_shape = form
  if encoding != entry["encoding"]:
    raise CheckpointError(f"tensor {name!r}: the manifest says encoding "
                          f"{entry['encoding']!r} for {dtype}, which is "
                          f"stored as {encoding!r}.")
  if code != _native_code(stored_dtype) or tuple(shape) != stored_shape:
    raise CheckpointError(
        f"tensor {name!r}: the file holds {code} {list(shape)}, the manifest "
        f"expects {_native_code(stored_dtype)} {list(stored_shape)} for "
        f"{dtype} {list(logical_shape)}.")
  if _sha256(data) != entry["sha256"]:
    raise CheckpointError(f"tensor {name!r}: checksum mismatch, the data is "
                          f"corrupted.")
  stored = np.frombuffer(data, stored_dtype).reshape(stored_shape)
  if encoding == "nibbles":
    return _unpack_nibbles(stored, dtype, logical_shape)
  return stored.view(dtype)
