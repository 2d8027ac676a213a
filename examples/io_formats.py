"""Quantized weights in and out of jaxq on real models: compressed-tensors
export and reload, SmolLM2 served from its GGUF blocks.

* MiniLM (all-MiniLM-L6-v2, `examples/minilm.py`): its 36 Dense layers as
  W8A8 (int8 per output channel, dynamic int8 per-token activations:
  compressed-tensors' ``int-quantized``) and W4A16 (int4 groups of 32:
  ``pack-quantized``), written with `jaxq.io.compressed_tensors.save` under
  the Hugging Face names of the original checkpoint, read back with
  ``load`` and served: the reloaded model's embeddings equal the exported
  model's bit for bit.
* SmolLM2-135M (`examples/smollm.py`): its 210 Dense layers W4A16 g32 by
  GPTQ, exported, reloaded, perplexity served from the reloaded files equal
  to the exported model's.
* The reloaded MiniLM models through ``jax.export`` (`jaxq.io.exported`)
  for cpu, cuda and tpu, reloaded and run on the CPU: equal to the live
  model.
* With ``--sections transformers`` (torch, transformers, compressed-tensors
  installed): the SmolLM2 export loaded by Hugging Face transformers, its
  logits against jaxq's.
* SmolLM2 served from its GGUF file's Q4_1 / Q8_0 blocks, not dequantized
  (`smollm.quantized_params_from_gguf`): held-out perplexity against the
  dequantized float reference, and the bytes each holds.

Every row prints the file's bytes beside the same parameters in float32.

Run: python examples/io_formats.py --out /tmp/jaxq_io [--sections minilm
smollm gguf] [--windows N]; ``--quick`` runs every section on a sliver (8
sentences, SmolLM2 cut after 2 blocks, 64-token windows) to check the
mechanics, not the numbers (`tests/io/test_io_formats_example.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

import jaxq
import minilm
import smollm
from jaxq import PerChannel, PerGroup, PerToken, QuantSpec
from jaxq.convert import tree_bytes
from jaxq.io import compressed_tensors as ct
from jaxq.io import exported as exported_lib

MINILM_DENSE = r"layers_\d+/(attention/(query|key|value|output)|ffn_in|ffn_out)"
SMOLLM_DENSE = r"layers_\d+/(self_attn|mlp)/\w+_proj"
W8A8 = (QuantSpec("int8", PerChannel(axis=-1)), QuantSpec("int8", PerToken()))
W4A16_G32 = (QuantSpec("int4", PerGroup(axis=0, size=32)), None)


def minilm_names(config: minilm.BertConfig) -> dict[str, str]:
  """MiniLM layer path -> the Hugging Face module name of its checkpoint."""
  return {"/".join(path[:-1]): name.rsplit(".", 1)[0]
          for path, name in minilm.checkpoint_names(config).items()}


def smollm_hf_config(config: smollm.LlamaConfig) -> dict[str, Any]:
  """The Hugging Face ``config.json`` fields of a SmolLM2 config."""
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
          "intermediate_size": config.intermediate_size,
          "num_hidden_layers": config.num_layers,
          "num_attention_heads": config.num_heads,
          "num_key_value_heads": config.num_kv_heads,
          "head_dim": config.head_dim, "rope_theta": config.rope_theta,
          "rms_norm_eps": config.rms_norm_eps,
          "max_position_embeddings": config.max_length,
          "tie_word_embeddings": True, "hidden_act": "silu",
          "torch_dtype": "float32"}


def _row(name: str, report: ct.ExportReport, seconds: float,
         quality: str) -> str:
  return (f"| {name} | {report.file_bytes / 1e6:.1f} | "
          f"{report.float_bytes / 1e6:.1f} | {report.ratio:.2f}x | "
          f"{quality} | {seconds:.0f} |")


def minilm_section(out: pathlib.Path, num_sentences: int | None = None
                   ) -> list[str]:
  """MiniLM W8A8 and W4A16 g32: export, reload, embeddings compared (on the
  first ``num_sentences`` sentences, all by default)."""
  pretrained = minilm.load_pretrained()
  config = pretrained.model.config
  hf_config = json.loads((minilm.model_dir() / "config.json").read_text())
  sentences = minilm.read_sentences(minilm.SENTENCES_FILE)[:num_sentences]
  reference = minilm.embed(pretrained, sentences)
  names = minilm_names(config)
  rows = []
  for label, (weight, act) in {"MiniLM W8A8 int8": W8A8,
                               "MiniLM W4A16 g32": W4A16_G32}.items():
    start = time.perf_counter()
    rules = [jaxq.Rule(MINILM_DENSE, weight=weight, act=act)]
    serve = jaxq.quantize_model(pretrained.model, rules, "serve")
    # One abstract trace tells linen's wrapper its layers (no calibration:
    # abs-max weights, dynamic or no activation quantization).
    jax.eval_shape(serve.apply, pretrained.variables,
                   *minilm.tokenize(pretrained.tokenizer, sentences[:2]))
    serving, _ = jaxq.convert(serve, pretrained.variables)
    directory = out / re.sub(r"\W+", "_", label.lower())
    report = ct.save(directory, serving, names, rules=rules, config=hf_config)
    loaded = ct.load(directory, names, pretrained.variables["params"])
    reloaded = jaxq.quantize_model(pretrained.model, loaded.rules, "serve")
    exported = minilm.embed(pretrained, sentences, variables=serving,
                            apply_fn=serve.apply)
    back = minilm.embed(pretrained, sentences, variables=loaded.variables,
                        apply_fn=reloaded.apply)
    seconds = time.perf_counter() - start
    if not np.array_equal(exported, back):
      raise AssertionError(f"{label}: the reloaded model's embeddings differ "
                           f"from the exported model's.")
    cosine = float(np.mean(np.sum(exported * reference, axis=-1)))
    print(f"{report}\n  reloaded == exported (bit-exact); mean cosine to "
          f"float {cosine:.5f}", flush=True)
    rows.append(_row(label, report, seconds, f"cosine {cosine:.5f}, "
                     f"reloaded bit-exact"))
    program_bytes = jax_export_check(reloaded.apply, loaded.variables,
                                     minilm.tokenize(pretrained.tokenizer,
                                                     sentences[:8]),
                                     directory / "model.jaxexport")
    print(f"  jax.export for cpu, cuda, tpu: {program_bytes:,} bytes, "
          f"reloaded on the CPU == live (bit-exact)", flush=True)
  return rows


def jax_export_check(apply: Any, variables: Any, args: Sequence[Any],
                     path: pathlib.Path) -> int:
  """Exports ``apply`` for cpu, cuda and tpu, reloads it, checks it equals
  the live jitted function on this CPU; returns the program's bytes."""
  program = exported_lib.export(apply, variables, *args)
  size = exported_lib.save(path, program)
  got = exported_lib.call(exported_lib.load(path), variables, *args)
  if not np.array_equal(got, jax.jit(apply)(variables, *args)):
    raise AssertionError("the reloaded jax.export program differs from the "
                         "live model.")
  return size


def _smollm(num_layers: int | None) -> smollm.Pretrained:
  pretrained = smollm.load_pretrained()
  return pretrained if num_layers is None else pretrained.truncated(
      num_layers)


def smollm_section(out: pathlib.Path, windows: np.ndarray, calibration: int,
                   num_layers: int | None = None) -> list[str]:
  """SmolLM2 W4A16 g32 GPTQ: export, reload, perplexity compared.

  ``calibration`` windows of the evaluation windows' length, in batches of
  4; ``num_layers`` cuts the model after its first blocks (`--quick`).
  """
  pretrained = _smollm(num_layers)
  config = pretrained.config
  start = time.perf_counter()
  weight, _ = W4A16_G32
  rules = [jaxq.Rule(SMOLLM_DENSE, weight=weight)]
  cal = jaxq.quantize_model(pretrained.model, rules, "calibrate")
  length = windows.shape[1]
  batches = list(smollm.calibration_windows(length, calibration).reshape(
      -1, 4, length))
  variables = jaxq.gptq(cal, pretrained.variables, batches, progress=False)
  result = jaxq.calibrate(cal, variables, batches, progress=False)
  serve = cal.with_mode("serve")
  serving, _ = jaxq.convert(serve, variables, result.stats)
  names = smollm.hf_names(config)
  directory = out / "smollm2_w4a16_g32_gptq"
  report = ct.save(directory, serving, names, rules=rules,
                   config=smollm_hf_config(config))
  loaded = ct.load(directory, names, pretrained.variables["params"])
  reloaded = jaxq.quantize_model(pretrained.model, loaded.rules, "serve")
  seconds = time.perf_counter() - start
  tokens = windows[:1]
  if not np.array_equal(jax.jit(serve.apply)(serving, tokens),
                        jax.jit(reloaded.apply)(loaded.variables, tokens)):
    raise AssertionError("SmolLM2: the reloaded model's logits differ from "
                         "the exported model's.")
  float_ppl = smollm.perplexity(pretrained.model.apply, pretrained.variables,
                                windows)
  ppl = smollm.perplexity(reloaded.apply, loaded.variables, windows)
  print(f"{report}\n  reloaded == exported (bit-exact logits); perplexity "
        f"{ppl:.3f} (float {float_ppl:.3f})", flush=True)
  return [_row("SmolLM2 W4A16 g32 GPTQ", report, seconds,
               f"perplexity {ppl:.3f} (float {float_ppl:.3f}), reloaded "
               f"bit-exact")]


def transformers_section(out: pathlib.Path, windows: np.ndarray,
                         num_layers: int | None = None) -> list[str]:
  """The SmolLM2 export loaded by Hugging Face transformers (PyTorch, its
  compressed-tensors integration): logits against jaxq serving the same
  directory. Needs torch, transformers and compressed-tensors."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  directory = out / "smollm2_w4a16_g32_gptq"
  pretrained = _smollm(num_layers)
  names = smollm.hf_names(pretrained.config)
  loaded = ct.load(directory, names, pretrained.variables["params"])
  serve = jaxq.quantize_model(pretrained.model, loaded.rules, "serve")
  tokens = windows[:1, :64]
  ours = np.asarray(jax.jit(serve.apply)(loaded.variables, tokens))
  model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32)
  with torch.no_grad():
    theirs = model(torch.tensor(np.asarray(tokens), dtype=torch.long)
                   ).logits.numpy()
  diff = float(np.max(np.abs(ours - theirs)))
  agree = float(np.mean(ours.argmax(-1) == theirs.argmax(-1)))
  print(f"transformers {transformers.__version__} on {directory}: max |logit "
        f"difference| {diff:.2e} (logits up to "
        f"{float(np.max(np.abs(theirs))):.1f}), argmax agreement "
        f"{agree:.3f} over {tokens.shape[1]} tokens", flush=True)
  rows = [f"| SmolLM2 W4A16 g32 GPTQ loaded by transformers | | | | max "
          f"logit difference {diff:.1e} vs jaxq, argmax agreement "
          f"{agree:.3f} | |"]
  return rows + minilm_transformers(out, torch, transformers)


def minilm_transformers(out: pathlib.Path, torch: Any,
                        transformers: Any) -> list[str]:
  """The MiniLM exports loaded by transformers: mean-pooled embeddings
  against jaxq serving the same directories."""
  pretrained = minilm.load_pretrained()
  sentences = minilm.read_sentences(minilm.SENTENCES_FILE)[:16]
  names = minilm_names(pretrained.model.config)
  batch = minilm.tokenize(pretrained.tokenizer, sentences)
  mask = batch.attention_mask[..., None].astype(np.float32)
  rows = []
  for label in ("MiniLM W8A8 int8", "MiniLM W4A16 g32"):
    directory = out / re.sub(r"\W+", "_", label.lower())
    loaded = ct.load(directory, names, pretrained.variables["params"])
    serve = jaxq.quantize_model(pretrained.model, loaded.rules, "serve")
    ours = minilm.embed(pretrained, sentences, variables=loaded.variables,
                        apply_fn=serve.apply)
    model = transformers.AutoModel.from_pretrained(directory,
                                                   dtype=torch.float32)
    with torch.no_grad():
      hidden = model(**{k: torch.tensor(np.asarray(v), dtype=torch.long)
                        for k, v in batch._asdict().items()}
                     ).last_hidden_state.numpy()
    theirs = (hidden * mask).sum(1) / mask.sum(1)
    theirs /= np.linalg.norm(theirs, axis=-1, keepdims=True)
    diff = float(np.max(np.abs(ours - theirs)))
    cosine = float(np.min(np.sum(ours * theirs, axis=-1)))
    print(f"transformers on {directory}: max |embedding difference| "
          f"{diff:.2e}, min cosine {cosine:.5f}", flush=True)
    rows.append(f"| {label} loaded by transformers | | | | max embedding "
                f"difference {diff:.1e} vs jaxq, min cosine {cosine:.5f} "
                f"| |")
  return rows


def gguf_section(windows: np.ndarray, num_layers: int | None = None
                 ) -> list[str]:
  """SmolLM2 served from its GGUF blocks vs the dequantized reference (the
  first ``num_layers`` blocks only, with `--quick`)."""
  pretrained = _smollm(num_layers)
  start = time.perf_counter()
  params, rules = smollm.quantized_params_from_gguf(
      smollm.read_gguf(smollm.gguf_path()), pretrained.config)
  serve = jaxq.quantize_model(pretrained.model, rules, "serve")
  seconds = time.perf_counter() - start
  served = smollm.perplexity(serve.apply, {"params": params}, windows)
  reference = smollm.perplexity(pretrained.model.apply, pretrained.variables,
                                windows)
  held, float_bytes = tree_bytes(params), tree_bytes(pretrained.variables)
  file_bytes = os.path.getsize(smollm.gguf_path())
  print(f"SmolLM2 GGUF blocks served: perplexity {served:.4f}, dequantized "
        f"reference {reference:.4f}; {held / 1e6:.1f} MB held "
        f"({held / float_bytes:.2f}x the float32 {float_bytes / 1e6:.1f} MB; "
        f"file {file_bytes / 1e6:.1f} MB)", flush=True)
  return [f"| SmolLM2 GGUF Q4_1/Q8_0, served as loaded | "
          f"{file_bytes / 1e6:.1f} (file), {held / 1e6:.1f} (held) | "
          f"{float_bytes / 1e6:.1f} | {float_bytes / held:.2f}x | "
          f"perplexity {served:.4f} (dequantized float {reference:.4f}) | "
          f"{seconds:.0f} |"]


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, required=True,
                      help="directory for the compressed-tensors exports")
  parser.add_argument("--sections", nargs="*", default=["minilm", "smollm",
                                                        "gguf"],
                      choices=["minilm", "smollm", "transformers", "gguf"],
                      help="transformers (torch, transformers and "
                           "compressed-tensors installed) loads the smollm "
                           "section's export")
  parser.add_argument("--windows", type=int, default=None,
                      help="held-out windows for perplexity (default 8; "
                           "--quick: 1)")
  parser.add_argument("--calibration-windows", type=int, default=None,
                      help="GPTQ calibration windows, a multiple of 4 "
                           "(default 16; --quick: 4)")
  parser.add_argument("--quick", action="store_true",
                      help="a sliver of each section: 8 MiniLM sentences, "
                           "SmolLM2 cut after 2 blocks, 64-token windows")
  args = parser.parse_args(argv)
  # --quick shrinks the defaults; windows asked for explicitly still count.
  length, sentences, num_layers = (64, 8, 2) if args.quick else (256, None,
                                                                 None)
  windows = smollm.evaluation_windows(
      length, args.windows or (1 if args.quick else 8))
  calibration = args.calibration_windows or (4 if args.quick else 16)
  rows = ["| model, scheme | file MB | float32 MB | smaller | quality | "
          "s |", "| --- | --- | --- | --- | --- | --- |"]
  if "minilm" in args.sections:
    rows += minilm_section(args.out, sentences)
  if "smollm" in args.sections:
    rows += smollm_section(args.out, windows, calibration, num_layers)
  if "transformers" in args.sections:
    rows += transformers_section(args.out, windows, num_layers)
  if "gguf" in args.sections:
    rows += gguf_section(windows, num_layers)
  print("\n".join(rows))


if __name__ == "__main__":
  main()
