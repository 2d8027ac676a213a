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
``nnx.to_pure_dict(state)``) whose leaves are arrays, `QArray`s or None,
the `Rule`s that produced it, and a JSON-serialisable ``metadata`` dict.
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
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import jaxq
from jaxq import flax as jaxq_flax
from jaxq import granularity as granularity_lib
from jaxq.flax.rules import Rule
from jaxq.flax.rules import check_rules
from jaxq.spec import QArray
from jaxq.spec import QuantSpec

FORMAT_VERSION = 1
SEPARATOR = "/"
MANIFEST_KEY = "jaxq.manifest"
DIGEST_KEY = "jaxq.manifest_sha256"

_QARRAY_FIELDS = ("values", "scale", "zero_point")
_NIBBLE_DTYPES = frozenset(
    np.dtype(t) for t in (ml_dtypes.int4, ml_dtypes.uint4,
                          ml_dtypes.float4_e2m1fn))
_GRANULARITIES = {cls.__name__: cls for cls in (
    granularity_lib.PerTensor, granularity_lib.PerChannel,
    granularity_lib.PerToken, granularity_lib.PerGroup,
    granularity_lib.PerBlock, granularity_lib.MX)}
_HEADER_LENGTH = struct.Struct("<Q")


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded exactly as it was saved."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """The checkpoint file does not exist."""


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


# ---------------------------------------------------------------- encoding


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


# ------------------------------------------------------- specs and rules


def _spec_to_json(spec: QuantSpec, where: str) -> dict[str, Any]:
  granularity = spec.granularity
  kind = type(granularity).__name__
  if _GRANULARITIES.get(kind) is not type(granularity):
    raise ValueError(f"jaxq.save: {where}: cannot store the custom "
                     f"granularity {granularity!r}; use one of "
                     f"{', '.join(_GRANULARITIES)}.")
  fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
  fields["granularity"] = {"type": kind, **dataclasses.asdict(granularity)}
  return fields


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the dataclasses were built with."""
  return tuple(map(_tuples, value)) if isinstance(value, list) else value


def _spec_from_json(fields: Mapping[str, Any]) -> QuantSpec:
  fields = dict(fields)
  granularity = dict(fields.pop("granularity"))
  kind = granularity.pop("type")
  if kind not in _GRANULARITIES:
    raise CheckpointError(f"unknown granularity {kind!r}; this jaxq knows "
                          f"{', '.join(_GRANULARITIES)}.")
  cls = _GRANULARITIES[kind]
  granularity = cls(**{k: _tuples(v) for k, v in granularity.items()})
  return QuantSpec(granularity=granularity, **fields)


def _rule_to_json(rule: Rule, index: int) -> dict[str, Any]:
  where = f"rules[{index}]"
  types = rule.module_types
  return {
      "path_regex": rule.path_regex,
      "weight": None if rule.weight is None else _spec_to_json(
          rule.weight, where),
      "act": None if rule.act is None else _spec_to_json(rule.act, where),
      "skip": rule.skip,
      "module_types": None if types is None else [
          t.__name__ if isinstance(t, type) else t for t in types],
  }


def _rule_from_json(fields: Mapping[str, Any]) -> Rule:
  fields = dict(fields)
  for name in ("weight", "act"):
    if fields.get(name) is not None:
      fields[name] = _spec_from_json(fields[name])
  if fields.get("module_types") is not None:
    fields["module_types"] = tuple(fields["module_types"])
  return Rule(**fields)


def check_qarray(values: Any, scale: Any, zero_point: Any,
                 spec: QuantSpec, dtype: np.dtype) -> None:
  """Raises ValueError if the arrays of a QArray do not fit its spec.

  The values must be in the spec's storage dtype, the scale must have the
  granularity's scale shape for the values' shape (e8m0 for MX, a float
  dtype otherwise), the zero point must be present exactly when the spec is
  affine, with the scale's shape and an integer dtype, and ``dtype`` must be
  a float dtype.
  """
  values_dtype, shape = np.dtype(values.dtype), tuple(values.shape)
  if values_dtype != spec.fmt.dtype:
    raise ValueError(f"values are {values_dtype} but the spec's format is "
                     f"{spec.format}.")
  try:
    expected = granularity_lib.scale_shape(spec.granularity, shape)
  except ValueError as e:
    raise ValueError(f"the granularity does not fit values of shape {shape}: "
                     f"{e}") from None
  if tuple(scale.shape) != expected:
    raise ValueError(f"scale has shape {tuple(scale.shape)} but "
                     f"{spec.granularity} on values of shape {shape} needs "
                     f"{expected}.")
  scale_dtype = np.dtype(scale.dtype)
  if spec.is_mx and scale_dtype != np.dtype(ml_dtypes.float8_e8m0fnu):
    raise ValueError(f"MX scales must be float8_e8m0fnu, got {scale_dtype}.")
  if not spec.is_mx and not jnp.issubdtype(scale_dtype, jnp.floating):
    raise ValueError(f"scale must be a float array, got {scale_dtype}.")
  if spec.symmetric != (zero_point is None):
    kind = "symmetric" if spec.symmetric else "affine"
    state = "missing" if zero_point is None else "present"
    raise ValueError(f"the spec is {kind} but the zero point is {state}.")
  if zero_point is not None and (
      tuple(zero_point.shape) != expected or
      not jnp.issubdtype(zero_point.dtype, jnp.integer)):
    raise ValueError(f"zero point must be integers of the scale's shape "
                     f"{expected}, got {np.dtype(zero_point.dtype)} "
                     f"{tuple(zero_point.shape)}.")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"the dequantized dtype must be a float dtype, got "
                     f"{dtype}.")


# ------------------------------------------------------------------ trees


def _check_key(key: Any, path: tuple[Any, ...]) -> None:
  where = SEPARATOR.join(map(str, path)) or "<root>"
  if isinstance(key, bool) or not isinstance(key, (str, int)):
    raise ValueError(f"jaxq.save: key {key!r} under {where!r} must be a str "
                     f"or an int.")
  if isinstance(key, str) and SEPARATOR in key:
    raise ValueError(f"jaxq.save: key {key!r} under {where!r} contains the "
                     f"separator {SEPARATOR!r}, which names tensors.")


@dataclasses.dataclass
class _Encoder:
  """Accumulates stored tensors and manifest entries while walking a tree."""

  tensors: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  entries: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
  float_bytes: int = 0
  num_arrays: int = 0
  num_qarrays: int = 0

  def add(self, name: str, x: Any) -> None:
    if name in self.tensors:
      raise ValueError(f"jaxq.save: two leaves are both stored as {name!r}; "
                       f"rename one of the keys.")
    self.tensors[name], self.entries[name] = _encode(np.asarray(x), name)

  def node(self, node: Any, path: tuple[Any, ...]) -> dict[str, Any]:
    name = SEPARATOR.join(map(str, path))
    if isinstance(node, Mapping):
      items = []
      for key, child in node.items():
        _check_key(key, path)
        items.append([key, self.node(child, path + (key,))])
      return {"type": "dict", "items": items}
    if node is None:
      return {"type": "none"}
    if isinstance(node, QArray):
      try:
        check_qarray(node.values, node.scale, node.zero_point, node.spec,
                     np.dtype(node.dtype))
      except ValueError as e:
        raise ValueError(f"jaxq.save: QArray at {name!r}: {e}") from None
      for field in _QARRAY_FIELDS:
        if getattr(node, field) is not None:
          self.add(f"{name}.{field}", getattr(node, field))
      self.num_qarrays += 1
      self.float_bytes += math.prod(node.shape) * np.dtype(node.dtype).itemsize
      return {"type": "qarray", "name": name,
              "spec": _spec_to_json(node.spec, f"QArray at {name!r}"),
              "dtype": np.dtype(node.dtype).name, "shape": list(node.shape)}
    if isinstance(node, (jax.Array, np.ndarray, np.generic)):
      self.add(name, node)
      self.num_arrays += 1
      self.float_bytes += np.asarray(node).nbytes
      # NumPy leaves come back as NumPy: jnp.asarray would turn int64 and
      # float64 into 32 bits unless x64 is on.
      return {"type": "array", "name": name,
              "numpy": not isinstance(node, jax.Array)}
    raise ValueError(f"jaxq.save: the leaf at {name!r} is a "
                     f"{type(node).__name__}; expected an array, a QArray "
                     f"or None.")


def _decode_tree(node: Mapping[str, Any], arrays: dict[str, np.ndarray]
                 ) -> Any:
  """Rebuilds the tree of ``node``, taking its tensors out of ``arrays``."""
  kind = node["type"]
  if kind == "dict":
    return {key: _decode_tree(child, arrays) for key, child in node["items"]}
  if kind == "none":
    return None
  name = node["name"]
  if kind == "array":
    array = arrays.pop(name)
    return np.array(array) if node["numpy"] else jnp.asarray(array)
  if kind == "qarray":
    spec, dtype = _spec_from_json(node["spec"]), _dtype(node["dtype"])
    values, scale, zero_point = (arrays.pop(f"{name}.{f}", None)
                                 for f in _QARRAY_FIELDS)
    if values is None or scale is None:
      raise CheckpointError(f"QArray at {name!r}: values or scale missing.")
    try:
      if tuple(values.shape) != tuple(node["shape"]):
        raise ValueError(f"values have shape {tuple(values.shape)}, the "
                         f"manifest says {tuple(node['shape'])}.")
      check_qarray(values, scale, zero_point, spec, dtype)
    except ValueError as e:
      raise CheckpointError(f"QArray at {name!r} does not match its spec "
                            f"{spec}: {e}") from None
    return QArray(values=jnp.asarray(values), scale=jnp.asarray(scale),
                  zero_point=None if zero_point is None else
                  jnp.asarray(zero_point), spec=spec, dtype=dtype)
  raise CheckpointError(f"unknown tree node type {kind!r}.")


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
      "jaxq_version": jaxq.__version__,
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


def _manifest(data: bytes) -> dict[str, Any]:
  """The verified manifest in the header of the file contents ``data``."""
  if len(data) < _HEADER_LENGTH.size:
    raise CheckpointError(f"the file is truncated: {len(data)} bytes.")
  (header_length,) = _HEADER_LENGTH.unpack_from(data)
  header_end = _HEADER_LENGTH.size + header_length
  if header_end > len(data):
    raise CheckpointError(
        f"the file is truncated or corrupted: its header claims "
        f"{header_length} bytes but the file has {len(data)}.")
  header = json.loads(data[_HEADER_LENGTH.size:header_end])
  metadata = header.get("__metadata__") or {}
  if MANIFEST_KEY not in metadata or DIGEST_KEY not in metadata:
    raise CheckpointError("no jaxq manifest in the header: not a jaxq "
                          "checkpoint, or its header is corrupted.")
  text = metadata[MANIFEST_KEY]
  if hashlib.sha256(text.encode()).hexdigest() != metadata[DIGEST_KEY]:
    raise CheckpointError("the manifest does not match its checksum; the "
                          "header is corrupted.")
  manifest = json.loads(text)
  version = manifest.get("format_version")
  if not isinstance(version, int) or version < 1:
    raise CheckpointError(f"invalid format version {version!r}.")
  if version > FORMAT_VERSION:
    raise CheckpointError(
        f"written by jaxq {manifest.get('jaxq_version', '?')} in format "
        f"version {version}; this jaxq ({jaxq.__version__}) reads up to "
        f"version {FORMAT_VERSION}. Upgrade jaxq to load it.")
  return manifest


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
