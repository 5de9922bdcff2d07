"""`python -m examples.llama compare RUN_DIR ...`: one table and one loss-vs-tokens plot of runs."""

import argparse
import json
import pathlib
import sys

from examples.llama.metrics import read_jsonl

COLUMNS = ("run", "method", "rank", "final eval ppl", "opt-state MiB", "tokens/s")


class _OneLineParser(argparse.ArgumentParser):
  def error(self, message):
    self.exit(2, f"error: {message} (see --help)\n")


def load_run(run_dir: pathlib.Path) -> dict:
  """config.json, metrics.jsonl and (once finished) summary.json of a run directory."""
  config_file, metrics_file = run_dir / "config.json", run_dir / "metrics.jsonl"
  if not config_file.exists() or not metrics_file.exists():
    raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json / metrics.jsonl)")
  summary_file = run_dir / "summary.json"
  return {
    "dir": run_dir,
    "config": json.loads(config_file.read_text()),
    "records": read_jsonl(metrics_file),
    "summary": json.loads(summary_file.read_text()) if summary_file.exists() else {},
  }


def table_row(run: dict) -> dict:
  config, summary = run["config"], run["summary"]
  evals = [r for r in run["records"] if r["kind"] == "eval"]
  optimizer = config["flags"]["optimizer"]
  ppl = summary.get("final_eval_ppl", evals[-1]["eval_ppl"] if evals else None)
  finished = "final_eval_ppl" in summary
  tokens_per_s = summary.get("tokens_per_s")
  return {
    "run": run["dir"].name,
    "method": optimizer,
    "rank": "-" if optimizer == "adamw" else str(config["rank"]),
    "final eval ppl": "-" if ppl is None else f"{ppl:.2f}" + ("" if finished else " (unfinished)"),
    "opt-state MiB": f"{config['opt_state_bytes'] / 2**20:.2f}",
    "tokens/s": "-" if tokens_per_s is None else f"{tokens_per_s:,.0f}",
  }


def markdown_table(rows: list[dict]) -> str:
  widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in COLUMNS}
  line = lambda cells: "| " + " | ".join(cells[c].ljust(widths[c]) for c in COLUMNS) + " |"
  rule = "|" + "|".join("-" * (widths[c] + 2) for c in COLUMNS) + "|"
  return "\n".join([line({c: c for c in COLUMNS}), rule, *(line(r) for r in rows)])


def plot(runs: list[dict], out: pathlib.Path) -> bool:
  """Draws train (lines) and eval (dots) loss against tokens; False without matplotlib."""
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, ax = plt.subplots(figsize=(8, 5))
  for run in runs:
    train = [r for r in run["records"] if r["kind"] == "train"]
    evals = [r for r in run["records"] if r["kind"] == "eval"]
    (line,) = ax.plot(
      [r["tokens"] for r in train],
      [r["loss"] for r in train],
      lw=1,
      alpha=0.8,
      label=f"{run['dir'].name} (train)",
    )
    ax.plot(
      [r["tokens"] for r in evals],
      [r["eval_loss"] for r in evals],
      "o-",
      color=line.get_color(),
      ms=4,
      label=f"{run['dir'].name} (eval)",
    )
  ax.set_xlabel("tokens")
  ax.set_ylabel("loss (nats/token)")
  ax.set_yscale("log")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return True


def main(argv=None) -> int:
  p = _OneLineParser(
    prog="python -m examples.llama compare",
    description="Compare training runs: a table and a loss-vs-tokens PNG.",
  )
  p.add_argument("runs", nargs="+", type=pathlib.Path, help="run directories")
  p.add_argument(
    "--out",
    type=pathlib.Path,
    default=None,
    help="the PNG to write (default: compare.png beside the first run directory)",
  )
  args = p.parse_args(argv)
  out = args.out or args.runs[0].parent / "compare.png"
  try:
    runs = [load_run(run_dir) for run_dir in args.runs]
  except FileNotFoundError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  print(markdown_table([table_row(run) for run in runs]))
  if plot(runs, out):
    print(f"plot: {out}")
  else:
    print("no plot: matplotlib is not installed (pip install matplotlib)")
  return 0
