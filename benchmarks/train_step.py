"""Suite `train_step`: tokens/s and peak device memory of the whole LLaMA train step, every method.

Each method's step is built by `benchmarks.train_setups` and run in a worker process (on a GPU one
per method; on the CPU, which has no peak counter, one for all), killed and recorded after
`--job-timeout-s`; the JSON is rewritten at each of a worker's progress lines. Per method: the
compile time and `memory_analysis()` (``need_bytes``: arguments + outputs − aliases + temps); the
median of `reps` synced steps after `warmup` and tokens/s; `reps` more steps back to back with one
sync (``*_pipelined``: a loop that fetches its losses every few steps overlaps the host's dispatch
with the device's work); the refresh (a step at count 0 for GaLore and GRASS, a program between
steps for the model level) and the step amortised over T = 200; the peak bytes; ratios to AdamW
within the run. docs/benchmarks.md, "Whole train step", has the defaults, commands and results.
"""

from __future__ import annotations

import math

from benchmarks import record
from benchmarks import suites
from benchmarks import train_setups
from examples.llama.config import MODEL_SIZES as SIZES

DEFAULT_SIZES = ("350m", "1b")
QUICK_SIZES = ("tiny",)
DEFAULT_BATCH = {
  "tiny": 8,
  "9m": 64,
  "20m": 64,
  "60m": 256,
  "130m": 256,
  "350m": 128,
  "1b": 64,
  "7b": 8,
}
SEQ = 256
VOCAB = 32000
# A job of the quick run that takes this long is killed and recorded (jaxlib 0.10's batched CPU
# LAPACK kernels can deadlock XLA's thread pool, see optax_subspace/projectors/random.py's
# `_one_matrix_per_call_on_cpu`; GaLore's eigh still can); other runs: `train_setups.JOB_TIMEOUT_S`.
QUICK_JOB_TIMEOUT_S = 120
QUICK = {"batch": 2, "seq": 16, "vocab": 512, "warmup": 1}
DEFAULT_REPS = 10
WARMUP = 2
TARGET_RATIO = 0.97  # issue 7: amortised tokens/s over AdamW's, LLaMA-1B
TARGET_METHODS = ("osd", "grass", "grass_model")
AMORTISED = f"amortised_over_{train_setups.UPDATE_EVERY}"


def _timed(fn, carry, calls: int, warmup: int, what: str = "steps"):
  """(median ms over `calls` synced calls after `warmup`, carry): ``carry = fn(carry)``
  (`optimizer_step.time_calls`), reported as progress."""
  from benchmarks import optimizer_step  # pylint: disable=g-import-not-at-top

  median, (carry,) = optimizer_step.time_calls(lambda c: (fn(c),), (carry,), calls, warmup)
  train_setups.progress(f"timed {calls} {what} after {warmup}: median {median:.2f} ms")
  return median, carry


def run_job(job: dict) -> dict:
  """One method at one size, in a worker process (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top

  setup, compiled, row = train_setups.start_job(job)
  row = {"method": setup.method, "level": setup.level, "host_refresh": setup.host_refresh, **row}
  train_setups.progress("initialising (eagerly)")
  carry = jax.block_until_ready(setup.init())
  tokens = setup.tokens(0)
  train_setups.progress("initialised")
  params, opt_state, frozen = carry
  row.update(train_setups.state_bytes(params, opt_state, frozen))
  if setup.level == "optimizer" and setup.state_dtype is None:
    # Issue 7's check: state bytes within 2% of the method's formula (float32 state).
    from benchmarks import optimizer_update  # pylint: disable=g-import-not-at-top

    shapes = jax.tree.map(lambda x: tuple(x.shape), params)
    analytic = optimizer_update.analytic_state_bytes(setup.method, shapes, setup.rank)
    row.update(analytic_state_bytes=analytic, state_over_analytic=row["opt_state_bytes"] / analytic)
  del params, opt_state, frozen
  if setup.steady_count is not None:  # past the step-0 refresh
    carry = (carry[0], setup.set_count(carry[1], setup.steady_count), carry[2])
  losses = []

  def step(carry):
    carry, loss = train_setups.run_step(compiled, carry, tokens)
    losses.append(loss)
    return carry

  step_ms, carry = _timed(step, carry, job["reps"], job["warmup"])
  losses = [float(x) for x in losses]
  # Steps back to back, one sync (`optimizer_step.time_pipelined`, one round).
  from benchmarks import optimizer_step  # pylint: disable=g-import-not-at-top

  pipelined_ms, (carry,) = optimizer_step.time_pipelined(
    lambda c: (train_setups.run_step(compiled, c, tokens)[0],), (carry,), job["reps"], rounds=1
  )
  train_setups.progress(f"{job['reps']} steps back to back: {pipelined_ms:.2f} ms per step")
  if job.get("profile_top"):  # where the step's device time goes, kernel by kernel
    from benchmarks import profile_update  # pylint: disable=g-import-not-at-top

    carry, row["kernels"] = profile_update.traced_kernels(
      lambda c: train_setups.run_step(compiled, c, tokens)[0],
      carry,
      job["reps"],
      job["profile_top"],
    )
    train_setups.progress(f"profiled: kernels {row['kernels']['kernel_ms']:.2f} ms per step")
  tokens_per_step = setup.batch * setup.seq
  row.update(
    step_ms=step_ms,
    tokens_per_s=tokens_per_step / (step_ms / 1e3),
    step_ms_pipelined=pipelined_ms,
    tokens_per_s_pipelined=tokens_per_step / (pipelined_ms / 1e3),
    loss_first=losses[0],
    loss_last=losses[-1],
    losses_finite=all(math.isfinite(x) for x in losses),
  )
  if setup.refresh_kind is not None:
    refresh_ms, carry = _timed(
      lambda c: train_setups.run_refresh(setup, compiled, c, tokens),
      carry,
      job["refresh_reps"],
      1,
      "refreshes",
    )
    t = setup.update_every
    if setup.refresh_kind == "count":  # the refresh step replaces one step in T
      amortise = lambda step: (refresh_ms + (t - 1) * step) / t
    else:  # the refresh program runs between steps, once in T
      amortise = lambda step: step + refresh_ms / t
    row.update(refresh_kind=setup.refresh_kind, refresh_ms=refresh_ms)
  else:
    amortise = lambda step: step
  for suffix, step in (("", step_ms), ("_pipelined", pipelined_ms)):
    row[f"step_ms_{AMORTISED}{suffix}"] = amortise(step)
    row[f"tokens_per_s_{AMORTISED}{suffix}"] = tokens_per_step / (amortise(step) / 1e3)
  del carry
  row.update(train_setups.device_memory())
  return row


def _ratios(rows) -> None:
  """Adds each row's ratios to AdamW's (tokens/s plain and amortised, peak and needed bytes)."""
  base = next((r for r in rows if r["method"] == "adamw" and "step_ms" in r), None)
  if base is None:
    return
  for r in rows:
    if "step_ms" not in r:
      continue
    for key in (
      "tokens_per_s",
      f"tokens_per_s_{AMORTISED}",
      "tokens_per_s_pipelined",
      f"tokens_per_s_{AMORTISED}_pipelined",
    ):
      if key in r and key in base:
        r[f"{key}_ratio_to_adamw"] = r[key] / base[key]
    if r.get("peak_bytes_in_use") and base.get("peak_bytes_in_use"):
      r["peak_ratio_to_adamw"] = r["peak_bytes_in_use"] / base["peak_bytes_in_use"]
    r["need_bytes_ratio_to_adamw"] = (
      r["memory_analysis"]["step"]["need_bytes"] / base["memory_analysis"]["step"]["need_bytes"]
    )


def _targets(rows) -> dict:
  """Issue 7's check per target method: amortised tokens/s over AdamW's, synced steps
  ("ratio") and steps back to back ("ratio_pipelined")."""
  by = {r["method"]: r for r in rows}
  key = f"tokens_per_s_{AMORTISED}_ratio_to_adamw"
  piped = f"tokens_per_s_{AMORTISED}_pipelined_ratio_to_adamw"
  out = {"amortised_tokens_per_s_ratio_min": TARGET_RATIO, "applies_at": "1b"}
  for m in TARGET_METHODS:
    if key in by.get(m, {}):
      out[m] = {"ratio": by[m][key], "met": by[m][key] >= TARGET_RATIO}
      if piped in by[m]:
        out[m].update(ratio_pipelined=by[m][piped], met_pipelined=by[m][piped] >= TARGET_RATIO)
  return out


def state_dtype(options) -> str | None:
  """The optimizer-state dtype of `options` (None: the method's own, "native" on the CLI)."""
  value = options.get("state_dtype")
  return None if value in (None, "native") else value


def describe(options, quick) -> dict:
  """The JSON's dtype, timing and config entries for these options."""
  options = dict(options or {})
  param = options.get("param_dtype") or "float32"
  state = state_dtype(options)
  return {
    "dtype": f"compute bfloat16; parameters {param}; optimizer state "
    + (
      state
      or "the method's own (Adam's moments in the parameters' dtype, the"
      " library's projector state float32)"
    ),
    "matmul_precision": "JAX default (TF32 on H100/H200 for float32 products) except the"
    " refreshes, which use HIGHEST",
    "timing": f"median of --reps synced steps after {options.get('warmup', WARMUP)} warm-up"
    " steps (refreshes: after 1); *_pipelined: --reps steps back to back, one sync;"
    " random tokens, parameters and state donated; no"
    " gradient clipping; learning rate: the example's warm-up + cosine schedule",
    "config": {
      "seq": options.get("seq") or (QUICK["seq"] if quick else SEQ),
      "batch": options.get("batch") or ("quick" if quick else DEFAULT_BATCH),
      "vocab": QUICK["vocab"] if quick else VOCAB,
      "remat": bool(options.get("remat")),
      "scan_layers": bool(options.get("scan_layers")),
      "param_dtype": param,
      "host_refresh": bool(options.get("host_refresh")),
      "hlo_dir": options.get("hlo_dir"),
      "state_dtype": state or "native",
      "attention": options.get("attention") or "auto",
      "rank": options.get("rank") or "hidden / 4",
      "projected": "attention and MLP kernels (optimizer level: examples/llama/"
      "optimizers.py PROJECTED; model level: those nnx.Linear layers)",
      "update_every_amortised": options.get("update_every") or train_setups.UPDATE_EVERY,
      "memory_fraction": train_setups.worker_env()["XLA_PYTHON_CLIENT_MEM_FRACTION"],
      "compilation_cache": options.get("compilation_cache"),
    },
  }


def run(sizes, reps, methods=None, options=None, quick=False, log=print, checkpoint=None) -> dict:
  """Every method of `methods` (default all; AdamW always) at every size; see the module doc.

  `options`: the harness's train_step flags (suites._FLAGS) as keywords, and update_every, warmup.
  `checkpoint(results)` is called before the first method, as each starts (its row "running"),
  on each of its progress lines and after it: a cut run keeps what finished and where it was.
  """
  import jax  # pylint: disable=g-import-not-at-top

  options = dict(options or {})
  known = train_setups.METHODS + train_setups.VARIANTS
  methods = suites.chosen(methods or train_setups.METHODS, known, adamw=True)
  if options.get("scan_layers"):
    left_out = [m for m in methods if m in train_setups.NEEDS_LAYER_MODULES]
    if left_out:
      log(f"--scan-layers: leaving out {', '.join(left_out)} (one module per layer needed)")
    methods = [m for m in methods if m not in train_setups.NEEDS_LAYER_MODULES]
  seq = options.get("seq") or (QUICK["seq"] if quick else SEQ)
  vocab = QUICK["vocab"] if quick else VOCAB
  warmup = options.get("warmup", QUICK["warmup"] if quick else WARMUP)
  isolate = jax.devices()[0].platform != "cpu"
  results = {"methods": methods, "sizes": []}
  timeout = options.get("job_timeout_s") or (
    QUICK_JOB_TIMEOUT_S if quick else train_setups.JOB_TIMEOUT_S
  )
  results["job_timeout_s"] = timeout
  save = checkpoint or (lambda results: None)
  with train_setups.Workers(isolate, timeout, log=log) as workers:
    for size in sizes:
      batch = options.get("batch") or (QUICK["batch"] if quick else DEFAULT_BATCH.get(size, 64))
      fields = train_setups.model_fields(
        SIZES[size],
        vocab,
        bool(options.get("remat")),
        options.get("param_dtype") or "float32",
        bool(options.get("scan_layers")),
      )
      entry = {
        "size": size,
        "model": fields,
        "n_params": train_setups.n_params(fields),
        "batch": batch,
        "seq": seq,
        "tokens_per_step": batch * seq,
        "rank": options.get("rank") or fields["hidden"] // 4,
        "rows": [],
      }
      results["sizes"].append(entry)
      log(
        f"LLaMA {size}: {entry['n_params'] / 1e6:.1f}M params, batch {batch} x {seq},"
        f" rank {entry['rank']}"
      )
      save(results)
      for method in methods:
        job = {
          "module": __name__,
          "method": method,
          "size": size,
          "model": fields,
          "batch": batch,
          "seq": seq,
          "rank": entry["rank"],
          "state_dtype": state_dtype(options),
          "attention": options.get("attention") or "auto",
          "update_every": options.get("update_every") or train_setups.UPDATE_EVERY,
          "reps": reps,
          "warmup": warmup,
          "refresh_reps": max(2, reps // 5),
          "profile_top": options.get("profile_top"),
          "host_refresh": bool(options.get("host_refresh")),
          "hlo_dir": options.get("hlo_dir"),
          "compilation_cache": options.get("compilation_cache"),
        }
        row = {"method": method, "status": "running"}
        entry["rows"].append(row)
        save(results)

        def on_progress(message, row=row):
          row["last_progress"] = message
          save(results)

        result = workers.run(job, on_progress)
        row.clear()
        row.update({"method": method, **result})
        _log_row(row, log)
        _ratios(entry["rows"])
        entry["targets"] = _targets(entry["rows"])
        save(results)
  return results


def _log_row(row, log) -> None:
  if "error" in row:
    log(f"  {row['method']:<22} error: {row['error'][:300]}")
    return
  peak = row.get("peak_bytes_in_use")
  refresh = f"   refresh {row['refresh_ms']:9.1f} ms" if "refresh_ms" in row else ""
  log(
    f"  {row['method']:<22} {row['step_ms']:9.2f} ms  {row['tokens_per_s']:12.0f} tok/s"
    f"   back to back {row.get('step_ms_pipelined', float('nan')):9.2f} ms"
    f"   amortised {row[f'tokens_per_s_{AMORTISED}']:12.0f} tok/s{refresh}"
    f"   peak {'-' if peak is None else f'{peak / 2**30:.2f} GiB'}"
    f"   compile {sum(row['compile_s'].values()):.1f} s"
  )


def figure(result):
  """Amortised tokens/s and peak memory (predicted need where no peak is measured) per method."""
  sizes = result["results"]["sizes"]
  methods = [
    m
    for m in train_setups.METHODS + train_setups.VARIANTS
    if any(r["method"] == m and "step_ms" in r for s in sizes for r in s["rows"])
  ]
  measured = all(r.get("peak_bytes_in_use") for s in sizes for r in s["rows"] if "step_ms" in r)
  memory = (
    (lambda r: r["peak_bytes_in_use"])
    if measured
    else (lambda r: r["memory_analysis"]["step"]["need_bytes"])
  )
  by_size = {
    f"{s['size']} ({s['batch']}×{s['seq']})": {r["method"]: r for r in s["rows"] if "step_ms" in r}
    for s in sizes
  }
  fig, axes = record.subplots(1, 2, figsize=(12, 4.5))
  for ax, value, title, ylabel in [
    (
      axes[0],
      lambda r: r[f"tokens_per_s_{AMORTISED}"] / 1e3,
      "whole train step throughput",
      f"thousand tokens/s (refresh amortised over {train_setups.UPDATE_EVERY})",
    ),
    (
      axes[1],
      lambda r: memory(r) / 2**30,
      "peak device memory (memory_stats)"
      if measured
      else "predicted need (memory_analysis: args + outputs − aliases + temp)",
      "GiB",
    ),
  ]:
    record.bars(
      ax,
      methods,
      {label: [value(by[m]) if m in by else 0 for m in methods] for label, by in by_size.items()},
      title,
      ylabel,
      "LLaMA",
    )
  fig.suptitle(
    f"train step, {result['device']}, bf16 compute, parameters "
    f"{sizes[0]['model']['param_dtype'] if sizes else ''}",
    fontsize=10,
  )
  return fig
