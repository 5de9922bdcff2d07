"""benchmarks/notebooks/benchmarks.ipynb runs both suites at the tiny size on the CPU."""

import json
import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "benchmarks" / "notebooks" / "benchmarks.ipynb"


def _executed(tmp_path, monkeypatch, params):
  monkeypatch.setenv("BENCHMARKS_NOTEBOOK_PARAMS", json.dumps(params))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv(
    "PYTHONPATH", os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
  )
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # A cell that hangs fails the test after 120 s; how fast the notebook runs is not a test's to
  # check (a loaded 2-core machine runs it in 20-30 s).
  NotebookClient(
    notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  ).execute()
  return notebook


@pytest.mark.slow
def test_notebook_runs_both_suites_and_plots_what_they_wrote(tmp_path, monkeypatch):
  notebook = _executed(tmp_path, monkeypatch, {"size": "tiny", "reps": 1, "out_dir": str(tmp_path)})

  projector = json.loads((tmp_path / "projector_cost_cpu.json").read_text())
  assert projector["platform"] == "cpu" and projector["versions"]["jax"]
  (row,) = projector["results"]["rows"]
  assert row["shape"] == [64, 176] and row["rank"] == 16
  for step in (
    "exact_svd",
    "svd_refresh_eigh",
    "randomized_svd_refresh",
    "online_pca_step",
    "sparse_rows_topk_refresh",
    "random_basis_haar",
    "adamw_step",
  ):
    assert row["median_ms"][step] > 0
    assert row["ratio_to_adamw_step"][step] > 0

  update = json.loads((tmp_path / "optimizer_update_cpu.json").read_text())
  (tree,) = update["results"]["sizes"]
  assert tree["size"] == "tiny"
  rows = {r["method"]: r for r in tree["rows"]}
  assert {"adamw", "galore", "galore_refresh", "osd", "rso", "grass", "grass_refresh"} <= set(rows)
  for name, r in rows.items():
    assert r["median_ms"] > 0 and r["ratio_to_adamw"] > 0, name
    # Measured state bytes within 2% of each method's analytic formula.
    assert abs(r["state_over_analytic"] - 1) < 0.02, (name, r["state_over_analytic"])
  assert rows["galore"]["state_ratio_to_adamw"] < 1
  assert set(tree["amortised_over_200_steps"]) == {"galore", "grass"}

  for name in ("projector_cost_cpu.png", "optimizer_update_cpu.png"):
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  images = [
    o
    for cell in notebook.cells
    if cell.cell_type == "code"
    for o in cell.get("outputs", [])
    if "image/png" in o.get("data", {})
  ]
  assert len(images) == 2  # one plot per suite, drawn from the JSON read back
