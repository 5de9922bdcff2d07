"""Smoke test of the product_rates suite (benchmarks/product_rates.py) on the tiny shapes (CPU)."""

import json

import pytest

from benchmarks import optimizer_step
from benchmarks import product_rates
from benchmarks import suites


def test_product_kinds_cover_the_steps_flops():
  """GaLore's kinds add up to 2 products with each projected G, OSD's to 3 plus the r×r work."""
  cfg = optimizer_step.SIZES["1b"]
  d, ffn, layers, r = cfg["d"], cfg["ffn"], cfg["layers"], cfg["rank"]
  flop = lambda a, b, t: 2 * a[0] * a[1] * b[1]
  kinds = product_rates.product_kinds(**cfg)
  galore = sum(c * flop(a, b, t) for n, a, b, t, c in kinds if n.startswith(("project", "back")))
  padded = ffn + (-ffn % 8)
  per_layer = 4 * 2 * d * d * r + 2 * 2 * d * padded * r + 2 * d * ffn * r
  assert galore == 2 * layers * per_layer
  osd_big = sum(c * flop(a, b, t) for n, a, b, t, c in kinds if n.startswith("osd") and ("G" in n))
  assert osd_big == layers * per_layer


@pytest.mark.slow
def test_rows_and_floors_are_written(tmp_path):
  out = tmp_path / "rates.json"
  # Through the harness: the flags after "--" are the script suite's own.
  result = suites.main(
    [
      "run",
      "--suite",
      "product_rates",
      "--",
      "--size",
      "tiny",
      "--reps",
      "2",
      "--dtypes",
      "float32",
      "--out",
      str(out),
    ]
  )
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  assert len(result["rows"]) == len(product_rates.product_kinds(**optimizer_step.SIZES["tiny"]))
  for row in result["rows"]:
    assert row["separate_ms"] > 0 and row["batched_ms"] > 0
  assert set(result["floor_ms"]) == {
    "galore_float32_separate",
    "galore_float32_batched",
    "osd_float32_separate",
    "osd_float32_batched",
  }
  assert out.with_suffix(".png").exists()
