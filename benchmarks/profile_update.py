"""Where the time of one optimizer update goes: device kernels, grouped, per method.

On the LLaMA tree of `optimizer_step.py` (default 1B, rank 512), one update + apply per method
(params and state donated, steady steps) run under `jax.profiler.trace`; the device kernels'
time per call by kind (`traces.KINDS`: GEMMs, fusions, copies/transposes, reductions, other) and
the top kernels with their share, next to the median synced wall time of the same calls ("wall")
and the time per call of calls back to back with one sync ("pipelined"). On the CPU the trace
holds no device kernels (every figure 0): a smoke run (--size tiny) checks the plumbing.

With --method-timeout-s S each method runs in a process of its own (`train_setups.Workers`),
killed after S seconds: a method whose compile or calls never finish (APOLLO's update has
stalled on an H100 where XLA autotunes its GEMMs) leaves a row with its error and the last
phase it reached ("compiled in …", "timing …"), and the methods after it still run.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

import optax_subspace as osub
from benchmarks import optimizer_step
from benchmarks import optimizer_update
from benchmarks import record
from benchmarks import suites
from benchmarks import train_setups
from benchmarks import traces
from benchmarks.traces import KINDS, kind_of  # noqa: F401  (re-exported: profile rows' kinds)

# Rounds of subspace iteration of "galore_refresh_warm" and (on r + r/2 columns, the 9M example's
# gradients' ≥ 0.999 of the exact top-r energy on every kernel) "galore_refresh_warm_oversampled".
WARM_ITERATIONS = 2
OVERSAMPLED_ITERATIONS = 3
PROFILED = (
  "adamw",
  "galore_steady",
  "galore_steady_unpadded",
  "galore_steady_bf16_products",
  "osd_steady",
  "galore_steady_host_refresh",
  "osd_steady_host_refresh",
  "osd_steady_bf16_products_host_refresh",
  "osd_steady_unpadded",
  "osd_steady_bf16_products",
  "galore_refresh",
  "galore_refresh_unchunked",
  "galore_refresh_warm",
  "galore_refresh_warm_oversampled",
  "fira_steady",
  "frugal_steady",
  "frugal_rows_steady",
  "apollo_steady",
  "apollo_mini_steady",
  "apollo_steady_unpadded",
  "apollo_mini_steady_unpadded",
  "apollo_steady_stored_basis",
  "apollo_mini_steady_stored_basis",
  "grass_steady_host_refresh",
  "rso_steady_host_refresh",
  "rso_steady_stored_basis_host_refresh",
  "rso_steady_held_bases_host_refresh",
  "apollo_steady_held_bases",
  "apollo_steady_unheld_bases",
  "rso_steady_unheld_bases_host_refresh",
  "galore_steady_stacked_products_host_refresh",
  "osd_steady_stacked_products_host_refresh",
  "rso_steady_stacked_products_host_refresh",
  "osd_steady_unstacked_direction_host_refresh",
  "osd_steady_per_leaf_steps_host_refresh",
  "galore_steady_stacked_under_2m_host_refresh",
  "osd_steady_stacked_under_2m_host_refresh",
  "rso_steady_stacked_under_2m_host_refresh",
  "rso_steady_bases_as_product_stacks_host_refresh",
  "apollo_steady_bases_cut_per_leaf",
  "rso_steady_bases_cut_per_leaf_host_refresh",
  "galore_steady_columns_stacked_as_stored_host_refresh",
  "galore_steady_columns_joined_transposed_host_refresh",
  "osd_steady_columns_joined_transposed_host_refresh",
  "osd_steady_columns_stacked_as_stored_host_refresh",
)


def methods(rank: int, dims=None) -> dict:
  """name -> (transformation, count to start at) of each of `PROFILED`: `optimizer_step.variants`
  by name ("galore_refresh": its galore_refresh_svd) with these suffixes.

  "*_unpadded" compile with the combinator's PRODUCT_ALIGNMENT at 1: products with gradients
  whose kept side is not a multiple of 8 (1B's ffn 5461) run on the gradient as it is.
  "galore_refresh*" refresh at every call (T = 1; "galore_refresh_warm": after the first call
  the refresh is `WARM_ITERATIONS` rounds of subspace iteration from the previous basis,
  `projectors.svd(..., warm_iterations=...)`; "galore_refresh_warm_oversampled":
  `OVERSAMPLED_ITERATIONS` rounds on r + r/2 columns, ``warm_oversample=rank // 2``, the top r
  kept by a Rayleigh–Ritz eigh); "*_unchunked" compile with
  `_chunks.OPTIMIZER_REFRESH_CHUNK_BYTES` unbounded (one batched refresh per shape, as before
  972ca93). "*_host_refresh": the update told on the host that the step does not refresh
  (``subspace_refresh=False``: no refresh cond, so no host sync at it on a GPU).
  "fira_steady", "frugal_steady", "apollo_steady", "apollo_mini_steady": those presets' steady
  steps (`_output_variants`), to see where their time over GaLore's goes ("frugal_rows_steady":
  FRUGAL with ``projector="rows"``, a gather and a scatter instead of products);
  (73a30f5's "*_term_barrier" held Fira's and FRUGAL's padded back-projection before their
  term joins it: Fira's is held since.) "apollo*_unpadded":
  APOLLO pads G only for its one product R = PᵀG (1.5 ms of the 1B update on an H100), which
  may cost more than an unaligned product; "apollo*_stored_basis": P kept in the state
  (``store_basis=True``) instead of drawn from its key in every update, a Gaussian draw that
  XLA may fuse into the product with G. "grass_steady*", "rso_steady*": GRASS's and RSO's steady
  steps (RSO at `rank`, its P regenerated from its key in every update, or with
  ``store_basis=True`` kept in the state), to see what RSO's redraw costs. "*_held_bases"
  compile with the combinator's HOLD_COMPUTED_BASES on: RSO's and APOLLO's per-leaf cuts of
  their stacked bases held, so that XLA autotunes the GEMMs that read them (RSO's are held
  by default since 92e9a51, APOLLO's since fe293fe made their program compile: "rso_steady*"
  and "apollo*_steady" without the suffix hold them too); "*_unheld_bases" with it off.
  "*_stacked_products" compile with the combinator's STACKED_PRODUCT_ELEMENTS at 2^20: the
  products of matrices under a million elements (every matrix of the 60M tree, none of the
  1B tree's) batched per (s, l, r); it is the default since a2ce464, and since a83aa76 the
  leaves projected on their columns (60M's 8 down projections under GaLore and OSD) join them.
  "*_unstacked_direction" compile with the combinator's OWN_BATCH_MATRICES at 1: OSD's ∇P
  runs per leaf, not stacked by (s, r), so no concatenation of P and G·GᵀP (2.94 ms of the 1B
  update on an H100). "*_per_leaf_steps" compile with the combinator's
  STACK_SMALL_PROJECTOR_STEPS off: the small matrices' OSD steps on P per leaf, their
  inputs and products still stacked (80697b9 stacks both; the default since af9fd14).
  "*_stacked_under_2m" compile with STACKED_PRODUCT_ELEMENTS at 2^21: LLaMA-350M's 96
  attention matrices (1024², exactly the default's 2^20, so per leaf by default) stacked too,
  its MLP's not (slower in 350M's whole step, 523014e). "*_bases_as_product_stacks" compile
  with the combinator's BASES_AS_PRODUCT_STACKS on: RSO's bases of the matrices whose
  products run stacked drawn in those stacks, not cut and held per leaf and concatenated
  again (the default since af9fd14); "*_bases_cut_per_leaf" with it off (before af9fd14).
  "*_columns_stacked_as_stored" compile with COLUMNS_STACKED_AS_STORED on: the leaves projected
  on their columns (60M's 8 down projections under GaLore and OSD) stacked apart, in their
  stored layout, instead of transposed into their bucket's stack (the default since it was
  measured, after 04c3fd3); "*_columns_joined_transposed" with it off (04c3fd3's default).
  (Earlier runs' "*_stacked_state" and "*_swapped_updates" measured layouts since taken out;
  04c3fd3's "*_ordered_count_keeps" and "*_split_direction_stacks" settings too.)
  """
  table = optimizer_step.variants(rank, dims=dims)
  table["galore_refresh"] = table["galore_refresh_svd"]
  warm = osub.projectors.svd(rank, 1, warm_iterations=WARM_ITERATIONS)
  table["galore_refresh_warm"] = (
    osub.galore(1e-3, rank, 1, mask=optimizer_step.PROJECTED, dims=dims, projector=warm),
    None,
  )
  oversampled = osub.projectors.svd(
    rank, 1, warm_iterations=OVERSAMPLED_ITERATIONS, warm_oversample=rank // 2
  )
  table["galore_refresh_warm_oversampled"] = (
    osub.galore(1e-3, rank, 1, mask=optimizer_step.PROJECTED, dims=dims, projector=oversampled),
    None,
  )
  table.update(_output_variants(rank, dims))
  suffixes = "|".join(s.lstrip("_") for s in [*train_setups.COMPILE_SETTINGS, "_host_refresh"])
  suffixes = rf"(_({suffixes}))+$"
  return {n: table[re.sub(suffixes, "", n)] for n in PROFILED}


def _output_variants(rank: int, dims, lr: float = 1e-3) -> dict:
  """Steady steps (from count 1; T never comes) of the methods with a residual path or a
  scaling output: Fira and FRUGAL at `rank`, APOLLO at `rank`, APOLLO-Mini at rank 1; and RSO's
  at `rank` (K never comes)."""
  common = {"mask": optimizer_step.PROJECTED, "dims": dims}
  never = optimizer_step.NEVER
  return {
    "fira_steady": (osub.fira(lr, rank, never, **common), 1),
    "frugal_steady": (osub.frugal(lr, rank, never, **common), 1),
    "frugal_rows_steady": (osub.frugal(lr, rank, never, projector="rows", **common), 1),
    "apollo_steady": (osub.apollo(lr, rank, never, **common), 1),
    "apollo_mini_steady": (osub.apollo_mini(lr, never, **common), 1),
    "apollo_steady_stored_basis": (osub.apollo(lr, rank, never, store_basis=True, **common), 1),
    "apollo_mini_steady_stored_basis": (
      osub.apollo_mini(lr, never, store_basis=True, **common),
      1,
    ),
    "rso_steady": (osub.rso(lr, rank, never, **common), 1),
    "rso_steady_stored_basis": (osub.rso(lr, rank, never, store_basis=True, **common), 1),
  }


def traced_kernels(run, carry, reps: int, top: int):
  """(carry, summary): `reps` calls ``carry = run(carry)`` under `jax.profiler.trace`.

  The summary (`traces.summary`, per call) adds the device kernels' total time (`kernel_ms`). On
  the CPU the trace holds no device kernels: every figure is 0.
  """
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(reps):
        carry = run(carry)
      jax.block_until_ready(carry)
    kernels = [k for found in traces.device_events(pathlib.Path(tmp)).values() for k in found]
  summary = traces.summary(kernels, reps, top)
  return carry, {"kernel_ms": sum(summary["by_kind_ms"].values()), **summary}


def update_step(name: str, tx):
  """The profiled program of method `name`: `tx`'s update and the weights' add, ``(params, state,
  grads) -> (params, state)`` (the caller donates params and state); a "*_host_refresh" update
  is told on the host that no refresh is due."""
  extra = {"subspace_refresh": False} if name.endswith("_host_refresh") else {}

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state

  return step


def profile(name, tx, count, params, grads, reps: int, top: int, hlo_dir=None) -> dict:
  step = update_step(name, tx)
  state = jax.jit(tx.init)(params)
  if count is not None:
    state = optimizer_update._count_setter(state)(state, count)  # past the step-0 refresh
  started = time.perf_counter()
  train_setups.progress(f"{name}: compiling")
  with train_setups.compile_settings(name):  # changed around the compile only
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
  train_setups.progress(f"{name}: compiled in {time.perf_counter() - started:.1f} s; first call")
  if hlo_dir:  # the kernel names of `top` are the fusions' names in this text
    record.write_hlo(pathlib.Path(hlo_dir) / f"{name}.hlo.txt.gz", compiled.as_text())
  p = jax.tree_util.tree_map(jnp.copy, params)
  run = lambda p, s: (*compiled(p, s, grads),)
  wall, (p, state) = optimizer_step.time_calls(run, (p, state), reps)
  train_setups.progress(f"{name}: synced calls timed; timing calls back to back")
  pipelined, (p, state) = optimizer_step.time_pipelined(run, (p, state), reps)
  train_setups.progress(f"{name}: calls back to back timed; tracing kernels")
  (p, state), summary = traced_kernels(lambda c: run(*c), (p, state), reps, top)
  del p, state
  row = {"method": name, "wall_ms": wall, "pipelined_ms": pipelined, **summary}
  print(
    f"{name:<30} wall {wall:8.2f} ms  pipelined {pipelined:8.2f} ms"
    f"  kernels {row['kernel_ms']:8.2f} ms"
    f"  ({row['kernels_per_step']:.0f} per step)  "
    + ", ".join(f"{k} {v:.2f}" for k, v in row["by_kind_ms"].items()),
    flush=True,
  )
  return row


def main(argv=None) -> dict:
  # --hlo-dir: each method's compiled HLO goes there (<method>.hlo.txt.gz); --scanned: the tree
  # of a scanned model (kernels stacked over the layers, so each leaf's products run batched);
  # --commit: the one to record (default: $OPTAX_SUBSPACE_COMMIT or git); --method-timeout-s:
  # each method in its own process, killed after that many seconds (0: all in this one).
  args = suites.script_parser(
    __doc__,
    size=["1b", *optimizer_step.SIZES],
    reps=10,
    top=25,
    hlo_dir="",
    methods="",
    scanned=False,
    commit="",
    method_timeout_s=0.0,
  ).parse_args(argv)
  if args.method_timeout_s:
    train_setups.prepare_parent()  # the workers hold the device's memory, not this process
  cfg = optimizer_step.SIZES[args.size]
  names = suites.chosen(args.methods, PROFILED) if args.methods else list(PROFILED)
  result = {
    **record.provenance("profile_update", argv),
    "size": args.size,
    "scanned": args.scanned,
    "config": cfg,
    "reps": args.reps,
    "timing": "kernel_ms: device kernel durations from a jax.profiler Perfetto trace, summed"
    " and divided by the traced calls; wall_ms: median synced wall time;"
    " pipelined_ms: wall time per call of `reps` calls in a row with one sync"
    " (median of 3 rounds)",
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "rows": [],
  }
  result["commit"] = args.commit or result["commit"]
  started = time.perf_counter()
  if args.hlo_dir:
    pathlib.Path(args.hlo_dir).mkdir(parents=True, exist_ok=True)
  jobs = [
    {
      "module": __name__,
      "method": name,
      "size": args.size,
      "scanned": args.scanned,
      "reps": args.reps,
      "top": args.top,
      # Absolute: a worker runs in the repository root, not necessarily the caller's folder.
      "hlo_dir": str(pathlib.Path(args.hlo_dir).resolve()) if args.hlo_dir else "",
    }
    for name in names
  ]
  with contextlib.ExitStack() as stack:
    if args.method_timeout_s:
      workers = stack.enter_context(
        train_setups.Workers(isolate=True, timeout_s=args.method_timeout_s)
      )
      run = lambda job: {"method": job["method"], **workers.run(job)}
    else:
      tree = _trees(args.size, args.scanned)
      run = lambda job: run_job(job, tree)
    for job in jobs:
      result["rows"].append(run(job))
      result["elapsed_s"] = time.perf_counter() - started
      record.write_json(args.out, result)
  return result


def _trees(size: str, scanned: bool) -> tuple:
  """(params, grads) of the LLaMA tree of `size` (`optimizer_step.llama_shapes`)."""
  cfg = optimizer_step.SIZES[size]
  shapes = optimizer_step.llama_shapes(**cfg, scanned=scanned)
  params = optimizer_step.make_tree(shapes, 0, lambda k, s: 0.02 * jax.random.normal(k, s))
  grads = optimizer_step.make_tree(shapes, 1, optimizer_step.synthetic_gradient)
  return params, grads


def run_job(job: dict, tree: tuple | None = None) -> dict:
  """One method's row (`profile`); a `train_setups.Workers` job, or `main`'s in its process
  with the `tree` it built once for every method."""
  rank = optimizer_step.SIZES[job["size"]]["rank"]
  dims = osub.MatrixDims(rows=1, cols=2) if job["scanned"] else None
  tx, count = methods(rank, dims=dims)[job["method"]]
  params, grads = tree or _trees(job["size"], job["scanned"])
  return profile(job["method"], tx, count, params, grads, job["reps"], job["top"], job["hlo_dir"])
