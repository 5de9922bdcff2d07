"""Suite `largest_model`: the largest LLaMA whose train step fits one device, per method.

The ladder 1B, 3B, 7B, 13B, 30B (`LADDER`), bf16 weights, float32 optimizer state, remat per
block, batch 1 × 2048 tokens, rank hidden/4. Per method, sizes ascending, each (method, size) in a
worker process: compile the step (and refresh) from abstract shapes and read their need from
`memory_analysis()`; where it fits the budget (`bytes_limit`, or --budget-gb), initialise, run
`reps` steps and the refresh and record the peak bytes. A method's answer is the largest size
that ran; past its first failure only the reported sizes (7B, 13B) are still compiled. Targets
(issue 7): 7B under 24 GB with the best method, 13B under 40 GB. docs/benchmarks.md, "Largest
model per GPU", has the commands and results.
"""

from __future__ import annotations

import statistics
import time

from benchmarks import record
from benchmarks import suites
from benchmarks import train_setups
from benchmarks import train_step
from examples.llama.config import MODEL_SIZES

LADDER = {
  "1b": MODEL_SIZES["1b"],
  "3b": (3200, 8640, 32, 26),
  "7b": MODEL_SIZES["7b"],
  "13b": (5120, 13824, 40, 40),
  "30b": (6656, 17920, 52, 60),
}
QUICK_LADDER = {"d32": (32, 88, 2, 1), "d64": (64, 176, 4, 1), "d128": (128, 352, 4, 1)}
SIZES = {**LADDER, **QUICK_LADDER}
DEFAULT_SIZES = tuple(LADDER)
QUICK_SIZES = ("d32", "d64")  # --quick: two rungs, every method, under a minute on the CPU
REPORTED = ("7b", "13b")  # compiled for every method even past its largest
QUICK_REPORTED = ("d64",)
DEFAULT_REPS = 3
VOCAB = 32000
DEFAULTS = {
  "batch": 1,
  "seq": 2048,
  "remat": True,
  "param_dtype": "bfloat16",
  "state_dtype": "float32",
}
QUICK = {"seq": 32, "vocab": 512, "budget_gb": 1.0}
TARGETS_GB = {"7b": 24.0, "13b": 40.0}
# A (method, size) job's limit unless given: twice the train_step suite's, since the 13B and 30B
# steps take minutes to compile.
JOB_TIMEOUT_S = 2 * train_setups.JOB_TIMEOUT_S


def _settings(options, quick) -> dict:
  options = dict(options or {})
  get = lambda k: options[k] if options.get(k) is not None else DEFAULTS[k]
  return {
    "batch": get("batch"),
    "seq": options.get("seq") or (QUICK["seq"] if quick else DEFAULTS["seq"]),
    "vocab": QUICK["vocab"] if quick else VOCAB,
    "remat": get("remat"),
    "param_dtype": get("param_dtype"),
    "state_dtype": None if get("state_dtype") == "native" else get("state_dtype"),
    "rank": options.get("rank"),
    "attention": options.get("attention") or "auto",
    "budget_gb": options.get("budget_gb") or (QUICK["budget_gb"] if quick else None),
    "compilation_cache": options.get("compilation_cache"),
    "job_timeout_s": options.get("job_timeout_s")
    or (train_step.QUICK_JOB_TIMEOUT_S if quick else JOB_TIMEOUT_S),
  }


def run_job(job: dict) -> dict:
  """One (method, size) in a worker process: compile, check the need, run if it fits."""
  import jax  # pylint: disable=g-import-not-at-top

  setup, compiled, row = train_setups.start_job(job)
  row.update(train_setups.state_bytes(*setup.abstract[:3]))
  row["need_bytes"] = max(a["need_bytes"] for a in row["memory_analysis"].values())
  memory = train_setups.device_memory()
  budget = job.get("budget_bytes")
  row["limit_bytes"] = budget if budget else memory["bytes_limit"]
  row["limit_source"] = "--budget-gb" if budget else "memory_stats()['bytes_limit']"
  if row["limit_bytes"] is None:
    raise ValueError("this device reports no memory limit: pass --budget-gb")
  row["fits"] = row["need_bytes"] <= row["limit_bytes"]
  row["ran"] = False
  if not (row["fits"] and job["run"]):
    return row
  try:
    train_setups.progress("initialising (eagerly)")
    carry = jax.block_until_ready(setup.init())
    tokens = setup.tokens(0)
    train_setups.progress("initialised")
    times, losses = [], []
    for _ in range(job["steps"]):
      t0 = time.perf_counter()
      carry, loss = train_setups.run_step(compiled, carry, tokens)
      losses.append(float(loss))
      times.append((time.perf_counter() - t0) * 1e3)
    train_setups.progress(f"ran {job['steps']} steps")
    if setup.refresh_kind == "program":
      t0 = time.perf_counter()
      carry = train_setups.run_refresh(setup, compiled, carry, tokens)
      jax.block_until_ready(carry)
      row["refresh_ms"] = (time.perf_counter() - t0) * 1e3
    del carry
  except jax.errors.JaxRuntimeError as e:
    if not train_setups.is_out_of_memory(e):
      raise
    row.update(error="out of memory: " + str(e).splitlines()[0][:300], out_of_memory=True)
    return row
  row.update(
    ran=True,
    step_ms=times,
    step_ms_median=statistics.median(times),
    losses=losses,
    peak_bytes_in_use=train_setups.device_memory()["peak_bytes_in_use"],
  )
  return row


def _memory(row):
  """(bytes, "measured" | "predicted") of a row: its peak where it ran, else its need."""
  if row.get("ran") and row.get("peak_bytes_in_use"):
    return row["peak_bytes_in_use"], "measured"
  if "need_bytes" in row:
    return row["need_bytes"], "predicted"
  return None, None


def _summary(by_method, reported) -> dict:
  """Per method: its answer and the memory of the reported sizes; the targets."""
  out = {"methods": {}, "targets": {}}
  for method, rows in by_method.items():
    ran = [r["size"] for r in rows if r.get("ran")]
    entry = {"largest_that_ran": ran[-1] if ran else None}
    for r in rows:
      if r["size"] in reported:
        value, basis = _memory(r)
        entry[f"{r['size']}_bytes"] = value
        entry[f"{r['size']}_basis"] = basis
    out["methods"][method] = entry
  for size, gb in TARGETS_GB.items():
    if size not in reported:
      continue
    measured = [
      (m, e[f"{size}_bytes"])
      for m, e in out["methods"].items()
      if e.get(f"{size}_basis") == "measured"
    ]
    candidates = measured or [
      (m, e[f"{size}_bytes"])
      for m, e in out["methods"].items()
      if e.get(f"{size}_bytes") is not None
    ]
    if candidates:
      method, value = min(candidates, key=lambda c: c[1])
      out["targets"][size] = {
        "max_gb": gb,
        "best_method": method,
        "bytes": value,
        "basis": "measured" if measured else "predicted",
        "met": value < gb * 1e9,
      }
  return out


def run(sizes, reps, methods=None, options=None, quick=False, log=print, checkpoint=None) -> dict:
  """The ladder `sizes` for every method of `methods` (default all); see the module doc.

  `options`: the harness's largest_model flags (suites._FLAGS) as keywords (defaults `DEFAULTS`;
  budget_gb: needed where the device reports no limit, except with `quick`: 1 GB).
  `checkpoint(results)` before the first job and after every (method, size).
  """
  import jax  # pylint: disable=g-import-not-at-top

  settings = _settings(options, quick)
  methods = suites.chosen(methods or train_setups.METHODS, train_setups.METHODS, adamw=True)
  platform = jax.devices()[0].platform
  if settings["budget_gb"] is None and platform == "cpu":
    raise ValueError("the CPU reports no memory limit: pass --budget-gb")
  sizes = sorted(sizes, key=lambda s: list(SIZES).index(s))
  reported = QUICK_REPORTED if quick else REPORTED
  models = {
    s: train_setups.model_fields(
      SIZES[s], settings["vocab"], settings["remat"], settings["param_dtype"]
    )
    for s in sizes
  }
  results = {
    "methods": methods,
    "models": {s: {**f, "n_params": train_setups.n_params(f)} for s, f in models.items()},
    "rows": {},
  }
  for s in sizes:
    log(f"LLaMA {s}: {results['models'][s]['n_params'] / 1e9:.2f}e9 params")
  budget = None if settings["budget_gb"] is None else int(settings["budget_gb"] * 1e9)
  timeout = results["job_timeout_s"] = settings["job_timeout_s"]
  if checkpoint is not None:  # the configuration, before any job can hang
    checkpoint(results)
  with train_setups.Workers(platform != "cpu", timeout, log=log) as workers:
    for method in methods:
      rows = results["rows"][method] = []
      stopped = False
      for size in sizes:
        if stopped and size not in reported:
          rows.append({"size": size, "skipped": "a smaller size did not fit"})
          _log_row(method, rows[-1], log)
          continue
        job = {
          "module": __name__,
          "method": method,
          "size": size,
          "model": models[size],
          "batch": settings["batch"],
          "seq": settings["seq"],
          "rank": settings["rank"],
          "state_dtype": settings["state_dtype"],
          "attention": settings["attention"],
          "budget_bytes": budget,
          "steps": reps,
          "run": not stopped,
          "compilation_cache": settings["compilation_cache"],
        }
        row = {"size": size, **workers.run(job)}
        rows.append(row)
        _log_row(method, row, log)
        stopped = stopped or not row.get("ran")
        results["summary"] = _summary(results["rows"], reported)
        if checkpoint is not None:
          checkpoint(results)
  results["summary"] = _summary(results["rows"], reported)
  for method, entry in results["summary"]["methods"].items():
    log(f"  {method:<22} largest that ran: {entry['largest_that_ran']}")
  return results


def _size_text(n: int) -> str:
  return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _log_row(method, row, log) -> None:
  head = f"  {method:<22} {row['size']:<5}"
  if "skipped" in row:
    log(f"{head} skipped: {row['skipped']}")
    return
  if "error" in row and "need_bytes" not in row:
    log(f"{head} error: {row['error'][:300]}")
    return
  need = f"need {_size_text(row['need_bytes'])} of {_size_text(row['limit_bytes'])}"
  if row.get("ran"):
    peak = row.get("peak_bytes_in_use")
    peak = "-" if peak is None else _size_text(peak)
    log(
      f"{head} {need}   ran: peak {peak}, step {row['step_ms_median']:.1f} ms"
      f"   compile {sum(row['compile_s'].values()):.1f} s"
    )
  else:
    why = row.get("error") or ("does not fit" if not row["fits"] else "compile only")
    log(f"{head} {need}   not run: {why}   compile {sum(row['compile_s'].values()):.1f} s")


def describe(options, quick) -> dict:
  """The JSON's dtype, timing and config entries for these options."""
  s = _settings(options, quick)
  return {
    "dtype": f"compute bfloat16; parameters {s['param_dtype']}; optimizer state "
    + (s["state_dtype"] or "the method's own"),
    "matmul_precision": "JAX default except the refreshes, which use HIGHEST",
    "timing": "steps of a fitting size are run once each, synced by reading the loss; the"
    " times include no compilation but are not a benchmark of speed",
    "config": {
      **{k: v for k, v in s.items() if k != "state_dtype"},
      "state_dtype": s["state_dtype"] or "native",
      "rank": s["rank"] or "hidden / 4",
      "ladder": {k: list(SIZES[k]) for k in (QUICK_LADDER if quick else LADDER)},
      "ladder_fields": "hidden, ffn, heads, layers",
      "reported_sizes": list(QUICK_REPORTED if quick else REPORTED),
      "need": "memory_analysis: arguments + outputs - aliased outputs + temporaries,"
      " the larger of the step's and the refresh program's",
      "memory_fraction": train_setups.worker_env()["XLA_PYTHON_CLIENT_MEM_FRACTION"],
      "targets_gb": TARGETS_GB,
    },
  }


def figure(result):
  """Left: each method's largest model that ran. Right: the reported sizes' memory per method."""
  res = result["results"]
  summary = res["summary"]
  methods = list(summary["methods"])
  models = res["models"]
  fig, axes = record.subplots(1, 2, figsize=(12, 4.5))
  largest = [summary["methods"][m]["largest_that_ran"] for m in methods]
  axes[0].bar(methods, [models[s]["n_params"] / 1e9 if s else 0 for s in largest])
  for i, s in enumerate(largest):
    axes[0].annotate(
      s or "none",
      (i, models[s]["n_params"] / 1e9 if s else 0),
      ha="center",
      va="bottom",
      fontsize=8,
    )
  axes[0].set_ylabel("parameters (1e9)")
  axes[0].set_title("largest LLaMA whose train step ran", fontsize=9)
  reported = [s for s in result["config"]["reported_sizes"] if s in models]
  limits = [r["limit_bytes"] for rows in res["rows"].values() for r in rows if r.get("limit_bytes")]
  if limits:
    axes[1].axhline(limits[0] / 1e9, color="gray", linewidth=0.8, label="limit")
  entry = lambda m, size, key: summary["methods"][m].get(f"{size}_{key}")
  drawn = record.bars(
    axes[1],
    methods,
    {size: [(entry(m, size, "bytes") or 0) / 1e9 for m in methods] for size in reported},
    "peak bytes in use (hatched: predicted need, not run); dashed: targets",
    "GB (1e9 bytes)",
  )
  for size, group in zip(reported, drawn):
    for bar, m in zip(group, methods):
      bar.set_hatch("//" if entry(m, size, "basis") == "predicted" else None)
    if size in TARGETS_GB:
      axes[1].axhline(
        TARGETS_GB[size], color=group[0].get_facecolor(), linestyle="--", linewidth=0.8
      )
  axes[0].set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
  c = result["config"]
  fig.suptitle(
    f"largest model per method, {result['device']}, parameters {c['param_dtype']},"
    f" state {c['state_dtype']}, batch {c['batch']}×{c['seq']},"
    f" remat {c['remat']}",
    fontsize=10,
  )
  return fig
