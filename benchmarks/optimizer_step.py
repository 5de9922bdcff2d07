"""The LLaMA trees, synthetic gradients and timing loops of the update suites, and suite
`optimizer_step`, the first update benchmark (docs/benchmarks.md's H100 and H200 anchors): the
update time, compile time and state bytes of AdamW, optax.contrib.galore, GaLore (steady and
refresh steps, exact and randomized SVD), OSD and GRASS on one tree in one process, then the
projector steps alone (`projector_cost`) on the OSD paper's shapes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_subspace as osub
from benchmarks import record

# hidden, ffn, layers, vocab, rank (hidden/4): the LLaMA models of the GaLore
# experiments (arXiv 2403.03507), as examples/llama/config.py.
SIZES = {
  "60m": dict(d=512, ffn=1376, layers=8, vocab=32000, rank=128),
  "130m": dict(d=768, ffn=2048, layers=12, vocab=32000, rank=192),
  "350m": dict(d=1024, ffn=2736, layers=24, vocab=32000, rank=256),
  "1b": dict(d=2048, ffn=5461, layers=24, vocab=32000, rank=512),
  "7b": dict(d=4096, ffn=11008, layers=32, vocab=32000, rank=1024),
  "tiny": dict(d=64, ffn=176, layers=2, vocab=512, rank=16),
}
PROJECTED = r"(attention|mlp)/.*kernel"
PROJECTOR_SHAPES = [(512, 1376), (1024, 2736), (2048, 5461), (4096, 11008)]
TINY_PROJECTOR_SHAPES = [(64, 176)]


def llama_shapes(d, ffn, layers, vocab, scanned=False, **_):
  """The parameter tree of a non-scanned Flax LLaMA, kernels (in, out).

  `scanned`: the tree of a scanned model instead, each block's parameter stacked over the
  layers (a kernel (layers, in, out): projected with ``MatrixDims(rows=1, cols=2)``).
  """
  tree = {
    "embed": {"embedding": (vocab, d)},
    "final_norm": {"scale": (d,)},
    "lm_head": {"kernel": (d, vocab)},
  }
  if scanned:
    tree["layers"] = {
      "attention": {n: {"kernel": (layers, d, d)} for n in ("q", "k", "v", "o")},
      "mlp": {
        "gate": {"kernel": (layers, d, ffn)},
        "up": {"kernel": (layers, d, ffn)},
        "down": {"kernel": (layers, ffn, d)},
      },
      "attention_norm": {"scale": (layers, d)},
      "mlp_norm": {"scale": (layers, d)},
    }
    return tree
  for i in range(layers):
    tree[f"layers_{i}"] = {
      "attention": {n: {"kernel": (d, d)} for n in ("q", "k", "v", "o")},
      "mlp": {
        "gate": {"kernel": (d, ffn)},
        "up": {"kernel": (d, ffn)},
        "down": {"kernel": (ffn, d)},
      },
      "attention_norm": {"scale": (d,)},
      "mlp_norm": {"scale": (d,)},
    }
  return tree


def synthetic_gradient(key, shape):
  """Gaussian with power-law column scales: a decaying spectrum (σ ~ 1/i).

  A stacked (scanned) leaf, more than 2 axes, gets one such matrix per leading index.
  """
  if len(shape) < 2:
    return jax.random.normal(key, shape)
  if len(shape) > 2:
    keys = jax.random.split(key, shape[0])
    return jax.vmap(lambda k: synthetic_gradient(k, shape[1:]))(keys)
  s = min(shape)
  k1, k2 = jax.random.split(key)
  left = jax.random.normal(k1, (shape[0], s)) / jnp.arange(1, s + 1)
  return left @ jax.random.normal(k2, (s, shape[1])) / np.sqrt(shape[1])


def make_tree(shapes, seed, fn):
  leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return treedef.unflatten([jax.jit(fn, static_argnums=1)(k, s) for k, s in zip(keys, leaves)])


def nbytes(tree):
  return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(tree)))


def time_calls(fn, args, reps, warmup=2):
  """(median wall time (ms), last args) of `args = fn(*args)`, a device sync per call."""
  times = []
  for i in range(warmup + reps):
    t0 = time.perf_counter()
    args = fn(*args)
    jax.block_until_ready(args)
    if i >= warmup:
      times.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(times), args


def time_pipelined(fn, args, reps, rounds=3):
  """Median over `rounds` of the wall time (ms) per call of `reps` calls in a row, one sync.

  As a training loop runs: the host dispatches call k + 1 while the device runs call k, so the
  host's per-call work (flattening and checking a state of ~1,000 arrays, launching) hides
  behind the device's, where `time_calls` (a sync per call) counts both.
  """
  per_call = []
  for _ in range(rounds):
    jax.block_until_ready(args)
    t0 = time.perf_counter()
    for _ in range(reps):
      args = fn(*args)
    jax.block_until_ready(args)
    per_call.append((time.perf_counter() - t0) * 1e3 / reps)
  return statistics.median(per_call), args


NEVER = 10**9  # an update_every that never comes again: steady steps


def variants(rank: int, dims=None, lr: float = 1e-3) -> dict:
  """name -> (transformation, count its timed steps start from) of the update variants the
  scripts time: AdamW; GaLore's (exact and randomized SVD), OSD's and GRASS's steady steps (from
  count 1, past the step-0 refresh; T never comes) and refresh steps (T = 1); bf16 operands for
  the products with G (float32 accumulation)."""
  galore = lambda every, **k: osub.galore(lr, rank, every, mask=PROJECTED, dims=dims, **k)
  osd = lambda **k: osub.online_subspace_descent(lr, rank, mask=PROJECTED, dims=dims, **k)
  grass = lambda every: osub.grass(lr, rank, every, mask=PROJECTED, dims=dims)
  return {
    "adamw": (optax.adamw(lr), None),
    "galore_steady": (galore(NEVER), 1),
    "galore_refresh_svd": (galore(1), None),
    "galore_refresh_randomized_svd": (galore(1, projector="randomized_svd"), None),
    "osd_steady": (osd(), 1),
    "grass_steady": (grass(NEVER), 1),
    "grass_refresh_topk": (grass(1), None),
    "galore_steady_bf16_products": (galore(NEVER, projection_dtype=jnp.bfloat16), 1),
    "osd_steady_bf16_products": (osd(projection_dtype=jnp.bfloat16), 1),
  }


def update_rows(methods, params, grads, reps: int) -> list[dict]:
  """`optimizer_update.bench_method`'s row of each (name, transformation, count to start from)
  on a copy of `params`, refresh rows at a tenth of `reps` (at least 3); ratios to the first's."""
  from benchmarks import optimizer_update  # pylint: disable=g-import-not-at-top  (imports this)

  rows = [
    optimizer_update.bench_method(
      name,
      tx,
      jax.tree.map(jnp.copy, params),
      grads,
      max(3, reps // 10) if "refresh" in name else reps,
      count,
      None,
    )[0]
    for name, tx, count in methods
  ]
  for r in rows:
    r["ratio_to_adamw"] = r["median_ms"] / rows[0]["median_ms"]
    r["state_ratio_to_adamw"] = r["state_bytes"] / rows[0]["state_bytes"]
  return rows


def bench_tree(size, reps):
  from benchmarks import optimizer_update  # pylint: disable=g-import-not-at-top  (imports this)

  cfg = SIZES[size]
  shapes = llama_shapes(**cfg)
  rank = cfg["rank"]
  params = make_tree(shapes, 0, lambda k, s: 0.02 * jax.random.normal(k, s))
  grads = make_tree(shapes, 1, synthetic_gradient)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  print(
    f"tree {size}: {n_params / 1e9:.3f}e9 params,"
    f" {len(jax.tree_util.tree_leaves(params))} leaves, rank {rank}"
  )
  methods = [(name, tx, count) for name, (tx, count) in variants(rank).items()]
  if hasattr(optax, "contrib") and hasattr(optax.contrib, "galore"):
    methods.insert(
      1,
      (
        "optax_contrib_galore_steady",
        optax.contrib.galore(1e-3, rank=rank, update_proj_gap=NEVER),
        None,
      ),
    )
  rows = update_rows(methods, params, grads, reps)
  by = {r["method"]: r for r in rows}
  adamw = by["adamw"]["median_ms"]
  gap = 200
  summary = {
    "galore_avg_over_200_step_gap_ms": {
      k: (by[f"galore_refresh_{k}"]["median_ms"] + (gap - 1) * by["galore_steady"]["median_ms"])
      / gap
      for k in ("svd", "randomized_svd")
    },
    "galore_state_formula_bytes": optimizer_update.analytic_state_bytes("galore", shapes, rank),
  }
  summary["galore_state_vs_formula"] = (
    by["galore_steady"]["state_bytes"] / summary["galore_state_formula_bytes"]
  )
  summary["galore_avg_ratio_to_adamw"] = {
    k: v / adamw for k, v in summary["galore_avg_over_200_step_gap_ms"].items()
  }
  return {
    "size": size,
    "config": cfg,
    "n_params": n_params,
    "n_leaves": len(jax.tree_util.tree_leaves(params)),
    "projected": PROJECTED,
    "rows": rows,
    "summary": summary,
    "randomized_svd_energy": refresh_accuracy(grads, rank),
  }


def oriented(g: jax.Array) -> jax.Array:
  """G as GaLore projects it: float32, its smaller side first (s ≤ l)."""
  g = g.astype(jnp.float32)
  return g.T if g.shape[0] > g.shape[1] else g


def captured(p: jax.Array, g: jax.Array) -> jax.Array:
  """‖PᵀG‖², the energy of g (s, l) in the span of P's orthonormal columns (s, r)."""
  return jnp.sum(jnp.square(jnp.matmul(p.T, g, precision=jax.lax.Precision.HIGHEST)))


def refresh_accuracy(grads, rank):
  """Top-r energy of the randomized basis over the exact one, per shape."""
  out = {}
  seen = set()
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    if (
      g.ndim != 2
      or g.shape in seen
      or not any("attention" in str(k) or "mlp" in str(k) for k in path)
    ):
      continue
    seen.add(g.shape)
    o = oriented(g)
    s, l = o.shape
    r = min(rank, s)
    exact, rand = osub.projectors.svd(r, 1), osub.projectors.randomized_svd(r, 1)
    e_state, _ = jax.jit(exact.refresh)(exact.init(s, l, r, None), o, 0)
    r_state, _ = jax.jit(rand.refresh)(rand.init(s, l, r, jax.random.PRNGKey(0)), o, 0)
    energy = lambda p: float(captured(p, o))
    out[f"{g.shape[0]}x{g.shape[1]}"] = energy(rand.basis(r_state)) / energy(exact.basis(e_state))
  return out


def bench_projectors(shapes, reps):
  """The first four projector steps of `projector_cost.STEPS` alone on s×l matrices."""
  from benchmarks import projector_cost  # pylint: disable=g-import-not-at-top  (imports this)

  rows = []
  for s, l in shapes:
    r = s // 4
    thunks = projector_cost.thunks(s, l, r, synthetic_gradient(jax.random.PRNGKey(2), (s, l)))
    row = {
      "shape": [s, l],
      "rank": r,
      **{
        f"{name}_ms": projector_cost.median_ms(thunks[name], reps)
        for name in projector_cost.STEPS[:4]
      },
    }
    row["exact_svd_over_online_pca"] = row["exact_svd_ms"] / row["online_pca_step_ms"]
    print(
      f"  {s}x{l} r={r}: exact SVD {row['exact_svd_ms']:.2f} ms,"
      f" eigh refresh {row['svd_refresh_eigh_ms']:.2f} ms,"
      f" randomized {row['randomized_svd_refresh_ms']:.2f} ms,"
      f" online PCA {row['online_pca_step_ms']:.3f} ms"
      f" ({row['exact_svd_over_online_pca']:.0f}x)",
      flush=True,
    )
    rows.append(row)
  return rows


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--size", default="1b", choices=sorted(SIZES))
  ap.add_argument("--reps", type=int, default=50)
  ap.add_argument("--out", required=True)
  args = ap.parse_args(argv)
  result = {
    **record.provenance("optimizer_step", argv),
    "dtype": "float32",
    "matmul_precision": "default (TF32 on H100) except refreshes, which use HIGHEST",
    "timing": "median of --reps calls after 2 warm-up calls, each synced;"
    " params and state donated; gradients synthetic (power-law spectrum)",
  }
  result["tree"] = bench_tree(args.size, args.reps)
  record.write_json(args.out, result)  # in case the projector part is cut short
  shapes = TINY_PROJECTOR_SHAPES if args.size == "tiny" else PROJECTOR_SHAPES
  print("projector step alone:")
  result["projectors"] = bench_projectors(shapes, max(5, args.reps // 5))
  record.write_json(args.out, result)
  print("wrote", args.out)
  return result
