"""The matmuls of a program's text: HLO and StableHLO parsers.

`parse_hlo` reads the optimized HLO of a compiled program
(``jax.jit(fn).lower(*args).compile().as_text()``) and `parse_stablehlo` the
StableHLO that ``jax.export`` hands a platform's compiler. Both return one
`Matmul` row per ``dot`` / ``convolution`` (inside fused computations and
loop bodies too, FLOPs times the loop trip count where the text gives it)
and per GPU library call XLA turns one into (cuBLAS gemms, cuDNN
convolutions), with operand and result types as the text writes them
(``s8[256,1024]``), a kind (``int8``, ``fp8``, ``int`` for integers wider
than 8 bits, ``float``), FLOPs (``2 * result elements * contracted
elements``; for a convolution ``2 * output elements * kernel elements /
output features``) and the op's ``op_name`` metadata (jax named scopes).
This module knows nothing of jaxq's layers: `jaxq.inspect` traces the rows
back to them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable, Literal

Kind = Literal["int8", "fp8", "int", "float"]
KINDS: tuple[str, ...] = ("int8", "fp8", "int", "float")


@dataclasses.dataclass(frozen=True)
class Matmul:
  """One dot or convolution of the program.

  Attributes:
    platform: ``"cpu"``, ``"cuda"``, ``"tpu"``, ... the program was built for.
    op: the HLO op: ``"dot"``, ``"convolution"``, or a custom call's target
      (``"__cublas$gemm"``, ``"__cudnn$convForward"``, ...).
    lhs, rhs, result: types as HLO writes them, e.g. ``"s8[4,8]"``.
    kind: ``"int8"``, ``"fp8"``, ``"int"`` or ``"float"`` (see the module
      docstring).
    flops: floating-point (or integer) operations per call of the function,
      ``count`` executions included.
    count: how many times one call runs it (loop trip counts); None when it
      sits in a loop whose trip count the text does not give (``flops`` then
      counts one execution).
    op_name: the op's metadata name (jax named scopes, "/"-joined).
    layer: the path of the jaxq layer it traces back to, or None.
    quantized: whether jaxq quantized that layer (a weight or act spec).
    fallback: for a quantized layer's matmul that is not low-bit, why (as
      far as jaxq knows); None otherwise.
  """

  platform: str
  op: str
  lhs: str
  rhs: str
  result: str
  kind: Kind
  flops: float
  count: int | None
  op_name: str
  layer: str | None = None
  quantized: bool = False
  fallback: str | None = None

  @property
  def where(self) -> str:
    """The layer path, else the op name without its ``jit(...)`` prefixes
    and primitive name."""
    if self.layer is not None:
      return self.layer
    parts = self.op_name.split("/")
    while parts and parts[0].startswith("jit("):  # Nested jits too.
      parts = parts[1:]
    if parts and parts[-1] in ("dot_general", "conv_general_dilated"):
      parts = parts[:-1]  # The primitive's own name says nothing more.
    return "/".join(parts) or self.op_name or "?"


# HLO text: the compiled program.

# "%name = type opcode(" with an optional ROOT; the type may be a tuple.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^\s*(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_ARRAY_TYPE = re.compile(r"([a-z]+[0-9]*[a-z0-9]*)\[([^\]]*)\]")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_CALLED = re.compile(
    r"\b(calls|to_apply|body|condition|true_computation|false_computation|"
    r"branch_computations|called_computations)=(\{[^}]*\}|%?[\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class _Array:
  dtype: str
  dims: tuple[int, ...]

  def __str__(self) -> str:
    return f"{self.dtype}[{','.join(map(str, self.dims))}]"


def _parse_type(text: str) -> _Array | None:
  """The first array type of an HLO type (a tuple's first element)."""
  m = _ARRAY_TYPE.search(text)
  if m is None:
    return None
  dims = tuple(int(d.lstrip("<=")) for d in m.group(2).split(",")
               if d.strip())
  return _Array(m.group(1), dims)


def _balanced(text: str, start: int) -> int:
  """The index just past the bracket group that opens at ``text[start]``."""
  pairs = {"(": ")", "{": "}", "[": "]"}
  stack = []
  quoted = False
  for i in range(start, len(text)):
    c = text[i]
    if c == '"' and (i == 0 or text[i - 1] != "\\"):
      quoted = not quoted
    if quoted:
      continue
    if c in pairs:
      stack.append(pairs[c])
    elif stack and c == stack[-1]:
      stack.pop()
      if not stack:
        return i + 1
  return len(text)


def _split_top(text: str) -> list[str]:
  """Splits on the commas that are not inside brackets or quotes."""
  parts, depth, quoted, start = [], 0, False, 0
  for i, c in enumerate(text):
    if c == '"' and (i == 0 or text[i - 1] != "\\"):
      quoted = not quoted
    elif not quoted and c in "([{":
      depth += 1
    elif not quoted and c in ")]}":
      depth -= 1
    elif not quoted and depth == 0 and c == ",":
      parts.append(text[start:i].strip())
      start = i + 1
  if text[start:].strip():
    parts.append(text[start:].strip())
  return parts


@dataclasses.dataclass(frozen=True)
class _Instruction:
  name: str
  type: str
  opcode: str
  operands: tuple[str, ...]
  attributes: str


def _parse_instruction(line: str) -> _Instruction | None:
  m = _INSTRUCTION.match(line)
  if m is None:
    return None
  name, rest = m.group(1), m.group(2)
  if rest.startswith("("):  # A tuple type.
    end = _balanced(rest, 0)
  else:
    end = rest.find(" ")
    if end < 0:
      return None
  type_text, rest = rest[:end], rest[end:].lstrip()
  m = re.match(r"([\w\-$]+)\(", rest)
  if m is None:
    return None
  open_at = m.end() - 1
  close = _balanced(rest, open_at)
  operands = tuple(_split_top(rest[open_at + 1:close - 1]))
  return _Instruction(name, type_text, m.group(1), operands, rest[close:])


def _operand_type(operand: str, types: dict[str, str]) -> _Array | None:
  """An operand written ``%name`` or ``type %name``."""
  name = operand.split()[-1].lstrip("%") if operand.split() else operand
  if " " in operand.strip():
    parsed = _parse_type(operand)
    if parsed is not None:
      return parsed
  return _parse_type(types.get(name, ""))


def _dims_attr(attributes: str, name: str) -> tuple[int, ...]:
  m = re.search(rf"\b{name}=\{{([^}}]*)\}}", attributes)
  if m is None:
    return ()
  return tuple(int(d) for d in m.group(1).split(",") if d.strip())


def _json_dims(attributes: str, name: str) -> tuple[int, ...] | None:
  m = re.search(rf'"{name}"\s*:\s*\[([^\]]*)\]', attributes)
  if m is None:
    return None
  return tuple(int(d.strip().strip('"')) for d in m.group(1).split(",")
               if d.strip())


def _dot_flops(lhs: _Array, result: _Array,
               contracting: Iterable[int]) -> float:
  k = math.prod(lhs.dims[d] for d in contracting if d < len(lhs.dims))
  return 2.0 * math.prod(result.dims) * k


def _conv_flops(output: _Array, kernel: _Array, attributes: str) -> float:
  """``2 * output elements * kernel elements / output features``."""
  m = re.search(r"dim_labels=[^_\s]+_([^-\s]+)->", attributes)
  out_features = 1
  if m is not None and "o" in m.group(1) and len(m.group(1)) == len(
      kernel.dims):
    out_features = kernel.dims[m.group(1).index("o")]
  elif kernel.dims:
    out_features = kernel.dims[-1]
  return 2.0 * math.prod(output.dims) * math.prod(kernel.dims) / max(
      out_features, 1)


def _kind(lhs: _Array | None, rhs: _Array | None) -> Kind:
  def bits(a: _Array | None) -> tuple[str, int]:
    if a is None:
      return "?", 64
    m = re.match(r"([a-z]+?)(\d+)", a.dtype)
    if m is None:
      return a.dtype, 64
    return m.group(1), int(m.group(2))
  (lk, lb), (rk, rb) = bits(lhs), bits(rhs)
  if lk in ("s", "u", "i", "ui") and rk in ("s", "u", "i", "ui") and max(
      lb, rb) <= 8:
    return "int8"
  if lk == "f" and rk == "f" and max(lb, rb) <= 8:
    return "fp8"
  if lk in ("s", "u", "i", "ui") and rk in ("s", "u", "i", "ui"):
    return "int"
  return "float"


def _multipliers(calls: dict[str, list[tuple[str, int | None]]],
                 entry: str | None) -> dict[str, int | None]:
  """Computation -> how often one call of the entry runs it (None: unknown
  trip count on the way)."""
  memo: dict[str, int | None] = {}

  def count(comp: str, seen: frozenset[str]) -> int | None:
    if comp in memo:
      return memo[comp]
    if comp == entry or comp not in calls:
      return 1
    total: int | None = 0
    for caller, factor in calls[comp]:
      if caller in seen:
        continue
      c = count(caller, seen | {comp})
      if c is None or factor is None or total is None:
        total = None
      else:
        total += c * factor
    memo[comp] = total
    return total

  return {comp: count(comp, frozenset()) for comp in calls}


def parse_hlo(text: str, platform: str) -> list[Matmul]:
  """The dots and convolutions of an HLO module's text (``as_text()``).

  Reads every computation (fused ones and loop bodies included), ``dot``,
  ``convolution`` and the custom calls XLA lowers them to on GPUs (targets
  with ``gemm``/``matmul``, cuDNN ``conv``). Rows carry no layer yet.
  """
  found: list[tuple[str, _Instruction, dict[str, str]]] = []
  calls: dict[str, list[tuple[str, int | None]]] = {}
  entry = None
  comp = ""
  types: dict[str, str] = {}
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header is not None and "=" not in line.split("(")[0]:
      comp, types = header.group(2), {}
      if header.group(1):
        entry = comp
      continue
    inst = _parse_instruction(line)
    if inst is None:
      continue
    types[inst.name] = inst.type
    trip = None
    if inst.opcode == "while":
      m = _TRIP_COUNT.search(inst.attributes)
      trip = int(m.group(1)) if m else None
    for attr, callee in _CALLED.findall(inst.attributes):
      factor = trip if attr == "body" else 1
      for name in re.findall(r"%?([\w.\-]+)", callee):
        calls.setdefault(name, []).append((comp, factor))
    op = inst.opcode
    target = ""
    if op == "custom-call":
      m = re.search(r'custom_call_target="([^"]*)"', inst.attributes)
      target = m.group(1) if m else ""
    if op in ("dot", "convolution") or (
        target and re.search(r"gemm|matmul|conv", target, re.I)):
      found.append((comp, inst, types))
  counts = _multipliers(calls, entry)
  rows = []
  for comp, inst, types in found:
    count = counts.get(comp, 1)
    lhs = _operand_type(inst.operands[0], types) if inst.operands else None
    rhs = (_operand_type(inst.operands[1], types)
           if len(inst.operands) > 1 else None)
    result = _parse_type(inst.type)
    op = inst.opcode
    flops = 0.0
    if op == "custom-call":
      op = re.search(r'custom_call_target="([^"]*)"', inst.attributes).group(1)
    if lhs is not None and rhs is not None and result is not None:
      if inst.opcode == "dot":
        flops = _dot_flops(lhs, result,
                           _dims_attr(inst.attributes, "lhs_contracting_dims"))
      elif inst.opcode == "convolution" or "conv" in op.lower():
        # cuDNN backward calls: the forward's output and kernel move around.
        if "BackwardFilter" in op:
          flops = _conv_flops(rhs, result, inst.attributes)
        elif "BackwardInput" in op:
          flops = _conv_flops(lhs, rhs, inst.attributes)
        else:
          flops = _conv_flops(result, rhs, inst.attributes)
      else:  # A gemm custom call: the dimension numbers are in its config.
        contracting = _json_dims(inst.attributes, "lhs_contracting_dimensions")
        flops = _dot_flops(lhs, result, contracting if contracting is not None
                           else (len(lhs.dims) - 1,))
    m = _OP_NAME.search(inst.attributes)
    rows.append(Matmul(
        platform=platform, op=op, lhs=str(lhs or "?"), rhs=str(rhs or "?"),
        result=str(result or "?"), kind=_kind(lhs, rhs),
        flops=flops * (count or 1), count=count,
        op_name=m.group(1) if m else ""))
  return rows


# StableHLO text: the exported program.

_MLIR_OP = re.compile(r"\b(stablehlo\.dot_general|stablehlo\.dot|"
                      r"stablehlo\.convolution)\b")
_TENSOR = re.compile(r"tensor<([^>]*)>")
_LOC_DEF = re.compile(r"^(#loc\d*)\s*=\s*loc\((.*)\)\s*$")


def _tensor(text: str) -> _Array:
  """``4x8xi8`` -> ``i8[4,8]``."""
  *dims, dtype = text.split("x")
  return _Array(dtype, tuple(int(d) if d.isdigit() else -1 for d in dims))


def _loc_name(ref: str, defs: dict[str, str], depth: int = 0) -> str:
  """The first name of a location, following ``#loc`` references."""
  if depth > 32:
    return ""
  body = defs.get(ref, ref)
  m = re.search(r'"((?:[^"\\]|\\.)*)"', body)
  if m is not None:
    return m.group(1)
  for inner in re.findall(r"#loc\d*", body):
    if inner != ref:
      name = _loc_name(inner, defs, depth + 1)
      if name:
        return name
  return ""


def parse_stablehlo(text: str, platform: str) -> list[Matmul]:
  """The dot_general and convolution ops of a StableHLO module's text.

  Each op counts once (``count`` 1): loop trip counts are not read here.
  """
  defs = {}
  for line in text.splitlines():
    m = _LOC_DEF.match(line.strip())
    if m is not None:
      defs[m.group(1)] = m.group(2)
  rows = []
  for line in text.splitlines():
    m = _MLIR_OP.search(line)
    if m is None or "=" not in line[:m.start()]:
      continue
    op = m.group(1).split(".")[1]
    signature = line[line.rfind(" : ") + 3:] if " : " in line else ""
    tensors = [_tensor(t) for t in _TENSOR.findall(signature)]
    if len(tensors) < 3:
      continue
    lhs, rhs, result = tensors[0], tensors[1], tensors[-1]
    if op == "convolution":
      labels = re.search(r"\[([^\]]*)\]x\[([^\]]*)\]->", line)
      attrs = ""
      if labels is not None:
        # dim_numbers = [b, 0, 1, f]x[0, 1, i, o]->[...]: the kernel's labels.
        kernel = labels.group(2).replace(",", "").replace(" ", "")
        attrs = f"dim_labels=x_{kernel}->"
      flops = _conv_flops(result, rhs, attrs)
    else:
      cm = re.search(r"contracting_dims\s*=\s*\[([^\]]*)\]", line)
      contracting = (tuple(int(d) for d in cm.group(1).split(",") if d.strip())
                     if cm else (len(lhs.dims) - 1,))
      flops = _dot_flops(lhs, result, contracting)
    loc = re.search(r"loc\((#loc\d*|\"[^\"]*\")", line[m.start():])
    name = _loc_name(loc.group(1), defs) if loc else ""
    rows.append(Matmul(platform=platform, op=op, lhs=str(lhs), rhs=str(rhs),
                       result=str(result), kind=_kind(lhs, rhs), flops=flops,
                       count=1, op_name=name))
  return rows
