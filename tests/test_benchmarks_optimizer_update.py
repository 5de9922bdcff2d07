"""`benchmarks.optimizer_update`: what a run cut by its time limit keeps; the state formulas."""

from benchmarks import optimizer_update


def test_each_method_is_checkpointed_as_it_finishes():
  # A GPU call past its limit is killed mid-method: the JSON must already hold the methods
  # that finished, with their ratios to AdamW (AdamW runs first).
  calls = []
  final = optimizer_update.run(["tiny"], reps=2, methods=["rso"], checkpoint=calls.append)
  rows_seen = [[row["method"] for row in c["sizes"][-1]["rows"]] for c in calls]
  assert rows_seen == [["adamw"], ["adamw", "rso"], ["adamw", "rso"]]
  (after_rso,) = calls[1]["sizes"]
  rso = {row["method"]: row for row in after_rso["rows"]}["rso"]
  assert rso["median_ms"] > 0 and rso["ratio_to_adamw"] > 0
  assert calls[-1] == final


def test_every_train_step_variant_has_its_state_formula():
  # The train_step suite checks each optimizer-level row's state against this formula: a variant
  # without one would fail its job, not the check.
  from benchmarks import train_setups  # pylint: disable=g-import-not-at-top

  shapes = {"kernel": (16, 24), "bias": (24,)}
  for variant in train_setups.VARIANTS:
    assert optimizer_update.analytic_state_bytes(variant, shapes, 4) > 0, variant
