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

The first four are `optimizer_step.projector_thunks`, the timing `optimizer_step.time_thunk`
(median of synced calls after 2 warm-up calls).
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
STEPS = ("exact_svd", "svd_refresh_eigh", "randomized_svd_refresh", "online_pca_step",
         "sparse_rows_topk_refresh", "random_basis_haar", "adamw_step")


def _extra_thunks(s, l, r, g):
  """The steps `optimizer_step.projector_thunks` does not time, same conventions."""
  rows = osub.projectors.sparse_rows(r, 1)
  rows_state = rows.init(s, l, r, None)
  refresh_rows = jax.jit(lambda st, g: rows.refresh(st, g, 0)[0])
  draw = jax.jit(lambda key: osub.projectors.random_basis(key, s, r))
  key = jax.random.PRNGKey(3)
  adamw = optax.adamw(1e-3)
  w = jnp.zeros((s, l), jnp.float32)
  adamw_state = adamw.init(w)

  def adamw_step(w, st, g):
    updates, st = adamw.update(g, st, w)
    return optax.apply_updates(w, updates), st

  adamw_step = jax.jit(adamw_step)
  return [("sparse_rows_topk_refresh", lambda: refresh_rows(rows_state, g)),
          ("random_basis_haar", lambda: draw(key)),
          ("adamw_step", lambda: adamw_step(w, adamw_state, g))]


def run(sizes, reps, log=print) -> dict:
  """Median ms of every step of `STEPS` per shape, and the ratios."""
  rows = []
  for size in sizes:
    s, l = sorted(SHAPES[size])
    r = max(1, s // 4)
    g = optimizer_step.synthetic_gradient(jax.random.PRNGKey(2), (s, l))
    thunks = optimizer_step.projector_thunks(s, l, r, g) + _extra_thunks(s, l, r, g)
    medians = {name: optimizer_step.time_thunk(thunk, reps) for name, thunk in thunks}
    row = {"size": size, "shape": [s, l], "rank": r, "median_ms": medians,
           "ratio_to_adamw_step": {k: v / medians["adamw_step"] for k, v in medians.items()},
           "exact_svd_over": {k: medians["exact_svd"] / v for k, v in medians.items()}}
    log(f"  {s}x{l} r={r}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in medians.items()))
    rows.append(row)
  return {"rows": rows}


def figure(result):
  """Median ms per step against the matrix shape, log scale (as the OSD paper's Figure 2)."""
  rows = result["results"]["rows"]
  labels = [f"{r['shape'][0]}×{r['shape'][1]}\n({r['size']})" for r in rows]
  fig, ax = record.subplots(figsize=(8, 4.5))
  for name in STEPS:
    ax.plot(range(len(rows)), [r["median_ms"][name] for r in rows], marker="o", label=name,
            linestyle="--" if name == "adamw_step" else "-")
  ax.set_xticks(range(len(rows)), labels, fontsize=8)
  ax.set_yscale("log")
  ax.set_ylabel("ms (median)")
  ax.set_xlabel("matrix (rank s/4)")
  ax.legend(fontsize=7)
  ax.set_title(f"projector step alone, {result['device']}, float32", fontsize=9)
  return fig
