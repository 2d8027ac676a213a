"""compressed-tensors -> jaxq: a model directory read back into serving
variables, still quantized, with the rules that reproduce them.

``load`` is the inverse of `jaxq.io.compressed_tensors.save` (the layout is
described there): kernels come back as `QArray`s in Flax's ``(in, out)``
layout with the values, scales and zero points as stored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxq import granularity as granularity_lib
from jaxq.flax.rules import Rule
from jaxq.io.compressed_tensors_schemes import CONFIG_FILE
from jaxq.io.compressed_tensors_schemes import INDEX_FILE
from jaxq.io.compressed_tensors_schemes import Names
from jaxq.io.compressed_tensors_schemes import PARAM_NAMES
from jaxq.io.compressed_tensors_schemes import QUANT_METHOD
from jaxq.io.compressed_tensors_schemes import WEIGHTS_FILE
from jaxq.io.compressed_tensors_schemes import act_spec_from_args
from jaxq.io.compressed_tensors_schemes import amax_for_scale
from jaxq.io.compressed_tensors_schemes import flatten
from jaxq.io.compressed_tensors_schemes import name_of
from jaxq.io.compressed_tensors_schemes import spec_from_args
from jaxq.io.compressed_tensors_schemes import unflatten
from jaxq.io.compressed_tensors_schemes import unpack_int32
from jaxq.io.tensors import CheckpointError
from jaxq.io.tensors import _safetensors
from jaxq.spec import QArray
from jaxq.spec import check_qarray


@dataclasses.dataclass(frozen=True)
class Loaded:
  """What `load` read.

  Attributes:
    variables: ``{"params": ...}`` (and ``"quant_ranges"`` for static
      activations), kernels as `QArray`s in Flax's ``(in, out)`` layout.
    rules: one `Rule` per quantized layer (its path escaped), reproducing
      the weight and activation specs.
    config: the ``config.json`` contents.
  """

  variables: dict[str, Any]
  rules: tuple[Rule, ...]
  config: dict[str, Any]



_CODES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
          "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
          "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of one safetensors file as NumPy (fp8 and bf16 included).

  Raises:
    CheckpointError: for a missing, truncated or corrupted file, or a dtype
      with no NumPy counterpart, naming the file or the tensor.
  """
  st = _safetensors()
  if not os.path.exists(path):
    raise CheckpointError(f"{path!r} is missing.")
  with open(path, "rb") as f:
    data = f.read()
  try:
    stored = st.deserialize(data)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{path!r} is not a valid safetensors file "
                          f"(truncated or corrupted): {e}") from None
  tensors = {}
  for name, view in stored:
    if view["dtype"] not in _CODES:
      raise CheckpointError(f"{path!r}: tensor {name} has the unsupported "
                            f"dtype {view['dtype']}.")
    tensors[name] = np.frombuffer(bytes(view["data"]), _CODES[view["dtype"]]
                                  ).reshape(view["shape"])
  return tensors


def _read_tensors(directory: str) -> dict[str, np.ndarray]:
  index = os.path.join(directory, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = [WEIGHTS_FILE]
  tensors = {}
  for name in files:
    try:
      tensors.update(read_safetensors(os.path.join(directory, name)))
    except CheckpointError as e:
      raise CheckpointError(f"compressed_tensors.load: {e}") from None
  return tensors


def _targets(module: str, targets: Sequence[str]) -> bool:
  for target in targets:
    if target.startswith("re:"):
      if re.match(target[3:], module):
        return True
    elif target == module or target == "Linear":
      return True
  return False


def load(directory: str | os.PathLike, names: Names,
         template: Mapping[str, Any]) -> Loaded:
  """Reads a compressed-tensors model directory into jaxq serving variables.

  Args:
    directory: holds ``config.json`` and ``model.safetensors`` (or shards
      with ``model.safetensors.index.json``).
    names: layer path -> Hugging Face module name, as for `save`.
    template: the model's float parameters (``variables["params"]``, or
      ``jax.eval_shape`` of them): which parameters to read, under which
      Flax names, with which shapes. A layer that `names` maps to None is
      skipped (and left out of the result).

  Returns:
    A `Loaded`: ``{"params": ...}`` with each quantized kernel a `QArray`
    in Flax's ``(in, out)`` layout (values, scales, zero points exactly as
    stored; float dtype from the scales), other parameters as float
    arrays, ``"quant_ranges"`` for static activations, and the rules.

  Raises:
    CheckpointError: for a missing, truncated or corrupted file, a missing
      tensor, a tensor whose shape or dtype does not match the template or
      its scheme, or a scheme jaxq cannot hold (naming the tensor).
  """
  directory = os.fspath(directory)
  config_path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(config_path):
    raise CheckpointError(f"compressed_tensors.load: no {CONFIG_FILE} in "
                          f"{directory!r}.")
  with open(config_path) as f:
    config = json.load(f)
  qconfig = config.get("quantization_config") or {}
  if qconfig.get("quant_method") != QUANT_METHOD:
    raise CheckpointError(f"compressed_tensors.load: {config_path!r} has no "
                          f"compressed-tensors quantization_config.")
  tensors = _read_tensors(directory)
  ignore = set(qconfig.get("ignore") or [])
  groups = list((qconfig.get("config_groups") or {}).values())
  top_format = qconfig.get("format")

  params: dict[tuple[str, ...], Any] = {}
  ranges: dict[tuple[str, ...], Any] = {}
  rules = []
  for path, like in flatten(template.get("params", template)).items():
    layer, param = "/".join(path[:-1]), path[-1]
    module = name_of(names, layer)
    if module is None:
      continue
    torch_name, transpose = PARAM_NAMES.get(param, (param, False))
    local = {k[len(module) + 1:]: v for k, v in tensors.items()
             if k.startswith(module + ".")}
    if param == "kernel" and "weight_scale" in local:
      if module in ignore:
        raise CheckpointError(f"compressed_tensors.load: {module!r} is in "
                              f"`ignore` but holds weight_scale.")
      group = next((g for g in groups if _targets(module, g["targets"])), None)
      if group is None:
        raise CheckpointError(f"compressed_tensors.load: {module!r} holds "
                              f"weight_scale but no config group targets it.")
      where = f"{module}.weight"
      qa = _decompress(local, group["weights"], group.get("format") or
                       top_format, where)
      if qa.shape != tuple(like.shape):
        raise CheckpointError(f"compressed_tensors.load: tensor {where} is "
                              f"{list(qa.shape[::-1])} (out, in); the model's "
                              f"kernel at {layer!r} is {list(like.shape)} "
                              f"(in, out).")
      act_spec = act_spec_from_args(group.get("input_activations"),
                                     f"{module}.input_activations")
      if act_spec is not None and not act_spec.dynamic:
        if "input_scale" not in local:
          raise CheckpointError(f"compressed_tensors.load: tensor "
                                f"{module}.input_scale is missing for its "
                                f"static activations.")
        ranges[path[:-1] + ("act", "amax")] = jnp.asarray(
            amax_for_scale(act_spec, local["input_scale"]).reshape(1, 1))
      params[path] = qa
      rules.append(Rule(re.escape(layer), weight=qa.spec, act=act_spec))
      continue
    name = f"{module}.{torch_name}"
    if name not in tensors:
      raise CheckpointError(f"compressed_tensors.load: tensor {name} "
                            f"(params/{'/'.join(path)}) is missing.")
    value = np.asarray(tensors[name])
    value = value.T if transpose else value
    if value.shape != tuple(like.shape):
      raise CheckpointError(f"compressed_tensors.load: tensor {name} has "
                            f"shape {list(value.shape)}{' transposed' if transpose else ''}, "
                            f"the model's params/{'/'.join(path)} is "
                            f"{list(like.shape)}.")
    params[path] = jnp.asarray(value)
  variables: dict[str, Any] = {"params": unflatten(params)}
  if ranges:
    variables["quant_ranges"] = unflatten(ranges)
  return Loaded(variables=variables, rules=tuple(rules), config=config)


def _decompress(local: Mapping[str, np.ndarray], args: Mapping[str, Any],
                fmt: str, where: str) -> QArray:
  """One module's tensors -> the kernel `QArray` in Flax's (in, out)."""
  scale = np.asarray(local["weight_scale"])
  dtype = np.dtype(scale.dtype)
  bits = int(args.get("num_bits", 8))
  if fmt == "pack-quantized":
    for name in ("weight_packed", "weight_shape"):
      if name not in local:
        raise CheckpointError(f"compressed_tensors.load: tensor "
                              f"{where.rsplit('.', 1)[0]}.{name} is missing.")
    out, d_in = (int(n) for n in local["weight_shape"])
    packed = local["weight_packed"]
    if packed.dtype != np.int32 or packed.shape != (
        out, math.ceil(d_in * bits / 32)):
      raise CheckpointError(
          f"compressed_tensors.load: tensor {where}_packed is "
          f"{packed.dtype} {list(packed.shape)}, expected int32 "
          f"{[out, math.ceil(d_in * bits / 32)]} for weight_shape "
          f"{[out, d_in]}.")
    values = unpack_int32(packed, bits, d_in, axis=1)
  else:
    if "weight" not in local:
      raise CheckpointError(f"compressed_tensors.load: tensor {where} is "
                            f"missing.")
    values = np.asarray(local["weight"])
    out, d_in = values.shape
  spec = spec_from_args(args, values, where)
  expected_dtype = np.dtype(spec.fmt.dtype)
  if fmt != "pack-quantized" and values.dtype != (
      np.int8 if spec.fmt.kind == "int" else expected_dtype):
    raise CheckpointError(f"compressed_tensors.load: tensor {where} is "
                          f"{values.dtype}, expected {expected_dtype}.")
  kernel_shape = (d_in, out)
  scale_shape = granularity_lib.scale_shape(spec.granularity, kernel_shape)
  if scale.size != math.prod(scale_shape):
    raise CheckpointError(f"compressed_tensors.load: tensor {where}_scale has "
                          f"shape {list(scale.shape)}, expected "
                          f"{list(scale_shape[::-1])} for {spec.granularity} "
                          f"on a ({out}, {d_in}) weight.")
  scale = scale.astype(np.float32).reshape(scale_shape[::-1]).T
  zero = None
  if not spec.symmetric:
    if "weight_zero_point" not in local:
      raise CheckpointError(f"compressed_tensors.load: tensor "
                            f"{where}_zero_point is missing for an "
                            f"asymmetric scheme.")
    zero = np.asarray(local["weight_zero_point"])
    if fmt == "pack-quantized":
      zero = unpack_int32(zero, bits, out, axis=0)
    zero = zero.astype(np.int32).reshape(scale_shape[::-1]).T
    narrow = spec.fmt.zero_point_dtype  # As `jaxq.quantize` stores them.
    if zero.size and np.iinfo(narrow).min <= zero.min() <= zero.max() <= (
        np.iinfo(narrow).max):
      zero = zero.astype(narrow)
  if "weight_g_idx" in local:
    g_idx = np.asarray(local["weight_g_idx"]).reshape(-1)
    size = args.get("group_size") or d_in
    if not np.array_equal(g_idx, np.arange(d_in) // size):
      raise CheckpointError(f"compressed_tensors.load: tensor {where}_g_idx "
                            f"holds act-order groups (not k // group_size); "
                            f"jaxq's groups are contiguous.")
  values = values.T
  if spec.fmt.kind == "int":
    values = values.astype(expected_dtype)
  qa = QArray(values=jnp.asarray(values), scale=jnp.asarray(scale),
              zero_point=None if zero is None else jnp.asarray(zero),
              spec=spec, dtype=dtype)
  try:
    check_qarray(qa, "compressed_tensors.load", where)
  except ValueError as e:
    raise CheckpointError(f"compressed_tensors.load: tensor {where}: {e}"
                          ) from None
  return qa


__all__ = ["Loaded", "load", "read_safetensors"]
