"""`benchmarks.optimizer_update`: what a run cut by its time limit keeps."""

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
