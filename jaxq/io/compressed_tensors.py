"""compressed-tensors: the checkpoint format vLLM and transformers load.

``save`` writes jaxq serving variables as a Hugging Face model directory in
the compressed-tensors format that llm-compressor writes (``model.safetensors``
plus ``config.json`` with a ``quantization_config``); ``load`` reads such a
directory back into jaxq serving variables, still quantized, with the
`Rule`s that reproduce them. This module writes; the reader is `jaxq.io.compressed_tensors_load`
(re-exported here), the packing and the spec <-> scheme mapping both use
are `jaxq.io.compressed_tensors_schemes`.

```python
report = jaxq.io.compressed_tensors.save(
    "out/", serving, names=hf_names, rules=rules, config=hf_config)
loaded = jaxq.io.compressed_tensors.load("out/", hf_names, variables)
y = jaxq.quantize_model(model, loaded.rules, "serve").apply(
    loaded.variables, x)
```

The on-disk layout (as compressed-tensors' compressors read it; every
tensor is PyTorch's, so a Flax ``(in, out)`` kernel is written ``(out, in)``):

* ``pack-quantized`` (int4, and int8 weight-only): ``weight_packed`` int32
  ``(out, ceil(in * bits / 32))``; each value ``v`` is stored offset binary,
  ``v + 2**(bits - 1)``, element ``i`` of a row at bits ``[i * bits % 32,
  ...)`` of word ``i * bits // 32`` (for int4: eight per word, the low
  nibble first). ``weight_scale`` ``(out, 1)`` (channel), ``(out, in /
  group_size)`` (group) or ``(1,)`` (tensor), in the scale dtype (the model
  dtype by default); ``weight_zero_point`` when asymmetric, the same offset
  binary packing along the output axis: ``(ceil(out * bits / 32), groups)``;
  ``weight_shape`` int64 ``[out, in]``.
* ``int-quantized`` (int8 weights with int8 activations): ``weight`` int8
  ``(out, in)``, ``weight_scale`` as above, ``weight_zero_point`` int8 of
  the scale's shape when asymmetric.
* ``float-quantized`` (fp8 e4m3 weights with fp8 activations) and
  ``naive-quantized`` (fp8 weight-only): ``weight`` float8_e4m3fn ``(out,
  in)``, ``weight_scale`` ``(out, 1)`` or, for blocks, ``(ceil(out / bo),
  ceil(in / bi))`` with ``block_structure [bo, bi]``.
* static activations: ``input_scale`` ``(1,)`` (float32), the scale jaxq
  serves with (`jaxq.scale_from_range` of the calibrated range).
* the KV cache (``kv_cache_scheme``): ``<attention>.k_scale`` and
  ``<attention>.v_scale`` where given.
* float parameters (biases, norms, embeddings, unquantized kernels) are
  written in the model dtype under their Hugging Face names; the linear
  layers left in float are listed in ``ignore``.

``config.json`` holds the user's model config plus ``quantization_config``:
``quant_method: "compressed-tensors"``, ``format`` (one format, or
``"mixed-precision"`` with a ``format`` per group), ``config_groups`` (one
group per distinct pair of weight and activation arguments, ``targets`` the
exact module names), ``ignore``, ``kv_cache_scheme``,
``quantization_status: "compressed"`` and ``version``.

jaxq specs map to compressed-tensors arguments (on a Flax ``(in, out)``
kernel): ``PerChannel(axis=-1)`` is ``strategy "channel"``,
``PerGroup(axis=0, size)`` is ``"group"`` with ``group_size``,
``PerBlock((bi, bo))`` is ``"block"`` with ``block_structure [bo, bi]``,
``PerTensor()`` is ``"tensor"``; activations ``PerToken()`` (dynamic) is
``"token"``, ``PerTensor()`` is ``"tensor"``. What compressed-tensors cannot
express (MX, int4 or asymmetric activations, per-input-channel scales, a
group size that does not divide the input, uint8, fp4, e5m2, convolutions,
quantized embeddings) raises a `ValueError` naming the layer and the spec
before anything is written. jaxq's groups are contiguous, so ``save``
writes no ``weight_g_idx``; ``load`` accepts a ``weight_g_idx`` only when it
is the contiguous order (``k // group_size``) and raises otherwise.

Round trips: ``load(save(v))`` gives back the same QArrays bit for bit
(values, scales, zero points; a scale dtype narrower than float32 rounds
the scales once, on ``save``), and compressed-tensors' own decompression of
the file gives ``jaxq.dequantize`` of each kernel, transposed.
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
import numpy as np

from jaxq.flax.rules import Rule
from jaxq.io.checkpoint import _human_bytes
from jaxq.io.compressed_tensors_load import Loaded
from jaxq.io.compressed_tensors_load import load
from jaxq.io.compressed_tensors_load import read_safetensors
from jaxq.io.compressed_tensors_schemes import CONFIG_FILE
from jaxq.io.compressed_tensors_schemes import FORMAT_VERSION
from jaxq.io.compressed_tensors_schemes import Names
from jaxq.io.compressed_tensors_schemes import PARAM_NAMES
from jaxq.io.compressed_tensors_schemes import QUANT_METHOD
from jaxq.io.compressed_tensors_schemes import WEIGHTS_FILE
from jaxq.io.compressed_tensors_schemes import act_args_of
from jaxq.io.compressed_tensors_schemes import flatten
from jaxq.io.compressed_tensors_schemes import format_of
from jaxq.io.compressed_tensors_schemes import name_of
from jaxq.io.compressed_tensors_schemes import pack_int32
from jaxq.io.compressed_tensors_schemes import unpack_int32
from jaxq.io.compressed_tensors_schemes import weight_args_of
from jaxq.io.tensors import _safetensors
from jaxq.quantize import scale_from_range
from jaxq.spec import QArray
from jaxq.spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class ExportReport:
  """What `save` wrote.

  Attributes:
    directory: the directory written.
    file_bytes: bytes of the safetensors file(s).
    float_bytes: bytes of the same parameters in float (QArrays at their
      float dtype, other arrays at their own).
    quantized: Hugging Face names of the quantized modules.
    ignored: Hugging Face names of the linear modules left in float.
    quantization_config: the ``quantization_config`` written.
  """

  directory: str
  file_bytes: int
  float_bytes: int
  quantized: tuple[str, ...]
  ignored: tuple[str, ...]
  quantization_config: dict[str, Any]

  @property
  def ratio(self) -> float:
    return self.float_bytes / max(self.file_bytes, 1)

  def __str__(self) -> str:
    return (f"{self.directory}: {_human_bytes(self.file_bytes)} on disk, "
            f"{_human_bytes(self.float_bytes)} in float "
            f"({self.ratio:.1f}x smaller), {len(self.quantized)} quantized "
            f"modules")



def _act_specs(rules: Sequence[Rule] | Mapping[str, Any] | None,
               paths: Sequence[str]) -> dict[str, QuantSpec | None]:
  """Each layer's activation spec: from `jaxq.layers` output (path ->
  `LayerInfo`), or the first rule whose regex matches the path."""
  if rules is None:
    return {p: None for p in paths}
  if isinstance(rules, Mapping):
    return {p: getattr(rules.get(p), "act", None) for p in paths}
  out = {}
  for path in paths:
    rule = next((r for r in rules if (r.weight is not None or r.act is not None
                                      or r.skip)
                 and re.fullmatch(r.path_regex, path)), None)
    out[path] = None if rule is None or rule.skip else rule.act
  return out


def _torch_dtype_name(dtype: np.dtype) -> str:
  return {"float32": "float32", "bfloat16": "bfloat16",
          "float16": "float16"}.get(np.dtype(dtype).name, "float32")


def save(directory: str | os.PathLike, serving_variables: Mapping[str, Any],
         names: Names, *,
         rules: Sequence[Rule] | Mapping[str, Any] | None = None,
         config: Mapping[str, Any] | None = None,
         scale_dtype: Any = None,
         kv_cache_scales: Mapping[str, tuple[Any, Any]] | None = None,
         kv_cache_format: str = "float8_e4m3fn") -> ExportReport:
  """Writes serving variables as a compressed-tensors model directory.

  Args:
    directory: created if needed; ``model.safetensors`` and ``config.json``
      are (over)written in it.
    serving_variables: linen-style ``{"params": ..., "quant_ranges": ...}``
      from `jaxq.convert` (an nnx state as ``nnx.to_pure_dict``): kernels
      (``(in, out)``) as `QArray`s or float arrays, other parameters float.
    names: layer path -> Hugging Face module name (a mapping or a
      function); a layer that maps to None is left out of the file. Every
      quantized layer needs a name.
    rules: the rules the model was quantized with (the first whose regex
      matches a path gives its activation spec), or ``jaxq.layers(qmodel)``
      (path -> `LayerInfo`); None for weight-only models.
    config: the Hugging Face model config (``config.json`` fields) to write
      beside the ``quantization_config``.
    scale_dtype: the dtype of the written scales; None for each kernel's
      float dtype (the model dtype, as llm-compressor writes them).
    kv_cache_scales: attention module name -> ``(k_scale, v_scale)``
      (scalars, or one per KV head), written as ``<name>.k_scale`` and
      ``<name>.v_scale`` with a ``kv_cache_scheme``.
    kv_cache_format: the KV cache's format for the ``kv_cache_scheme``
      (``"float8_e4m3fn"`` or ``"int8"``).

  Returns:
    An `ExportReport` (bytes on disk, bytes in float, the module names).

  Raises:
    ValueError: before anything is written, for a quantized layer without
      a name or a spec compressed-tensors cannot express (naming both).
  """
  st = _safetensors()
  params = serving_variables.get("params", serving_variables)
  ranges = flatten(serving_variables.get("quant_ranges", {}))
  flat = flatten(params)
  layer_paths = sorted({"/".join(p[:-1]) for p in flat})
  acts = _act_specs(rules, layer_paths)

  tensors: dict[str, np.ndarray] = {}
  groups: dict[str, dict[str, Any]] = {}
  quantized, ignored = [], []
  float_bytes = 0
  model_dtype = None
  for path_tuple, leaf in flat.items():
    layer, param = "/".join(path_tuple[:-1]), path_tuple[-1]
    module = name_of(names, layer)
    where = f"layer {layer!r}"
    if isinstance(leaf, QArray):
      float_bytes += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
      model_dtype = model_dtype or np.dtype(leaf.dtype)
      if param != "kernel":
        raise ValueError(f"compressed_tensors.save: {where}: the quantized "
                         f"{param!r} ({leaf.spec}) cannot be written: "
                         f"compressed-tensors quantizes Linear weights "
                         f"(kernels) only. Nothing was written.")
      if module is None:
        raise ValueError(f"compressed_tensors.save: {where} is quantized "
                         f"({leaf.spec}) but `names` gives it no Hugging Face "
                         f"name. Nothing was written.")
      weights = weight_args_of(leaf.spec, leaf.shape, where)
      act_spec = acts.get(layer)
      act_args = act_args_of(act_spec, where)
      fmt = format_of(weights, act_args)
      key = json.dumps([weights, act_args, fmt], sort_keys=True)
      group = groups.setdefault(key, {"targets": [], "weights": weights,
                                      "input_activations": act_args,
                                      "output_activations": None,
                                      "format": fmt})
      group["targets"].append(module)
      sd = _compress(leaf, weights, fmt, scale_dtype)
      if act_args is not None and not act_args["dynamic"]:
        amax = ranges.get((layer, "act", "amax"))
        if amax is None:
          raise ValueError(f"compressed_tensors.save: {where} has a static "
                           f"activation spec {act_spec} but no range at "
                           f"quant_ranges/{layer}/act/amax. Nothing was "
                           f"written.")
        scale = np.asarray(scale_from_range(act_spec, jnp.asarray(amax))[0])
        sd["input_scale"] = scale.astype(np.float32).reshape(1)
      for name, tensor in sd.items():
        tensors[f"{module}.{name}"] = tensor
      quantized.append(module)
      continue
    array = np.asarray(leaf)
    float_bytes += array.nbytes
    if module is None:
      continue
    torch_name, transpose = PARAM_NAMES.get(param, (param, False))
    if param == "kernel" and array.ndim != 2:
      raise ValueError(f"compressed_tensors.save: {where}: a {array.ndim}-D "
                       f"kernel has no torch Linear layout. Nothing was "
                       f"written.")
    if param == "kernel":
      ignored.append(module)
    tensors[f"{module}.{torch_name}"] = np.ascontiguousarray(
        array.T if transpose else array)

  kv_scheme = None
  if kv_cache_scales:
    per_head = any(np.asarray(k).size > 1 for k, _ in kv_cache_scales.values())
    kv_scheme = {"num_bits": 8, "type": "float" if "float" in kv_cache_format
                 else "int", "symmetric": True, "group_size": None,
                 "strategy": "attn_head" if per_head else "tensor",
                 "block_structure": None, "dynamic": False, "actorder": None,
                 "observer": "minmax", "observer_kwargs": {}}
    for module, (k_scale, v_scale) in kv_cache_scales.items():
      for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
        value = np.asarray(value, np.float32)
        tensors[f"{module}.{name}"] = value.reshape(-1) if per_head else (
            value.reshape(()))

  formats = {g["format"] for g in groups.values()}
  config_groups = {f"group_{i}": g for i, g in enumerate(groups.values())}
  quantization_config = {
      "quant_method": QUANT_METHOD,
      "format": (formats.pop() if len(formats) == 1 else "mixed-precision")
                if formats else "dense",
      "config_groups": config_groups,
      "ignore": sorted(ignored),
      "kv_cache_scheme": kv_scheme,
      "quantization_status": "compressed",
      "global_compression_ratio": None,
      "sparsity_config": {},
      "transform_config": {},
      "version": FORMAT_VERSION,
  }
  full_config = dict(config or {})
  full_config.setdefault("torch_dtype", _torch_dtype_name(
      model_dtype or np.float32))
  full_config["quantization_config"] = quantization_config

  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  weights_path = os.path.join(directory, WEIGHTS_FILE)
  # safetensors writes an array's memory as it lies: C order, always.
  tensors = {k: np.asarray(v, order="C") for k, v in tensors.items()}
  st.numpy.save_file(tensors, weights_path, metadata={"format": "pt"})
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(full_config, f, indent=2, sort_keys=True)
  return ExportReport(directory=directory,
                      file_bytes=os.path.getsize(weights_path),
                      float_bytes=float_bytes, quantized=tuple(quantized),
                      ignored=tuple(sorted(ignored)),
                      quantization_config=quantization_config)


def _compress(qa: QArray, weights: Mapping[str, Any], fmt: str,
              scale_dtype: Any) -> dict[str, np.ndarray]:
  """One kernel's compressed-tensors tensors (PyTorch (out, in) layout)."""
  dtype = np.dtype(scale_dtype if scale_dtype is not None else qa.dtype)
  values = np.asarray(qa.values).T  # (out, in)
  scale = np.asarray(qa.scale, np.float32).T
  if weights["strategy"] == "tensor":
    scale = scale.reshape(1)
  sd = {"weight_scale": np.ascontiguousarray(scale.astype(dtype))}
  zero = None if qa.zero_point is None else np.asarray(qa.zero_point).T
  if fmt == "pack-quantized":
    bits = weights["num_bits"]
    sd["weight_packed"] = pack_int32(values.astype(np.int8), bits, axis=1)
    sd["weight_shape"] = np.asarray(values.shape, np.int64)
    if zero is not None:
      sd["weight_zero_point"] = pack_int32(zero.astype(np.int8), bits, axis=0)
  else:
    sd["weight"] = np.ascontiguousarray(
        values.astype(np.int8) if fmt == "int-quantized" else values)
    if zero is not None:
      sd["weight_zero_point"] = np.ascontiguousarray(zero.astype(np.int8))
  return sd


__all__ = ["ExportReport", "Loaded", "load", "pack_int32", "read_safetensors",
           "save", "unpack_int32"]
