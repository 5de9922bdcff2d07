"""Online Subspace Descent's projector: one optimizer step of online PCA per step."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from optax_subspace import _adam
from optax_subspace.projectors import _base
from optax_subspace.projectors.svd import top_left_singular_vectors


class OnlinePcaState(NamedTuple):
  """State of one matrix under `online_pca`: P (s, r) and P's optimizer state."""

  basis: jax.Array
  opt_state: Any


def online_pca_gradient(p, g, gtp, orthogonality_weight=0.0):
  """Gradient of L(P) = ‖P Pᵀ G̃ − G̃‖²_F + λ‖PᵀP − I‖²_F, G̃ = G/‖G‖_F.

  For P (s, r), G (s, l) and gtp = GᵀP (l, r), OSD's left-case closed form
  (docs/methods.md) with A = G̃ᵀP = gtp/‖G‖:
  ∇P = 2[P(AᵀA) + G̃A(PᵀP) − 2 G̃A] + 4λ P(PᵀP − I).
  The normalisation is applied to the small products (G̃A = G·gtp/‖G‖²), so
  G is read once, never scaled in place. Cost O(s·l·r); no s×s or l×l matrix.
  """
  return _gradient_from_products(p, _products(g, gtp), orthogonality_weight)


def _products(g, gtp):
  """What the online-PCA gradient needs from G (s, l) and gtp = GᵀP (l, r).

  (‖G‖², G·gtp (s, r)): the only work that reads G, so what is left runs on
  s×r and r×r arrays.
  """
  sq = jnp.sum(jnp.square(g.astype(jnp.float32)))
  # The one product with G runs in G's dtype (`projection_dtype`).
  ga = jnp.matmul(g, gtp.astype(g.dtype), preferred_element_type=jnp.float32)
  return sq, ga


def _gradient_from_products(p, products, orthogonality_weight):
  sq, ga = products
  inv_sq = 1.0 / sq
  ptp = p.T @ p
  # ‖G‖²·AᵀA = PᵀG·GᵀP = Pᵀ·(G·GᵀP): an r×r product over s from the s×r
  # arrays at hand, rather than gtpᵀ·gtp over l (l ≥ s where P spans the
  # smaller side) on each matrix's own l×r array.
  gram = p.T @ ga
  grad = (2.0 * inv_sq) * (p @ gram + ga @ ptp - 2.0 * ga)
  if orthogonality_weight:
    grad = grad + 4.0 * orthogonality_weight * (p @ ptp - p)
  return grad


def online_pca(
  rank: int,
  optimizer: Optional[optax.GradientTransformation] = None,
  *,
  orthogonality_weight: float = 0.0,
  step_before_projection: bool = False,
  dtype=jnp.float32,
):
  """Online Subspace Descent's projector, stepped by online PCA every step.

  P is initialised at step 0 by the exact top-`rank` singular vectors of the
  first gradient (as `svd`); on every later step, after the weights have been
  updated through the current P_t, one step of `optimizer` on the online-PCA
  loss L(P) = ‖P Pᵀ G̃ − G̃‖²_F (+ λ‖PᵀP − I‖²_F), G̃ = G/‖G‖_F, gives
  P_{t+1}. The loss gradient is the closed form of `online_pca_gradient`; it
  reuses Pᵀ G from the projection, so a step costs two products with G. No
  SVD after step 0. A gradient that is zero or not finite skips the step.

  References:
    Liang, Liu, Chen, Liu, "Memory-Efficient LLM Training with Online
    Subspace Descent", NeurIPS 2024, arXiv:2408.12857.

  Args:
    rank: r, the subspace dimension (clamped per matrix to its smaller side).
    optimizer: any optax transformation stepping P. Default: the authors'
      code, torch AdamW defaults (β 0.9/0.999, eps 1e-8, weight decay 0.01)
      at learning rate 1/200 (the `online_subspace_descent` preset makes it
      follow the weights' schedule).
    orthogonality_weight: λ; 0 in the authors' code, 0.1 in the paper.
    step_before_projection: False (the paper's order and docs/methods.md's: W
      moves through P_t, then P_{t+1} is stored). True reproduces the stored
      copy of the authors' code (`proj_type="continuous"`): at step t > 0, P
      is first stepped with G_t and G_t is then projected on the new P. It
      costs one more product with G (PᵀG cannot be reused) and runs through
      the refresh path every step.
    dtype: storage dtype of P.

  Returns:
    A `Projector` for `project_subspace`.

  Example:
    >>> import optax, optax_subspace as osub
    >>> proj = osub.projectors.online_pca(4, optax.adamw(5e-3))
    >>> tx = osub.project_subspace(optax.adam(1e-3), proj)
  """
  rank = _base.check_rank(rank)
  if optimizer is None:
    optimizer = _adam.torch_adamw(1.0 / 200)

  def init(s, l, r, key):
    del l, key
    basis = _base.first_columns(s, r).astype(dtype)
    return OnlinePcaState(basis, optimizer.init(basis))

  def svd_start(state, g):
    # P_0 from an SVD of the first gradient.
    r = state.basis.shape[-1]
    g = g.astype(jnp.float32)
    ok = _base.usable(g)
    svd_basis = top_left_singular_vectors(jnp.where(ok, g, 0.0), r)
    basis = jnp.where(ok, svd_basis.astype(state.basis.dtype), state.basis)
    return OnlinePcaState(basis, state.opt_state), ok

  def inputs(state, g, projected):
    # GᵀP = (PᵀG)ᵀ: the projection already computed it.
    del state
    return _products(g, projected.T)

  def direction(basis, products):
    # ∇P of the online-PCA loss from P (float32) and the products with G.
    return _gradient_from_products(basis, products, orthogonality_weight)

  def apply(state, products, grad, count):
    # P gets no step at step 0, only the SVD (the authors' code). Values
    # computed from an unusable g are discarded by the selects at the end,
    # so g itself is never masked (that would cost a pass over it).
    sq = products[0]
    ok = jnp.isfinite(sq) & (sq > 0) & (count > 0)
    updates, opt_state = optimizer.update(
      grad.astype(state.basis.dtype), state.opt_state, state.basis
    )
    new_basis = optax.apply_updates(state.basis, updates)
    keep = lambda new, old: jnp.where(ok, new, old)
    new_state = OnlinePcaState(
      keep(new_basis, state.basis),
      jax.tree_util.tree_map(keep, opt_state, state.opt_state),
    )
    return new_state, ok

  basis = lambda state: state.basis.astype(jnp.float32)
  advance = _base.Advance(inputs=inputs, apply=apply, direction=direction, basis=basis)

  if not step_before_projection:
    return _base.Projector(
      rank=rank,
      init=init,
      basis=basis,
      needs_refresh=_base.RefreshSchedule(None),  # step 0
      refresh=lambda state, g, count: svd_start(state, g),
      advance=advance,
    )

  def step_first(state, g, count):
    projected = jnp.matmul(state.basis.T.astype(g.dtype), g, preferred_element_type=jnp.float32)
    return advance(state, g, projected, count)

  return _base.Projector(
    rank=rank,
    init=init,
    basis=basis,
    needs_refresh=_base.RefreshSchedule(1),  # every step
    refresh=lambda state, g, count: jax.lax.cond(
      count == 0, lambda: svd_start(state, g), lambda: step_first(state, g, count)
    ),
  )
