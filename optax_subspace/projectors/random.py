"""Random subspaces (RSO, and Flora/GoLore-style projections).

A random basis P (s × r) is a function of a PRNG key and the subproblem
index only, so the state stores the key (and, for a Haar basis, the r × r
factor of its QR) and P is regenerated where it is needed, identical on
every device without communication.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from optax_subspace.projectors import _base

DISTRIBUTIONS = ("haar", "gaussian")


def random_basis(key: jax.Array, s: int, r: int, distribution: str = "haar") -> jax.Array:
  """The random basis P (s, r), float32, of one matrix for one key.

  "haar": orthonormal columns, uniform on the Stiefel manifold (PᵀP = I,
  E[PPᵀ] = (r/s)·I), as RSO's theory assumes; drawn as the Q factor of a
  Gaussian matrix with a positive-diagonal R (Mezzadri), which is what
  CholeskyQR yields. For s ≥ 2r it is Z·M, M from CholeskyQR2 (`haar_factor`): a
  Gaussian s×r matrix is then well conditioned (κ ≈ (√s+√r)/(√s−√r), 3 at
  s = 4r), so two plain passes are exact to float32 rounding (Yamamoto et
  al.). Closer to square, κ grows without bound and the shifted CholeskyQR3
  of `_base.orthonormalize` is used. "gaussian": i.i.d. N(0, 1/r) entries,
  so that E[PPᵀ] = I.

  References:
    Chen, Zhang, Liu, Yuan, Wen, "A Memory Efficient Randomized Subspace
    Optimization Method for Training Large Language Models", ICML 2025,
    arXiv:2502.07222.
    Mezzadri, "How to generate random matrices from the classical compact
    groups", Notices of the AMS 2007, arXiv:math-ph/0609050.
    Yamamoto, Nakatsukasa, Yanagisawa, Fukaya, "Roundoff error analysis of
    the CholeskyQR2 algorithm", Electron. Trans. Numer. Anal. 44, 2015.

  Args:
    key: a PRNG key (already folded with the subproblem index).
    s: length of the projected side.
    r: rank, 1 ≤ r ≤ s.
    distribution: "haar" or "gaussian".

  Returns:
    P, float32 of shape (s, r).

  Example:
    >>> import jax
    >>> from optax_subspace.projectors import random_basis
    >>> p = random_basis(jax.random.PRNGKey(0), 64, 8)
  """
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")
  g = gaussian_draw(key, s, r)
  if distribution == "gaussian":
    return g / jnp.sqrt(jnp.float32(r))
  if has_haar_factor(s, r, distribution):
    return jnp.matmul(g, haar_factor(g), precision=jax.lax.Precision.HIGHEST)
  return _base.orthonormalize(g)


def gaussian_draw(key: jax.Array, s: int, r: int) -> jax.Array:
  """Z (s, r), i.i.d. N(0, 1) float32: the draw every random basis is made from."""
  return jax.random.normal(key, (s, r), jnp.float32)


def has_haar_factor(s: int, r: int, distribution: str) -> bool:
  """Whether the basis is Z·M with M = `haar_factor`(Z): "haar" with s ≥ 2r (CholeskyQR2)."""
  return distribution == "haar" and s >= 2 * r


def haar_factor(z: jax.Array) -> jax.Array:
  """M (r, r), upper triangular, with Z·M = Q of Z = QR (positive diagonal): CholeskyQR2.

  Each pass: the r×r Gram matrix yᵀy = LLᵀ, then y ← y·L⁻ᵀ, with L⁻¹ from
  one r×r triangular solve so that the s×r work is a matrix product; M is
  the product L₁⁻ᵀ·L₂⁻ᵀ of the two passes. For κ(Z) well below float32's
  u^(−1/2) ≈ 4000 (a Gaussian Z with s ≥ 2r), the second pass leaves
  ‖QᵀQ − I‖ at O(u) and Q is that of the exact QR (Yamamoto, Nakatsukasa,
  Yanagisawa, Fukaya, ETNA 2015); with κ(Z) ≤ 6, Z·M is Q to the same order.
  No shift and no perturbation: those are for rank-deficient inputs
  (`_base.orthonormalize`). Keeping M (r² floats) lets a regenerated basis
  cost a draw and one product instead of the two passes (`random`).
  """
  hi = jax.lax.Precision.HIGHEST
  first = _inverse_cholesky_factor(jnp.matmul(z.T, z, precision=hi)).T  # L₁⁻ᵀ
  y = jnp.matmul(z, first, precision=hi)  # the first pass's y, measured: the second corrects it
  second = _inverse_cholesky_factor(jnp.matmul(y.T, y, precision=hi)).T  # L₂⁻ᵀ
  return jnp.matmul(first, second, precision=hi)


def subproblem_draw(key: jax.Array, subproblem: jax.Array, s: int, r: int) -> jax.Array:
  """Z (s, r) of one matrix's subproblem: the draw of its key folded with the index."""
  return gaussian_draw(jax.random.fold_in(key, subproblem), s, r)


def subproblem_factor(key: jax.Array, subproblem: jax.Array, s: int, r: int) -> jax.Array:
  """M (r, r) of one matrix's subproblem: `haar_factor` of its draw, as `random`'s refresh keeps."""
  return haar_factor(subproblem_draw(key, subproblem, s, r))


def _inverse_cholesky_factor(gram: jax.Array) -> jax.Array:
  """L⁻¹ for gram = LLᵀ (L lower triangular): a Cholesky and a triangular solve.

  One LAPACK call per matrix on the CPU, batched elsewhere
  (`_base.one_matrix_per_call_on_cpu`: jaxlib 0.10's batched CPU kernels can
  deadlock XLA's thread pool when independent draws run side by side).
  """
  eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)
  # The solve overwrites its right-hand side, so each draw copies the identity; tied to the Gram
  # matrix, the copy is made when the draw runs. Otherwise nothing orders it: a compile of
  # `nn.merge_and_redraw` with its barriers kept made every layer's copy first and held them all
  # (CPU, 2 × r² floats per layer: 1.1 of 2.1 GB at LLaMA-7B's 224 layers, r = 1024).
  gram, eye = jax.lax.optimization_barrier((gram, eye))
  return _base._cholesky_solve(gram, eye)  # pylint: disable=protected-access


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=("key", "subproblem", "factor"),
  meta_fields=("basis_shape",),
)
@dataclasses.dataclass(frozen=True)
class RandomState:
  """State of one matrix under `random`: a key, the subproblem index and the QR factor.

  P is not stored: `basis` regenerates it from the draw
  Z = ``gaussian_draw(fold_in(key, subproblem), s, r)``: Z·`factor` for a
  Haar basis with s ≥ 2r, otherwise as ``random_basis(fold_in(key,
  subproblem), s, r, distribution)`` does.

  Attributes:
    key: uint32[2], the matrix's key from `project_subspace` folded with the
      projector's seed.
    subproblem: int32, k of the current subproblem (count // K).
    factor: M (r, r) float32 with P_k = Z·M (`haar_factor`, computed by the
      subproblem's refresh; zero before the first one), or None where the
      basis has none (Gaussian entries; Haar with s < 2r).
    basis_shape: (s, r), static (part of the tree structure, not an array):
      the shape of the P it regenerates, which the `Projector` interface
      does not pass to `basis`.
  """

  key: jax.Array
  subproblem: jax.Array
  factor: Optional[jax.Array]
  basis_shape: tuple[int, int]


class StoredRandomState(NamedTuple):
  """State of one matrix under ``random(..., store_basis=True)``: P_k itself.

  Attributes:
    basis: P_k (s, r), float32, drawn at the subproblem's start.
    key: uint32[2], the matrix's key, as `RandomState`'s.
    subproblem: int32, k of the current subproblem.
  """

  basis: jax.Array
  key: jax.Array
  subproblem: jax.Array


def random(
  rank: int,
  update_every: int = 200,
  *,
  distribution: str = "haar",
  seed: int = 0,
  store_basis: bool = False,
) -> _base.Projector:
  """RSO's random subspace: a new random P every `update_every` steps.

  At steps 0, K, 2K, … (K = `update_every`) the matrix enters subproblem
  k = step // K, whose basis is
  ``P_k = random_basis(fold_in(key, k), s, r, distribution)`` with `key`
  the matrix's key (from `project_subspace`) folded with `seed`. The key
  and k are stored, not P, which is regenerated where it is used, identical
  on every device without communication (docs/design.md). For a Haar basis
  with s ≥ 2r the refresh also keeps the r × r factor M of the draw's QR
  (`haar_factor`, two CholeskyQR passes), so that each use costs the draw Z
  and one product, P = Z·M, instead of the passes again; r² floats per
  matrix, next to the moments' 2·r·l. The refresh does not look at the
  gradient. With ``store_basis=True`` the refresh draws the same P_k once
  and the state keeps it (s × r floats per matrix, as GaLore's P): the
  steps in between skip the draw too; the updates are the same.

  Z·M is computed at JAX's default matmul precision, as are the products
  with G it enters (on a GPU: TF32 operands), while the refresh's passes
  and `random_basis` use float32 throughout: on such a device the
  regenerated P differs from `random_basis`'s by TF32 rounding.

  The bases of all matrices of one shape are drawn in one batched call, held,
  then cut per matrix into arrays of their own (`Projector.hold_basis`), so that
  XLA on a GPU autotunes the products that read them: one more copy of the bases
  during a step (s·r floats per matrix), for an update of LLaMA-1B's tree 15%
  faster on an H100 with a Haar P (RSO), 2% faster with a Gaussian one (APOLLO).

  The key derivation is a contract with `optax_subspace.nn`'s model-level
  RSO: the matrix of leaf i (flatten order) draws
  ``random_basis(fold_in(fold_in(matrix_keys(i, 1)[0], seed), k), s, r,
  distribution)``, so both levels see the same P_k.

  References:
    Chen, Zhang, Liu, Yuan, Wen, "A Memory Efficient Randomized Subspace
    Optimization Method for Training Large Language Models", ICML 2025,
    arXiv:2502.07222.

  Args:
    rank: r, the subspace dimension (clamped per matrix to its projected
      side).
    update_every: K, steps per subproblem.
    distribution: "haar" (orthonormal columns, PᵀP = I, the paper's theory)
      or "gaussian" (i.i.d. N(0, 1/r), E[PPᵀ] = I); see `random_basis`.
    seed: folded into every matrix's key.
    store_basis: keep P_k in the state (`StoredRandomState`) instead of
      regenerating it at every use (`RandomState`: a key, k and M).

  Returns:
    A `Projector` for `project_subspace`.

  Example:
    >>> import optax, optax_subspace as osub
    >>> proj = osub.projectors.random(4, 100, distribution="gaussian")
    >>> tx = osub.project_subspace(optax.adam(1e-3), proj, side="rows")
  """
  rank = _base.check_rank(rank)
  update_every = _base.check_every(update_every)
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")

  def draw(key, subproblem, s, r):
    return random_basis(jax.random.fold_in(key, subproblem), s, r, distribution)

  def subproblem_of(count):
    return (count // update_every).astype(jnp.int32)

  if store_basis:
    return _stored(rank, update_every, seed, draw, subproblem_of)

  def init(s, l, r, key):
    del l
    factor = jnp.zeros((r, r), jnp.float32) if has_haar_factor(s, r, distribution) else None
    return RandomState(jax.random.fold_in(key, seed), jnp.zeros([], jnp.int32), factor, (s, r))

  def refresh(state, g, count):
    del g
    subproblem = subproblem_of(count)
    factor = state.factor
    if factor is not None:  # the subproblem's two CholeskyQR passes, once
      factor = subproblem_factor(state.key, subproblem, *state.basis_shape)
    return RandomState(state.key, subproblem, factor, state.basis_shape), jnp.array(True)

  def basis(state):
    if state.factor is None:
      return draw(state.key, state.subproblem, *state.basis_shape)
    # At the default matmul precision, as the products with G that P enters (on a GPU: TF32).
    z = subproblem_draw(state.key, state.subproblem, *state.basis_shape)
    return jnp.matmul(z, state.factor)

  return _base.Projector(
    rank=rank,
    init=init,
    basis=basis,
    needs_refresh=_base.RefreshSchedule(update_every),
    refresh=refresh,
    batch_basis=True,  # each basis is a draw (and a product): batched by shape
    # Held (the docstring says why): benchmarks/results/
    # profile_update_1b_h100_f50e8d7_rso_held_bases.json,
    # profile_update_1b_h100_50e0858_stack_hold.json.
    hold_basis=True,
  )


def _stored(rank: int, update_every: int, seed: int, draw, subproblem_of) -> _base.Projector:
  """`random`'s projector that keeps P_k in its state (``store_basis=True``).

  The keys, subproblem indices and draws are `random`'s, so P_k and every
  update are the same. Before the first refresh (step 0's) the state holds
  the first r canonical vectors, as `svd`'s does: drawing P_0 in `init`
  would compile a QR per leaf there (40 s instead of 6 s for the jitted
  `init` of the LLaMA-1B tree on a 2-core CPU).
  """

  def init(s, l, r, key):
    del l
    key = jax.random.fold_in(key, seed)
    return StoredRandomState(_base.first_columns(s, r), key, jnp.zeros([], jnp.int32))

  def refresh(state, g, count):
    del g
    subproblem = subproblem_of(count)
    basis = draw(state.key, subproblem, *state.basis.shape)
    return StoredRandomState(basis, state.key, subproblem), jnp.array(True)

  return _base.Projector(
    rank=rank,
    init=init,
    basis=lambda state: state.basis,
    needs_refresh=_base.RefreshSchedule(update_every),
    refresh=refresh,
    hold_basis=True,  # the refresh's stacked draws (`Projector.hold_basis`)
  )
