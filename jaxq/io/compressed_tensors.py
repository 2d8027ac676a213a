"""compressed-tensors: the checkpoint format vLLM and transformers load.

``save`` writes jaxq serving variables as a Hugging Face model directory in
the compressed-tensors format that llm-compressor writes (``model.safetensors``
plus ``config.json`` with a ``quantization_config``); ``load`` reads such a
directory back into jaxq serving variables, still quantized, with the
`Rule`s that reproduce them.

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxq import granularity as granularity_lib
from jaxq.flax.rules import Rule
from jaxq.io.checkpoint import _human_bytes
from jaxq.io.tensors import CheckpointError
from jaxq.io.tensors import _safetensors
from jaxq.quantize import scale_from_range
from jaxq.spec import QArray
from jaxq.spec import QuantSpec

QUANT_METHOD = "compressed-tensors"
FORMAT_VERSION = "0.20.1"  # the compressed-tensors release this layout follows
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

Names = Mapping[str, str | None] | Callable[[str], str | None]
"""Layer path (``"layers_0/self_attn/q_proj"``) -> Hugging Face module name
(``"model.layers.0.self_attn.q_proj"``), or None to leave it out."""

# Flax parameter name -> (PyTorch parameter name, transposed).
_PARAM_NAMES = {"kernel": ("weight", True), "embedding": ("weight", False),
                "scale": ("weight", False), "bias": ("bias", False)}


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


# ------------------------------------------------------------------ packing


def pack_int32(values: np.ndarray, num_bits: int, axis: int = -1
               ) -> np.ndarray:
  """Packs signed ``num_bits`` integers into int32 words along ``axis``.

  Args:
    values: integers in ``[-2**(bits-1), 2**(bits-1) - 1]``, 2-D.
    num_bits: 4 or 8 (a divisor of 32).
    axis: the axis packed (compressed-tensors packs weights along the input
      axis, 1, and zero points along the output axis, 0).

  Returns:
    int32 of ``values``' shape with ``axis`` of ``ceil(n * bits / 32)``:
    element ``i`` of a line, plus ``2**(bits - 1)``, at bits ``[i * bits %
    32, ...)`` of word ``i * bits // 32``.
  """
  if 32 % num_bits:
    raise ValueError(f"pack_int32: num_bits must divide 32, got {num_bits}.")
  per_word = 32 // num_bits
  values = np.moveaxis(np.asarray(values), axis, -1).astype(np.int64)
  codes = (values + (1 << (num_bits - 1))).astype(np.uint32)
  pad = -codes.shape[-1] % per_word
  codes = np.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
  codes = codes.reshape(*codes.shape[:-1], -1, per_word)
  shifts = (np.arange(per_word, dtype=np.uint32) * num_bits)
  words = np.bitwise_or.reduce(codes << shifts, axis=-1).astype(np.uint32)
  return np.ascontiguousarray(np.moveaxis(words.view(np.int32), -1, axis))


def unpack_int32(words: np.ndarray, num_bits: int, size: int,
                 axis: int = -1) -> np.ndarray:
  """Inverse of `pack_int32`: int8 values, ``size`` of them along ``axis``."""
  if 32 % num_bits:
    raise ValueError(f"unpack_int32: num_bits must divide 32, got "
                     f"{num_bits}.")
  per_word = 32 // num_bits
  words = np.moveaxis(np.asarray(words), axis, -1).view(np.uint32)
  shifts = np.arange(per_word, dtype=np.uint32) * num_bits
  codes = (words[..., None] >> shifts) & np.uint32((1 << num_bits) - 1)
  codes = codes.reshape(*words.shape[:-1], -1)[..., :size]
  values = codes.astype(np.int16) - (1 << (num_bits - 1))
  return np.moveaxis(values.astype(np.int8), -1, axis)


# ------------------------------------------------- specs <-> quantization args


def _bits(spec: QuantSpec) -> int:
  return int(np.dtype(spec.fmt.dtype).itemsize * 8) if spec.format not in (
      "int4",) else 4


def _weight_args(spec: QuantSpec, shape: tuple[int, ...], where: str
                 ) -> dict[str, Any]:
  """The ``weights`` quantization args of a kernel spec, or raises."""
  def unsupported(why: str) -> ValueError:
    return ValueError(f"compressed_tensors.save: {where}: {spec} cannot be "
                      f"written in compressed-tensors: {why}. Nothing was "
                      f"written.")
  if len(shape) != 2:
    raise unsupported(f"only 2-D (in, out) kernels map to torch Linear "
                      f"weights, this one has shape {shape}")
  if spec.format not in ("int4", "int8", "float8_e4m3fn"):
    raise unsupported(f"format {spec.format} (compressed-tensors takes int4, "
                      f"int8 and float8_e4m3fn weights here)")
  kind = "float" if spec.fmt.kind == "float" else "int"
  args: dict[str, Any] = {"num_bits": _bits(spec), "type": kind,
                          "symmetric": bool(spec.symmetric),
                          "group_size": None, "strategy": None,
                          "block_structure": None, "dynamic": False,
                          "actorder": None, "observer": "minmax",
                          "observer_kwargs": {}}
  g = spec.granularity
  d_in, d_out = shape
  if isinstance(g, granularity_lib.MX):
    raise unsupported("MX groups (power-of-two e8m0 scales) have no "
                      "compressed-tensors strategy here")
  if isinstance(g, granularity_lib.PerTensor):
    args["strategy"] = "tensor"
  elif isinstance(g, granularity_lib.PerChannel) and g.axis % 2 == 1:
    args["strategy"] = "channel"
  elif isinstance(g, granularity_lib.PerGroup) and g.axis % 2 == 0:
    if d_in % g.size:
      raise unsupported(f"group size {g.size} does not divide the input "
                        f"size {d_in}")
    args.update(strategy="group", group_size=int(g.size))
  elif (isinstance(g, granularity_lib.PerBlock) and len(g.shape) == 2):
    block_in, block_out = (int(b) for b in g.shape)
    args.update(strategy="block", block_structure=[block_out, block_in])
  else:
    raise unsupported(f"the granularity {g} has no compressed-tensors "
                      f"strategy (per-tensor, per-output-channel, groups "
                      f"along the input, 2-D blocks)")
  if args["strategy"] == "block" and kind == "int":
    raise unsupported("block scales are for fp8 weights")
  return args


def _act_args(spec: QuantSpec | None, where: str) -> dict[str, Any] | None:
  """The ``input_activations`` quantization args, or raises."""
  if spec is None:
    return None
  def unsupported(why: str) -> ValueError:
    return ValueError(f"compressed_tensors.save: {where}: activation spec "
                      f"{spec} cannot be written in compressed-tensors: {why}."
                      f" Nothing was written.")
  if spec.format not in ("int8", "float8_e4m3fn"):
    raise unsupported(f"format {spec.format} (int8 or float8_e4m3fn "
                      f"activations only; vLLM has no int4 activations)")
  if not spec.symmetric:
    raise unsupported("asymmetric activations")
  g = spec.granularity
  if isinstance(g, granularity_lib.PerToken) and spec.dynamic:
    strategy = "token"
  elif isinstance(g, granularity_lib.PerTensor):
    strategy = "tensor"
  else:
    raise unsupported(f"granularity {g} (dynamic per-token or per-tensor "
                      f"only)")
  return {"num_bits": 8, "type": "float" if spec.fmt.kind == "float" else
          "int", "symmetric": True, "group_size": None, "strategy": strategy,
          "block_structure": None, "dynamic": bool(spec.dynamic),
          "actorder": None, "observer": None if spec.dynamic else "minmax",
          "observer_kwargs": {}}


def _format_of(weights: Mapping[str, Any],
               acts: Mapping[str, Any] | None) -> str:
  if weights["type"] == "float":
    return "float-quantized" if acts is not None else "naive-quantized"
  if acts is None or weights["num_bits"] < 8:
    return "pack-quantized"
  return "int-quantized"


def _spec_from_args(args: Mapping[str, Any], values: np.ndarray | None,
                    where: str) -> QuantSpec:
  """The jaxq weight spec of compressed-tensors ``weights`` args."""
  kind, bits = args.get("type", "int"), int(args.get("num_bits", 8))
  strategy = args.get("strategy") or ("group" if (args.get("group_size") or 0)
                                      > 0 else "tensor")
  if kind == "int" and bits in (4, 8):
    fmt = f"int{bits}"
  elif kind == "float" and bits == 8:
    fmt = "float8_e4m3fn"
  else:
    raise CheckpointError(f"{where}: {bits}-bit {kind} weights are not "
                          f"supported.")
  if strategy == "tensor":
    granularity = granularity_lib.PerTensor()
  elif strategy == "channel":
    granularity = granularity_lib.PerChannel(axis=-1)
  elif strategy == "group":
    granularity = granularity_lib.PerGroup(axis=0, size=int(args["group_size"]))
  elif strategy == "block":
    block_out, block_in = args["block_structure"]
    granularity = granularity_lib.PerBlock((int(block_in), int(block_out)))
  else:
    raise CheckpointError(f"{where}: weight strategy {strategy!r} is not "
                          f"supported.")
  narrow = None
  if fmt == "int8" and values is not None and values.size and (
      int(values.min()) == -128):
    narrow = False
  return QuantSpec(fmt, granularity, symmetric=bool(args.get("symmetric",
                                                              True)),
                   narrow_range=narrow)


def _act_spec_from_args(args: Mapping[str, Any] | None, where: str
                        ) -> QuantSpec | None:
  if args is None:
    return None
  kind, bits = args.get("type", "int"), int(args.get("num_bits", 8))
  if bits != 8 or not args.get("symmetric", True):
    raise CheckpointError(f"{where}: {bits}-bit or asymmetric activations "
                          f"are not supported.")
  fmt = "float8_e4m3fn" if kind == "float" else "int8"
  strategy, dynamic = args.get("strategy"), bool(args.get("dynamic", False))
  if strategy == "token":
    return QuantSpec(fmt, granularity_lib.PerToken(), dynamic=True)
  if strategy == "tensor":
    return QuantSpec(fmt, granularity_lib.PerTensor(), dynamic=dynamic)
  raise CheckpointError(f"{where}: activation strategy {strategy!r} is not "
                        f"supported.")


def _amax_for_scale(spec: QuantSpec, scale: np.ndarray) -> np.ndarray:
  """A range whose `jaxq.scale_from_range` is ``scale``, bit for bit where
  float32 allows (searched a few ulps around ``scale * amax_level``)."""
  target = np.asarray(scale, np.float32).reshape(-1)
  out = np.empty_like(target)
  for i, s in enumerate(target):
    guess = np.float32(s * np.float32(spec.fmt.amax_level))
    best = guess
    for step in range(4):
      for candidate in (guess, np.nextafter(guess, np.float32(np.inf)),
                        np.nextafter(guess, np.float32(0))):
        got = np.asarray(scale_from_range(spec, jnp.float32(candidate))[0])
        if got == s:
          best = candidate
          break
      else:
        guess = np.nextafter(guess, np.float32(np.inf) if np.asarray(
            scale_from_range(spec, jnp.float32(guess))[0]) < s else
                             np.float32(0))
        continue
      break
    out[i] = best
  return out


# --------------------------------------------------------------------- save


def _flat(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
          ) -> dict[tuple[str, ...], Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, prefix + (str(key),)))
    else:
      out[prefix + (str(key),)] = value
  return out


def _name_of(names: Names, path: str) -> str | None:
  if callable(names):
    return names(path)
  return names.get(path)


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
  ranges = _flat(serving_variables.get("quant_ranges", {}))
  flat = _flat(params)
  layer_paths = sorted({"/".join(p[:-1]) for p in flat})
  acts = _act_specs(rules, layer_paths)

  tensors: dict[str, np.ndarray] = {}
  groups: dict[str, dict[str, Any]] = {}
  quantized, ignored = [], []
  float_bytes = 0
  model_dtype = None
  for path_tuple, leaf in flat.items():
    layer, param = "/".join(path_tuple[:-1]), path_tuple[-1]
    module = _name_of(names, layer)
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
      weights = _weight_args(leaf.spec, leaf.shape, where)
      act_spec = acts.get(layer)
      act_args = _act_args(act_spec, where)
      fmt = _format_of(weights, act_args)
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
    torch_name, transpose = _PARAM_NAMES.get(param, (param, False))
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


# --------------------------------------------------------------------- load


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
  for path, like in _flat(template.get("params", template)).items():
    layer, param = "/".join(path[:-1]), path[-1]
    module = _name_of(names, layer)
    if module is None:
      continue
    torch_name, transpose = _PARAM_NAMES.get(param, (param, False))
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
      act_spec = _act_spec_from_args(group.get("input_activations"),
                                     f"{module}.input_activations")
      if act_spec is not None and not act_spec.dynamic:
        if "input_scale" not in local:
          raise CheckpointError(f"compressed_tensors.load: tensor "
                                f"{module}.input_scale is missing for its "
                                f"static activations.")
        ranges[path[:-1] + ("act", "amax")] = jnp.asarray(
            _amax_for_scale(act_spec, local["input_scale"]).reshape(1, 1))
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
  variables: dict[str, Any] = {"params": _unflatten(params)}
  if ranges:
    variables["quant_ranges"] = _unflatten(ranges)
  return Loaded(variables=variables, rules=tuple(rules), config=config)


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


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
  spec = _spec_from_args(args, values, where)
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
    from jaxq.spec import check_qarray  # pylint: disable=g-import-not-at-top
    check_qarray(qa, "compressed_tensors.load", where)
  except ValueError as e:
    raise CheckpointError(f"compressed_tensors.load: tensor {where}: {e}"
                          ) from None
  return qa


__all__ = ["ExportReport", "Loaded", "load", "pack_int32", "save",
           "unpack_int32"]
