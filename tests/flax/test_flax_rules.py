"""Rules: first match wins, fullmatch, module types, reporting, bad specs."""

from __future__ import annotations

import flax.linen as nn
import jax
import pytest
from flax import nnx

import jaxq
from jaxq import PerChannel, QuantSpec

import flax_models as fm

W8 = QuantSpec("int8", PerChannel(axis=-1))
W4 = QuantSpec("int4", PerChannel(axis=-1))


def test_first_match_wins_with_fullmatch_and_module_types():
  rules = [jaxq.Rule(r"Dense_1", skip=True),
           jaxq.Rule(r".*", module_types=("DenseGeneral",), weight=W4),
           jaxq.Rule(r"Dense", weight=W8),                 # Never fully matches.
           jaxq.Rule(r"Dense_\d", module_types=(nn.Dense,), weight=W8)]
  model = fm.LinenMLP()
  x = fm.mlp_input(jax.random.key(0))
  qmodel = jaxq.quantize_model(model, rules)
  with pytest.warns(UserWarning, match=r"1 rule\(s\) matched no layer: 'Dense'"):
    jax.eval_shape(qmodel.init, jax.random.key(0), x)
  layers = jaxq.layers(qmodel)
  assert layers["Dense_1"].rule is rules[0] and not layers["Dense_1"].quantized
  assert layers["DenseGeneral_0"].weight == W4
  assert layers["Dense_0"].rule is rules[3]
  assert (layers["Dense_0"].module_type, layers["Dense_0"].weight_shape) == (
      "Dense", (8, 16))
  assert jaxq.unmatched_rules(qmodel) == (rules[2],)


def test_nnx_reports_unmatched_rules_at_quantize_model():
  rules = [jaxq.Rule(r"fc.*", weight=W8), jaxq.Rule(r"typo", weight=W8)]
  with pytest.warns(UserWarning, match="'typo'"):
    qmodel = jaxq.quantize_model(fm.NnxMLP(nnx.Rngs(0)), rules)
  assert jaxq.unmatched_rules(qmodel) == (rules[1],)
  assert sorted(jaxq.layers(qmodel)) == ["fc1", "fc2", "fc3"]


@pytest.mark.parametrize("rule_args, message", [
    (dict(skip=True, weight=W8), "skip rule"),
    (dict(), "weight spec, an act spec, a kv_cache spec, or skip"),
    (dict(weight="int8"), "must be a QuantSpec"),
])
def test_malformed_rules_raise(rule_args, message):
  with pytest.raises(ValueError, match=message):
    jaxq.Rule(r".*", **rule_args)
  with pytest.raises(ValueError, match="invalid path_regex"):
    jaxq.Rule(r"(", weight=W8)


@pytest.mark.parametrize("spec, message", [
    # A group may be ragged, an MX block may not.
    (QuantSpec("int8", jaxq.MX(axis=0)), r"size 32 does not divide axis 0 "
                                         r"of length 8"),
    (QuantSpec("int8", PerChannel(axis=2)), r"axis 2 is out of range"),
])
def test_linen_bad_spec_raises_at_init_naming_layer(spec, message):
  qmodel = jaxq.quantize_model(fm.LinenMLP(), [jaxq.Rule(r"Dense_0",
                                                         weight=spec)])
  x = fm.mlp_input(jax.random.key(0))
  with pytest.raises(ValueError, match=r"'Dense_0'.*\(8, 16\).*" + message):
    qmodel.init(jax.random.key(0), x)


def test_bad_mode_and_model_raise():
  with pytest.raises(ValueError, match="unknown mode"):
    jaxq.quantize_model(fm.LinenMLP(), fm.SKIP_RULES, "train")
  with pytest.raises(ValueError, match="linen or flax.nnx Module"):
    jaxq.quantize_model(lambda x: x, fm.SKIP_RULES)
