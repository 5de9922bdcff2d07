"""`python -m benchmarks run --suite train_step | largest_model --quick` on the CPU.

The workers compile unoptimised CPU code (--xla_backend_optimization_level=0, as
tests/test_notebooks.py): these runs check what the suites record, not how fast the CPU is.
"""

import json
import math
import os

import pytest

from benchmarks import largest_model
from benchmarks import suites
from benchmarks import train_setups

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _fast_cpu_compiles(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", " ".join(
      [*filter(None, [os.environ.get("XLA_FLAGS")]), "--xla_backend_optimization_level=0"]))


def test_train_step_quick_times_every_method_and_writes_json_and_png(tmp_path):
  out = tmp_path / "train_step.json"
  result = suites.main(["run", "--suite", "train_step", "--quick", "--out", str(out)])
  assert json.loads(out.read_text()) == result
  assert out.with_suffix(".png").read_bytes()[:8] == PNG
  assert result["benchmark"] == "train_step" and result["platform"] == "cpu"
  assert result["config"]["param_dtype"] == "float32"
  (size,) = result["results"]["sizes"]
  assert size["size"] == "tiny" and size["tokens_per_step"] == size["batch"] * size["seq"]
  rows = {r["method"]: r for r in size["rows"]}
  assert set(rows) == set(train_setups.METHODS)
  for name, r in rows.items():
    assert "error" not in r, (name, r.get("error"))
    assert math.isfinite(r["step_ms"]) and r["step_ms"] > 0, name
    assert r["losses_finite"], name
    assert r["tokens_per_s_amortised_over_200_ratio_to_adamw"] > 0, name
    assert r["memory_analysis"]["step"]["need_bytes"] > 0, name
    assert r["peak_bytes_in_use"] is None  # the CPU has no peak counter
  # Refreshes: a step at count 0 (GaLore, GRASS), a program between steps (model level).
  for name, kind in train_setups.REFRESH_KIND.items():
    assert rows[name]["refresh_kind"] == kind and rows[name]["refresh_ms"] > 0, name
    assert "refresh" in rows[name]["memory_analysis"] or kind == "count"
  # The model level trains B / D only: W rides along frozen.
  for name in train_setups.MODEL_LEVEL:
    assert rows[name]["frozen_bytes"] > 0
    assert rows[name]["trainable_param_bytes"] < rows["adamw"]["trainable_param_bytes"]
  assert set(size["targets"]) >= {"osd", "grass"}


def test_largest_model_quick_runs_the_ladder_and_writes_json_and_png(tmp_path):
  out = tmp_path / "largest_model.json"
  result = suites.main(["run", "--suite", "largest_model", "--quick", "--out", str(out),
                        "--methods", "adamw,rso_model"])
  assert json.loads(out.read_text()) == result
  assert out.with_suffix(".png").read_bytes()[:8] == PNG
  assert result["config"]["param_dtype"] == "bfloat16"
  assert result["config"]["state_dtype"] == "float32"
  res = result["results"]
  for method in ("adamw", "rso_model"):
    rows = res["rows"][method]
    assert [r["size"] for r in rows] == list(largest_model.QUICK_SIZES)
    for r in rows:  # a 1 GB budget holds every quick rung
      assert r["ran"] and r["need_bytes"] <= r["limit_bytes"], (method, r)
      assert all(math.isfinite(x) for x in r["step_ms"] + r["losses"])
      # bf16 weights, float32 optimizer state (the only floats in it).
      assert set(r["opt_state_bytes_by_dtype"]) - {"int32", "uint32"} == {"float32"}
    assert res["summary"]["methods"][method]["largest_that_ran"] == "d64"
    assert res["summary"]["methods"][method]["d64_basis"] == "predicted"  # no CPU peak


def test_a_small_budget_makes_a_smaller_model_the_answer():
  # d32's step needs about 0.9 MB, d64's about 2 MB: a 1.2 MB budget runs d32 only; d64, the
  # reported size, is still compiled; d128 past it is skipped.
  logs = []
  result = largest_model.run(["d32", "d64", "d128"], 2, ["adamw"], {"budget_gb": 1.2e-3},
                             quick=True, log=logs.append)
  rows = {r["size"]: r for r in result["rows"]["adamw"]}
  assert rows["d32"]["ran"] and rows["d32"]["need_bytes"] <= 1.2e6
  assert not rows["d64"]["fits"] and not rows["d64"]["ran"]
  assert rows["d64"]["need_bytes"] > rows["d64"]["limit_bytes"] == 1_200_000
  assert "skipped" in rows["d128"]
  assert result["summary"]["methods"]["adamw"]["largest_that_ran"] == "d32"
