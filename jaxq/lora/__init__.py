"""LoRA and QLoRA: low-rank adapters on a frozen, low-bit base, for linen
and nnx, trained with optax.

    rules = [jaxq.lora.LoraRule(r".*_proj", rank=8, alpha=16,
                                base=jaxq.lora.NF4_DQ)]       # QLoRA
    lora = jaxq.lora.attach(model, variables, rules, key=jax.random.key(0))

Each chosen layer (linen ``nn.Dense``, nnx ``nnx.Linear``) keeps its (in,
out) kernel frozen and stored by ``rule.base`` (a `QArray`; for 4-bit
formats a `PackedQArray`, two values per byte in memory; the float kernel
is not kept) and gains ``A`` (in, r) and ``B`` (r, out), B = 0 at the start:
``y = x @ dequantize(W_q) + (x @ A) @ B * alpha / r (+ bias)``
(`jaxq.lora.core.lora_dense`).

Training, linen: ``adapters, frozen = jaxq.lora.partition(params)``;
differentiate with respect to ``adapters`` only and run any optax
transformation on them (or label the whole tree with `trainable_mask` for
``optax.multi_transform({True: tx, False: optax.set_to_zero()}, mask)``;
``optax.masked`` alone passes the frozen leaves' gradients through); ``lora.model.apply(combine(adapters,
frozen) ...)``. nnx: ``nnx.Optimizer(lora.model, tx, wrt=LoraParam)`` and
``nnx.grad(..., argnums=nnx.DiffState(0, LoraParam))``.

After training: serve base + adapters as they are, or `merge` them into
float kernels ``W + A B alpha / r`` and quantize again (``jaxq.quantize_model``
in serve mode: RTN; ``jaxq.gptq``: GPTQ). `save_adapters` / `load_adapters`
write and read the adapters alone; ``jaxq.save`` writes linen variables with
the base (QArray leaves; PackedQArrays saved as QArrays, which
`jaxq.load` gives back and the LoRA layers take as well) as any other.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from jaxq.lora import core
from jaxq.lora import checkpoint as _checkpoint
from jaxq.lora.core import (FP8_CHANNEL, INT4_G64, INT8_CHANNEL, NF4, NF4_DQ,
                            LoraLayer, LoraRule, lora_dense, merged_kernel)
from jaxq.flax import lora as _flax_lora
from jaxq.flax.lora import (Lora, LoraBase, LoraLinear, LoraParam, combine,
                            partition, trainable_mask)


def attach(model: Any, variables: Any, rules: list[LoraRule] | tuple,
           *, key: jax.Array) -> Lora:
  """Adds adapters to the layers ``rules`` choose (first match wins).

  Args:
    model: a ``flax.linen`` or ``flax.nnx`` module.
    variables: linen: its variables (``{"params": ...}``), not modified;
      nnx: None (the module holds its state; it is not modified either: the
      result is a new module sharing the unchosen arrays).
    rules: `LoraRule`s.
    key: initialises the ``A`` matrices (and nnx's dropout stream).

  Returns:
    A `Lora`: ``model`` (linen `LinenLora` with ``apply``; nnx the new
    module), ``variables`` (linen) and ``layers`` (path -> `LoraLayer`).

  Raises:
    ValueError: a rule matching no layer, or a rank above min(in, out),
      naming the rule, the layer and its shape.
  """
  return _flax_lora.attach(model, variables, rules, key)


def adapters(lora: Lora, variables: Any = None) -> dict[str, dict[str, Any]]:
  """path -> {"lora_a": A (in, r), "lora_b": B (r, out)}."""
  return _flax_lora.get_adapters(lora, variables)


def set_adapters(lora: Lora, new: dict[str, dict[str, Any]],
                 variables: Any = None) -> Any:
  """Writes adapters after checking their shapes against the layers:
  linen returns new variables, nnx updates ``lora.model`` and returns it.

  Raises:
    ValueError: a layer that is not a LoRA layer, or a matrix of another
      shape, naming the layer path and both shapes.
  """
  for path, pair in new.items():
    if path not in lora.layers:
      raise ValueError(f"jaxq.lora.set_adapters: {path!r} is not a LoRA "
                       f"layer of the model; its LoRA layers are "
                       f"{list(lora.layers)[:6]}.")
    for name in core.ADAPTER_NAMES:
      core.check_adapter(lora.layers[path], name, pair[name].shape,
                         "jaxq.lora.set_adapters")
  return _flax_lora.set_adapters(lora, new, variables)


def bases(lora: Lora, variables: Any = None) -> dict[str, Any]:
  """path -> the frozen base of each LoRA layer (`QArray`, `PackedQArray`
  or float)."""
  return _flax_lora.get_bases(lora, variables)


def base_bytes(lora: Lora, variables: Any = None) -> int:
  """Bytes of the LoRA layers' frozen bases as stored (`core.base_bytes`)."""
  return sum(core.base_bytes(b) for b in bases(lora, variables).values())


def adapter_bytes(lora: Lora, variables: Any = None) -> int:
  """Bytes of the adapter matrices."""
  return sum(int(x.size) * x.dtype.itemsize
             for pair in adapters(lora, variables).values()
             for x in pair.values())


def merge(lora: Lora, variables: Any = None) -> Any:
  """Base + adapters as one float kernel per layer, ``dequantize(W_q) + A B
  alpha / r``, in the original model's form: linen variables for the
  original module, or a new nnx module with ``nnx.Linear`` layers. Quantize
  it again with any jaxq workflow (serve-mode RTN, `jaxq.gptq`)."""
  return _flax_lora.merge(lora, variables)


def save_adapters(path: str | os.PathLike, lora: Lora,
                  variables: Any = None) -> int:
  """Writes the adapters alone (safetensors); returns the file's bytes."""
  return _checkpoint.save(path, adapters(lora, variables), lora.layers)


def load_adapters(path: str | os.PathLike, lora: Lora,
                  variables: Any = None) -> Any:
  """Reads adapters written by `save_adapters` into ``lora``'s model:
  linen returns new variables, nnx updates the module and returns it.

  Raises:
    ValueError: adapters that do not fit the model (a layer missing on
      either side, another rank or alpha, another shape), naming the layer.
  """
  return set_adapters(lora, _checkpoint.load(path, lora.layers), variables)


__all__ = [
    "FP8_CHANNEL", "INT4_G64", "INT8_CHANNEL", "NF4", "NF4_DQ", "Lora",
    "LoraBase", "LoraLayer", "LoraLinear", "LoraParam", "LoraRule",
    "adapter_bytes", "adapters", "attach", "base_bytes", "bases", "combine",
    "core", "load_adapters", "lora_dense", "merge", "merged_kernel",
    "partition", "save_adapters", "set_adapters", "trainable_mask",
]
