"""Adapters alone in a small safetensors file, and back, checked.

The file holds one tensor per adapter matrix, named ``"<layer path>/lora_a"``
and ``"<layer path>/lora_b"`` (float32 or the adapters' dtype), and in its
metadata the jaxq adapter format version and, per layer, rank and alpha as
JSON (``"jaxq_lora"``). Loading checks the file against the model's LoRA
layers: the same layer paths, ranks, alphas and shapes, or a ValueError
naming the first layer that does not fit.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from jaxq.io.tensors import _safetensors
from jaxq.lora import core

FORMAT_VERSION = 1
_METADATA_KEY = "jaxq_lora"


def save(path: str | os.PathLike, adapters: Mapping[str, Mapping[str, object]],
         layers: Mapping[str, core.LoraLayer]) -> int:
  """Writes ``adapters`` (path -> {"lora_a", "lora_b"}) to ``path``.

  Returns:
    The file's size in bytes.
  """
  tensors, meta = {}, {}
  for layer_path, pair in adapters.items():
    layer = layers[layer_path]
    for name in core.ADAPTER_NAMES:
      tensors[f"{layer_path}/{name}"] = np.asarray(pair[name])
    meta[layer_path] = {"rank": layer.rank, "alpha": layer.alpha}
  metadata = {_METADATA_KEY: json.dumps({"version": FORMAT_VERSION,
                                         "layers": meta})}
  _safetensors().numpy.save_file(tensors, os.fspath(path), metadata=metadata)
  return os.path.getsize(path)


def load(path: str | os.PathLike, layers: Mapping[str, core.LoraLayer]
         ) -> dict[str, dict[str, jnp.ndarray]]:
  """Reads adapters saved by `save`, checked against ``layers``.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: not a jaxq adapter file, or adapters that do not fit the
      model: a layer missing on either side, another rank or alpha, or a
      matrix of another shape (naming the layer path and both shapes).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"jaxq.lora.load_adapters: no file {path!r}.")
  st = _safetensors()
  with st.safe_open(path, framework="numpy") as f:
    metadata = f.metadata() or {}
  where = f"jaxq.lora.load_adapters({path!r})"
  if _METADATA_KEY not in metadata:
    raise ValueError(f"{where}: not a jaxq adapter file (no "
                     f"{_METADATA_KEY!r} metadata).")
  info = json.loads(metadata[_METADATA_KEY])
  if info.get("version") != FORMAT_VERSION:
    raise ValueError(f"{where}: adapter format version "
                     f"{info.get('version')!r}; this jaxq reads "
                     f"{FORMAT_VERSION}.")
  saved = info["layers"]
  missing = [p for p in layers if p not in saved]
  extra = [p for p in saved if p not in layers]
  if missing or extra:
    raise ValueError(
        f"{where}: the adapters do not fit the model: "
        + "; ".join(filter(None, [
            missing and f"the model's LoRA layers {missing[:4]} have no "
            f"adapters in the file",
            extra and f"the file's layers {extra[:4]} are not LoRA layers "
            f"of the model"])) + ".")
  tensors = st.numpy.load_file(path)
  out = {}
  for layer_path, layer in layers.items():
    entry = saved[layer_path]
    if entry["rank"] != layer.rank or entry["alpha"] != layer.alpha:
      raise ValueError(f"{where}: layer {layer_path!r} was saved with rank "
                       f"{entry['rank']} and alpha {entry['alpha']}, the "
                       f"model's has rank {layer.rank} and alpha "
                       f"{layer.alpha}.")
    pair = {}
    for name in core.ADAPTER_NAMES:
      value = tensors[f"{layer_path}/{name}"]
      core.check_adapter(layer, name, value.shape, where)
      pair[name] = jnp.asarray(value)
    out[layer_path] = pair
  return out
