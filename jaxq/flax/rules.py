"""Rules: which layers are quantized, and how.

A `Rule` maps module paths to quantizers. Paths are the "/"-joined names of
the modules from the root, e.g. ``"encoder/layers_0/attention/query"`` for
linen or ``"encoder/layers/0/attention/query"`` for nnx (the attribute path).
Rules are tried in order and the first rule whose ``path_regex`` matches
the whole path (``re.fullmatch``) and whose ``module_types`` (when given)
include the module wins; a layer no rule matches stays in float.

```python
rules = [
    jaxq.Rule(r".*head", skip=True),                          # leave in float
    jaxq.Rule(r".*", module_types=("Embed",),
              weight=QuantSpec("int8", PerChannel(axis=0))),  # one scale per row
    jaxq.Rule(r".*", weight=QuantSpec("int8", PerChannel(axis=-1)),
              act=QuantSpec("int8", PerToken())),
]
```

A rule's ``kv_cache`` (a `jaxq.kvcache.KVCacheSpec`) quantizes the KV cache
of the attention modules it matches: Flax's decoding attention (linen's
``MultiHeadDotProductAttention(decode=True)``, nnx's ``MultiHeadAttention``)
and jaxq's cache modules
(`jaxq.flax.kv_cache`). Weight layers skip rules that carry only a
``kv_cache``, and attention modules skip rules that carry none (`match`,
`match_kv_cache`), so one list of rules can say both.

`LayerInfo` records which rule each layer got; `unmatched` lists the rules
that matched no layer (a likely typo in a regex), which `quantize_model`
also reports with a `UserWarning`.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Iterable, Sequence

import jax

from jaxq.kvcache.spec import KVCacheSpec
from jaxq.spec import QuantSpec

ModuleType = type | str


@dataclasses.dataclass(frozen=True)
class Rule:
  """Quantizers for the layers whose path matches ``path_regex``.

  Attributes:
    path_regex: a regular expression matched against the whole "/"-joined
      module path with ``re.fullmatch`` (use ``".*name.*"`` to match a
      substring).
    weight: the quantizer of the layer's weight (a module parameter: a
      ``kernel`` or an ``embedding`` table), or None to keep it in float.
    act: the quantizer of the layer's input activation, or None to keep it
      in float. ``act.dynamic`` picks per-batch ranges (True) or static
      ranges calibrated beforehand (False). Embedding lookups are weight-only
      and ignore ``act``.
    kv_cache: how the matching attention modules cache keys and values
      (`jaxq.kvcache.KVCacheSpec`), or None. A rule may carry it alone.
    skip: leave the matching layers (and caches) in float; ``weight``,
      ``act`` and ``kv_cache`` must be None.
    module_types: restrict the rule to these module types: classes (matched
      with ``isinstance``) or class names (matched against the names of the
      module's class and its bases, e.g. ``"Dense"`` or ``"Linear"``).
  """

  path_regex: str
  weight: QuantSpec | None = None
  act: QuantSpec | None = None
  kv_cache: KVCacheSpec | None = None
  skip: bool = False
  module_types: tuple[ModuleType, ...] | None = None

  def __post_init__(self):
    try:
      re.compile(self.path_regex)
    except re.error as e:
      raise ValueError(f"Rule: invalid path_regex {self.path_regex!r}: {e}"
                       ) from None
    for name, spec in (("weight", self.weight), ("act", self.act)):
      if spec is not None and not isinstance(spec, QuantSpec):
        raise ValueError(f"Rule({self.path_regex!r}): {name} must be a "
                         f"QuantSpec or None, got {spec!r}.")
    if self.kv_cache is not None and not isinstance(self.kv_cache,
                                                    KVCacheSpec):
      raise ValueError(f"Rule({self.path_regex!r}): kv_cache must be a "
                       f"jaxq.kvcache.KVCacheSpec or None, got "
                       f"{self.kv_cache!r}.")
    carries = (self.weight, self.act, self.kv_cache)
    if self.skip and any(c is not None for c in carries):
      raise ValueError(f"Rule({self.path_regex!r}): a skip rule cannot also "
                       f"carry weight, act or kv_cache specs.")
    if not self.skip and all(c is None for c in carries):
      raise ValueError(f"Rule({self.path_regex!r}): give a weight spec, an "
                       f"act spec, a kv_cache spec, or skip=True.")
    if self.module_types is not None:
      types = (self.module_types,) if isinstance(
          self.module_types, (type, str)) else tuple(self.module_types)
      object.__setattr__(self, "module_types", types)

  def matches(self, path: str, module: object) -> bool:
    """Whether this rule applies to ``module`` at ``path``."""
    if re.fullmatch(self.path_regex, path) is None:
      return False
    if self.module_types is None:
      return True
    names = {cls.__name__ for cls in type(module).__mro__}
    return any(isinstance(module, t) if isinstance(t, type) else t in names
               for t in self.module_types)


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """One quantizable layer and the rule it got.

  Attributes:
    path: the "/"-joined module path.
    module_type: the module's class name.
    rule: the first matching rule, or None when no rule matched.
    weight_shape: the shape of the layer's weight parameter.
    weight_name: the weight parameter's name in the layer (``"kernel"``,
      ``"embedding"``, or a user module's own name).
    weight: the weight spec applied (the rule's, adapted for embeddings;
      see `jaxq.flax.core.embed_spec`), or None.
    act: the input activation spec applied, or None.
    mask: the mask a masked convolution multiplies its kernel by (shape
      ``weight_shape``), or None: QAT quantizes ``kernel * mask``, and so
      does `jaxq.convert`. Left out of equality and repr.
    serve_fallback: why serve mode cannot run this layer as an integer op,
      or None when it can (or when the layer is weight-only by its rule).
      A convolution whose quantized input has scales that vary along a
      summed axis (a ``PerToken()`` act rule that matched a conv), or an
      activation and weight of an integer and a float format (fp8 x int8),
      serve by the fallback: the input dequantized (equal to QAT's
      fake-quantized input) times the low-bit weight, weight-only. Decided
      from the specs and the kernel shape (a conv input with more than one
      example and position): when traced for linen, at quantize time for
      nnx (`jaxq.flax.serve_ops.layer_fallback_reason`).
    stacked: the size of the leading stack axis of the stored weight when
      the layer runs inside ``nn.scan`` over layers (the stored weight is
      ``(stacked, *weight_shape)``; ``weight_shape`` is one layer's), or
      None for an ordinary layer. `ModelAdapter.get_weight` returns the
      stored, stacked weight; `jaxq.convert` quantizes it per layer slice.
  """

  path: str
  module_type: str
  rule: Rule | None
  weight_shape: tuple[int, ...]
  weight_name: str = "kernel"
  weight: QuantSpec | None = None
  act: QuantSpec | None = None
  mask: jax.Array | None = dataclasses.field(default=None, compare=False,
                                            repr=False)
  serve_fallback: str | None = None
  stacked: int | None = None

  @property
  def quantized(self) -> bool:
    """Whether a non-skip rule applies."""
    return self.rule is not None and not self.rule.skip


def check_rules(rules: Sequence[Rule] | Rule, caller: str = "quantize_model"
                ) -> tuple[Rule, ...]:
  """Validates ``rules`` and returns them as a tuple; errors name ``caller``."""
  rules = (rules,) if isinstance(rules, Rule) else tuple(rules)
  for i, rule in enumerate(rules):
    if not isinstance(rule, Rule):
      raise ValueError(f"{caller}: rules[{i}] must be a jaxq.Rule, got "
                       f"{rule!r}.")
  return rules


def _only_kv_cache(rule: Rule) -> bool:
  return rule.kv_cache is not None and rule.weight is None and (
      rule.act is None)


def match(rules: Sequence[Rule], path: str, module: object) -> Rule | None:
  """The first rule that applies to the layer ``module`` at ``path``, or
  None; rules that carry only a ``kv_cache`` are not for layers."""
  return next((r for r in rules
               if not _only_kv_cache(r) and r.matches(path, module)), None)


def match_kv_cache(rules: Sequence[Rule], path: str, module: object
                   ) -> Rule | None:
  """The first rule with a ``kv_cache`` (or ``skip``) that applies to the
  attention ``module`` at ``path``, or None."""
  return next((r for r in rules if (r.kv_cache is not None or r.skip) and
               r.matches(path, module)), None)


def unmatched(rules: Sequence[Rule], layers: Iterable[LayerInfo],
              kv_cache_rules: Iterable[Rule] = ()) -> tuple[Rule, ...]:
  """The rules that no layer (nor, for ``kv_cache_rules``, attention
  module) got; first match wins, so shadowed rules too."""
  used = {id(layer.rule) for layer in layers if layer.rule is not None}
  used |= {id(rule) for rule in kv_cache_rules}
  return tuple(r for r in rules if id(r) not in used)


def warn_unmatched(rules: Sequence[Rule], layers: Iterable[LayerInfo],
                   kv_cache_rules: Iterable[Rule] = ()) -> None:
  """Warns with a `UserWarning` naming every rule that matched no layer."""
  missing = unmatched(rules, layers, kv_cache_rules)
  if missing:
    names = ", ".join(repr(r.path_regex) for r in missing)
    warnings.warn(f"jaxq: {len(missing)} rule(s) matched no layer: {names}. "
                  f"Check the regexes against jaxq.layers(qmodel).",
                  UserWarning, stacklevel=3)
