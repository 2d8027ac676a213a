"""Tests for `jaxq.io.compressed_tensors`: export, import, the on-disk layout.

The layout is checked against an independent NumPy reading of the documented
format (offset-binary int4, eight per int32 word, low nibble first) on every
run; the real ``compressed-tensors`` package's decompression is checked when
it is installed (``pip install jaxq[io]``).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import LAYERS, SCHEMES, hf_name

import jaxq
from jaxq import MX, PerChannel, PerGroup, PerToken, QuantSpec
from jaxq.io import compressed_tensors as ct
from jaxq.io.tensors import CheckpointError


@pytest.fixture(scope="module")
def exported(quantized, tmp_path_factory):
  directory = tmp_path_factory.mktemp("ct") / "model"
  report = ct.save(directory, quantized.serving, hf_name,
                   rules=quantized.rules,
                   config={"architectures": ["MLP"], "hidden_size": 256})
  return directory, report


def _tensors(directory):
  return ct.read_safetensors(os.path.join(directory, ct.WEIGHTS_FILE))


def _kernel(quantized, layer):
  return quantized.serving["params"][layer]["kernel"]


# ------------------------------------------------------------ round trips


def test_name_map_as_a_dict(quantized, tmp_path):
  """A user's table of names: only the layers it names are written/read."""
  names = {"w8a8": "encoder.block.3.mlp", "head": "classifier"}
  serving = {"params": {k: quantized.serving["params"][k] for k in names}}
  report = ct.save(tmp_path / "out", serving, names, rules=quantized.rules)
  assert report.quantized == ("encoder.block.3.mlp",)
  assert report.ignored == ("classifier",)
  stored = _tensors(tmp_path / "out")
  assert {"encoder.block.3.mlp.weight", "encoder.block.3.mlp.weight_scale",
          "classifier.weight", "classifier.bias"} <= set(stored)
  loaded = ct.load(tmp_path / "out", names, quantized.variables)
  assert set(loaded.variables["params"]) == set(names)
  np.testing.assert_array_equal(
      loaded.variables["params"]["w8a8"]["kernel"].values,
      _kernel(quantized, "w8a8").values)


def test_round_trip_is_bit_exact(quantized, exported):
  directory, _ = exported
  loaded = ct.load(directory, hf_name, quantized.variables)
  for layer in LAYERS:
    want, got = _kernel(quantized, layer), loaded.variables["params"][layer][
        "kernel"]
    assert got.spec == want.spec and got.dtype == want.dtype, layer
    for field in ("values", "scale", "zero_point"):
      a, b = getattr(want, field), getattr(got, field)
      assert (a is None) == (b is None), (layer, field)
      if a is not None:
        assert np.asarray(a).dtype == np.asarray(b).dtype, (layer, field)
        np.testing.assert_array_equal(
            np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    np.testing.assert_array_equal(
        loaded.variables["params"][layer]["bias"],
        quantized.serving["params"][layer]["bias"])
  np.testing.assert_array_equal(
      loaded.variables["quant_ranges"]["fp8_channel_static"]["act"]["amax"],
      quantized.serving["quant_ranges"]["fp8_channel_static"]["act"]["amax"])
  assert {r.path_regex: (r.weight, r.act) for r in loaded.rules} == {
      layer: SCHEMES[layer] for layer in LAYERS}
  # Serving the loaded model is serving the exported one, bit for bit.
  serve = jaxq.quantize_model(quantized.model, loaded.rules, "serve")
  want = quantized.serve.apply(quantized.serving, quantized.x)
  got = serve.apply(loaded.variables, quantized.x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_config(exported):
  directory, report = exported
  with open(os.path.join(directory, ct.CONFIG_FILE)) as f:
    config = json.load(f)
  assert config["architectures"] == ["MLP"]
  assert config["torch_dtype"] == "float32"
  q = config["quantization_config"]
  assert q == report.quantization_config
  assert q["quant_method"] == "compressed-tensors"
  assert q["quantization_status"] == "compressed"
  assert q["format"] == "mixed-precision"
  assert q["ignore"] == ["lm_head"]
  assert q["kv_cache_scheme"] is None and q["version"]
  by_target = {t: g for g in q["config_groups"].values() for t in g["targets"]}
  assert set(by_target) == {f"model.{layer}" for layer in LAYERS}
  formats = {t: g["format"] for t, g in by_target.items()}
  assert formats == {
      "model.w4a16": "pack-quantized", "model.w4a16_asym": "pack-quantized",
      "model.w4a16_channel": "pack-quantized", "model.w8a16": "pack-quantized",
      "model.w8a8": "int-quantized",
      "model.fp8_channel_static": "float-quantized",
      "model.fp8_block": "float-quantized"}
  w4 = by_target["model.w4a16"]
  assert (w4["weights"]["num_bits"], w4["weights"]["type"],
          w4["weights"]["strategy"], w4["weights"]["group_size"],
          w4["weights"]["symmetric"]) == (4, "int", "group", 32, True)
  assert w4["input_activations"] is None
  assert not by_target["model.w4a16_asym"]["weights"]["symmetric"]
  w8a8 = by_target["model.w8a8"]
  assert (w8a8["weights"]["strategy"], w8a8["input_activations"]["strategy"],
          w8a8["input_activations"]["dynamic"]) == ("channel", "token", True)
  fp8 = by_target["model.fp8_channel_static"]
  assert (fp8["weights"]["type"], fp8["input_activations"]["strategy"],
          fp8["input_activations"]["dynamic"]) == ("float", "tensor", False)
  block = by_target["model.fp8_block"]["weights"]
  assert (block["strategy"], block["block_structure"]) == ("block",
                                                           [128, 128])
  for group in q["config_groups"].values():
    for args in (group["weights"], group["input_activations"]):
      if args is not None:
        assert {"num_bits", "type", "symmetric", "group_size", "strategy",
                "dynamic", "actorder", "observer"} <= set(args)


# ------------------------------------------------ the layout, independently


def _reference_pack_rows(values: np.ndarray) -> np.ndarray:
  """The documented packing, element by element: row-wise int4 -> int32."""
  rows, cols = values.shape
  words = np.zeros((rows, -(-cols // 8)), np.int64)
  for r in range(rows):
    for i in range(cols):
      nibble = (int(values[r, i]) + 8) & 0xF
      words[r, i // 8] |= nibble << (4 * (i % 8))
  return words.astype(np.uint32).view(np.int32)


def test_pack_quantized_layout(quantized, exported):
  directory, _ = exported
  t = _tensors(directory)
  qa = _kernel(quantized, "w4a16_asym")
  values = np.asarray(qa.values).astype(np.int32).T  # (out, in)
  assert t["model.w4a16_asym.weight_packed"].dtype == np.int32
  assert t["model.w4a16_asym.weight_packed"].shape == (256, 256 // 8)
  np.testing.assert_array_equal(t["model.w4a16_asym.weight_packed"],
                                _reference_pack_rows(values))
  np.testing.assert_array_equal(t["model.w4a16_asym.weight_shape"],
                                [256, 256])
  assert t["model.w4a16_asym.weight_shape"].dtype == np.int64
  scale = t["model.w4a16_asym.weight_scale"]
  assert scale.dtype == np.float32 and scale.shape == (256, 256 // 32)
  np.testing.assert_array_equal(scale, np.asarray(qa.scale).T)
  # Zero points: packed the same way along the output axis.
  zero = np.asarray(qa.zero_point).T  # (out, groups)
  assert t["model.w4a16_asym.weight_zero_point"].shape == (256 // 8, 8)
  np.testing.assert_array_equal(t["model.w4a16_asym.weight_zero_point"],
                                _reference_pack_rows(zero.T).T)
  # Dense weights from the file by the documented formula, in NumPy.
  group = np.repeat(np.arange(8), 32)
  dense = (values - zero[:, group]).astype(np.float32) * scale[:, group]
  np.testing.assert_array_equal(
      dense, np.asarray(jaxq.dequantize(qa)).T)
  assert "model.w4a16.weight_zero_point" not in t
  # 8-bit weight-only: four per word, offset 128.
  w8 = np.asarray(_kernel(quantized, "w8a16").values).astype(np.int64).T
  words = t["model.w8a16.weight_packed"].view(np.uint32).astype(np.int64)
  assert words.shape == (256, 64)
  for j in range(4):
    np.testing.assert_array_equal((words >> (8 * j)) & 0xFF,
                                  w8[:, j::4] + 128)


def test_int_and_float_quantized_layout(quantized, exported):
  directory, _ = exported
  t = _tensors(directory)
  w8 = _kernel(quantized, "w8a8")
  assert t["model.w8a8.weight"].dtype == np.int8
  np.testing.assert_array_equal(t["model.w8a8.weight"],
                                np.asarray(w8.values).T)
  assert t["model.w8a8.weight_scale"].shape == (256, 1)
  fp8 = _kernel(quantized, "fp8_channel_static")
  assert t["model.fp8_channel_static.weight"].dtype == ml_dtypes.float8_e4m3fn
  np.testing.assert_array_equal(
      t["model.fp8_channel_static.weight"].view(np.uint8),
      np.asarray(fp8.values).T.view(np.uint8))
  amax = quantized.serving["quant_ranges"]["fp8_channel_static"]["act"][
      "amax"]
  input_scale = t["model.fp8_channel_static.input_scale"]
  assert input_scale.shape == (1,) and input_scale.dtype == np.float32
  act_spec = SCHEMES["fp8_channel_static"][1]
  np.testing.assert_array_equal(
      input_scale, np.asarray(jaxq.scale_from_range(act_spec, amax)[0]
                              ).reshape(1))
  block = _kernel(quantized, "fp8_block")
  assert t["model.fp8_block.weight_scale"].shape == (2, 2)
  np.testing.assert_array_equal(t["model.fp8_block.weight_scale"],
                                np.asarray(block.scale).T)
  assert "model.fp8_block.input_scale" not in t
  # The float head: PyTorch (out, in).
  np.testing.assert_array_equal(
      t["lm_head.weight"], np.asarray(quantized.serving["params"]["head"][
          "kernel"]).T)


def test_pack_unpack_inverse_and_ragged():
  rng = np.random.default_rng(0)
  for bits, cols in ((4, 40), (4, 33), (8, 10)):
    low = -(1 << (bits - 1))
    v = rng.integers(low, -low, (3, cols)).astype(np.int8)
    words = ct.pack_int32(v, bits)
    assert words.shape == (3, -(-cols * bits // 32))
    np.testing.assert_array_equal(ct.unpack_int32(words, bits, cols), v)
    np.testing.assert_array_equal(
        ct.unpack_int32(ct.pack_int32(v, bits, axis=0), bits, 3, axis=0), v)


def test_scale_dtype_rounds_only_the_scales(quantized, tmp_path):
  ct.save(tmp_path, quantized.serving, hf_name, rules=quantized.rules,
          scale_dtype=jnp.bfloat16)
  t = _tensors(tmp_path)
  assert t["model.w4a16.weight_scale"].dtype == ml_dtypes.bfloat16
  loaded = ct.load(tmp_path, hf_name, quantized.variables)
  want = _kernel(quantized, "w4a16")
  got = loaded.variables["params"]["w4a16"]["kernel"]
  np.testing.assert_array_equal(np.asarray(got.values), np.asarray(want.values))
  np.testing.assert_array_equal(
      np.asarray(got.scale),
      np.asarray(want.scale).astype(ml_dtypes.bfloat16).astype(np.float32))


def test_kv_cache_scales(quantized, tmp_path):
  report = ct.save(tmp_path, quantized.serving, hf_name,
                   rules=quantized.rules, kv_cache_scales={
                       "model.attn": (np.float32(0.5), np.float32(0.25))})
  t = _tensors(tmp_path)
  assert float(t["model.attn.k_scale"]) == 0.5
  assert float(t["model.attn.v_scale"]) == 0.25
  scheme = report.quantization_config["kv_cache_scheme"]
  assert (scheme["type"], scheme["num_bits"], scheme["strategy"],
          scheme["dynamic"]) == ("float", 8, "tensor", False)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("weight, act, match", [
    (QuantSpec("float8_e4m3fn", MX(axis=0)), None, "MX"),
    (QuantSpec("int8", PerChannel(axis=-1)), QuantSpec("int4", PerToken()),
     "int4"),
    (QuantSpec("int8", PerChannel(axis=0)), None, "no compressed-tensors"),
    (QuantSpec("int4", PerGroup(axis=0, size=24)), None, "does not divide"),
    (QuantSpec("uint8", PerChannel(axis=-1), symmetric=False), None,
     "uint8"),
])
def test_unsupported_specs_raise_before_writing(quantized, tmp_path, weight,
                                                act, match):
  w = jax.random.normal(jax.random.key(2), (256, 256))
  serving = {"params": {"proj": {"kernel": jaxq.quantize(w, weight)}}}
  rules = [jaxq.Rule("proj", weight=weight, act=act)]
  directory = tmp_path / "out"
  with pytest.raises(ValueError, match=f"(?s)'proj'.*{match}"):
    ct.save(directory, serving, {"proj": "model.proj"}, rules=rules)
  assert not directory.exists()


def test_unnamed_quantized_layer_raises(quantized, tmp_path):
  with pytest.raises(ValueError, match="'w4a16' is quantized.*no Hugging"):
    ct.save(tmp_path / "out", quantized.serving,
            lambda p: None if p == "w4a16" else hf_name(p))
  assert not (tmp_path / "out").exists()


def test_load_errors(quantized, exported, tmp_path):
  directory, _ = exported
  with pytest.raises(CheckpointError, match="no config.json"):
    ct.load(tmp_path, hf_name, quantized.variables)
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / ct.CONFIG_FILE).write_bytes(
      (directory / ct.CONFIG_FILE).read_bytes())
  data = (directory / ct.WEIGHTS_FILE).read_bytes()
  (broken / ct.WEIGHTS_FILE).write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match="truncated or corrupted"):
    ct.load(broken, hf_name, quantized.variables)
  t = _tensors(directory)
  for name, edit, match in (
      ("model.w4a16.weight_packed", lambda x: x[:, :-1],
       "model.w4a16.weight_packed is int32"),
      ("model.w4a16.weight_scale", lambda x: x[:, :-1],
       "model.w4a16.weight_scale has shape"),
      ("model.w4a16_asym.weight_zero_point", None,
       "model.w4a16_asym.weight_zero_point is missing"),
      ("model.fp8_channel_static.input_scale", None,
       "model.fp8_channel_static.input_scale is missing"),
      ("lm_head.bias", None, "lm_head.bias .*is missing"),
      ("lm_head.weight", lambda x: x[:-1], "lm_head.weight has shape"),
      ("model.w4a16.weight_g_idx", "add", "act-order"),
  ):
    edited = dict(t)
    if edit is None:
      del edited[name]
    elif edit == "add":
      edited[name] = np.random.default_rng(0).permutation(256) // 32
    else:
      edited[name] = np.ascontiguousarray(edit(t[name]))
    _write(broken / ct.WEIGHTS_FILE, edited)
    with pytest.raises(CheckpointError, match=match):
      ct.load(broken, hf_name, quantized.variables)
  # The contiguous group order is accepted as the plain groups.
  edited = dict(t)
  edited["model.w4a16.weight_g_idx"] = np.arange(256) // 32
  _write(broken / ct.WEIGHTS_FILE, edited)
  loaded = ct.load(broken, hf_name, quantized.variables)
  np.testing.assert_array_equal(
      loaded.variables["params"]["w4a16"]["kernel"].values,
      _kernel(quantized, "w4a16").values)


def _write(path, tensors):
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  safetensors.numpy.save_file(
      {k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))


# ------------------------------------- the real compressed-tensors package


def test_compressed_tensors_package_decompresses_to_jaxq_weights(
    quantized, exported):
  """compressed-tensors' own config parsing and compressors, on our files."""
  pytest.importorskip("torch")
  pytest.importorskip("compressed_tensors")
  import torch  # pylint: disable=g-import-not-at-top
  from compressed_tensors.compressors import BaseCompressor  # pylint: disable=g-import-not-at-top
  from compressed_tensors.quantization import QuantizationConfig  # pylint: disable=g-import-not-at-top
  from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top

  directory, _ = exported
  with open(os.path.join(directory, ct.CONFIG_FILE)) as f:
    config = QuantizationConfig.model_validate(
        json.load(f)["quantization_config"])
  tensors = load_file(os.path.join(directory, ct.WEIGHTS_FILE))
  checked = set()
  for scheme in config.config_groups.values():
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    for module in scheme.targets:
      layer = module.split(".", 1)[1]
      local = {k[len(module) + 1:]: v for k, v in tensors.items()
               if k.startswith(module + ".") and k.count(".") == 2}
      assert set(compressor.compression_param_names(scheme)) == (
          set(local) - {"input_scale", "bias"}), module
      decompressed = compressor.decompress(dict(local), scheme)
      dense = decompressed["weight"]
      want = np.asarray(jaxq.dequantize(_kernel(quantized, layer))).T
      np.testing.assert_array_equal(dense.float().numpy(), want)
      # And compressing those dense weights with our scales gives our bits.
      again = compressor.compress(decompressed, scheme)
      for name in ("weight", "weight_packed", "weight_zero_point"):
        if name in local:
          assert torch.equal(again[name].view(torch.uint8) if again[
              name].dtype == torch.float8_e4m3fn else again[name],
                             local[name].view(torch.uint8) if local[
                                 name].dtype == torch.float8_e4m3fn else
                             local[name]), (module, name)
      checked.add(layer)
  assert checked == set(LAYERS)
