"""compressed-tensors' layout, shared by `compressed_tensors` (save) and
`compressed_tensors_load`: int32 packing, jaxq specs <-> compressed-tensors
quantization args, the file names and the Flax <-> PyTorch parameter names.

See `jaxq.io.compressed_tensors` for the on-disk layout and the mapping of
specs to schemes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxq import granularity as granularity_lib
from jaxq.io.tensors import CheckpointError
from jaxq.quantize import scale_from_range
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
PARAM_NAMES = {"kernel": ("weight", True), "embedding": ("weight", False),
                "scale": ("weight", False), "bias": ("bias", False)}


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


def bits_of(spec: QuantSpec) -> int:
  return int(np.dtype(spec.fmt.dtype).itemsize * 8) if spec.format not in (
      "int4",) else 4


def weight_args_of(spec: QuantSpec, shape: tuple[int, ...], where: str
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
  args: dict[str, Any] = {"num_bits": bits_of(spec), "type": kind,
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


def act_args_of(spec: QuantSpec | None, where: str) -> dict[str, Any] | None:
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


def format_of(weights: Mapping[str, Any],
               acts: Mapping[str, Any] | None) -> str:
  if weights["type"] == "float":
    return "float-quantized" if acts is not None else "naive-quantized"
  if acts is None or weights["num_bits"] < 8:
    return "pack-quantized"
  return "int-quantized"


def spec_from_args(args: Mapping[str, Any], values: np.ndarray | None,
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


def act_spec_from_args(args: Mapping[str, Any] | None, where: str
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


def amax_for_scale(spec: QuantSpec, scale: np.ndarray) -> np.ndarray:
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


# ------------------------------------------------------------- trees


def flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
            ) -> dict[tuple[str, ...], Any]:
  """A nested mapping's leaves by key path: ``{("a", "b"): leaf}``."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, prefix + (str(key),)))
    else:
      out[prefix + (str(key),)] = value
  return out


def name_of(names: Names, path: str) -> str | None:
  """The Hugging Face module name of a layer path, or None to leave it out."""
  if callable(names):
    return names(path)
  return names.get(path)


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  """The inverse of `flatten`: nested dicts from key paths."""
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out
