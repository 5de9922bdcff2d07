"""Suite `optimizer_update`: update time and state bytes of every method on LLaMA trees.

On the tree of a non-scanned Flax LLaMA (`optimizer_step.llama_shapes`; rank hidden/4; the
attention and MLP kernels projected), one jitted ``update + apply_updates`` per method, parameters
and state donated, gradients synthetic, the median of synced calls after 2 warm-up calls.
Methods: adamw; optax_contrib_galore (where installed; started at count 1, so its P stays zero:
the products cost the same); galore / galore_refresh and grass / grass_refresh (a steady step and
the refresh step, one compiled program: the refresh is timed with the count set back to 0 before
each call); osd; rso; fira, frugal, apollo, apollo_mini (steady steps). State bytes are
measured and compared with each method's analytic formula
(`analytic_state_bytes`; target: within 2%); refreshes are also amortised over T = 200. A method
whose parameters, gradients and analytic state exceed the device's `bytes_limit` is skipped, one
that runs out of memory recorded with its error.
"""

from __future__ import annotations

import collections
import gc
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_subspace as osub
from benchmarks import optimizer_step
from benchmarks import record
from benchmarks import suites

DEFAULT_SIZES = ("60m", "350m", "1b")
UPDATE_EVERY = 200  # T of the amortised rows
# optax.contrib.galore's state, where this optax has it (its count is set like ours).
_OPTAX_GALORE_STATE = getattr(getattr(optax, "contrib", None), "GaLoreState", None)
METHODS = (
  "adamw",
  "optax_contrib_galore",
  "galore",
  "galore_refresh",
  "osd",
  "rso",
  "grass",
  "grass_refresh",
  "fira",
  "frugal",
  "apollo",
  "apollo_mini",
)
# Words (4 bytes each: float32 moments and bases, int32 indices and keys) of the state of one
# projected matrix, (s, l) its smaller and larger side, (m, n) its rows (input side) and
# columns, r the rank; every other leaf holds Adam's 2·size. Scalar step counters not counted.
PROJECTED_WORDS = {
  "adamw": lambda s, l, m, n, r: 2 * s * l,
  # P on the larger side (l × r), moments r × s.
  "optax_contrib_galore": lambda s, l, m, n, r: r * l + 2 * r * s,
  # P (s × r), moments r × l.
  "galore": lambda s, l, m, n, r: r * s + 2 * r * l,
  # P (s × r) and AdamW's moments on P (2·s × r), moments r × l.
  "osd": lambda s, l, m, n, r: 3 * r * s + 2 * r * l,
  # P regenerated from a key (2 words), a subproblem index and, for m ≥ 2r, its QR factor
  # (r × r); moments of B (r × n).
  "rso": lambda s, l, m, n, r: 2 * r * n + 3 + (r * r if m >= 2 * r else 0),
  # The same, and P_k kept (m × r, rso(..., store_basis=True)).
  "rso_stored_basis": lambda s, l, m, n, r: 2 * r * n + 3 + m * r,
  # σ (r), ρ (r), the row counts (s), moments r × l.
  "grass": lambda s, l, m, n, r: 2 * r + s + 2 * r * l,
  # GaLore's and the limiter's previous norm.
  "fira": lambda s, l, m, n, r: r * s + 2 * r * l + 1,
  # GaLore's and Adam's per-matrix step count (its state restarts with the subspace).
  "frugal": lambda s, l, m, n, r: r * s + 2 * r * l + 1,
  # Moments r × l, the limiter's norm, P regenerated from a key (2 words) and an index.
  "apollo": lambda s, l, m, n, r: 2 * r * l + 4,
  # Rank 1.
  "apollo_mini": lambda s, l, m, n, r: 2 * l + 4,
}


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def _leaves(shapes):
  return jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]


def _projected(path: str, shape) -> bool:
  return len(shape) == 2 and re.search(optimizer_step.PROJECTED, path) is not None


# Variants that hold their base method's state: another refresh, or another operand dtype of the
# products.
SAME_STATE_AS = {
  "galore_warm": "galore",
  "galore_bf16_products": "galore",
  "galore_warm_bf16_products": "galore",
  "osd_bf16_products": "osd",
  "osd_per_leaf_steps": "osd",
  "rso_bases_as_product_stacks": "rso",
  "galore_stacked_under_2m": "galore",
  "osd_stacked_under_2m": "osd",
  "rso_stacked_under_2m": "rso",
  "galore_columns_stacked_as_stored": "galore",
  "galore_columns_joined_transposed": "galore",
  "osd_columns_joined_transposed": "osd",
  "osd_columns_stacked_as_stored": "osd",
}


def analytic_state_bytes(method: str, shapes, rank: int) -> int:
  """The state bytes `method` should hold on the tree `shapes` at `rank` (float32)."""
  method = method.removesuffix("_refresh")
  words = PROJECTED_WORDS[SAME_STATE_AS.get(method, method)]
  total = 0
  for path, shape in _leaves(shapes):
    if _projected(_path(path), shape):
      m, n = shape
      s, l = min(shape), max(shape)
      total += words(s, l, m, n, min(rank, s))
    else:
      total += 2 * int(np.prod(shape))
  return 4 * total


def _optax_galore_dims(params):
  """optax.contrib.galore's dimension numbers: the kernels we project, nothing else."""
  dims = optax.contrib.GaLoreDimensionNumbers(0, 1)
  return jax.tree_util.tree_map_with_path(
    lambda path, p: dims if _projected(_path(path), p.shape) else None, params
  )


def transformations(rank: int, lr: float = 1e-3) -> dict:
  """name -> (transformation, count the timed steps start from or None, refresh row or None).

  A method with a refresh row is compiled once: its steady steps run from count 1, its refresh
  steps with the count set back to 0 before each call (the refresh branch of the same program,
  as in training at steps 0, T, 2T, ...).
  """
  mask = optimizer_step.PROJECTED
  txs = {"adamw": (optax.adamw(lr), None, None)}
  if _OPTAX_GALORE_STATE is not None:
    txs["optax_contrib_galore"] = (
      optax.contrib.galore(
        lr,
        rank=rank,
        update_proj_gap=optimizer_step.NEVER,
        weight_dimension_numbers=_optax_galore_dims,
      ),
      1,
      None,
    )
  txs.update(
    {
      "galore": (osub.galore(lr, rank, UPDATE_EVERY, mask=mask), 1, "galore_refresh"),
      "osd": (osub.online_subspace_descent(lr, rank, mask=mask), 1, None),
      "rso": (osub.rso(lr, rank, UPDATE_EVERY, mask=mask), 1, None),
      "grass": (osub.grass(lr, rank, UPDATE_EVERY, mask=mask), 1, "grass_refresh"),
      "fira": (osub.fira(lr, rank, UPDATE_EVERY, mask=mask), 1, None),
      "frugal": (osub.frugal(lr, rank, UPDATE_EVERY, mask=mask), 1, None),
      "apollo": (osub.apollo(lr, rank, UPDATE_EVERY, mask=mask), 1, None),
      "apollo_mini": (osub.apollo_mini(lr, UPDATE_EVERY, mask=mask), 1, None),
    }
  )
  return txs


def _count_setter(state):
  """A function ``(state, count) -> state`` that sets the step count of every subspace state.

  Subspace states: our `ProjectSubspaceState` and optax.contrib.galore's `GaLoreState`, whose
  count decides when the projector is refreshed. Their flat positions are found once, so a call
  costs a flatten and an unflatten; each call makes a new count array (the state is donated).
  """
  types = tuple(t for t in (osub.ProjectSubspaceState, _OPTAX_GALORE_STATE) if t is not None)
  is_counted = lambda x: isinstance(x, types)
  marker = object()
  marked = jax.tree_util.tree_map(
    lambda x: x._replace(count=marker) if is_counted(x) else x, state, is_leaf=is_counted
  )
  positions = [i for i, leaf in enumerate(jax.tree_util.tree_leaves(marked)) if leaf is marker]

  def set_count(state, count):
    leaves, treedef = jax.tree_util.tree_flatten(state)
    for i in positions:
      leaves[i] = jnp.asarray(count, jnp.int32)
    return treedef.unflatten(leaves)

  return set_count


def bench_method(name, tx, params, grads, reps, steady_count, refresh_name, log=print):
  """Compile time, state bytes, median steady step (and refresh step) of one transformation.

  `params` is donated to the timed calls (consumed). Timing: `optimizer_step.time_calls`.
  """

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.jit(tx.init)(params)
  state_bytes = optimizer_step.nbytes(state)
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
  compile_s = time.perf_counter() - t0
  set_count = _count_setter(state)
  if steady_count is not None:  # start past the step-0 refresh
    state = set_count(state, steady_count)
  steady = lambda p, s: (*compiled(p, s, grads),)
  median, (params, state) = optimizer_step.time_calls(steady, (params, state), reps)
  rows = [{"method": name, "median_ms": median, "compile_s": compile_s, "state_bytes": state_bytes}]
  if refresh_name is not None:
    refresh = lambda p, s: (*compiled(p, set_count(s, 0), grads),)
    median, (params, state) = optimizer_step.time_calls(
      refresh, (params, state), max(3, reps // 10)
    )
    rows.append(
      {
        "method": refresh_name,
        "median_ms": median,
        "compile_s": compile_s,
        "state_bytes": state_bytes,
        "program": f"{name}'s, count set to 0",
      }
    )
  del params, state
  for r in rows:
    log(
      f"  {r['method']:<22} {r['median_ms']:10.3f} ms   compile {compile_s:6.1f} s"
      f"   state {state_bytes / 2**20:10.2f} MiB"
    )
  return rows


def bench_size(size: str, reps: int, methods, log=print, partial=None) -> dict:
  """Every method of `methods` on the tree of `size`: one row each, ratios, amortised rows.

  `partial(result)`, if given, gets the result so far after each method (a run cut by a time
  limit keeps the methods that finished).
  """
  cfg = optimizer_step.SIZES[size]
  rank = cfg["rank"]
  shapes = optimizer_step.llama_shapes(**cfg)
  n_params = sum(int(np.prod(s)) for _, s in _leaves(shapes))
  grads = optimizer_step.make_tree(shapes, 1, optimizer_step.synthetic_gradient)
  init = lambda k, s: 0.02 * jax.random.normal(k, s)
  limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
  log(
    f"tree {size}: {n_params / 1e9:.3f}e9 params, {len(_leaves(shapes))} leaves, rank {rank}"
    + (f", device limit {limit / 2**30:.1f} GiB" if limit else "")
  )
  rows = []
  for name, (tx, count, refresh_name) in transformations(rank).items():
    wanted = [n for n in (name, refresh_name) if n in methods]
    if not wanted:
      continue
    analytic = analytic_state_bytes(name, shapes, rank)
    needed = 2 * 4 * n_params + analytic  # parameters, gradients, state: no temporaries
    if limit is not None and needed > limit:
      skipped = f"needs at least {needed / 2**30:.1f} GiB, device has {limit / 2**30:.1f}"
      rows += [{"method": n, "skipped": skipped} for n in wanted]
      log(f"  {name:<22} skipped: {skipped}")
      continue
    params = optimizer_step.make_tree(shapes, 0, init)  # consumed by the timed calls
    steady_reps = min(reps, UPDATE_EVERY - 3) if count is not None else reps
    try:
      measured = bench_method(
        name,
        tx,
        params,
        grads,
        steady_reps,
        count,
        refresh_name if refresh_name in methods else None,
        log,
      )
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      error = "out of memory: " + str(e).splitlines()[0][:300]
      measured = [{"method": n, "error": error} for n in wanted]
      log(f"  {name:<22} {error}")
    del params
    gc.collect()
    for row in measured:
      if row["method"] not in methods:
        continue
      row["analytic_state_bytes"] = analytic
      if "state_bytes" in row:
        row["state_over_analytic"] = row["state_bytes"] / analytic
      rows.append(row)
    if partial is not None:
      partial(_summary(size, cfg, shapes, n_params, [dict(r) for r in rows]))  # a snapshot
  del grads
  gc.collect()
  return _summary(size, cfg, shapes, n_params, rows)


def _summary(size, cfg, shapes, n_params, rows) -> dict:
  """One size's result from its rows: ratios to AdamW, GaLore's and GRASS's amortised rows."""
  by = {r["method"]: r for r in rows if "median_ms" in r}
  if "adamw" in by:
    base = by["adamw"]
    for r in by.values():
      r["ratio_to_adamw"] = r["median_ms"] / base["median_ms"]
      r["state_ratio_to_adamw"] = r["state_bytes"] / base["state_bytes"]
  amortised = {}
  for method in ("galore", "grass"):
    if method in by and f"{method}_refresh" in by:
      ms = (
        by[f"{method}_refresh"]["median_ms"] + (UPDATE_EVERY - 1) * by[method]["median_ms"]
      ) / UPDATE_EVERY
      amortised[method] = {"median_ms": ms}
      if "adamw" in by:
        amortised[method]["ratio_to_adamw"] = ms / by["adamw"]["median_ms"]
  return {
    "size": size,
    "config": cfg,
    "n_params": n_params,
    "n_leaves": len(_leaves(shapes)),
    "projected_matrices": dict(
      collections.Counter(f"{s[0]}x{s[1]}" for p, s in _leaves(shapes) if _projected(_path(p), s))
    ),
    "rows": rows,
    f"amortised_over_{UPDATE_EVERY}_steps": amortised,
  }


def run(sizes, reps, methods=METHODS, log=print, checkpoint=None) -> dict:
  """`bench_size` for every size; `checkpoint(results)` after each method (a cut run keeps them).

  AdamW always runs: the ratios are to it.
  """
  methods = suites.chosen(methods, METHODS, adamw=True)
  results = {"sizes": []}
  for size in sizes:
    done = list(results["sizes"])
    partial = None if checkpoint is None else lambda cut: checkpoint({"sizes": [*done, cut]})
    results["sizes"].append(bench_size(size, reps, methods, log, partial))
    if checkpoint is not None:
      checkpoint(results)
  return results


def figure(result):
  """Step time and state bytes over AdamW's, per method, one bar per tree size."""
  sizes = result["results"]["sizes"]
  methods = [m for m in METHODS if any(r["method"] == m for s in sizes for r in s["rows"])]
  fig, axes = record.subplots(1, 2, figsize=(12, 4.5))
  for ax, key, title in [
    (axes[0], "ratio_to_adamw", "update time / AdamW's"),
    (axes[1], "state_ratio_to_adamw", "state bytes / AdamW's"),
  ]:
    record.bars(
      ax,
      methods,
      {
        s["size"]: [{r["method"]: r for r in s["rows"]}.get(m, {}).get(key, 0.0) for m in methods]
        for s in sizes
      },
      title,
      legend_title="LLaMA tree",
    )
    ax.axhline(1.0, color="gray", linewidth=0.8)
  axes[0].set_yscale("log")
  fig.suptitle(f"optimizer update, {result['device']}, float32, rank hidden/4", fontsize=10)
  return fig
