"""Suite `projector_cost`: one projector step alone, per matrix shape of LLaMA 60M to 7B.

The Online Subspace Descent paper's Figure 2 (projector cost against exact SVD) redone in JAX,
with every projector family of the library. Per s×l matrix (s the smaller side, rank r = s/4,
gradient synthetic with a power-law spectrum, `optimizer_step.synthetic_gradient`):

- ``exact_svd``: ``jnp.linalg.svd(g, full_matrices=False)``;
- ``svd_refresh_eigh``: the `svd` projector's refresh (eigh of the s×s Gram matrix);
- ``randomized_svd_refresh``: the `randomized_svd` projector's refresh;
- ``online_pca_step``: one online-PCA step + AdamW on P, as the combinator runs it (PᵀG reused);
- ``sparse_rows_topk_refresh``: GRASS's selection (row norms, top-r);
- ``random_basis_haar``: one Haar draw of P (`projectors.random_basis`), RSO's per-step cost;
- ``adamw_step``: `optax.adamw` update + apply on the same matrix: the reference the ratios use.

Each is timed by the median of synced calls after 2 warm-up calls (`median_ms`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import optax_subspace as osub
from benchmarks import optimizer_step
from benchmarks import record

# The attention/MLP matrix (d × ffn) of each LLaMA size of optimizer_step.SIZES.
SHAPES = {name: (cfg["d"], cfg["ffn"]) for name, cfg in optimizer_step.SIZES.items()}
DEFAULT_SIZES = ("60m", "130m", "350m", "1b", "7b")
STEPS = (
  "exact_svd",
  "svd_refresh_eigh",
  "randomized_svd_refresh",
  "online_pca_step",
  "sparse_rows_topk_refresh",
  "random_basis_haar",
  "adamw_step",
)


def thunks(s, l, r, g) -> dict:
  """name -> a thunk running one jitted call of that step of `STEPS` on the s×l matrix g (s the
  smaller side), g an argument of the jitted function, never a constant XLA would fold."""
  svd, randomized = osub.projectors.svd(r, 1), osub.projectors.randomized_svd(r, 1)
  online, rows = osub.projectors.online_pca(r), osub.projectors.sparse_rows(r, 1)
  st_svd, st_rows = svd.init(s, l, r, None), rows.init(s, l, r, None)
  st_rand = randomized.init(s, l, r, jax.random.PRNGKey(0))
  st_online = online.refresh(online.init(s, l, r, None), g, 0)[0]
  refresh = lambda projector: jax.jit(lambda st, g: projector.refresh(st, g, 0)[0])
  refresh_svd, refresh_rand, refresh_rows = refresh(svd), refresh(randomized), refresh(rows)
  # The P step as the combinator runs it: PᵀG reused.
  online_step = jax.jit(lambda st, g: online.advance(st, g, online.basis(st).T @ g, 1)[0])
  exact = jax.jit(lambda g: jnp.linalg.svd(g, full_matrices=False))
  draw = jax.jit(lambda key: osub.projectors.random_basis(key, s, r))
  adamw = optax.adamw(1e-3)
  w = jnp.zeros((s, l), jnp.float32)
  adamw_state = adamw.init(w)

  def adamw_step(w, st, g):
    updates, st = adamw.update(g, st, w)
    return optax.apply_updates(w, updates), st

  adamw_step = jax.jit(adamw_step)
  return {
    "exact_svd": lambda: exact(g),
    "svd_refresh_eigh": lambda: refresh_svd(st_svd, g),
    "randomized_svd_refresh": lambda: refresh_rand(st_rand, g),
    "online_pca_step": lambda: online_step(st_online, g),
    "sparse_rows_topk_refresh": lambda: refresh_rows(st_rows, g),
    "random_basis_haar": lambda: draw(jax.random.PRNGKey(3)),
    "adamw_step": lambda: adamw_step(w, adamw_state, g),
  }


def median_ms(thunk, reps: int) -> float:
  """Median wall time (ms) of thunk() over `reps` synced calls after 2 warm-up calls."""
  return optimizer_step.time_calls(lambda *_: (thunk(),), (), reps)[0]


def run(sizes, reps, log=print) -> dict:
  """Median ms of every step of `STEPS` per shape, and the ratios."""
  rows = []
  for size in sizes:
    s, l = sorted(SHAPES[size])
    r = max(1, s // 4)
    steps = thunks(s, l, r, optimizer_step.synthetic_gradient(jax.random.PRNGKey(2), (s, l)))
    medians = {name: median_ms(steps[name], reps) for name in STEPS}
    row = {
      "size": size,
      "shape": [s, l],
      "rank": r,
      "median_ms": medians,
      "ratio_to_adamw_step": {k: v / medians["adamw_step"] for k, v in medians.items()},
      "exact_svd_over": {k: medians["exact_svd"] / v for k, v in medians.items()},
    }
    log(f"  {s}x{l} r={r}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in medians.items()))
    rows.append(row)
  return {"rows": rows}


def figure(result):
  """Median ms per step against the matrix shape, log scale (as the OSD paper's Figure 2)."""
  rows = result["results"]["rows"]
  labels = [f"{r['shape'][0]}×{r['shape'][1]}\n({r['size']})" for r in rows]
  fig, ax = record.subplots(figsize=(8, 4.5))
  for name in STEPS:
    ax.plot(
      range(len(rows)),
      [r["median_ms"][name] for r in rows],
      marker="o",
      label=name,
      linestyle="--" if name == "adamw_step" else "-",
    )
  ax.set_xticks(range(len(rows)), labels, fontsize=8)
  ax.set_yscale("log")
  ax.set_ylabel("ms (median)")
  ax.set_xlabel("matrix (rank s/4)")
  ax.legend(fontsize=7)
  ax.set_title(f"projector step alone, {result['device']}, float32", fontsize=9)
  return fig
