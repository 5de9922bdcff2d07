"""CPU smoke test of benchmarks/grass_cost.py at a tiny size."""

import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ and examples/ are run from the repository root

from benchmarks import grass_cost  # noqa: E402


@pytest.mark.slow
def test_grass_cost_runs_at_a_tiny_size_and_writes_json_and_plot(tmp_path):
  out = tmp_path / "grass_cost.json"
  grass_cost.main(
    [
      "--hidden",
      "32",
      "--ffn",
      "64",
      "--heads",
      "2",
      "--layers",
      "1",
      "--batch",
      "1",
      "--seq",
      "16",
      "--rank",
      "4",
      "--reps",
      "1",
      "--tree-size",
      "tiny",
      "--tree-methods",
      "adamw,grass_model_level",
      "--out",
      str(out),
    ]
  )
  result = json.loads(out.read_text())
  assert out.with_suffix(".png").exists()
  blocks = result["blocks"]
  dense, grass = blocks["dense"], blocks["grass"]
  # GRASS's gradient is D (in × r) per layer: far fewer bytes, fewer dW FLOPs.
  assert grass["gradient_bytes"] < dense["gradient_bytes"] / 2
  assert grass["weight_grad_flops"] < dense["weight_grad_flops"] / 2
  assert blocks["analytic"]["grass_dd_flops"] < blocks["analytic"]["dense_dw_flops"]
  assert grass["refresh_ms"] > 0 and grass["train_step_ms"] > 0
  methods = [r["method"] for r in result["tree"]["rows"]]
  assert methods == ["adamw", "grass_model_level"]
  assert result["tree"]["rows"][1]["state_ratio_to_adamw"] < 1
