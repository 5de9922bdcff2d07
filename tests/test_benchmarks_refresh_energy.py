"""CPU smoke test of benchmarks/refresh_energy.py: the tiny LLaMA, a few refreshes."""

import json
import pathlib
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ and examples/ are run from the repository root

from benchmarks import optimizer_step, refresh_energy  # noqa: E402


def test_captured_energy_is_the_top_singular_values_for_the_exact_basis():
  g = jax.random.normal(jax.random.PRNGKey(0), (12, 20))
  u, s, _ = np.linalg.svd(np.asarray(g), full_matrices=False)
  chex.assert_trees_all_close(
    optimizer_step.captured(jnp.asarray(u[:, :4]), g), np.sum(s[:4] ** 2), rtol=1e-5
  )
  # A kernel (in, out) with in > out is projected on its smaller side: oriented transposes it.
  assert optimizer_step.oriented(jnp.ones((8, 3), jnp.bfloat16)).shape == (3, 8)
  assert optimizer_step.oriented(jnp.ones((3, 8))).dtype == jnp.float32


@pytest.mark.slow
def test_refresh_energy_scores_every_kernel_at_every_refresh(tmp_path):
  out = tmp_path / "energy.json"
  argv = ["--size", "tiny", "--steps", "5", "--update-every", "2", "--batch", "2"]
  flags = ["--seq", "32", "--iterations", "1,3", "--oversample", "0,4", "--out", str(out)]
  refresh_energy.main([*argv, *flags])
  result = json.loads(out.read_text())
  assert out.with_suffix(".png").exists()
  assert result["bases"] == ["stale", "warm1", "warm3", "warm1_p4", "warm3_p4"]
  # Refreshes at 2 and 4 are scored (step 0 starts the chains); the tiny model's 2 blocks
  # have 7 projected kernels each.
  assert [e["step"] for e in result["summary"]] == [2, 4]
  assert all(e["kernels"] == 14 for e in result["summary"])
  assert len(result["rows"]) == 28
  for row in result["rows"]:
    for basis in result["bases"]:
      # A fraction of the best rank-r energy: no basis of r columns captures more.
      assert 0.0 < row[basis] <= 1.0 + 1e-4, (row["kernel"], basis, row[basis])
  for entry in result["summary"]:
    # Subspace iteration from the previous basis recovers energy the stale basis misses.
    assert entry["warm3"]["mean"] > entry["stale"]["mean"]
    assert entry["warm1"]["min"] <= entry["warm1"]["mean"]
    # Four more columns and the Rayleigh–Ritz step: at least what the plain round keeps.
    assert entry["warm3_p4"]["mean"] >= entry["warm3"]["mean"] - 1e-4


def test_refresh_energy_refuses_a_run_with_no_refresh_to_score(tmp_path):
  with pytest.raises(SystemExit, match="--steps must exceed"):
    refresh_energy.main(["--steps", "200", "--update-every", "200", "--out", str(tmp_path / "x")])
  with pytest.raises(SystemExit, match="--iterations"):
    refresh_energy.main(["--iterations", "0", "--out", str(tmp_path / "x")])
  with pytest.raises(SystemExit, match="--oversample"):
    refresh_energy.main(["--oversample", "-4", "--out", str(tmp_path / "x")])
  with pytest.raises(SystemExit, match="--oversample"):
    refresh_energy.main(["--oversample", "a", "--out", str(tmp_path / "x")])
