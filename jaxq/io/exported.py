"""A served model's function as a serialized ``jax.export`` program.

```python
serve = jaxq.quantize_model(model, rules, "serve")
exported = jaxq.io.exported.export(serve.apply, serving, x,
                                   platforms=("cpu", "cuda", "tpu"))
jaxq.io.exported.save("model.jaxexport", exported)
program = jaxq.io.exported.load("model.jaxexport")    # no model code needed
y = jaxq.io.exported.call(program, serving, x)         # on any of platforms
```

The program is lowered once for all ``platforms`` together (the lowering
`jaxq.inspect` uses, `jaxq.lowering.export`), so one file runs on a CPU, a
GPU or a TPU host; on this CPU it computes what the live jitted function
computes, bit for bit (the same StableHLO, compiled by the same compiler).

Weights are either arguments or baked in:

* ``bake_weights=False`` (default): the program takes the serving
  variables' leaves (``jax.tree.leaves(variables)``: QArray values, scales
  and zero points, float parameters) as its first argument, a flat list, so
  the file is small and holds no pytree classes; `call` flattens the
  variables the same way. Give the same tree (a `jaxq.load`ed checkpoint
  of the same model is one).
* ``bake_weights=True``: the variables are constants of the program, which
  then takes only the model's inputs (`call` with ``variables=None``).

Inputs are the model's positional arguments, arrays of the example's
shapes and dtypes (bind other arguments with ``functools.partial``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax

from jaxq.lowering import export as lower_export
from jaxq.lowering import export_platforms

PLATFORMS = ("cpu", "cuda", "tpu")


def export(apply: Callable[..., Any], variables: Any, *args: Any,
           platforms: str | Sequence[str] = PLATFORMS,
           bake_weights: bool = False) -> jax.export.Exported:
  """Lowers ``apply(variables, *args)`` with ``jax.export``.

  Args:
    apply: the served model's function, ``apply(variables, *args)`` (a
      linen ``QuantizedLinen.apply``, or a function around an nnx model).
    variables: the serving variables (``{"params": ...}`` with QArrays).
    *args: example inputs, arrays (or ``jax.ShapeDtypeStruct``s): the
      program takes inputs of these shapes and dtypes.
    platforms: where the program may run (``"cpu"``, ``"cuda"``,
      ``"rocm"``, ``"tpu"``), lowered together.
    bake_weights: True to make the variables constants of the program.

  Returns:
    The ``jax.export.Exported``: with weights as arguments its inputs are
    ``(leaves, *args)``, ``leaves = jax.tree.leaves(variables)``; baked,
    ``(*args)``.

  Raises:
    ValueError: for an unknown platform name.
  """
  platforms = export_platforms(platforms, "jaxq.io.exported.export")
  if bake_weights:
    return lower_export(lambda *xs: apply(variables, *xs), platforms, *args)
  leaves, treedef = jax.tree.flatten(variables)

  def flat_apply(flat: list[jax.Array], *xs: Any) -> Any:
    return apply(jax.tree.unflatten(treedef, flat), *xs)

  return lower_export(flat_apply, platforms, list(leaves), *args)


def call(exported: jax.export.Exported, variables: Any, *args: Any) -> Any:
  """Runs an exported program on this machine's platform.

  Args:
    exported: from `export` or `load`.
    variables: the serving variables (flattened with ``jax.tree.leaves``),
      or None for a program with baked weights.
    *args: the model's inputs.

  Raises:
    ValueError: for variables or inputs that do not match the program (a
      different number of leaves, shapes or dtypes), saying which.
  """
  if variables is None:
    return exported.call(*args)
  leaves = jax.tree.leaves(variables)
  expected = len(exported.in_avals) - len(args)
  if len(leaves) != expected:
    raise ValueError(f"jaxq.io.exported.call: the program takes {expected} "
                     f"weight arrays, the variables have {len(leaves)} "
                     f"leaves (a different model or tree?).")
  return exported.call(list(leaves), *args)


def save(path: str | os.PathLike, exported: jax.export.Exported) -> int:
  """Writes ``exported.serialize()`` to ``path``; returns its bytes."""
  data = exported.serialize()
  with open(os.fspath(path), "wb") as f:
    f.write(data)
  return len(data)


def load(path: str | os.PathLike) -> jax.export.Exported:
  """Reads a program `save` wrote (``jax.export.deserialize``)."""
  with open(os.fspath(path), "rb") as f:
    return jax.export.deserialize(bytearray(f.read()))


__all__ = ["PLATFORMS", "call", "export", "load", "save"]
