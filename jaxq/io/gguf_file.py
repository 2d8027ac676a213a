"""A GGUF file's tensor index, checked before any tensor is read.

``gguf.GGUFReader`` (the ``gguf`` package) maps a file and slices its
tensors without checking them against the file: a truncated or inconsistent
file fails with a NumPy reshape error that names no tensor. `read_index`
parses the header and tensor infos itself (GGUF v2 and v3, little-endian)
and checks every tensor's bytes against the file, so `jaxq.io.gguf.read`
raises a `CheckpointError` naming the tensor instead.

The layout read: ``"GGUF"``, version uint32, tensor count uint64, metadata
count uint64; each metadata entry a string key, a uint32 value type and
the value (strings as a uint64 length and bytes, arrays as an item type,
a uint64 count and the items); each tensor info a string name, a uint32
rank, ``rank`` uint64 dimensions (fastest first), a uint32 ggml type and a
uint64 offset into the data section, which starts at the next multiple of
``general.alignment`` (32 unless given) after the infos.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import os
import struct

from jaxq.io.tensors import CheckpointError

MAGIC = b"GGUF"

# ggml type id -> (name, elements per block, bytes per block).
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}

# Metadata value type -> struct format (fixed-size scalars).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f",
            7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor of a GGUF file.

  Attributes:
    name: the tensor's GGUF name (``"blk.0.attn_q.weight"``).
    shape: its shape in NumPy/PyTorch order (slowest first: ``(out, in)``
      for a matrix; GGUF stores the dimensions fastest first).
    kind: the ggml type's name (``"Q4_K"``).
    offset: the absolute byte offset of its data in the file.
    nbytes: the bytes its shape and type take.
  """

  name: str
  shape: tuple[int, ...]
  kind: str
  offset: int
  nbytes: int


class _Cursor:
  """Reads little-endian values from bytes, raising on a short read."""

  def __init__(self, data: bytes | mmap.mmap, path: str):
    self.data, self.pos, self.path = data, 0, path

  def take(self, n: int, what: str) -> bytes:
    if self.pos + n > len(self.data):
      raise CheckpointError(f"gguf: {self.path!r} is truncated in {what} "
                            f"(needs {self.pos + n} bytes, has "
                            f"{len(self.data)}).")
    out = self.data[self.pos:self.pos + n]
    self.pos += n
    return out

  def scalar(self, fmt: str, what: str) -> int | float | bool:
    return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

  def string(self, what: str) -> str:
    n = int(self.scalar("<Q", what))
    try:
      return self.take(n, what).decode("utf-8")
    except UnicodeDecodeError:
      raise CheckpointError(f"gguf: {self.path!r}: {what} is not UTF-8 "
                            f"(corrupted).") from None

  def value(self, kind: int, what: str) -> object:
    if kind in _SCALARS:
      return self.scalar(_SCALARS[kind], what)
    if kind == _STRING:
      return self.string(what)
    if kind == _ARRAY:
      item = int(self.scalar("<I", what))
      count = int(self.scalar("<Q", what))
      if item in _SCALARS:  # Skipped in one step: vocabularies are long.
        self.take(count * struct.calcsize(_SCALARS[item]), what)
        return None
      return [self.value(item, what) for _ in range(count)]
    raise CheckpointError(f"gguf: {self.path!r}: {what} has the unknown "
                          f"value type {kind} (corrupted).")


def read_index(path: str | os.PathLike) -> tuple[TensorInfo, ...]:
  """The tensors of a GGUF file, each checked against the file's bytes.

  Args:
    path: the ``.gguf`` file.

  Returns:
    One `TensorInfo` per tensor, in the file's order.

  Raises:
    CheckpointError: for a missing file, a bad magic or version, a header
      cut short, an unknown ggml type, a row that is not whole blocks, a
      tensor whose data runs past the end of the file (truncated) or
      overlaps the next one (inconsistent), naming the tensor.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"gguf: {path!r} is missing.")
  with open(path, "rb") as f:
    if os.fstat(f.fileno()).st_size == 0:
      raise CheckpointError(f"gguf: {path!r} is empty.")
    # Mapped, not read: only the header's pages are touched.
    data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
  try:
    return _read_index(data, path)
  finally:
    data.close()


def _read_index(data: mmap.mmap, path: str) -> tuple[TensorInfo, ...]:
  """`read_index` on the mapped file ``data``."""
  cur = _Cursor(data, path)
  if cur.take(4, "the magic") != MAGIC:
    raise CheckpointError(f"gguf: {path!r} is not a GGUF file (no GGUF "
                          f"magic).")
  version = int(cur.scalar("<I", "the version"))
  if version not in (2, 3):
    raise CheckpointError(f"gguf: {path!r} has GGUF version {version}; "
                          f"versions 2 and 3 are read.")
  n_tensors = int(cur.scalar("<Q", "the tensor count"))
  n_kv = int(cur.scalar("<Q", "the metadata count"))
  alignment = 32
  for i in range(n_kv):
    key = cur.string(f"metadata key {i}")
    value = cur.value(int(cur.scalar("<I", f"metadata {key}")),
                      f"metadata {key}")
    if key == "general.alignment" and isinstance(value, int):
      alignment = value
  if alignment <= 0:
    raise CheckpointError(f"gguf: {path!r}: general.alignment is "
                          f"{alignment}.")
  raw = []
  for i in range(n_tensors):
    name = cur.string(f"the name of tensor {i}")
    where = f"the info of tensor {name}"
    rank = int(cur.scalar("<I", where))
    dims = [int(cur.scalar("<Q", where)) for _ in range(rank)]
    kind_id = int(cur.scalar("<I", where))
    offset = int(cur.scalar("<Q", where))
    raw.append((name, dims, kind_id, offset))
  start = -(-cur.pos // alignment) * alignment
  infos = []
  for name, dims, kind_id, offset in raw:
    if kind_id not in GGML_TYPES:
      raise CheckpointError(f"gguf: tensor {name}: unknown ggml type "
                            f"{kind_id}.")
    kind, block, block_bytes = GGML_TYPES[kind_id]
    if dims and dims[0] % block:
      raise CheckpointError(f"gguf: tensor {name}: rows of {dims[0]} "
                            f"elements are not whole {kind} blocks of "
                            f"{block} (inconsistent).")
    nbytes = math.prod(dims) // block * block_bytes
    infos.append(TensorInfo(name, tuple(reversed(dims)), kind,
                            start + offset, nbytes))
  ordered = sorted(infos, key=lambda t: t.offset)
  for info, after in zip(ordered, ordered[1:] + [None]):
    end = info.offset + info.nbytes
    if end > len(data):
      raise CheckpointError(f"gguf: tensor {info.name}: its {info.nbytes} "
                            f"bytes ({info.kind} {list(info.shape)}) run "
                            f"past the end of {path!r} ({len(data)} bytes): "
                            f"truncated.")
    if after is not None and end > after.offset:
      raise CheckpointError(f"gguf: tensor {info.name}: its {info.nbytes} "
                            f"bytes ({info.kind} {list(info.shape)}) overlap "
                            f"tensor {after.name} (inconsistent offsets).")
  return tuple(infos)


__all__ = ["GGML_TYPES", "TensorInfo", "read_index"]
