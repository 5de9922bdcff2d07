"""One figure of several multi_gpu runs: tokens/s on 1 and n devices and the speed-up, per method.

`multi_gpu` writes one JSON per call, and a call's time limit often splits the methods over
several. This reads those JSONs (the same model, batch, sequence length, steps, mesh and
devices), takes each method from the last file with both its runs, and writes a PNG (tokens/s
of both runs; the speed-up against the target), a JSON of the same figures with their files,
and a markdown table. Nothing is measured here.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from benchmarks import record

# What must agree for the runs of several files to be put side by side.
SHARED = (
  "model_size",
  "global_batch",
  "seq_len",
  "steps",
  "mesh",
  "shard_optimizer",
  "train_args",
  "mesh_args",
)


def collect(paths: list[pathlib.Path]) -> dict:
  """{method: figures} from multi_gpu JSONs; ValueError where their set-ups differ."""
  first, methods = None, {}
  for path in paths:
    result = json.loads(path.read_text())
    setup = {k: result["config"].get(k) for k in SHARED}
    setup["devices"] = {k: result["devices"][k] for k in ("kind", "count")}
    if first is None:
      first = (path, setup)
    elif setup != first[1]:
      diff = {k: (first[1][k], setup[k]) for k in setup if setup[k] != first[1][k]}
      raise ValueError(f"{path.name} and {first[0].name} ran different set-ups: {diff}")
    for method, entry in result["methods"].items():
      if "speedup" in entry:  # both runs finished
        methods[method] = {
          "one_tokens_per_s": entry["one"]["tokens_per_s"],
          "mesh_tokens_per_s": entry["mesh"]["tokens_per_s"],
          "speedup": entry["speedup"],
          "max_rel_loss_diff": entry["max_rel_loss_diff"],
          "commit": result["commit"],
          "file": path.name,
        }
  if not methods:
    raise ValueError("no method has both its one-device and its mesh run in these files")
  return {"setup": first[1], "methods": methods}


def markdown(summary: dict) -> str:
  rows = [
    "| method | 1 device tokens/s | mesh tokens/s | speed-up | max rel. loss diff | commit |",
    "|---|---|---|---|---|---|",
  ]
  for method, m in summary["methods"].items():
    rows.append(
      f"| {method} | {m['one_tokens_per_s'] / 1e3:.1f}K | "
      f"{m['mesh_tokens_per_s'] / 1e3:.1f}K | {m['speedup']:.2f}× | "
      f"{m['max_rel_loss_diff']:.4f} | {m['commit']} |"
    )
  return "\n".join(rows)


def plot(summary: dict, path: pathlib.Path, target: float) -> None:
  names = list(summary["methods"])
  figures = [summary["methods"][n] for n in names]
  x = range(len(names))
  fig, (left, right) = record.subplots(1, 2, figsize=(4 + 1.4 * len(names), 3.4))
  n = summary["setup"]["devices"]["count"]
  left.bar(
    [i - 0.2 for i in x], [f["one_tokens_per_s"] / 1e3 for f in figures], 0.4, label="1 device"
  )
  left.bar(
    [i + 0.2 for i in x], [f["mesh_tokens_per_s"] / 1e3 for f in figures], 0.4, label=f"{n} devices"
  )
  left.set_ylabel("thousand tokens/s")
  left.set_ylim(0, 1.25 * max(f["mesh_tokens_per_s"] for f in figures) / 1e3)
  left.legend(fontsize=8, loc="upper center", ncol=2)
  right.bar(list(x), [f["speedup"] for f in figures], 0.6, color="tab:green")
  right.axhline(target, color="black", linestyle="--", linewidth=1, label=f"target {target}×")
  right.axhline(n, color="grey", linestyle=":", linewidth=1, label=f"ideal {n}×")
  for i, f in enumerate(figures):
    right.text(i, f["speedup"], f"{f['speedup']:.2f}", ha="center", va="bottom", fontsize=8)
  right.set_ylabel(f"speed-up, 1 → {n} devices")
  right.set_ylim(0, n * 1.12)
  right.legend(fontsize=8, loc="lower right")
  for ax in (left, right):
    ax.set_xticks(list(x), names)
  setup = summary["setup"]
  commits = sorted({f["commit"] for f in figures})
  fig.suptitle(
    f"{setup['model_size']}, global batch {setup['global_batch']} × {setup['seq_len']}, "
    f"{setup['mesh']}{', ZeRO-1' if setup['shard_optimizer'] else ''}, "
    f"{setup['devices']['kind']} (commit {', '.join(commits)})",
    fontsize=9,
  )
  record.save(fig, path)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("files", nargs="+", type=pathlib.Path, help="multi_gpu.py JSONs")
  p.add_argument(
    "--out",
    required=True,
    type=pathlib.Path,
    help="the PNG; the summary JSON goes next to it (.json)",
  )
  p.add_argument("--target", type=float, default=1.8, help="the speed-up to draw as a line")
  args = p.parse_args(argv)
  summary = collect(args.files)
  summary["target"] = args.target
  plot(summary, args.out, args.target)
  args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
  print(markdown(summary))
  return summary
