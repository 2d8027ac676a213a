"""The PTQ algorithms' inputs block by block: cost linear in depth.

`jaxq.gptq` quantizes layer after layer, each on inputs computed with the
layers before it already quantized. Capturing those inputs by running the
whole model before each of ``n`` layers costs ``n`` model passes, quadratic
in depth, and keeps every layer's inputs. Deep models repeat one block
(``layers_0`` ... ``layers_29``), and, as in the GPTQ paper's reference
implementation, the inputs of block ``i + 1`` are the outputs of the
quantized block ``i``. So this module walks the model block by block:

1. `plan` finds the blocks: module paths that hold layers and repeat with
   an index, ``<name>_<i>`` (linen) or ``<list>/<i>`` (nnx), the shortest
   such prefix of each layer path (or a regex of block paths). One abstract
   trace of a capture pass at the blocks (`jaxq.flax.capture`) records each
   block's call and where each of its array arguments came from
   (`LayerCall.sources`): consecutive blocks are *linked* when every array
   argument of block ``i + 1`` is an argument or an output of block ``i``
   (``x = block(x, positions, mask)``), which the trace shows directly.
2. `walk` captures the first block's call arguments of each linked chain
   with one pass of the whole model (XLA drops everything after the block),
   then, per block: runs the block alone on them (`ModelAdapter.run_module`;
   identical blocks share one compiled pass) for its layers' inputs, as
   often as the algorithm asks (GPTQ: before each layer whose input the
   layers just quantized could change, computing the block only up to the
   layers it asks for), and once more for its outputs, from which the next
   block's arguments are picked. Only one block's arguments and its layers'
   inputs are held.

Layers outside any block (an input projection, a head) are captured by
whole-model passes, as before; a model with no blocks, with stacked layers
(``nn.scan``), with a block called more than once, or whose layers of one
block are not called contiguously, keeps the whole-model path (`plan`
returns None; a warning says why when blocks were found). Cost: one
whole-model pass per chain (one for a plain decoder) plus, per block, one
block run per sequential step plus one: linear in depth.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Any, Callable, Collection, Mapping, Sequence

import jax

from jaxq.flax import adapter as adapter_lib
from jaxq.flax import batch as batch_lib
from jaxq.flax.adapter import LayerInputs
from jaxq.flax.adapter import ModelAdapter
from jaxq.flax.capture import LayerCall
from jaxq.flax.capture import Source
from jaxq.flax.rules import LayerInfo

# `blocks=` of the algorithms: True finds them, False runs the whole model
# per capture (the path of models without blocks), a string is a regex of
# block module paths.
Blocks = bool | str

_INDEXED = re.compile(r"(.+)_(\d+)")  # linen ``layers_3``.


def _family(parts: Sequence[str], k: int) -> tuple[Any, ...] | None:
  """The repeated-module family of ``parts[:k + 1]`` (its parent path and
  name without the index), or None if its last name carries no index."""
  name = parts[k]
  if name.isdigit():  # nnx: an index into a list of modules.
    return (tuple(parts[:k]), None)
  match = _INDEXED.fullmatch(name)
  return (tuple(parts[:k]), match.group(1)) if match else None


def block_paths(paths: Sequence[str], pattern: Blocks) -> dict[str, str]:
  """Layer path -> the path of the block holding it, for the layers inside
  a block: the shortest proper prefix that fullmatches ``pattern`` (a
  regex), or, for ``pattern=True``, the shortest that ends in an index
  (``layers_3``, ``layers/3``) shared with other prefixes of its family
  (the same parent and name, at least two indices)."""
  split = {path: path.split("/") for path in paths}
  if isinstance(pattern, str):
    regex = re.compile(pattern)
    found = {}
    for path, parts in split.items():
      for k in range(len(parts) - 1):
        prefix = "/".join(parts[:k + 1])
        if regex.fullmatch(prefix):
          found[path] = prefix
          break
    return found
  indices: dict[tuple[Any, ...], set[str]] = {}
  for parts in split.values():
    for k in range(len(parts) - 1):
      family = _family(parts, k)
      if family is not None:
        indices.setdefault(family, set()).add(parts[k])
  found = {}
  for path, parts in split.items():
    for k in range(len(parts) - 1):
      family = _family(parts, k)
      if family is not None and len(indices[family]) > 1:
        found[path] = "/".join(parts[:k + 1])
        break
  return found


@dataclasses.dataclass(frozen=True)
class Unit:
  """One step of the walk: a block, or one layer outside any block.

  Attributes:
    block: the block's module path, or None for a layer outside blocks.
    layers: the layers to process in it, in call order (may be empty for a
      block: it still runs to feed the next one).
    call: the block's recorded call (its arguments' structure and sources).
    linked: whether the previous unit is a block whose outputs and
      arguments make this block's arguments (else one whole-model pass
      captures them).
  """

  block: str | None
  layers: tuple[LayerInfo, ...]
  call: LayerCall | None = None
  linked: bool = False

  @property
  def name(self) -> str:
    """The block's path, or the path of the one layer outside blocks."""
    return self.block if self.block is not None else self.layers[0].path


@dataclasses.dataclass(frozen=True)
class Plan:
  """The units of a model in call order (see the module docstring)."""

  units: tuple[Unit, ...]

  @property
  def chains(self) -> int:
    """Whole-model passes that start a chain of linked blocks."""
    return sum(u.block is not None and not u.linked for u in self.units)


def plan(adapter: ModelAdapter, batches: Sequence[Any],
         targets: Sequence[LayerInfo], blocks: Blocks, what: str
         ) -> Plan | None:
  """The block-by-block plan of a model, or None for the whole-model path.

  Args:
    adapter: the calibrate-mode model (its layers traced) with the variables
      to trace it with.
    batches: the calibration batches (the first is traced abstractly).
    targets: the layers the algorithm processes, in call order.
    blocks: True (find them), False (None: the whole-model path) or a regex
      of block module paths.
    what: the algorithm's name, for messages.
  """
  if blocks is False:
    return None
  if not isinstance(blocks, (bool, str)):
    raise ValueError(f"{what}: blocks must be True, False or a regex of "
                     f"block module paths, got {blocks!r}.")
  known = adapter.layers()
  holder = block_paths(list(known), blocks)
  if not holder:
    if isinstance(blocks, str):
      raise ValueError(f"{what}: blocks={blocks!r} matches no module holding "
                       f"layers; the layers are {sorted(known)}.")
    return None
  if any(info.stacked for info in known.values()):
    return None  # Scanned stacks have their own per-layer walk.

  def fallback(why: str) -> None:
    warnings.warn(f"{what}: the model's blocks cannot be walked one by one "
                  f"({why}); running the whole model for each capture, "
                  f"which costs time quadratic in depth. Pass blocks=False "
                  f"to silence this, or blocks=<regex of block paths>.",
                  stacklevel=3)

  seen: list[str] = []
  for info in targets:  # Each block's layers called one after another.
    block = holder.get(info.path)
    if block is not None and (not seen or seen[-1] != block):
      if block in seen:
        fallback(f"the layers of {block!r} are not called one after another")
        return None
      seen.append(block)
  outside = {info.path: info for info in targets if info.path not in holder}
  # One abstract trace: the blocks' calls with their sources, and the
  # order of blocks and outside layers.
  capture = adapter.capture(sorted(set(holder.values()) | set(outside)))
  jax.eval_shape(capture, adapter.variables, batches[0])
  calls = capture.calls
  chosen: dict[str, list[LayerInfo]] = {}
  for info in targets:
    if info.path in holder:
      chosen.setdefault(holder[info.path], []).append(info)
  units: list[Unit] = []
  previous: str | None = None  # The block called last.
  for path, path_calls in calls.items():
    if path in outside:
      units.append(Unit(None, (outside[path],)))
      continue
    if len(path_calls) != 1:
      fallback(f"{path!r} is called {len(path_calls)} times per batch, not "
               f"once")
      return None
    call = path_calls[0]
    # Linked: every array argument is one the previous block took or gave
    # (whatever runs between them feeds nothing into this block).
    linked = previous is not None and bool(call.sources) and all(
        s is not None and s.path == previous and s.call == 0
        for s in call.sources)
    units.append(Unit(path, tuple(chosen.get(path, ())), call, linked))
    previous = path
  while units and not units[-1].layers:  # Nothing left to process.
    units.pop()
  return Plan(tuple(units))


Want = frozenset[str] | None  # Layer paths to capture; None: all.


@dataclasses.dataclass
class UnitInputs:
  """The inputs of one unit's layers under given variables, memoized on the
  last run (one unit's inputs held at a time).

  ``inputs(variables, want=None) -> LayerInputs`` of the layers at ``want``
  (all by default); ``outputs(variables)``: the block's output per batch;
  ``shares_input(a, b)``: whether layers ``a`` and ``b`` of a block are
  called on the very same array (so quantizing ``a`` cannot change ``b``'s
  input: GPTQ skips a run).

  Attributes:
    run: ``(variables, want, output) -> (LayerInputs, outputs or None)``.
    sharers: path -> the layers whose first argument is the same array.
  """

  run: Callable[[Any, Want, bool], tuple[LayerInputs, list[Any] | None]]
  sharers: Callable[[str], frozenset[str]] = lambda path: frozenset()
  _last: tuple[Any, Want, LayerInputs, list[Any] | None] | None = None

  def _get(self, variables: Any, want: Want, output: bool
           ) -> tuple[LayerInputs, list[Any] | None]:
    """The memo, else a run; ``output``: the block's output is needed."""
    last = self._last
    if not (last is not None and last[0] is variables and
            (last[1] is None or (want is not None and want <= last[1])) and
            (last[3] is not None or not output)):
      self._last = None  # Freed before the next run allocates.
      # A run of every layer computes the whole block: keep its output.
      inputs, outs = self.run(variables, want, output or want is None)
      self._last = last = (variables, want, inputs, outs)
    return last[2], last[3]

  def inputs(self, variables: Any, want: Want = None) -> LayerInputs:
    return self._get(variables, want, False)[0]

  def outputs(self, variables: Any) -> list[Any] | None:
    return self._get(variables, frozenset(), True)[1]

  def shares_input(self, a: str, b: str) -> bool:
    return a in self.sharers(b)


def _sharers(calls: Mapping[str, Sequence[LayerCall]]
             ) -> Callable[[str], frozenset[str]]:
  """path -> the layers called on the same first array as it (one call
  each), following the sources of the layers' first arguments."""

  def sharers(path: str) -> frozenset[str]:
    found: set[str] = set()
    current = calls.get(path, ())
    while len(current) == 1 and current[0].sources:
      source = current[0].sources[0]
      if (source is None or source.kind != "arg" or source.index != 0 or
          len(calls.get(source.path, ())) != 1):
        break
      found.add(source.path)
      current = calls[source.path]
    return frozenset(found)

  return sharers


def _pick(source: Source, arrays: Sequence[jax.Array], out: Any) -> jax.Array:
  held = arrays if source.kind == "arg" else [
      a for a in jax.tree.leaves(out) if isinstance(a, jax.Array)]
  return held[source.index]


Process = Callable[[Unit, UnitInputs, Any], Any]


def walk(adapter: ModelAdapter, batches: Sequence[Any], the_plan: Plan,
         variables: Any, process: Process, *, sequential: bool,
         what: str) -> Any:
  """Runs ``process(unit, inputs, variables) -> variables`` on each unit.

  ``inputs`` gives the unit's layer inputs under any variables of the
  structure of ``variables`` (GPTQ's kernels change, not the structure).
  ``sequential``: a block's outputs, the next block's inputs, come from
  the variables ``process`` returns (GPTQ: the quantized block); else from
  the variables the walk started with (AWQ, SmoothQuant: every input as
  the original model computes it).
  """
  start = variables
  # The model with the variables' structure (nnx: the structure is the
  # module's), so each compiled pass serves every step.
  model = adapter.with_variables(variables)
  masks = tuple(batch_lib.batch_mask(b) for b in batches)
  outside_paths = [u.layers[0].path for u in the_plan.units
                   if u.block is None]
  outside_pass = model.capture(outside_paths) if outside_paths else None
  outside = UnitInputs(lambda v, want, output: (_capture(
      model, batches, outside_paths, v, outside_pass, what), None))
  arrays: list[tuple[jax.Array, ...]] = []
  previous: UnitInputs | None = None  # The last block's.
  for unit in the_plan.units:
    if unit.block is None:
      variables = process(unit, outside, variables)
      continue
    source_vars = variables if sequential else start
    if unit.linked:
      outs = previous.outputs(source_vars)
      arrays = [tuple(_pick(s, args, out) for s in unit.call.sources)
                for args, out in zip(arrays, outs)]
    else:  # One whole-model pass (cut after the block) for its arguments.
      first = model.capture([unit.block])
      arrays = [tuple(first(source_vars, b)[unit.block][0][0])
                for b in batches]
    previous = None  # Its inputs are freed before this block runs.
    paths = [info.path for info in unit.layers]
    module_pass = model.run_module(unit.block, unit.call, paths)
    previous = UnitInputs(_block_run(module_pass, arrays, paths, masks),
                          lambda path, p=module_pass: _sharers(p.calls)(path))
    variables = process(unit, previous, variables)
  return variables


def _capture(model: ModelAdapter, batches: Sequence[Any], paths: list[str],
             variables: Any, capture_pass: Any, what: str) -> LayerInputs:
  try:
    return model.capture_inputs(batches, paths, variables,
                                capture=capture_pass)
  except ValueError as e:
    raise ValueError(f"{what}: calibration never reached a layer: {e}"
                     ) from None


def _block_run(module_pass: Any, arrays: Sequence[tuple[jax.Array, ...]],
               paths: Collection[str], masks: tuple[Any, ...]
               ) -> Callable[[Any, Want, bool],
                             tuple[LayerInputs, list[Any] | None]]:
  """``(variables, want, output) -> (inputs of the block's layers at
  ``want``, the block's output per batch or None)``: the block alone on
  each batch's arguments, computing only what is asked for."""

  def run(variables: Any, want: Want, output: bool
          ) -> tuple[LayerInputs, list[Any] | None]:
    chosen = [p for p in paths if want is None or p in want]
    results = [module_pass(variables, a, frozenset(chosen), output)
               for a in arrays]
    inputs = adapter_lib.collect_inputs(
        module_pass.calls, [c for _, c in results], chosen,
        masks) if chosen else LayerInputs({}, {}, masks)
    return inputs, [out for out, _ in results] if output else None

  return run
