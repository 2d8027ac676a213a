"""Every script in ``benchmarks/`` runs with ``--quick`` and writes the JSON
the convention in DESIGN.md promises: ``{"benchmark", "device", "rows"}``,
each row with ``case``, ``impl``, ``median_s`` and ``ratio``. Speed itself
is never asserted here; what the rows say about correctness is.

``gpu.py --quick`` runs ``matmul.py``, ``qat_overhead.py`` and ``decode.py``
with the quick arguments their own tests want, so one module-scoped run of it
(kept whole on one xdist worker by tests/conftest.py) serves all four tests:
it keeps each script's JSON (``--script-json``) and passes each script's
stdout through."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _run(name: str, tmp_path: pathlib.Path, *args: str) -> list[dict]:
  out = tmp_path / f"{name}.json"
  done = subprocess.run(
      [sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick", "--json",
       str(out), *args], capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return _check(name, done.stdout, out)


def _check(name: str, stdout: str, out: pathlib.Path) -> list[dict]:
  """The convention's checks of NAME.py's stdout and its JSON file ``out``;
  returns the rows."""
  # The table goes to stdout as well as the file.
  assert f"# {name} on " in stdout
  result = json.loads(out.read_text())
  assert result["benchmark"] == name and result["device"]
  rows = result["rows"]
  assert rows
  for row in rows:
    assert {"case", "impl", "median_s", "ratio"} <= set(row), row
    assert row["median_s"] > 0 and math.isfinite(row["median_s"]), row
    assert row["ratio"] > 0 and math.isfinite(row["ratio"]), row
  return rows


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory) -> tuple[str, pathlib.Path]:
  """``gpu.py --quick``: its stdout and the folder of its JSON, which also
  holds the JSON of each script it ran."""
  tmp = tmp_path_factory.mktemp("gpu")
  done = subprocess.run(
      [sys.executable, str(BENCHMARKS / "gpu.py"), "--quick", "--json",
       str(tmp / "gpu.json"), "--script-json", str(tmp / "scripts")],
      capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout, tmp


@pytest.mark.slow
def test_primitives(tmp_path):
  rows = _run("primitives", tmp_path)
  assert [r["ratio"] for r in rows if r["impl"] == "float"] == [1]
  assert {r["case"] for r in rows} >= {"T int8", "C int8", "K int8",
                                        "MX32 int8"}


@pytest.mark.slow
def test_matmul(gpu_run):
  # gpu.py ran `matmul.py --quick` as it is.
  stdout, tmp = gpu_run
  assert "/matmul.py --quick --json " in stdout
  rows = _check("matmul", stdout, tmp / "scripts" / "matmul.json")
  for row in rows:
    if row["impl"] == "bf16":
      assert row["ratio"] == 1
    if row["impl"] == "jaxq":
      # int8 or fp8 values plus small scales: about a quarter of float32.
      assert 0.25 <= row["weight_vs_f32"] < 0.27, row


@pytest.mark.slow
def test_calibration(tmp_path):
  rows = _run("calibration", tmp_path)
  assert {r.get("observer") for r in rows if r["impl"] == "jaxq"} >= {
      "max", "percentile", "entropy", "mse"}
  # The JAX entropy threshold equals the numpy reference loop's.
  assert [r["agrees"] for r in rows if r.get("agrees", "-") != "-"] == [
      True, True]


@pytest.mark.slow
def test_qat_overhead(gpu_run, monkeypatch):
  # gpu.py ran qat_overhead.py with these arguments (the peers, an optional
  # extra, and the second model only add compile time here) and every
  # backward mode its --help lists, which is what no --backward means.
  stdout, tmp = gpu_run
  args = ["--int8-forward", "--quick", "--repeats", "2", "--no-peers",
          "--case", "mlp"]
  modes = ["--backward", "ste", "float", "int8"]
  assert f"/qat_overhead.py {' '.join(args + modes)} --json " in stdout
  monkeypatch.syspath_prepend(str(BENCHMARKS))
  import qat_overhead  # pylint: disable=import-outside-toplevel
  assert (qat_overhead.parse_args(args)[1] ==
          qat_overhead.parse_args(args + modes)[1])
  rows = _check("qat_overhead", stdout,
                tmp / "scripts" / "qat_overhead.json")
  # Every backward mode by default: ste and float for both forwards, int8
  # for the int8 forward.
  assert {r["impl"] for r in rows} == {
      "float", "jaxq", "jaxq-float", "jaxq-int8", "jaxq-int8-float",
      "jaxq-int8-int8"}
  by_impl = {(r["case"], r["impl"]): r for r in rows}
  for case in ("mlp",):
    grad_err = {impl: by_impl[case, impl]["grad_err"]
                for _, impl in by_impl if _ == case}
    assert all(math.isfinite(e) for e in grad_err.values()), grad_err
    assert by_impl[case, "float"]["ratio"] == 1
    # grad_err is measured against jaxq's own fake-quant gradient; the int8
    # forward computes the same gradient up to float32 rounding, while the
    # float model's gradient differs by the quantization error.
    assert grad_err["jaxq"] == 0
    assert grad_err["jaxq-int8"] < 1e-4
    assert grad_err["float"] > 1e-3
    # The float backward: the same forward, the backward matmuls on the
    # float operands, whichever the forward; far closer to the STE gradient
    # than the float model's.
    assert 1e-4 < grad_err["jaxq-float"] < 0.5 * grad_err["float"]
    assert abs(grad_err["jaxq-float"] - grad_err["jaxq-int8-float"]) < 1e-3
    # The int8 backward: stochastic rounding noise of a few percent at most.
    assert 1e-4 < grad_err["jaxq-int8-int8"] < 0.05
    low, high = map(float, by_impl[case, "jaxq"]["ratio_ci95"].split("-"))
    assert low <= by_impl[case, "jaxq"]["ratio"] <= high


@pytest.mark.slow
def test_gpu(gpu_run):
  # The accelerator run, unchanged on a CPU: every section, one JSON.
  stdout, tmp = gpu_run
  rows = _check("gpu", stdout, tmp / "gpu.json")
  result = json.loads((tmp / "gpu.json").read_text())
  assert result["skipped"] == {} and result["failed"] == {}
  sections = {r["section"] for r in rows}
  # The MiniLM wheel is a test dependency (README), so nothing is skipped.
  assert sections == {"matmul", "qat_overhead", "minilm", "decode"}, sections
  by = {(r["section"], r.get("variant", ""), r.get("act", ""), r["impl"]): r
        for r in rows}
  # jaxq.inspect of each matmul variant: int8 runs int8 on every backend.
  for act in ("offline", "dynamic"):
    assert by["matmul", "int8 K-C", act, "jaxq"]["compiled"] == "int8:100%"
  assert {r["impl"] for r in rows if r["section"] == "qat_overhead"} >= {
      "float", "jaxq", "jaxq-int8", "jaxq-int8-int8"}
  # With the int8 backward the compiled QAT step multiplies no float: int8
  # dots (some widened to int32 operands by the CPU compiler).
  int8_step = by["qat_overhead", "", "", "jaxq-int8-int8"]["compiled"]
  assert int8_step.startswith("int8:") and "float" not in int8_step
  minilm = {r["impl"]: r for r in rows if r["section"] == "minilm"}
  assert minilm["bf16"]["ratio"] == 1
  assert minilm["jaxq"]["quantized_int8_share"] == 1.0
  assert minilm["float32"]["int8_share"] == 0.0
  assert minilm["jaxq"]["mean_cosine"] > 0.95


def test_gpu_asks_qat_overhead_for_every_backward_mode(monkeypatch):
  # gpu.py reads the modes from qat_overhead.py --help, in either of
  # argparse's forms for a list of choices.
  monkeypatch.syspath_prepend(str(BENCHMARKS))
  import gpu  # pylint: disable=import-outside-toplevel
  appended = "  --backward {ste,float,int8}\n                        mode"
  assert gpu.backward_modes(appended) == (
      "--backward", ["--backward", "ste", "--backward", "float",
                     "--backward", "int8"])
  several = "  --backward-mode {ste,float} [{ste,float} ...]"
  assert gpu.backward_modes(several) == (
      "--backward-mode", ["--backward-mode", "ste", "float"])
  assert gpu.backward_modes("usage: qat_overhead.py [-h] [--quick]") is None


@pytest.mark.slow
def test_sensitivity(tmp_path):
  rows = _run("sensitivity", tmp_path)
  by_impl = {(r["case"].split()[0], r["impl"]): r for r in rows}
  for case in ("sensitivity", "partial"):
    assert by_impl[case, "jaxq-recompile"]["ratio"] == 1
    # Compiled once, the result is the per-configuration one exactly.
    assert by_impl[case, "jaxq"]["same"] is True
  # The per-layer path compiles the model per configuration (and each layer
  # alone); the switchable one compiles a fixed number of programs, fewer
  # than the model has layers, and partial_quantize's loop exactly one.
  layers = by_impl["sensitivity", "jaxq"]["layers"]
  assert by_impl["sensitivity", "jaxq"]["compiles"] < layers
  assert by_impl["sensitivity", "jaxq-recompile"]["compiles"] > 2 * (
      layers - 1)
  assert by_impl["partial", "jaxq"]["compiles"] == 1
  assert by_impl["partial", "jaxq-recompile"]["compiles"] == layers


def test_kvcache(tmp_path):
  rows = {row["case"]: row for row in _run("kvcache", tmp_path)}
  assert rows["float32"]["attn_rel_err"] < 1e-5
  assert rows["int8 token"]["attn_rel_err"] < 0.05
  assert 0.5 < rows["int8 token"]["bytes_vs_bf16"] < 0.6
  assert 0.25 < rows["int4 token"]["bytes_vs_bf16"] < 0.3
  # On keys with outlier channels, KIVI and the Hadamard rotation pay at int4.
  for better in ("int4 kivi-g32", "int4 token+hadamard"):
    assert rows[better]["attn_rel_err"] < 0.6 * rows["int4 token"][
        "attn_rel_err"]


@pytest.mark.slow
def test_ptq_depth(tmp_path):
  # One depth: each (algorithm, depth, way) is a process of its own, and the
  # two ways agree at any depth.
  rows = _run("ptq_depth", tmp_path, "--algorithms", "gptq", "--depths", "2")
  assert {r["impl"] for r in rows} == {"jaxq", "jaxq-whole"}
  # Block by block gives what the whole-model path gives.
  assert all(r["max_diff"] < 1e-5 for r in rows), rows


@pytest.mark.slow
def test_decode(gpu_run):
  # gpu.py ran decode.py --quick on one weight configuration and two
  # caches: every column is filled in.
  stdout, tmp = gpu_run
  assert ("/decode.py --quick --weights w8a8 --caches float int8 --json "
          in stdout)
  rows = {row["cache"]: row for row in _check(
      "decode", stdout, tmp / "scripts" / "decode.json")}
  assert set(rows) == {"float", "int8"}
  for row in rows.values():
    assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0
    assert row["peak_bytes"] is None or row["peak_bytes"] > 0
  # int8 weights (embedding int8 per row): about a quarter of float32.
  assert rows["int8"]["weight_bytes"] < 0.3 * 4 * 36e6
  # An int8 cache: values at 1 byte plus a float32 scale per token-head.
  assert rows["int8"]["cache_bytes"] < 0.3 * rows["float"]["cache_bytes"]
