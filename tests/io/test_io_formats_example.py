"""examples/io_formats.py --quick on the real MiniLM and SmolLM2 weights.

Every section runs on a sliver (8 sentences, SmolLM2 cut after 2 blocks,
64-token windows). The sections themselves raise when a reloaded model differs from
the exported one by a single bit (embeddings, logits, the ``jax.export``
program); this checks that they ran, what they wrote, and that the numbers
they print are sane: files smaller than float, MiniLM's cosines near 1,
W4's perplexity away from float's, and the GGUF blocks served at the
dequantized model's perplexity.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))
import io_formats  # noqa: E402


@pytest.mark.slow
def test_quick_run_exports_reloads_and_serves(tmp_path: pathlib.Path,
                                              capsys: pytest.CaptureFixture):
  try:
    io_formats.main(["--out", str(tmp_path), "--quick"])
  except ModuleNotFoundError as error:
    pytest.fail(str(error), pytrace=False)
  printed = capsys.readouterr().out
  rows = [line for line in printed.splitlines() if line.startswith("| ")
          and not line.startswith(("| model", "| ---"))]
  assert [row.split(" | ")[0] for row in rows] == [
      "| MiniLM W8A8 int8", "| MiniLM W4A16 g32", "| SmolLM2 W4A16 g32 GPTQ",
      "| SmolLM2 GGUF Q4_1/Q8_0, served as loaded"]

  expected = {"minilm_w8a8_int8": "int-quantized",
              "minilm_w4a16_g32": "pack-quantized",
              "smollm2_w4a16_g32_gptq": "pack-quantized"}
  for directory, fmt in expected.items():
    config = json.loads((tmp_path / directory / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors"
    assert quantization["format"] == fmt
    assert (tmp_path / directory / "model.jaxexport").exists() == (
        directory.startswith("minilm"))

  for row in rows[:3]:
    _, file_mb, float_mb, smaller, *_ = row.split(" | ")
    assert 0 < float(file_mb) < float(float_mb), row
    assert float(smaller.rstrip("x")) > 1, row
  cosines = [float(c) for c in re.findall(r"cosine (\d\.\d+)", " ".join(
      rows[:2]))]
  assert len(cosines) == 2 and min(cosines) > 0.95, rows[:2]
  assert cosines[0] > 0.99, rows[0]  # W8A8 stays closer than W4
  assert "reloaded bit-exact" in rows[2]
  ppl, float_ppl = map(float, re.search(
      r"perplexity ([\d.]+) \(float ([\d.]+)\)", rows[2]).groups())
  # Two blocks, then the head: a perplexity of no meaning, but W4 moves it.
  assert np.isfinite(ppl) and ppl != float_ppl, rows[2]
  served, reference = map(float, re.search(
      r"perplexity ([\d.]+) \(dequantized float ([\d.]+)\)", rows[3]
  ).groups())
  assert served == pytest.approx(reference, rel=1e-3), rows[3]
