"""The `update_identity` suite's comparison: bitwise-equal leaves and the relative difference."""

import numpy as np
import pytest

from benchmarks import update_identity


def _run(values):
  hashes = {k: str(v.tobytes()) for k, v in values.items()}
  return hashes, values


def test_identical_updates_are_counted_bitwise_and_differences_relative_to_the_leaf():
  base = {
    "galore/0/w": np.array([1.0, -4.0]),
    "galore/0/b": np.array([2.0]),
    "osd/0/w": np.array([1.0, 2.0]),
  }
  current = dict(base, **{"osd/0/w": np.array([1.0, 2.002])})
  rows = update_identity.compare(_run(current), _run(base))
  assert rows["galore"] == {"leaves": 2, "bitwise_identical": 2, "max_rel_diff": 0.0}
  assert rows["osd"]["bitwise_identical"] == 0
  assert rows["osd"]["max_rel_diff"] == pytest.approx(0.001)


def test_trees_with_different_leaves_are_refused():
  with pytest.raises(ValueError, match="different leaves"):
    update_identity.compare(_run({"galore/0/w": np.zeros(2)}), _run({"galore/0/v": np.zeros(2)}))


def test_an_unknown_size_is_a_one_line_error():
  with pytest.raises(ValueError, match="unknown size"):
    update_identity.main(["--size", "3t", "--out", "unused.json"])
