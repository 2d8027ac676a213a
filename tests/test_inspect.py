"""jaxq.inspect: the matmuls of the compiled (or exported) program, their
kinds, FLOPs, layers and the float fallbacks of quantized layers."""

from __future__ import annotations

import pathlib
import sys

import jax
import pytest
from flax import nnx

import jaxq
from jaxq import MX, PerChannel, QuantSpec
from jaxq.hlo import parse_hlo
from jaxq.inspect import COMPILED_SOURCE
from jaxq.inspect import EXPORTED_SOURCE

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "flax"))
import flax_models as fm  # noqa: E402

MLP_PATHS = {"Dense_0", "DenseGeneral_0", "Dense_1"}
# The MLP's three matmuls on a batch of 4: 8 -> 16 -> (2, 4) -> 3.
MLP_FLOPS = 2 * 4 * (8 * 16 + 16 * 8 + 8 * 3)
# The tied output projection (Embed.attend) is weight-only by nature.
NO_EMBED = (jaxq.Rule(r".*Embed.*|embed", skip=True),)


def _served_linen(name: str, rules) -> tuple[jaxq.flax.QuantizedLinen, dict,
                                              jax.Array]:
  """A converted serve-mode linen model of flax_models, its variables and
  an input; static act specs are calibrated on the input."""
  model_cls, make_input = fm.LINEN[name]
  model = model_cls()
  x = make_input(jax.random.key(1))
  variables = model.init(jax.random.key(0), x)
  cal = jaxq.quantize_model(model, rules, "calibrate")
  _, stats = cal.apply(variables, x, mutable=["quant_stats"])
  serving, _ = jaxq.convert(cal, variables, stats["quant_stats"])
  return cal.with_mode("serve"), serving, x


@pytest.mark.parametrize("rules", [fm.STATIC_RULES, fm.DYNAMIC_RULES],
                         ids=["T-C", "K-C"])
def test_int8_mlp_is_all_int8(rules):
  serve, serving, x = _served_linen("mlp", rules)
  result = jaxq.inspect(serve.apply, serving, x)
  summary = result.summary()
  assert summary.source == COMPILED_SOURCE
  assert summary.shares == {"int8": 1.0, "fp8": 0.0, "int": 0.0,
                            "float": 0.0}
  assert summary.flops == MLP_FLOPS
  assert {r.layer for r in result.rows} == MLP_PATHS
  assert all(r.quantized and r.result.startswith("s32") for r in result.rows)
  assert result.fallbacks() == ()
  text = str(result)
  assert "int8 100.0%" in text and "layers: none" in text


@pytest.mark.parametrize("rules", [fm.STATIC_RULES, fm.DYNAMIC_RULES],
                         ids=["T-C", "K-C"])
def test_int8_transformer_quantized_layers_all_int8(rules):
  serve, serving, x = _served_linen("transformer", NO_EMBED + rules)
  result = jaxq.inspect(serve.apply, serving, x)
  summary = result.summary()
  assert summary.quantized_shares["int8"] == 1.0
  quantized = {r.layer for r in result.rows if r.quantized}
  assert quantized == {"Dense_0", "Einsum_0"} | {
      f"MultiHeadDotProductAttention_0/{n}"
      for n in ("query", "key", "value", "out")}
  # The attention's activation-by-activation einsums and the tied output
  # stay float without being fallbacks: jaxq did not quantize them.
  floats = [r for r in result.rows if r.kind == "float"]
  assert len(floats) == 3 and not any(r.quantized for r in floats)
  assert 0 < summary.shares["int8"] < 1
  assert result.fallbacks() == ()


def test_nnx_layers_are_named_through_their_scope():
  model = fm.NnxTransformer(nnx.Rngs(0))
  x = fm.transformer_input(jax.random.key(1))
  serve = jaxq.quantize_model(model, fm.DYNAMIC_RULES, "serve")
  state, _ = jaxq.convert(serve, nnx.state(model))
  nnx.update(serve, state)
  graph, state = nnx.split(serve)
  result = jaxq.inspect(lambda s, x: nnx.merge(graph, s)(x), state, x,
                        model=serve)
  assert {r.layer for r in result.rows if r.kind == "int8"} == {
      "up", "down", "attention/query", "attention/key", "attention/value",
      "attention/out"}
  assert result.summary().quantized_shares["int8"] == 1.0


def test_int8_cnn_convolutions():
  serve, serving, x = _served_linen("cnn", fm.STATIC_RULES)
  exported = jaxq.inspect(serve.apply, serving, x, platforms=("tpu",))
  convs = [r for r in exported.rows if r.op == "convolution"]
  assert [r.layer for r in convs] == ["Conv_0", "Conv_1", "Conv_2"]
  assert all(r.kind == "int8" and r.result.startswith("i32") for r in convs)
  # 2 x output elements x window x input channels per group (depthwise: 1).
  out = 2 * 8 * 8 * 8
  assert [r.flops for r in convs] == [2 * out * 3 * 3 * 2, 2 * out * 3 * 3,
                                      2 * (2 * 4 * 4 * 4) * 8]
  # The CPU compiler may widen small int8 convolutions and dots to int32:
  # such rows are named, with that reason.
  compiled = jaxq.inspect(serve.apply, serving, x)
  assert {r.layer for r in compiled.rows} == {"Conv_0", "Conv_1", "Conv_2",
                                              "Dense_0"}
  for row in compiled.rows:
    assert row.kind in ("int8", "int"), row
    assert (row.kind == "int") == (row.fallback is not None), row
    if row.kind == "int":
      assert "widened the integer operands" in row.fallback


def test_weight_only_names_its_float_dots():
  rules = (jaxq.Rule(r".*", weight=QuantSpec("int8", PerChannel(-1))),)
  serve, serving, x = _served_linen("mlp", rules)
  result = jaxq.inspect(serve.apply, serving, x)
  assert result.summary().shares["float"] == 1.0
  fallbacks = result.fallbacks()
  assert {r.layer for r in fallbacks} == MLP_PATHS
  assert all("weight-only" in r.fallback for r in fallbacks)
  text = result.table()
  for path in MLP_PATHS:
    assert f"  {path}: " in text  # Listed under the fallbacks.


def test_fp8_on_cpu_is_a_named_fallback():
  fp8 = "float8_e4m3fn"
  rules = (jaxq.Rule(r".*", weight=QuantSpec(fp8, MX(axis=0, size=8)),
                     act=QuantSpec(fp8, MX(axis=-1, size=8))),)
  serve, serving, x = _served_linen("mlp", rules)
  compiled = jaxq.inspect(serve.apply, serving, x)
  assert {r.layer for r in compiled.fallbacks()} == MLP_PATHS
  assert all(f"cpu has no {fp8} matmul" in r.fallback
             for r in compiled.fallbacks())
  # What the program asks a GPU for: fp8 x fp8 dots.
  exported = jaxq.inspect(serve.apply, serving, x, platforms="cuda")
  assert exported.summary().shares["fp8"] == 1.0
  assert exported.fallbacks() == ()


def test_qat_mode_is_float_and_says_why():
  model = fm.LinenMLP()
  x = fm.mlp_input(jax.random.key(1))
  variables = model.init(jax.random.key(0), x)
  qat = jaxq.quantize_model(model, fm.DYNAMIC_RULES, "qat")
  result = jaxq.inspect(qat.apply, variables, x)
  assert len(result.fallbacks()) == 3
  assert all("qat mode" in r.fallback for r in result.fallbacks())


def test_float_model_is_zero_int8():
  model = fm.LinenMLP()
  x = fm.mlp_input(jax.random.key(1))
  variables = model.init(jax.random.key(0), x)
  result = jaxq.inspect(model.apply, variables, x)
  summary = result.summary()
  assert summary.shares["int8"] == 0.0 and summary.shares["float"] == 1.0
  assert summary.flops == MLP_FLOPS and summary.quantized_flops == 0
  assert all(r.layer is None for r in result.rows)  # No model given.
  assert "MLP/Dense_0" in str(result)  # Still found by its op name.


def test_export_for_cuda_and_tpu_asks_for_int8_dots():
  serve, serving, x = _served_linen("mlp", fm.DYNAMIC_RULES)
  result = jaxq.inspect(serve.apply, serving, x, platforms=("cuda", "tpu"))
  assert result.platforms == ("cuda", "tpu")
  for platform in ("cuda", "tpu"):
    rows = [r for r in result.rows if r.platform == platform]
    assert {r.layer for r in rows} == MLP_PATHS
    for row in rows:
      assert (row.lhs[:3], row.rhs[:3], row.result[:4]) == ("i8[", "i8[",
                                                            "i32["), row
    summary = result.summary(platform)
    assert summary.source == EXPORTED_SOURCE
    assert summary.shares["int8"] == 1.0 and summary.flops == MLP_FLOPS
  assert str(result).count("StableHLO") == 2


def test_unknown_platform_and_missing_platform_raise():
  model = fm.LinenMLP()
  x = fm.mlp_input(jax.random.key(1))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"unknown platform.*'gpu'"):
    jaxq.inspect(model.apply, variables, x, platforms=("gpu",))
  with pytest.raises(ValueError, match="platforms is empty"):
    jaxq.inspect(model.apply, variables, x, platforms=())
  # A platform named twice is inspected once.
  once = jaxq.inspect(model.apply, variables, x, platforms=("tpu",))
  twice = jaxq.inspect(model.apply, variables, x, platforms=("tpu", "tpu"))
  assert twice.platforms == ("tpu",) and twice.rows == once.rows
  result = jaxq.inspect(model.apply, variables, x, platforms=("cpu", "tpu"))
  with pytest.raises(ValueError, match="name one"):
    result.summary()
  with pytest.raises(ValueError, match="no platform 'cuda'"):
    result.summary("cuda")


# What a GPU compiler writes: gemm library calls with their dimension numbers
# in a JSON config, tuple results, operand types inline, and a loop whose
# trip count XLA knows.
GPU_HLO = """\
HloModule jit_f, entry_computation_layout={(s8[64,128]{1,0})->s32[64,32]{1,0}}

%body (p: (s32[], s8[64,128], s32[64,32])) -> (s32[], s8[64,128], \
s32[64,32]) {
  %p = (s32[], s8[64,128]{1,0}, s32[64,32]{1,0}) parameter(0)
  %a = s8[64,128]{1,0} get-tuple-element(%p), index=1
  %w = s8[128,32]{1,0} constant({...})
  %gemm = (s32[64,32]{1,0}, s8[1024]{0}) custom-call(s8[64,128]{1,0} %a, \
s8[128,32]{1,0} %w), custom_call_target="__cublas$gemm", \
metadata={op_name="jit(f)/while/body/Dense_0/dot_general" source_file="x.py" \
source_line=3}, \
backend_config={"gemm_backend_config":{"alpha_real":1,\
"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],\
"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],\
"rhs_batch_dimensions":[]}}}
  ROOT %t = (s32[], s8[64,128]{1,0}, s32[64,32]{1,0}) tuple(%i, %a, %gemm)
}

%cond (q: (s32[], s8[64,128], s32[64,32])) -> pred[] {
  %q = (s32[], s8[64,128]{1,0}, s32[64,32]{1,0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

%fused_conv (param_0: bf16[8,16,16,4], param_1: bf16[3,3,4,8]) -> \
bf16[8,16,16,8] {
  %param_0 = bf16[8,16,16,4]{3,2,1,0} parameter(0)
  %param_1 = bf16[3,3,4,8]{3,2,1,0} parameter(1)
  ROOT %conv = bf16[8,16,16,8]{3,2,1,0} convolution(%param_0, %param_1), \
window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f, \
metadata={op_name="jit(f)/Conv_0/conv_general_dilated"}
}

ENTRY %main (x: s8[64,128]) -> s32[64,32] {
  %x = s8[64,128]{1,0} parameter(0)
  %init = (s32[], s8[64,128]{1,0}, s32[64,32]{1,0}) tuple(%z, %x, %acc)
  %loop = (s32[], s8[64,128]{1,0}, s32[64,32]{1,0}) while(%init), \
condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %img = bf16[8,16,16,4]{3,2,1,0} parameter(1)
  %k = bf16[3,3,4,8]{3,2,1,0} parameter(2)
  %c = bf16[8,16,16,8]{3,2,1,0} fusion(%img, %k), kind=kOutput, \
calls=%fused_conv
  ROOT %out = s32[64,32]{1,0} get-tuple-element(%loop), index=2
}
"""


def test_parse_hlo_reads_gpu_calls_loops_and_fusions():
  gemm, conv = parse_hlo(GPU_HLO, "cuda")
  assert (gemm.op, gemm.kind, gemm.lhs, gemm.rhs, gemm.result) == (
      "__cublas$gemm", "int8", "s8[64,128]", "s8[128,32]", "s32[64,32]")
  assert gemm.count == 4  # The loop's known trip count.
  assert gemm.flops == 4 * 2 * 64 * 32 * 128
  assert gemm.op_name == "jit(f)/while/body/Dense_0/dot_general"
  assert (conv.op, conv.kind, conv.count) == ("convolution", "float", 1)
  # Each output element sums 3 x 3 x 4 products.
  assert conv.flops == 2 * (8 * 16 * 16 * 8) * (3 * 3 * 4)
  assert conv.where == "Conv_0"  # jit(f)/ and the primitive dropped.


def test_model_that_jaxq_did_not_quantize_is_refused():
  model = fm.LinenMLP()
  x = fm.mlp_input(jax.random.key(1))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="model= takes the model that"):
    jaxq.inspect(model.apply, variables, x, model=model)
  nnx_model = fm.NnxMLP(nnx.Rngs(0))
  with pytest.raises(ValueError, match="NnxMLP with no jaxq layer"):
    jaxq.inspect(nnx_model, x, model=nnx_model)
