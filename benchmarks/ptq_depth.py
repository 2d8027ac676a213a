"""PTQ algorithms against depth: block by block versus the whole model.

A linen Llama-style decoder (`Decoder`: token embedding, ``depth`` blocks
``layers_<i>`` called as ``block(x, cos, sin, mask)`` with RMSNorm, grouped
query attention with RoPE, SwiGLU; final norm, head) is quantized W4 per
channel on its 7 Dense layers per block (q, k, v, o, gate, up, down; the
embedding and head stay float) by `jaxq.gptq`, `jaxq.awq` and
`jaxq.smoothquant` (alpha 0.5, W8A8), each two ways on the same batches:

* ``jaxq``: the default ``blocks=True``, walking the model block by block
  (`jaxq.ptq.blocks`): time and memory linear in depth;
* ``jaxq-whole``: ``blocks=False``, capturing with the whole model (every
  layer's inputs held; GPTQ runs the whole model once per layer).

Each case runs in a fresh subprocess, once, compilation included (what a
user waits for): ``median_s`` is that one wall time, ``cpu_s`` the
process's CPU time over all its threads (steadier than wall time on a
machine shared with other work), ``peak_mb`` the
process's peak resident memory over the run (``ru_maxrss``) and ``rise_mb``
its rise over the resident memory before the algorithm started (model and
batches built). ``ratio`` is the time over the ``jaxq-whole`` time of the
same algorithm and depth. ``max_diff`` is the largest difference of any
variable between the two ways (the same results, up to float rounding).

Default: d=64, hidden 128, 4/2 heads, 4 batches of 64 tokens, depths 10,
20 and 30, both ways (a few minutes on 2 CPU cores). ``--quick``: depths 2
and 4, d=32. ``--smollm``: SmolLM2-135M's widths (d=576, hidden 1536, 9/3
heads of 64, vocab 49152 replaced by 512 since the embedding stays float)
on 16 batches of 256 tokens, ``jaxq`` only unless ``--whole`` (46 minutes
for GPTQ at 30 blocks before this walk existed).

``python benchmarks/ptq_depth.py [--quick] [--smollm [--whole]]
[--depths 10 20 30] [--algorithms gptq awq smoothquant] [--json PATH]``
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import _harness  # noqa: E402
import jaxq  # noqa: E402
from jaxq import PerChannel, PerTensor, QuantSpec  # noqa: E402

ALGORITHMS = ("gptq", "awq", "smoothquant")
VOCAB = 512


class Block(nn.Module):
  """A Llama block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  dim: int
  hidden: int
  heads: int
  kv_heads: int

  @nn.compact
  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
               mask: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    head_dim = self.dim // self.heads
    h = nn.RMSNorm(name="attn_norm")(x)
    q = nn.Dense(self.dim, use_bias=False, name="q")(h)
    k = nn.Dense(self.kv_heads * head_dim, use_bias=False, name="k")(h)
    v = nn.Dense(self.kv_heads * head_dim, use_bias=False, name="v")(h)
    q = q.reshape(b, t, self.heads, head_dim)
    k = k.reshape(b, t, self.kv_heads, head_dim)
    v = v.reshape(b, t, self.kv_heads, head_dim)

    def rope(u: jax.Array) -> jax.Array:
      u1, u2 = jnp.split(u, 2, axis=-1)
      return jnp.concatenate([u1 * cos - u2 * sin, u2 * cos + u1 * sin], -1)

    q, k = rope(q), rope(k)
    group = self.heads // self.kv_heads
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(head_dim)
    probs = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
    att = jnp.einsum("bhts,bshd->bthd", probs, v).reshape(b, t, self.dim)
    x = x + nn.Dense(self.dim, use_bias=False, name="o")(att)
    h = nn.RMSNorm(name="mlp_norm")(x)
    gate = nn.Dense(self.hidden, use_bias=False, name="gate")(h)
    up = nn.Dense(self.hidden, use_bias=False, name="up")(h)
    return x + nn.Dense(self.dim, use_bias=False, name="down")(
        nn.silu(gate) * up)


class Decoder(nn.Module):
  """Embedding, ``depth`` blocks ``layers_<i>``, final norm and head."""

  depth: int
  dim: int
  hidden: int
  heads: int
  kv_heads: int

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    t = tokens.shape[1]
    half = self.dim // self.heads // 2
    angles = (jnp.arange(t)[:, None] *
              1e4 ** (-jnp.arange(half) / half))[:, None, :]  # (t, 1, half)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    mask = jnp.tril(jnp.ones((t, t), bool))
    x = nn.Embed(VOCAB, self.dim, name="embed")(tokens)
    for i in range(self.depth):
      x = Block(self.dim, self.hidden, self.heads, self.kv_heads,
                name=f"layers_{i}")(x, cos, sin, mask)
    return nn.Dense(VOCAB, use_bias=False, name="head")(
        nn.RMSNorm(name="norm")(x))


def _setup(depth: int, dim: int, hidden: int, heads: int, kv_heads: int,
           batches: int, tokens: int, algorithm: str):
  model = Decoder(depth, dim, hidden, heads, kv_heads)
  data = [jax.random.randint(jax.random.key(i), (1, tokens), 0, VOCAB)
          for i in range(batches)]
  variables = jax.jit(model.init)(jax.random.key(99), data[0])
  act = (QuantSpec("int8", PerTensor(), dynamic=False)
         if algorithm == "smoothquant" else None)
  rules = (jaxq.Rule(r"layers_\d+/.*", weight=QuantSpec("int4",
                                                        PerChannel(-1)),
                     act=act),
           jaxq.Rule(r".*", skip=True))
  cal = jaxq.quantize_model(model, rules, mode="calibrate")
  jax.eval_shape(lambda v: cal.apply(v, data[0], mutable=["quant_stats"]),
                 variables)
  return cal, variables, data


def _run(algorithm: str, cal, variables, data, blocks: bool):
  if algorithm == "gptq":
    return jaxq.gptq(cal, variables, data, blocks=blocks, progress=False)
  if algorithm == "awq":
    return jaxq.awq(cal, variables, data, blocks=blocks, progress=False)
  return jaxq.smoothquant(cal, variables, data, alpha=0.5, blocks=blocks,
                          progress=False)


def _rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _case(args: list[str]) -> None:
  """One measured run in this (fresh) process; prints its JSON result."""
  algorithm, blocks, out = args[0], args[1] == "1", args[2]
  sizes = [int(a) for a in args[3:]]
  cal, variables, data = _setup(*sizes, algorithm)
  before = _rss_mb()
  start, cpu = time.perf_counter(), time.process_time()
  result = jax.block_until_ready(_run(algorithm, cal, variables, data,
                                      blocks))
  seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  flat = {"/".join(map(str, k)): np.asarray(v) for k, v in
          jax.tree_util.tree_flatten_with_path(result)[0]}
  np.savez(out, **flat)
  print(json.dumps({"seconds": seconds, "cpu_s": cpu, "peak_mb": peak,
                    "rise_mb": peak - before}))


def _measure(algorithm: str, blocks: bool, sizes: list[int], out: str
             ) -> dict:
  done = subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--case", algorithm,
       "1" if blocks else "0", out, *map(str, sizes)],
      capture_output=True, text=True, check=False)
  if done.returncode:
    raise RuntimeError(done.stderr[-3000:])
  return json.loads(done.stdout.strip().splitlines()[-1])


def _max_diff(a: str, b: str) -> float:
  with np.load(a) as x, np.load(b) as y:
    assert sorted(x.files) == sorted(y.files)
    return max(float(np.max(np.abs(x[k].astype(np.float64) - y[k])))
               for k in x.files)


def main() -> None:
  if len(sys.argv) > 1 and sys.argv[1] == "--case":
    _case(sys.argv[2:])
    return
  p = _harness.parser(__doc__.splitlines()[0])
  p.add_argument("--smollm", action="store_true",
                 help="SmolLM2-135M widths, 16 x 256 tokens")
  p.add_argument("--whole", action="store_true",
                 help="with --smollm: also the whole-model path (slow)")
  p.add_argument("--depths", type=int, nargs="+", default=None)
  p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS),
                 choices=ALGORITHMS)
  args = p.parse_args()
  if args.smollm:
    widths, batches, tokens, depths = (576, 1536, 9, 3), 16, 256, [10, 20, 30]
  elif args.quick:
    widths, batches, tokens, depths = (32, 64, 4, 2), 2, 16, [2, 4]
  else:
    widths, batches, tokens, depths = (64, 128, 4, 2), 4, 64, [10, 20, 30]
  depths = args.depths or depths
  both = not args.smollm or args.whole
  rows = []
  tmp = os.environ.get("TMPDIR", "/tmp")
  for algorithm in args.algorithms:
    for depth in depths:
      sizes = [depth, *widths, batches, tokens]
      case = f"{algorithm} depth {depth}"
      files = {b: os.path.join(tmp, f"ptq_depth_{os.getpid()}_{b}.npz")
               for b in (True, False)}
      measured = {True: _measure(algorithm, True, sizes, files[True])}
      if both:
        measured[False] = _measure(algorithm, False, sizes, files[False])
      diff = _max_diff(files[True], files[False]) if both else "-"
      base = measured[False]["seconds"] if both else measured[True]["seconds"]
      print(f"{case}: {measured}", file=sys.stderr, flush=True)
      for blocks, m in measured.items():
        rows.append({"case": case, "impl": "jaxq" if blocks else "jaxq-whole",
                     "median_s": m["seconds"], "ratio": m["seconds"] / base,
                     "cpu_s": m["cpu_s"],
                     "peak_mb": m["peak_mb"], "rise_mb": m["rise_mb"],
                     "max_diff": diff})
      for f in files.values():
        if os.path.exists(f):
          os.remove(f)
  note = (f"d={widths[0]}, hidden {widths[1]}, heads {widths[2]}/"
          f"{widths[3]}, {batches} x {tokens} tokens; one run each, compile "
          f"included; ratio: time over jaxq-whole's")
  _harness.emit("ptq_depth", rows, args.json, note=note)


if __name__ == "__main__":
  main()
