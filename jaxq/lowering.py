"""Lowering a function for platforms other than this machine's, with
``jax.export``: what `jaxq.inspect` reads (``platforms=``) and what
`jaxq.io.exported` serializes.

No Flax and no jaxq types here: a function and its example arguments in,
a ``jax.export.Exported`` out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

# Platforms that jax.export lowers for.
EXPORT_PLATFORMS: tuple[str, ...] = ("cpu", "cuda", "rocm", "tpu")


def export_platforms(platforms: str | Sequence[str], who: str
                     ) -> tuple[str, ...]:
  """``platforms`` as a tuple, each named once in order, checked.

  Raises:
    ValueError: for an empty sequence or an unknown name, saying ``who``
      asked.
  """
  if isinstance(platforms, str):
    platforms = (platforms,)
  platforms = tuple(dict.fromkeys(platforms))
  if not platforms:
    raise ValueError(f"{who}: platforms is empty; give names from "
                     f"{list(EXPORT_PLATFORMS)}.")
  unknown = [p for p in platforms if p not in EXPORT_PLATFORMS]
  if unknown:
    raise ValueError(f"{who}: unknown platform(s) {unknown}; jax.export "
                     f"lowers for {list(EXPORT_PLATFORMS)}.")
  return platforms


def export(fn: Callable[..., Any], platforms: Sequence[str], *args: Any,
           **kwargs: Any) -> jax.export.Exported:
  """``jax.export.export(jax.jit(fn), platforms=...)(*args, **kwargs)``.

  Args:
    fn: the function (jitted or not).
    platforms: checked names (`export_platforms`); one program is lowered
      for all of them together (``Exported.platforms``).
    *args: example arguments: arrays, pytrees of arrays or
      ``jax.ShapeDtypeStruct``s (only shapes and dtypes are used).
    **kwargs: keyword arguments, traced like ``args``.

  Returns:
    The ``jax.export.Exported``: its StableHLO (``mlir_module()``), its
    serialization (``serialize()``), callable on any of ``platforms``.
  """
  return jax.export.export(jax.jit(fn), platforms=list(platforms))(*args,
                                                                   **kwargs)


__all__ = ["EXPORT_PLATFORMS", "export", "export_platforms"]
