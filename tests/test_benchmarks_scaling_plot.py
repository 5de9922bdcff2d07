"""benchmarks/scaling_plot.py on hand-written multi_gpu.py JSONs with known figures."""

import json

import pytest

from benchmarks import scaling_plot

CONFIG = {
  "model_size": "350m",
  "global_batch": 256,
  "seq_len": 256,
  "steps": 20,
  "mesh": "data 2 x fsdp 1",
  "shard_optimizer": True,
  "train_args": "",
  "mesh_args": "",
}


def _run(tokens_per_s, losses):
  return {"tokens_per_s": tokens_per_s, "losses": losses}


def _write(path, methods, commit="abc1234", **config):
  result = {
    "commit": commit,
    "devices": {"platform": "gpu", "kind": "H200", "count": 2},
    "config": {**CONFIG, **config},
    "methods": {},
  }
  for name, (one, mesh) in methods.items():
    entry = {"one": _run(one, [4.0, 2.0])}
    if mesh is not None:  # a call cut before the mesh run: no speedup in the file
      entry["mesh"] = _run(mesh, [4.0, 2.1])
      entry["speedup"] = mesh / one
      entry["max_rel_loss_diff"] = 0.05
    result["methods"][name] = entry
  path.write_text(json.dumps(result))
  return path


def test_methods_come_from_the_file_that_has_both_runs(tmp_path, capsys):
  cut = _write(tmp_path / "a.json", {"adamw": (100e3, 198e3), "osd": (90e3, None)})
  rerun = _write(tmp_path / "b.json", {"osd": (92e3, 170.2e3)})
  out = tmp_path / "scaling.png"
  summary = scaling_plot.main([str(cut), str(rerun), "--out", str(out), "--target", "1.8"])
  assert list(summary["methods"]) == ["adamw", "osd"]
  osd = summary["methods"]["osd"]
  assert osd["file"] == "b.json" and osd["speedup"] == pytest.approx(170.2 / 92)
  assert summary["methods"]["adamw"]["speedup"] == pytest.approx(1.98)
  assert out.exists()
  assert json.loads(out.with_suffix(".json").read_text())["methods"] == summary["methods"]
  table = capsys.readouterr().out
  assert "| osd | 92.0K | 170.2K | 1.85× | 0.0500 | abc1234 |" in table


def test_files_of_different_set_ups_are_refused(tmp_path):
  a = _write(tmp_path / "a.json", {"adamw": (100e3, 198e3)})
  b = _write(tmp_path / "b.json", {"osd": (92e3, 170.2e3)}, global_batch=512)
  with pytest.raises(ValueError, match="global_batch"):
    scaling_plot.main([str(a), str(b), "--out", str(tmp_path / "x.png")])


def test_files_without_a_finished_pair_are_refused(tmp_path):
  cut = _write(tmp_path / "a.json", {"osd": (90e3, None)})
  with pytest.raises(ValueError, match="both"):
    scaling_plot.main([str(cut), "--out", str(tmp_path / "x.png")])
