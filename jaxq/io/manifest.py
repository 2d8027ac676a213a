"""The JSON manifest of a jaxq checkpoint: specs, rules, the tree, the header.

The manifest is what makes a safetensors file a jaxq checkpoint: the format
version, the tree of the saved variables (nested ``{"type": "dict", "items":
[[key, node], ...]}`` nodes with ``"array"``, ``"qarray"`` and ``"none"``
leaves), every tensor's entry (see `jaxq.io.tensors`), the rules and
the metadata. This module turns `QuantSpec`s and `Rule`s into JSON and back,
walks a variables tree into stored tensors (`_Encoder`) and back
(`_decode_tree`), checks a QArray's arrays against its spec (`check_qarray`),
and reads and verifies the manifest from a file's header (`_manifest`: its
SHA-256 digest and format version).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxq import formats as formats_lib
from jaxq import granularity as granularity_lib
from jaxq.io.tensors import _dtype
from jaxq.io.tensors import _encode
from jaxq.io.tensors import CheckpointError
from jaxq.flax.rules import Rule
from jaxq.spec import PackedQArray
from jaxq.spec import QArray
from jaxq.spec import QuantSpec
from jaxq.version import __version__

FORMAT_VERSION = 1
SEPARATOR = "/"
MANIFEST_KEY = "jaxq.manifest"
DIGEST_KEY = "jaxq.manifest_sha256"

_QARRAY_FIELDS = ("values", "scale", "zero_point")
_GRANULARITIES = {cls.__name__: cls for cls in (
    granularity_lib.PerTensor, granularity_lib.PerChannel,
    granularity_lib.PerToken, granularity_lib.PerGroup,
    granularity_lib.PerBlock, granularity_lib.MX)}
_HEADER_LENGTH = struct.Struct("<Q")


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
  affine, with the scale's shape and an integer dtype (or float32, an
  offset off the integer grid), and ``dtype`` must be
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
      not (jnp.issubdtype(zero_point.dtype, jnp.integer) or
           np.dtype(zero_point.dtype) == np.float32)):
    raise ValueError(f"zero point must be integers (or float32) of the "
                     f"scale's shape "
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
    if isinstance(node, PackedQArray):  # Stored as any QArray (packed).
      node = node.unpack()
    if isinstance(node, QArray):
      try:
        check_qarray(node.values, node.scale, node.zero_point, node.spec,
                     np.dtype(node.dtype))
      except ValueError as e:
        raise ValueError(f"jaxq.save: QArray at {name!r}: {e}") from None
      for field in _QARRAY_FIELDS:
        value = getattr(node, field)
        if value is None:
          continue
        if field == "scale" and node.spec.double_quant is not None:
          # Double-quantized scales are stored as their codes and steps
          # (a fixed point of the double quantization: read back exactly).
          codes, steps = formats_lib.double_quantize_scale(
              value, node.spec.double_quant)
          if not np.array_equal(np.asarray(formats_lib.double_dequantize_scale(
              codes, steps, node.spec.double_quant)), np.asarray(value)):
            raise ValueError(f"jaxq.save: QArray at {name!r}: its scale is "
                             f"not on the double_quant grid of its spec.")
          self.add(f"{name}.scale_codes", codes)
          self.add(f"{name}.scale_steps", steps)
          continue
        self.add(f"{name}.{field}", value)
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
    codes = arrays.pop(f"{name}.scale_codes", None)
    steps = arrays.pop(f"{name}.scale_steps", None)
    if scale is None and codes is not None and steps is not None and (
        spec.double_quant is not None):
      scale = np.asarray(formats_lib.double_dequantize_scale(
          jnp.asarray(codes), jnp.asarray(steps), spec.double_quant))
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


# ----------------------------------------------------------------- header


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
        f"version {version}; this jaxq ({__version__}) reads up to "
        f"version {FORMAT_VERSION}. Upgrade jaxq to load it.")
  return manifest
