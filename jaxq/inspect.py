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
import re
from typing import Any, Callable, Iterable, Sequence

import jax

from jaxq import flax as flax_lib
from jaxq.granularity import MX
from jaxq.granularity import PerBlock
from jaxq.granularity import PerGroup
from jaxq.hlo import KINDS
from jaxq.hlo import Matmul
from jaxq.hlo import parse_hlo
from jaxq.hlo import parse_stablehlo
from jaxq.lowering import EXPORT_PLATFORMS  # noqa: F401 (re-exported)
from jaxq.lowering import export
from jaxq.lowering import export_platforms
COMPILED_SOURCE = "optimized HLO: the device compiler's output"
EXPORTED_SOURCE = ("StableHLO from jax.export: what the program asks the "
                   "platform's compiler for, not that compiler's output")


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
      StableHLO (not the device compiler's output; see the module doc);
      a name given twice is inspected once.
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
    for platform in export_platforms(platforms, "jaxq.inspect"):
      exported = export(jitted, [platform], *args, **kwargs)
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


# Tracing rows back to jaxq's layers.


def _model_of(fn: Callable[..., Any]) -> Any:
  """The quantized model that ``fn`` is a bound method of, if any."""
  owner = getattr(fn, "__self__", None)
  if owner is None:
    return None
  try:
    return owner if flax_lib.adapt(owner).quantized else None
  except ValueError:  # Not a Flax model.
    return None


def _model_layers(model: Any) -> tuple[dict[str, Any], str | None, bool]:
  """(path -> LayerInfo, mode, int8_forward) of a jaxq-quantized model."""
  if model is None:
    return {}, None, False
  try:
    adapter = flax_lib.adapt(model, what="jaxq.inspect")
  except ValueError:
    adapter = None
  if adapter is None or not adapter.quantized:
    raise ValueError(f"jaxq.inspect: model= takes the model that "
                     f"jaxq.quantize_model returned (a QuantizedLinen or a "
                     f"quantized nnx module), got a {type(model).__name__} "
                     f"with no jaxq layer.")
  settings = adapter.settings()
  return adapter.layers(), settings.mode, settings.int8_forward


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
