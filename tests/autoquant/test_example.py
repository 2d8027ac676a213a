"""examples/auto_quantize.py --quick: the first MiniLM block on the real
weights, searched, verified and plotted (the SmolLM2 half is the same code
on a decoder; its full numbers are the README's)."""

import pathlib
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))
import auto_quantize  # noqa: E402


@pytest.mark.slow
def test_quick_minilm_search_meets_its_budget_and_plots(tmp_path, capsys):
  results = auto_quantize.main(["--quick", "--model", "minilm",
                                "--no-progress", "--plots", str(tmp_path)])
  result = results["minilm"]
  assert result.compilations == 1
  assert result.bits_per_weight <= 4.5
  assert 0.9 < result.metric < 1.0
  assert result.served_metric == pytest.approx(result.metric, abs=1e-3)
  uniform = {p.label: p.metric for p in result.front
             if not p.label.startswith("mixture")}
  assert set(uniform) == {"bf16", "W8 rtn", "W4 g32 rtn", "W4 g64 rtn",
                          "W4 per-channel rtn"}
  assert (tmp_path / "auto_quantize_minilm.png").stat().st_size > 0
  assert "| W4 g64 rtn |" in capsys.readouterr().out
