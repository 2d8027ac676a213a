"""What a compiled program really multiplies: its dots and convolutions.

``jaxq.inspect(fn, *args)`` compiles ``fn`` for the current backend
(``jax.jit(fn).lower(*args).compile()``) and lists every matrix
multiplication of the *optimized* HLO, the program the device runs after
XLA's rewrites: ``dot`` and ``convolution`` instructions, inside fused
computations and loop bodies too, and the GPU library calls XLA turns them
into (cuBLAS gemms, cuDNN convolutions). For each (a `Matmul` row):

* operand and result types as HLO writes them, e.g. ``s8[256,1024]`` (``s8``
  int8, ``s32`` int32, ``f8e4m3fn`` fp8, ``bf16``, ``f32``);
* ``kind``: ``"int8"`` when both operands are integers of at most 8 bits
  (int4 included), ``"fp8"`` when both are floats of at most 8 bits,
  ``"int"`` for wider integers (XLA widened int8 operands, e.g. to s32, as
  the CPU backend does for some small shapes), ``"float"`` otherwise (an
  int8 operand multiplied in float counts as float: that is the fallback
  this module exists to show);
* FLOPs: ``2 * result elements * contracted elements`` (for a convolution,
  ``2 * output elements * kernel elements / output features``), times the
  trip count of the loops around it where XLA knows it;
* where it comes from: the op's ``op_name`` metadata, which carries the jax
  named scopes and so the Flax module path (linen's module names; jaxq's
  nnx layers open a ``jax.named_scope`` with their path), and the jaxq layer
  path it traces back to.

With ``model=`` the quantized model (for a linen ``QuantizedLinen``, its
bound ``apply`` is recognised by itself), each row traced to a layer that
jaxq quantized and whose matmul is not int8/fp8 (kind ``"int"`` or
``"float"``) is a *fallback*, with the reason when jaxq knows it: the mode
(qat and calibrate compute in float; the straight-through backward of the
int8 forward too), a weight-only rule (float activations times a
dequantized weight), a format the backend cannot multiply (fp8 or fp4 on a
CPU), integer operands the compiler widened, a grouped granularity.

```python
serve = jaxq.quantize_model(model, rules, "serve")
serving, _ = jaxq.convert(serve, variables)
print(jaxq.inspect(serve.apply, serving, x))          # compiled, this backend
jaxq.inspect(serve.apply, serving, x, platforms=("cuda", "tpu"))  # exported
```

``platforms=("cuda", "tpu")`` lowers ``fn`` for those platforms with
``jax.export`` instead, without their devices: the rows then come from the
StableHLO the program hands to that platform's compiler, not from the
device compiler's output, so they show what the program *asks* for (e.g. i8
x i8 -> i32 dots) but not what the compiler may rewrite; loops there count
one iteration. Every table says which of the two it shows.

The summary (`Summary`) gives each kind's share of all matmul FLOPs, and the
same shares over the matmuls traced to jaxq-quantized layers (an attention's
activation-by-activation einsums stay float in any quantized model).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Iterable, Literal, Sequence

import jax
from flax import nnx

from jaxq.flax import QuantizedLinen
from jaxq.flax import layers as flax_layers
from jaxq.granularity import MX
from jaxq.granularity import PerBlock
from jaxq.granularity import PerGroup

Kind = Literal["int8", "fp8", "int", "float"]
KINDS: tuple[str, ...] = ("int8", "fp8", "int", "float")
# Platforms that jax.export lowers for.
EXPORT_PLATFORMS: tuple[str, ...] = ("cpu", "cuda", "rocm", "tpu")
COMPILED_SOURCE = "optimized HLO: the device compiler's output"
EXPORTED_SOURCE = ("StableHLO from jax.export: what the program asks the "
                   "platform's compiler for, not that compiler's output")


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


@dataclasses.dataclass(frozen=True)
class Summary:
  """Shares of matmul FLOPs by kind, for one platform.

  Attributes:
    platform: the platform of the rows summarised.
    source: `COMPILED_SOURCE` or `EXPORTED_SOURCE`.
    flops: all matmul FLOPs of one call.
    shares: kind -> share of ``flops`` (0 to 1), for every kind in `KINDS`.
    quantized_flops: the FLOPs of the matmuls traced to jaxq-quantized
      layers.
    quantized_shares: kind -> share of ``quantized_flops`` (all 0 when
      there are none).
  """

  platform: str
  source: str
  flops: float
  shares: dict[str, float]
  quantized_flops: float
  quantized_shares: dict[str, float]

  def line(self) -> str:
    """``matmul FLOPs: int8 100.0%, fp8 0.0%, float 0.0% of ...``."""
    text = f"matmul FLOPs: {_shares(self.shares)} of {_flops(self.flops)}"
    if self.quantized_flops == self.flops:
      return text + " (all in jaxq-quantized layers)"
    if self.quantized_flops:
      text += (f"; in jaxq-quantized layers: "
               f"{_shares(self.quantized_shares)} of "
               f"{_flops(self.quantized_flops)}")
    return text


@dataclasses.dataclass(frozen=True)
class Inspection:
  """The matmuls of a program, per platform; ``print`` shows the table.

  Attributes:
    rows: every dot and convolution, platform by platform in program order.
    summaries: one `Summary` per platform, in the order of ``platforms``.
  """

  rows: tuple[Matmul, ...]
  summaries: tuple[Summary, ...]

  @property
  def platforms(self) -> tuple[str, ...]:
    return tuple(s.platform for s in self.summaries)

  def summary(self, platform: str | None = None) -> Summary:
    """The summary of ``platform`` (may be omitted when there is one)."""
    if platform is None:
      if len(self.summaries) != 1:
        raise ValueError(f"jaxq.inspect: this inspection has platforms "
                         f"{list(self.platforms)}; name one.")
      return self.summaries[0]
    for s in self.summaries:
      if s.platform == platform:
        return s
    raise ValueError(f"jaxq.inspect: no platform {platform!r} here; this "
                     f"inspection has {list(self.platforms)}.")

  def fallbacks(self, platform: str | None = None) -> tuple[Matmul, ...]:
    """The rows of jaxq-quantized layers whose matmul is not low-bit."""
    return tuple(r for r in self.rows if r.fallback is not None and
                 (platform is None or r.platform == platform))

  def table(self) -> str:
    """A readable table per platform, its source, summary and fallbacks."""
    out = []
    for s in self.summaries:
      rows = [r for r in self.rows if r.platform == s.platform]
      out.append(f"jaxq.inspect on {s.platform} ({s.source})")
      header = ("where", "op", "lhs", "rhs", "result", "kind", "count",
                "FLOPs")
      cells = [(r.where, r.op, r.lhs, r.rhs, r.result, r.kind,
                "?" if r.count is None else str(r.count), _flops(r.flops))
               for r in rows]
      widths = [max([len(h)] + [len(c[i]) for c in cells])
                for i, h in enumerate(header)]
      out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
      out.append("  ".join("-" * w for w in widths))
      for c in cells:
        out.append("  ".join(v.ljust(w) for v, w in zip(c, widths)))
      if not rows:
        out.append("(no dot or convolution)")
      out.append(s.line())
      falls = [r for r in rows if r.fallback is not None]
      if falls:
        out.append("fallbacks (not int8/fp8) in jaxq-quantized layers:")
        out.extend(f"  {r.where}: {r.lhs} x {r.rhs} -> {r.result}: "
                   f"{r.fallback}" for r in falls)
      elif s.quantized_flops:
        out.append("fallbacks (not int8/fp8) in jaxq-quantized layers: none")
      out.append("")
    return "\n".join(out).rstrip("\n")

  def __str__(self) -> str:
    return self.table()


def inspect(fn: Callable[..., Any], *args: Any, model: Any = None,
            platforms: Sequence[str] | None = None,
            **kwargs: Any) -> Inspection:
  """Lists the dots and convolutions that ``fn(*args, **kwargs)`` runs.

  Args:
    fn: the function, e.g. a served model's ``apply`` (jitted or not).
    *args: example arguments (arrays, pytrees of arrays, ``QArray``s; only
      shapes and dtypes matter, but they are passed to ``jax.jit(fn).lower``
      as they are).
    model: the jaxq-quantized model (``QuantizedLinen`` or nnx module from
      `jaxq.quantize_model`), to trace rows back to its layers and name the
      float fallbacks. Defaults to ``fn.__self__`` when ``fn`` is a bound
      method of a ``QuantizedLinen``.
    platforms: None to compile for the current backend and read the
      optimized HLO; else platform names (``"cpu"``, ``"cuda"``,
      ``"rocm"``, ``"tpu"``) to lower for with ``jax.export`` and read the
      StableHLO (not the device compiler's output; see the module doc).
    **kwargs: keyword arguments of ``fn``, traced like ``args`` (bind
      static ones, e.g. linen's ``method=``, with ``functools.partial``).

  Returns:
    An `Inspection`: rows, a summary per platform, ``print``-able.

  Raises:
    ValueError: for an unknown platform name or an empty ``platforms``.
  """
  if model is None:
    model = _model_of(fn)
  _model_layers(model)  # Refuses a wrong model before compiling.
  jitted = jax.jit(fn)
  results: list[tuple[str, str, list[Matmul]]] = []
  if platforms is None:
    platform = jax.default_backend()
    text = jitted.lower(*args, **kwargs).compile().as_text()
    results.append((platform, COMPILED_SOURCE, parse_hlo(text, platform)))
  else:
    if isinstance(platforms, str):
      platforms = (platforms,)
    if not platforms:
      raise ValueError("jaxq.inspect: platforms is empty; give names from "
                       f"{list(EXPORT_PLATFORMS)} or None for the current "
                       "backend.")
    unknown = [p for p in platforms if p not in EXPORT_PLATFORMS]
    if unknown:
      raise ValueError(f"jaxq.inspect: unknown platform(s) {unknown}; "
                       f"jax.export lowers for {list(EXPORT_PLATFORMS)}.")
    for platform in platforms:
      exported = jax.export.export(jitted, platforms=[platform])(*args,
                                                                  **kwargs)
      results.append((platform, EXPORTED_SOURCE,
                      parse_stablehlo(exported.mlir_module(), platform)))
  # linen records its layers while tracing: read them after lowering.
  layers, mode, int8_forward = _model_layers(model)
  rows: list[Matmul] = []
  summaries = []
  for platform, source, found in results:
    found = [_attribute(r, layers, mode, int8_forward, source) for r in found]
    rows.extend(found)
    summaries.append(_summarise(platform, source, found))
  return Inspection(tuple(rows), tuple(summaries))


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


# Tracing rows back to jaxq's layers.


def _model_of(fn: Callable[..., Any]) -> Any:
  """The QuantizedLinen that ``fn`` is a bound method of, if any."""
  owner = getattr(fn, "__self__", None)
  return owner if isinstance(owner, QuantizedLinen) else None


def _model_layers(model: Any) -> tuple[dict[str, Any], str | None, bool]:
  """(path -> LayerInfo, mode, int8_forward) of a jaxq-quantized model."""
  if model is None:
    return {}, None, False
  if isinstance(model, QuantizedLinen):
    return flax_layers(model), model.mode, model.int8_forward
  if isinstance(model, nnx.Module):
    # The layers quantize_model swapped in carry jaxq_info; jaxq_layer is
    # None on the skipped ones.
    quants = [getattr(m, "jaxq_layer", None) for _, m in nnx.iter_graph(model)
              if hasattr(m, "jaxq_info")]
    if quants:
      quant = next((q for q in quants if q is not None), None)
      return (flax_layers(model), quant.mode if quant else None,
              bool(quant and quant.int8_forward))
  raise ValueError(f"jaxq.inspect: model= takes the model that "
                   f"jaxq.quantize_model returned (a QuantizedLinen or a "
                   f"quantized nnx module), got a {type(model).__name__} "
                   f"with no jaxq layer.")


def _scope(op_name: str) -> list[str]:
  """Op-name components with transform wrappers removed:
  ``transpose(jvp(Dense_0))`` -> ``Dense_0``; ``Embed_0.attend`` kept."""
  parts = []
  for part in op_name.split("/"):
    while True:
      m = re.fullmatch(r"[\w\-]+\((.*)\)", part)
      if m is None:
        break
      part = m.group(1)
    parts.append(part)
  return parts


def _layer_of(op_name: str, paths: Iterable[str]) -> str | None:
  """The longest layer path whose components appear in a row in the op
  name (a component may carry a method: ``Embed_0.attend``)."""
  scope = _scope(op_name)
  best = None
  for path in paths:
    comps = path.split("/")
    n = len(comps)
    for i in range(len(scope) - n + 1):
      if all(s == c or s.startswith(c + ".")
             for s, c in zip(scope[i:i + n], comps)):
        if best is None or n > len(best.split("/")):
          best = path
        break
  return best


def _fallback_reason(info: Any, mode: str | None, int8_forward: bool,
                     row: Matmul, compiled: bool) -> str:
  """Why a quantized layer's matmul is not low-bit, as far as jaxq knows."""
  backward = "transpose(" in row.op_name
  if mode == "calibrate":
    return "calibrate mode computes in float"
  if mode == "qat":
    if int8_forward and backward:
      return ("the straight-through backward of the int8 forward multiplies "
              "in float")
    if not int8_forward or backward:
      return "qat mode: fake-quant, the matmul itself is float"
  weight, act = info.weight, info.act
  reasons = []
  if weight is not None and act is None:
    reasons.append("weight-only: float activations times the dequantized "
                   "weight")
  elif weight is None and act is not None:
    reasons.append("activation-only: the float weight needs a float matmul")
  float_formats = [str(s.format) for s in (weight, act)
                   if s is not None and str(s.format).startswith("float")]
  if compiled and float_formats and act is not None:
    reasons.append(f"{row.platform} has no {float_formats[0]} matmul: XLA "
                   f"converts the operands to float")
  if row.kind == "int":
    reasons.append(f"the compiler widened the integer operands to "
                   f"{row.lhs.split('[')[0]} before multiplying")
  grouped = (PerGroup, PerBlock, MX)
  if not float_formats and any(
      isinstance(getattr(s, "granularity", None), grouped)
      for s in (weight, act)):
    reasons.append("grouped granularity: one matmul per group of the "
                   "contraction")
  if not reasons:
    reasons.append("the compiler converted the low-bit operands to float")
  return "; ".join(reasons)


def _attribute(row: Matmul, layers: dict[str, Any], mode: str | None,
               int8_forward: bool, source: str) -> Matmul:
  layer = _layer_of(row.op_name, layers)
  if layer is None:
    return row
  info = layers[layer]
  quantized = info.weight is not None or info.act is not None
  fallback = None
  if quantized and row.kind in ("int", "float"):
    fallback = _fallback_reason(info, mode, int8_forward, row,
                                source == COMPILED_SOURCE)
  return dataclasses.replace(row, layer=layer, quantized=quantized,
                             fallback=fallback)


def _share(rows: list[Matmul]) -> tuple[float, dict[str, float]]:
  total = sum(r.flops for r in rows)
  return total, {k: (sum(r.flops for r in rows if r.kind == k) / total
                     if total else 0.0) for k in KINDS}


def _summarise(platform: str, source: str, rows: list[Matmul]) -> Summary:
  flops, shares = _share(rows)
  qflops, qshares = _share([r for r in rows if r.quantized])
  return Summary(platform, source, flops, shares, qflops, qshares)


def _shares(shares: dict[str, float]) -> str:
  # Widened integers are rare: shown only when present.
  return ", ".join(f"{k} {100 * shares[k]:.1f}%" for k in KINDS
                   if k != "int" or shares[k])


def _flops(flops: float) -> str:
  for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6),
                     ("kFLOP", 1e3)):
    if flops >= size:
      return f"{flops / size:.3g} {unit}"
  return f"{flops:.3g} FLOP"
