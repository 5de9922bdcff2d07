"""GRASS's projector: a scaled selection of r rows, P = Bᵀρ.

B (r × s) has one 1 per row, at the selected row σ_j of the oriented matrix;
ρ is diagonal. The projection is a gather, ρ_j·G[σ_j] (r × l), and the
back-projection a scatter-add of ρ_j·N_j into row σ_j (s × l): P is never
formed. The state stores the r indices and r scales (docs/methods.md, GRASS).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from optax_subspace.projectors import _base

SELECTIONS = ("topk", "multinomial", "uniform")


class SparseRowsState(NamedTuple):
  """State of one matrix under `sparse_rows`.

  Attributes:
    indices: σ, int32 (r,): the selected rows of the oriented matrix, sorted
      ascending (a row drawn twice appears twice).
    scales: ρ, (r,): the scale of each selected row.
    counts: int32 (s,): how many times each row is selected (0: not
      trained). It is also how `back` and `basis` know s, which the
      `Projector` interface does not pass them.
    key: uint32[2] PRNG key of the sampled selections, folded with the step
      at each refresh; None for "topk".
  """

  indices: jax.Array
  scales: jax.Array
  counts: jax.Array
  key: Optional[jax.Array]


def row_norms(g):
  """‖G_i‖ for every row, computed on G/max|G| so squares cannot overflow."""
  amax = jnp.max(jnp.abs(g))
  return jnp.linalg.norm(g / jnp.maximum(amax, jnp.finfo(g.dtype).tiny), axis=1)


def _select(selection, replacement, norms, r, key):
  """σ (sorted) and ρ for one matrix, from its row norms (s,)."""
  s = norms.shape[0]
  if selection == "topk":  # docs/methods.md: minimises ‖G − BᵀBG‖² over r rows
    indices = jnp.sort(jax.lax.top_k(norms, r)[1])
    return indices, jnp.ones((r,), jnp.float32)
  if selection == "uniform":  # q_i = 1/s, ρ = √(s/r)
    if replacement:
      indices = jax.random.randint(key, (r,), 0, s)
    else:
      indices = jax.random.permutation(key, s)[:r]
    return jnp.sort(indices), jnp.full((r,), jnp.sqrt(s / r), jnp.float32)
  # multinomial: q_i ∝ ‖G_i‖ (not its square), ρ_j = 1/√(r·q_σj); an
  # all-zero gradient has no direction: fall back to uniform q.
  total = jnp.sum(norms)
  q = jnp.where(total > 0, norms / jnp.where(total > 0, total, 1.0), 1.0 / s)
  if replacement:
    indices = jax.random.categorical(key, jnp.log(q), shape=(r,))
  else:  # Gumbel top-r; rows of q = 0 come last, if r exceeds the others
    indices = jax.random.choice(key, s, (r,), replace=False, p=q)
  indices = jnp.sort(indices)
  qs = q[indices]
  # A row of q = 0 is drawn only without replacement; it carries no gradient.
  scales = jnp.where(qs > 0, jax.lax.rsqrt(r * jnp.where(qs > 0, qs, 1.0)), 0.0)
  return indices, scales


def reselect(selection, replacement, indices, scales, norms, finite, key):
  """One matrix's refresh from its row norms: (σ, ρ, moved).

  σ and ρ are chosen from `norms` (s,) by `selection`; they stay the old
  `indices` and `scales` when the gradient was not finite (`finite` False)
  or, for "topk", all zero (every choice ties). `moved` says whether they
  changed. `key` is the refresh's key (None for "topk"). Shared by
  `sparse_rows` and the model level (`optax_subspace.nn.grass`), which
  computes the norms inside the backward pass.
  """
  sampled = selection != "topk"
  r = indices.shape[-1]
  new_indices, new_scales = _select(selection, replacement, norms, r, key)
  new_indices = new_indices.astype(jnp.int32)
  new_scales = new_scales.astype(scales.dtype)
  ok = finite if sampled else finite & jnp.any(norms > 0)
  moved = ok & (jnp.any(new_indices != indices) | jnp.any(new_scales != scales))
  keep = lambda new, old: jnp.where(moved, new, old)
  return keep(new_indices, indices), keep(new_scales, scales), moved


def sparse_rows(
  rank: int,
  update_every: int = 200,
  *,
  selection: str = "topk",
  replacement: Optional[bool] = None,
  seed: int = 0,
  dtype=jnp.float32,
):
  r"""GRASS's row-selection projector, refreshed every `update_every` steps.

  Pᵀ = ρB selects r rows σ of the oriented gradient G (s × l, s the smaller
  side) and scales them: the projection is R_j = ρ_j·G[σ_j] (a gather), the
  back-projection of N (r × l) is the scatter-add of ρ_j·N_j into row σ_j
  (zeros elsewhere), so duplicated rows accumulate. At steps 0, T, 2T, …
  (T = `update_every`) σ and ρ are chosen from the current gradient:

  - "topk": the r rows of largest ‖G_i‖, ρ = 1 (no duplicates; minimises
    ‖G − BᵀBG‖²_F among r-row selections).
  - "multinomial": r draws with q_i ∝ ‖G_i‖ (the norm, not its square), ρ_j =
    1/√(r·q_σj); with replacement (the default) E[PPᵀ] = I, so PPᵀG is an
    unbiased estimate of G, and q ∝ ‖G_i‖ minimises its variance
    (1/r)(Σ‖G_i‖²/q_i − ‖G‖²). Without replacement the same ρ is used and the
    estimate is biased (the inclusion probabilities are not r·q_i).
  - "uniform": r rows drawn uniformly (without replacement by default),
    ρ = √(s/r); unbiased either way.

  The draws use a key carried in each matrix's state (folded with `seed`,
  then with the step at each refresh): the same on every device, no
  communication. An all-zero gradient gives uniform probabilities (no NaN);
  "topk" then keeps its previous rows, since every choice ties. A non-finite
  gradient keeps the previous selection in every mode. Indices are stored
  sorted, so a refresh that picks the same rows is not a change (with
  ``on_change="reset"`` their moments stay). `basis(state)` is the dense 0/1
  matrix Bᵀ without ρ, for ``on_change="transport"`` (GRASS's "remap").

  References:
    Muhamed, Li, Woodruff, Diab, Smith, "Grass: Compute Efficient Low-Memory
    LLM Training with Structured Sparse Gradients", EMNLP 2024,
    arXiv:2406.17660.

  Args:
    rank: r, the number of selected rows (clamped per matrix to its smaller
      side).
    update_every: T, steps between selections.
    selection: "topk", "multinomial" or "uniform".
    replacement: draw with replacement; default True for "multinomial",
      False for "uniform"; "topk" never draws twice (True is an error).
    seed: folded into every matrix's key.
    dtype: storage dtype of ρ (indices are int32; math is float32).

  Returns:
    A `Projector` for `project_subspace`.

  Example:
    >>> import optax, optax_subspace as osub
    >>> proj = osub.projectors.sparse_rows(4, 50, selection="multinomial")
    >>> tx = osub.project_subspace(optax.adam(1e-3), proj, on_change="reset")
  """
  rank = _base.check_rank(rank)
  update_every = _base.check_every(update_every)
  if selection not in SELECTIONS:
    raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}.")
  if selection == "topk" and replacement:
    raise ValueError(
      "selection='topk' picks distinct rows: replacement=True is not defined for it."
    )
  if replacement is None:
    replacement = selection == "multinomial"
  sampled = selection != "topk"

  def init(s, l, r, key):
    del l
    indices = jnp.arange(r, dtype=jnp.int32)
    return SparseRowsState(
      indices=indices,
      scales=jnp.ones((r,), dtype),
      counts=jnp.zeros((s,), jnp.int32).at[indices].add(1),
      key=jax.random.fold_in(key, seed) if sampled else None,
    )

  def refresh(state, g, count):
    g = g.astype(jnp.float32)
    finite = jnp.all(jnp.isfinite(g))
    norms = row_norms(jnp.where(finite, g, 0.0))
    key = jax.random.fold_in(state.key, count) if sampled else None
    indices, scales, moved = reselect(
      selection, replacement, state.indices, state.scales, norms, finite, key
    )
    counts = jnp.zeros_like(state.counts).at[indices].add(1)
    return SparseRowsState(indices, scales, counts, state.key), moved

  def project(state, g):  # R = ρ ⊙ G[σ]: a gather, r × l
    rows = jnp.take(g, state.indices, axis=0).astype(jnp.float32)
    return state.scales.astype(jnp.float32)[:, None] * rows

  def back(state, n):  # ΔG = Bᵀ ρ N: scatter-add, duplicates accumulate
    s = state.counts.shape[-1]
    upd = state.scales.astype(jnp.float32)[:, None] * n.astype(jnp.float32)
    return jnp.zeros((s, n.shape[-1]), jnp.float32).at[state.indices].add(upd)

  def basis(state):  # Bᵀ, 0/1, without ρ: M = B_new B_oldᵀ is a row remap
    s = state.counts.shape[-1]
    rows = jnp.arange(s, dtype=jnp.int32)[:, None]
    return (rows == state.indices[None, :]).astype(jnp.float32)

  return _base.Projector(
    rank=rank,
    init=init,
    basis=basis,
    needs_refresh=_base.RefreshSchedule(update_every),
    refresh=refresh,
    project=project,
    back=back,
  )
