"""`save` and `load`: serving variables on disk, bit-exact.

```python
report = jaxq.save("model.safetensors", serving, rules, metadata={"a": 1})
print(report)  # model.safetensors: 140.61 KiB on disk, 1.05 MiB in float
               # (7.6x smaller)
loaded = jaxq.load("model.safetensors")
y = serve.apply(loaded.variables, x)      # linen
nnx.replace_by_pure_dict(state, loaded.variables)   # nnx
```

What is saved: a nested mapping (linen collections such as
``{"params": {...}}``, or an ``nnx.State``, saved as
``nnx.to_pure_dict(state)``) whose leaves are arrays, `QArray`s (a
`PackedQArray` is saved as its QArray) or None, the `Rule`s that produced it, and a JSON-serialisable ``metadata`` dict.
`load` gives back plain nested dicts with the same keys in the same order
(str and int keys; an int key stays an int), the same leaves bit for bit
(NaN payloads included), QArrays with their spec and float dtype, and jax
arrays that ``jit`` and `jaxq.dequantize` take as they are (NumPy leaves
come back as NumPy arrays, so 64-bit dtypes survive without
``jax_enable_x64``).

On-disk layout: one safetensors file.

* Tensors are named by the "/"-joined key path of their leaf; a QArray at
  ``params/dense/kernel`` is stored as ``params/dense/kernel.values``,
  ``.scale`` and, when affine, ``.zero_point``. Keys must not contain "/".
* Dtypes that the installed safetensors stores natively keep their dtype
  (with safetensors 0.8: float32/16/64, bfloat16, float8_e4m3fn,
  float8_e5m2, float8_e8m0fnu, the ints, bool). The 4-bit formats (int4,
  uint4, float4_e2m1fn) are packed two per byte into a flat uint8 tensor of
  ``ceil(size / 2)`` bytes: element ``2i`` in the low nibble of byte ``i``,
  element ``2i + 1`` in the high nibble, the last high nibble zero when the
  size is odd (safetensors' own F4 type cannot hold odd sizes). Any other
  dtype is stored as the unsigned integers of its width (``"bits"``).
* The safetensors metadata header holds two strings: ``jaxq.manifest``,
  a JSON document, and ``jaxq.manifest_sha256``, its SHA-256. The manifest
  records the format version, the tree (nested ``{"type": "dict", "items":
  [[key, node], ...]}`` nodes with ``"array"``, ``"qarray"`` and ``"none"``
  leaves; a qarray node holds its spec, float dtype and shape), every
  tensor's logical dtype, logical shape, encoding and the SHA-256 of its
  stored bytes, the rules and the metadata.

Rules are stored field by field; ``module_types`` given as classes are
stored by their ``__name__`` and come back as names (`Rule` matches a name
against the class names along a module's MRO, so a restored rule matches
the same layers; a full module path would match none). Granularities are
stored by type name and fields and must be jaxq's own.

Every check runs before anything is returned: a missing file
(`CheckpointNotFoundError`, also a ``FileNotFoundError``), a truncated or
corrupted file (header or data: the manifest digest and per-tensor
checksums), a manifest from a newer format version, and a spec that does not
fit its arrays (values dtype, scale shape for the granularity, zero points)
all raise a `CheckpointError` (a ``ValueError``) naming the file, the tensor
or the key path.

The tensor encodings live in `jaxq.io.tensors`, the manifest (specs,
rules, the tree and its header) in `jaxq.io.manifest`; this module
writes and reads the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from jaxq.version import __version__
from jaxq import flax as jaxq_flax
from jaxq.io.manifest import _decode_tree
from jaxq.io.manifest import _Encoder
from jaxq.io.manifest import _manifest
from jaxq.io.manifest import _rule_from_json
from jaxq.io.manifest import _rule_to_json
from jaxq.io.manifest import check_qarray
from jaxq.io.manifest import DIGEST_KEY
from jaxq.io.manifest import FORMAT_VERSION
from jaxq.io.manifest import MANIFEST_KEY
from jaxq.io.manifest import SEPARATOR
from jaxq.io.tensors import _decode
from jaxq.io.tensors import _safetensors
from jaxq.io.tensors import CheckpointError
from jaxq.io.tensors import CheckpointNotFoundError
from jaxq.flax.rules import Rule
from jaxq.flax.rules import check_rules


@dataclasses.dataclass(frozen=True)
class SaveReport:
  """What `save` wrote.

  Attributes:
    path: the file written.
    file_bytes: its size on disk (tensors, header and manifest).
    float_bytes: the bytes the same variables take in float: every QArray
      counted at its float dtype (``size * dtype.itemsize``), every other
      array at its own size.
    num_arrays: the plain array leaves saved.
    num_qarrays: the QArray leaves saved.
  """

  path: str
  file_bytes: int
  float_bytes: int
  num_arrays: int
  num_qarrays: int

  @property
  def ratio(self) -> float:
    """How many times smaller the file is than the float variables."""
    return self.float_bytes / max(self.file_bytes, 1)

  def __str__(self) -> str:
    return (f"{self.path}: {_human_bytes(self.file_bytes)} on disk, "
            f"{_human_bytes(self.float_bytes)} in float "
            f"({self.ratio:.1f}x smaller)")


def _human_bytes(num_bytes: int) -> str:
  unit = max((u for u in range(4) if num_bytes >= 1024**u), default=0)
  return (f"{num_bytes} B" if unit == 0 else
          f"{num_bytes / 1024**unit:.2f} {('KiB', 'MiB', 'GiB')[unit - 1]}")


@dataclasses.dataclass(frozen=True)
class Loaded:
  """What `load` read.

  Attributes:
    variables: nested dicts of jax arrays, `QArray`s and None, as saved.
    rules: the saved rules (``module_types`` as names), or None when
      `save` got none.
    metadata: the saved metadata dict ({} when none was given).
  """

  variables: dict[Any, Any]
  rules: tuple[Rule, ...] | None
  metadata: dict[str, Any]


# --------------------------------------------------------------- save/load


def save(path: str | os.PathLike, serving_variables: Mapping[Any, Any],
         rules: Rule | Sequence[Rule] | None = None, *,
         metadata: Mapping[str, Any] | None = None) -> SaveReport:
  """Saves serving variables (and the rules that made them) to one file.

  Args:
    path: the file to write (``.safetensors`` by convention); replaced
      atomically if it exists.
    serving_variables: a nested mapping of arrays, `QArray`s and None, e.g.
      the output of `jaxq.convert`; an ``nnx.State`` is saved as
      ``nnx.to_pure_dict(state)``. Keys are str or int without "/".
    rules: the `Rule`s of the model, stored alongside (or None).
    metadata: a JSON-serialisable dict stored in the manifest.

  Returns:
    A `SaveReport` with the bytes on disk and the bytes in float.

  Raises:
    ValueError: for a key with "/" or two keys stored under one name, a
      leaf that is not an array, a QArray or None, a QArray whose arrays do
      not fit its spec, a custom granularity, or metadata JSON cannot hold.
  """
  st = _safetensors()
  serving_variables = jaxq_flax.pure_variables(serving_variables)
  if not isinstance(serving_variables, Mapping):
    raise ValueError(f"jaxq.save: serving_variables must be a mapping (e.g. "
                     f"{{'params': ...}}), got "
                     f"{type(serving_variables).__name__}.")
  rules = None if rules is None else check_rules(rules, "jaxq.save")
  encoder = _Encoder()
  tree = encoder.node(serving_variables, ())
  manifest = {
      "format": "jaxq",
      "format_version": FORMAT_VERSION,
      "jaxq_version": __version__,
      "tree": tree,
      "tensors": encoder.entries,
      "rules": None if rules is None else [
          _rule_to_json(r, i) for i, r in enumerate(rules)],
      "metadata": dict(metadata or {}),
  }
  try:
    text = json.dumps(manifest, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ValueError(f"jaxq.save: metadata must be JSON-serialisable: {e}"
                     ) from None
  if json.loads(text)["metadata"] != manifest["metadata"]:
    raise ValueError("jaxq.save: metadata must survive a JSON round trip "
                     "(str keys; lists, not tuples).")
  header = {MANIFEST_KEY: text,
            DIGEST_KEY: hashlib.sha256(text.encode()).hexdigest()}

  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".jaxq-", suffix=".tmp")
  os.close(fd)
  try:
    st.numpy.save_file(encoder.tensors, tmp, metadata=header)
    # mkstemp creates the file 0600; give it the permissions of a plain open.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return SaveReport(path=path, file_bytes=os.path.getsize(path),
                    float_bytes=encoder.float_bytes,
                    num_arrays=encoder.num_arrays,
                    num_qarrays=encoder.num_qarrays)


def _read(path: str | os.PathLike) -> tuple[bytes, dict[str, Any]]:
  """The file's bytes and its verified manifest."""
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise CheckpointNotFoundError(
        f"jaxq.load: no checkpoint at {path!r}.") from None
  try:
    return data, _manifest(data)
  except CheckpointError as e:
    raise CheckpointError(f"jaxq.load: {path!r}: {e}") from None
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # Bytes that are not UTF-8 JSON of the expected shape.
    raise CheckpointError(f"jaxq.load: {path!r}: corrupted header: "
                          f"{type(e).__name__}: {e}") from None


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
  """The verified JSON manifest of a checkpoint, without loading tensors."""
  return _read(path)[1]


def load(path: str | os.PathLike) -> Loaded:
  """Loads what `save` wrote, bit for bit.

  Returns:
    A `Loaded` with the variables (nested dicts of jax arrays, QArrays and
    None), the rules and the metadata.

  Raises:
    CheckpointNotFoundError: if ``path`` does not exist.
    CheckpointError: if the file is truncated or corrupted, comes from a
      newer format version, or holds a QArray whose arrays do not fit its
      spec.
  """
  st = _safetensors()
  data, manifest = _read(path)
  where = f"jaxq.load: {os.fspath(path)!r}"
  try:
    stored = st.deserialize(data)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{where} is not a valid safetensors file "
                          f"(truncated or corrupted): {e}") from None
  try:
    entries = manifest["tensors"]
    names = {name for name, _ in stored}
    if names != set(entries):
      raise CheckpointError(
          f"the file's tensors do not match the manifest: missing "
          f"{sorted(set(entries) - names)}, unexpected "
          f"{sorted(names - set(entries))}.")
    arrays = {name: _decode(name, view["dtype"], view["shape"],
                            bytes(view["data"]), entries[name])
              for name, view in stored}
    variables = _decode_tree(manifest["tree"], arrays)
    if arrays:
      raise CheckpointError(f"tensors {sorted(arrays)} are in no leaf of the "
                            f"tree.")
    rules = manifest["rules"]
    rules = None if rules is None else tuple(map(_rule_from_json, rules))
    metadata = dict(manifest["metadata"])
  except CheckpointError as e:
    raise CheckpointError(f"{where}: {e}") from None
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise CheckpointError(f"{where}: invalid manifest: "
                          f"{type(e).__name__}: {e}") from None
  return Loaded(variables=variables, rules=rules, metadata=metadata)


__all__ = ["CheckpointError", "CheckpointNotFoundError", "DIGEST_KEY",
           "FORMAT_VERSION", "Loaded", "MANIFEST_KEY", "SEPARATOR",
           "SaveReport", "check_qarray", "load", "read_manifest", "save"]
