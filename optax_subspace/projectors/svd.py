"""GaLore's projector and its mathematics, in one place.

GaLore (Zhao et al., ICML 2024, arXiv:2403.03507; docs/methods.md) trains
each selected matrix G (oriented s × l, s the smaller side) through

    P  = U[:, :r],  G_t = U Σ Vᵀ         at steps 0, T, 2T, … (`svd` below)
    R  = Pᵀ G                            (r × l: the projection)
    N  = Adam(R)                         (m, v of shape r × l; HF placement of ε)
    ΔW = −lr · α · P N                   (α = 0.25; the back-projection)
    W  ← W + ΔW, then W ← W − lr · wd · W (decay after the update)

and keeps Adam's moments when P changes. The basis (the top-r left singular
vectors, from the smaller side's Gram matrix, each sign-canonical) is here;
R = PᵀG and α·P·N are the generic products every dense projector shares
(`project_subspace`'s pipeline); the Adam of the authors' code, with ε added
to the un-corrected √v, is `optax_subspace.scale_by_hf_adam`, and the decay
after the update `optax_subspace.add_decayed_weights_after_update`;
`optax_subspace.galore` puts them together with the authors' constants.

`svd` is exact (eigenvectors of the smaller-side Gram matrix);
`randomized_svd` is a seeded randomized range finder with power iterations
(Halko, Martinsson and Tropp 2011), the refresh GaLore 2 uses to cut the SVD
cost at scale.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from optax_subspace.projectors import _base


@_base.one_matrix_per_call_on_cpu
def eigenvectors(symmetric: jax.Array) -> jax.Array:
  """Eigenvectors of a symmetric matrix, columns by ascending eigenvalue.

  jaxlib's eigensolver: on a GPU, cuSOLVER's divide and conquer (syevd) at LLaMA's Gram
  matrices. Its Jacobi solver (syevj) is no faster there: asked for it, the 1B tree's first
  exact refresh had not finished after 109 s on an H100, where the default's takes ~2 s
  (profile_update_1b_h100_f50e8d7_rso_held_bases.json, "galore_refresh_jacobi").
  """
  return jnp.linalg.eigh(symmetric)[1]


def canonical_signs(p: jax.Array) -> jax.Array:
  """Flips each column so that its largest-magnitude entry is positive.

  Singular vectors are defined up to sign and backends disagree; since the
  moments carry over a refresh, the sign changes the trajectory. This fixes
  it the same way on every backend (docs/methods.md, "SVD sign").
  """
  idx = jnp.argmax(jnp.abs(p), axis=0)
  pivot = jnp.take_along_axis(p, idx[None, :], axis=0)[0]
  return p * jnp.where(pivot < 0, -1.0, 1.0).astype(p.dtype)


def top_left_singular_vectors(g: jax.Array, r: int) -> jax.Array:
  """Top-r left singular vectors of g (s, l), s ≤ l, sign-canonical.

  GaLore's basis (Zhao et al. 2024, Algorithm 2: U[:, :r] of
  SVD(G)), computed from the eigenvectors of the s×s Gram matrix g gᵀ
  (the smaller side: docs/design.md allows it, and on our GPU eigh of the
  Gram matrix is 13–17× faster than an SVD), since G = UΣVᵀ gives
  G Gᵀ = U Σ² Uᵀ. The Gram product runs at full float32 precision: the
  refresh is rare and TF32 would perturb the eigenvectors.
  """
  g = g.astype(jnp.float32)
  gram = jnp.matmul(g, g.T, precision=jax.lax.Precision.HIGHEST)
  vecs = eigenvectors(gram)  # ascending eigenvalues
  return canonical_signs(vecs[:, ::-1][:, :r])


def warm_left_singular_vectors(
  g: jax.Array,
  previous: jax.Array,
  iterations: int,
  oversample: int = 0,
  key: Optional[jax.Array] = None,
) -> jax.Array:
  """An orthonormal basis (s, r) near g's top-r left singular subspace, from `previous`.

  `iterations` rounds of subspace iteration on the Gram matrix g gᵀ started
  from the previous basis, Q ← orth(g (gᵀ Q)) (Halko, Martinsson and Tropp
  2011, Algorithm 4.3, with the previous basis as the start): products and
  Cholesky QRs, a few large batched kernels, where the exact refresh's eigh
  reduces each Gram matrix to tridiagonal form one column at a time (on an
  H100, cuSOLVER's batched syev took LLaMA-60M's 56 Grams of 512² through
  510 such steps: the refresh and step ran 6,107 kernels, 30.7 ms, mostly
  that reduction; profile_update_60m_h100_80697b9_refresh.json,
  "galore_refresh"). Where consecutive refreshes'
  subspaces overlap, a round or two recover most of the top-r energy; the
  columns are not the singular vectors themselves but stay in the previous
  basis' order and orientation (no sign flips for the kept moments to
  meet).

  Precision: the products with g run at `lax.Precision.HIGH` (TF32 on an
  NVIDIA GPU, three bfloat16 passes on a TPU, float32 on a CPU), the
  orthonormalization, the Rayleigh–Ritz matrix and the final rotation at
  full float32. A product's relative error ε moves the iterate by an angle
  of order ε, and the share of the top-r energy a basis keeps is 1 minus
  the square of its angle to the top-r subspace (to leading order), so TF32's
  ε ≈ 1e-3 costs about 1e-6 of it, while the orthonormalization, at full
  precision, keeps the returned basis orthonormal to float32 rounding
  (Fira's fused residual relies on PᵀP = I). At full float32 these products
  were 604 of the 793 ms of three oversampled rounds on the LLaMA-1B tree
  (one H100, 37c7c23); at TF32 they are 437 of 620 ms (one H100, 11eca49).

  With ``oversample=p > 0`` the iteration runs on r + p columns, the
  previous basis and p more from a Gaussian sketch g·Ω (Ω: l × p, drawn
  from `key`), and the r kept are the top r of that subspace: the
  Rayleigh–Ritz step of Halko et al. (Algorithm 5.1 on the iterated
  range), an eigh of the (r + p)² matrix (gᵀQ)ᵀ(gᵀQ), then the sign
  convention of the exact refresh (`canonical_signs`; the columns are then
  the Ritz vectors, ordered by value). The extra columns let the
  directions near the r-th converge at the rate of σ_{r+p+1}/σ_r instead of
  σ_{r+1}/σ_r, what a flat gradient spectrum needs.
  """
  g = g.astype(jnp.float32)
  hi, with_g = jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGH
  q = previous.astype(jnp.float32)
  r = q.shape[-1]
  oversample = min(oversample, g.shape[0] - r)
  if oversample > 0 and key is None:
    raise ValueError("warm_left_singular_vectors: oversample > 0 draws its sketch from `key`.")
  if oversample > 0:
    omega = jax.random.normal(key, (g.shape[1], oversample), jnp.float32)
    q = _base.orthonormalize(jnp.concatenate([q, jnp.matmul(g, omega, precision=with_g)], axis=1))
  for _ in range(iterations):
    q = _base.orthonormalize(jnp.matmul(g, jnp.matmul(g.T, q, precision=with_g), precision=with_g))
  if oversample <= 0:
    return q
  h = jnp.matmul(g.T, q, precision=with_g)  # (l, r + p)
  vecs = eigenvectors(jnp.matmul(h.T, h, precision=hi))  # ascending
  return canonical_signs(jnp.matmul(q, vecs[:, ::-1][:, :r], precision=hi))


def warm_sketch_key(count) -> jax.Array:
  """The key of the warm refresh's Gaussian sketch Ω at step `count`.

  From the step alone: the same on every device (no communication) and a
  new sketch at each refresh.
  """
  return jax.random.fold_in(jax.random.PRNGKey(0), count)


class SvdState(NamedTuple):
  """State of one matrix under `svd`: its basis P (s, r)."""

  basis: jax.Array


class RandomizedSvdState(NamedTuple):
  """State of one matrix under `randomized_svd`: P (s, r) and its own key."""

  basis: jax.Array
  key: jax.Array


def _keep_if_unusable(g, new_basis_fn, old_basis):
  """The new basis, or the old one if g is unusable or the result is not finite."""
  g = g.astype(jnp.float32)
  usable = _base.usable(g)
  new = new_basis_fn(jnp.where(usable, g, 0.0))
  ok = usable & jnp.all(jnp.isfinite(new))
  return jnp.where(ok, new.astype(old_basis.dtype), old_basis), ok


def svd(
  rank: int,
  update_every: int = 200,
  *,
  dtype=jnp.float32,
  warm_iterations: int = 0,
  warm_oversample: int = 0,
):
  """GaLore's SVD projector, refreshed every `update_every` steps.

  At steps 0, T, 2T, … (T = `update_every`) the basis becomes the top-`rank`
  left singular vectors of the current step's gradient on its smaller side,
  computed in float32 and sign-canonicalised (each vector's largest-magnitude
  entry positive, so every backend gives the same trajectory). Between
  refreshes it is fixed. A gradient that is all zero or not finite keeps the
  previous basis (the first `rank` canonical vectors before any refresh).

  With ``warm_iterations=k > 0`` only step 0's refresh is exact; the later
  ones run k rounds of subspace iteration from the previous basis
  (`warm_left_singular_vectors`): an approximation of GaLore's basis, not
  the authors' refresh, for when the exact one's eigh is the cost. With
  ``warm_oversample=p`` those rounds run on r + p columns (p from a
  Gaussian sketch of the gradient, drawn from the step count) and keep the
  top r of them, which on a flat spectrum is what brings the warm basis
  close to the exact one (docs/benchmarks.md, "How much of the exact
  refresh the warm start keeps").

  References:
    Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
    Projection", ICML 2024, arXiv:2403.03507.

  Args:
    rank: r, the subspace dimension (clamped per matrix to its smaller side).
    update_every: T, steps between refreshes (200 in all the authors' LLaMA
      runs, 500 at 7B).
    dtype: storage dtype of P (math is float32 regardless).
    warm_iterations: 0 (default) for the exact refresh at every T; k > 0 for
      k rounds of subspace iteration from the previous basis after step 0.
    warm_oversample: p ≥ 0, extra columns of the warm rounds (clamped to
      s − r per matrix); needs ``warm_iterations > 0``.

  Returns:
    A `Projector` for `project_subspace`.

  Example:
    >>> import optax, optax_subspace as osub
    >>> tx = osub.project_subspace(optax.adam(1e-3), osub.projectors.svd(4, 50))
  """
  rank = _base.check_rank(rank)
  update_every = _base.check_every(update_every)
  if isinstance(warm_iterations, bool) or not isinstance(warm_iterations, int):
    raise TypeError(f"warm_iterations must be an int, got {warm_iterations!r}.")
  if warm_iterations < 0:
    raise ValueError(f"warm_iterations must be 0 or positive, got {warm_iterations}.")
  if isinstance(warm_oversample, bool) or not isinstance(warm_oversample, int):
    raise TypeError(f"warm_oversample must be an int, got {warm_oversample!r}.")
  if warm_oversample < 0:
    raise ValueError(f"warm_oversample must be 0 or positive, got {warm_oversample}.")
  if warm_oversample and not warm_iterations:
    raise ValueError(
      "warm_oversample needs warm_iterations > 0 (the exact refresh has no use for it)."
    )

  def init(s, l, r, key):
    del l, key
    return SvdState(_base.first_columns(s, r).astype(dtype))

  def exact(state, g):
    r = state.basis.shape[-1]
    return _keep_if_unusable(g, lambda x: top_left_singular_vectors(x, r), state.basis)

  def warm(state, g, count):
    start, key = state.basis, warm_sketch_key(count)
    return _keep_if_unusable(
      g,
      lambda x: warm_left_singular_vectors(x, start, warm_iterations, warm_oversample, key),
      state.basis,
    )

  def refresh(state, g, count):
    if not warm_iterations:
      basis, ok = exact(state, g)
    else:  # step 0 has no previous basis to start from
      basis, ok = jax.lax.cond(
        count == 0, lambda st, x: exact(st, x), lambda st, x: warm(st, x, count), state, g
      )
    return SvdState(basis), ok

  return _base.Projector(
    rank=rank,
    init=init,
    basis=lambda state: state.basis.astype(jnp.float32),
    needs_refresh=_base.RefreshSchedule(update_every),
    refresh=refresh,
  )


def _randomized_range(g, r, key, oversample, power_iters):
  """Top-r left singular vectors of g (s, l) by a randomized range finder."""
  s, l = g.shape
  k = min(r + oversample, s)
  hi = jax.lax.Precision.HIGHEST
  omega = jax.random.normal(key, (l, k), jnp.float32)
  q = _base.orthonormalize(jnp.matmul(g, omega, precision=hi))

  def power_iteration(_, q):  # subspace iteration, re-orthonormalised
    z = _base.orthonormalize(jnp.matmul(g.T, q, precision=hi))
    return _base.orthonormalize(jnp.matmul(g, z, precision=hi))

  q = jax.lax.fori_loop(0, power_iters, power_iteration, q)
  b = jnp.matmul(q.T, g, precision=hi)  # (k, l): g ≈ q b
  vecs = eigenvectors(jnp.matmul(b, b.T, precision=hi))
  top = vecs[:, ::-1][:, :r]
  return canonical_signs(jnp.matmul(q, top, precision=hi))


def randomized_svd(
  rank: int,
  update_every: int = 200,
  *,
  oversample: int = 32,
  power_iters: int = 2,
  seed: int = 0,
  dtype=jnp.float32,
):
  """GaLore 2's randomized-SVD projector, refreshed every `update_every` steps.

  Like `svd`, but the top-r subspace comes from a randomized range finder:
  Y = G Ω with a Gaussian Ω of r + `oversample` columns, `power_iters` rounds
  of subspace iteration Y ← G (Gᵀ Y) with QR in between, then an exact
  eigen-decomposition inside the small range. Its cost is O(s·l·(r+p)) per
  power iteration instead of an SVD. Ω is drawn from a key carried in each
  matrix's state, folded with the step: the same on every device and run.

  References:
    Halko, Martinsson, Tropp, "Finding structure with randomness",
    SIAM Review 2011, arXiv:0909.4061.
    Su et al., "GaLore 2: Large-Scale LLM Pre-Training by Gradient Low-Rank
    Projection", arXiv:2504.20437.

  Args:
    rank: r, the subspace dimension (clamped per matrix to its smaller side).
    update_every: T, steps between refreshes.
    oversample: p, extra random directions (more: closer to the exact SVD).
    power_iters: rounds of subspace iteration (more: sharper on flat spectra).
    seed: folded into every matrix's key.
    dtype: storage dtype of P.

  Returns:
    A `Projector` for `project_subspace`.

  Example:
    >>> import optax, optax_subspace as osub
    >>> proj = osub.projectors.randomized_svd(4, 50, seed=1)
    >>> tx = osub.project_subspace(optax.adam(1e-3), proj)
  """
  rank = _base.check_rank(rank)
  update_every = _base.check_every(update_every)
  if oversample < 0 or power_iters < 0:
    raise ValueError("oversample and power_iters must be non-negative.")

  def init(s, l, r, key):
    del l
    return RandomizedSvdState(
      _base.first_columns(s, r).astype(dtype), jax.random.fold_in(key, seed)
    )

  def refresh(state, g, count):
    r = state.basis.shape[-1]
    key = jax.random.fold_in(state.key, count)
    basis, ok = _keep_if_unusable(
      g,
      lambda x: _randomized_range(x, r, key, oversample, power_iters),
      state.basis,
    )
    return RandomizedSvdState(basis, state.key), ok

  return _base.Projector(
    rank=rank,
    init=init,
    basis=lambda state: state.basis.astype(jnp.float32),
    needs_refresh=_base.RefreshSchedule(update_every),
    refresh=refresh,
  )
