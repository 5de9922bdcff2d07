"""The projector interface and the linear algebra the projectors share.

A projector is a set of pure functions on the state of ONE matrix. The
matrix is always seen oriented, shape (s, l): s is the projected (smaller)
side, l the other. The basis P is (s, r) with orthonormal columns (up to the
online-PCA drift), the projected gradient is R = Pᵀ G (r, l) and the
back-projection of a low-rank update N (r, l) is P N (s, l). A projector
whose P is structured (a row selection) supplies `project` and `back` that
never form P; dense projectors leave them to the default products. The combinator
`project_subspace` vmaps these functions over the batch axes of a leaf and
over the leaves of one shape; projectors never see more than one matrix.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

ProjectorState = Any


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class RefreshSchedule:
  """The steps at which a projector refreshes: 0, T, 2T, … (T = `every`).

  ``every=None``: step 0 only (Online Subspace Descent's SVD start). Calling
  it on a step count gives the answer in the count's kind: a Python bool
  for a Python int (on the host: what a caller passes as
  `project_subspace`'s ``subspace_refresh``), a bool array for a traced
  count (on the device: the refresh `lax.cond`'s predicate). So one
  definition serves both, and `optax_subspace.refresh_due` reads it from
  the optimizer state. A static pytree (no leaves; compared by value), so
  it can sit in a state that jit, `optax.inject_hyperparams` (which
  rebuilds the transformation every step) and `nnx.Optimizer` carry.
  """

  every: Optional[int] = None

  def __call__(self, count):
    if self.every is None:
      return count == 0
    return count % self.every == 0


@dataclasses.dataclass(frozen=True)
class Advance:
  """How a stepped projector moves its basis after each update, in three parts.

  One step on one matrix is ``apply(state, x, direction(P, x), count)``
  with ``x = inputs(state, g, r)`` and P its basis; calling the `Advance`
  as ``advance(state, g, r, count)`` runs exactly that. The combinator
  runs the three parts where each is cheapest:

  - `inputs` ``(state, g, r) -> x`` reads the gradient g (s, l') and its
    projection r = Pᵀg (r, l') while the combinator holds them, so no copy
    of g outlives the projection; it returns small arrays (no l-sized
    axis). l' ≥ l: g and r may carry zero columns (`PRODUCT_ALIGNMENT`),
    which change no product with them and no norm.
  - `direction` ``(P, x) -> d``, optional, reads only P (s, r, float32)
    and x; it runs stacked over every matrix of one (s, r), as one batched
    call, with the P the step's products used. OSD's ∇P is a few r×r and
    s×r products that run far below a GPU's throughput one matrix at a time
    (each product is a few tiles). None: `apply` gets d = None and does all
    the work itself.
  - `apply` ``(state, x, d, count) -> (state, changed)`` runs per leaf
    (vmapped over its batch axes), so the projector's own state (OSD: P's
    optimizer moments) is updated in place, never stacked and unstacked
    (LLaMA-1B: P's two Adam moments, 1.4 GB, copied in and out every step).
    `changed` is a bool scalar: the basis moved.

  Attributes:
    inputs, apply, direction: the parts above.
    basis: ``state -> P``, the projector's `basis`: what a call on one
      matrix gives `direction` (the combinator passes the step's P instead).
  """

  inputs: Callable[[ProjectorState, jax.Array, jax.Array], Any]
  apply: Callable[..., tuple[ProjectorState, jax.Array]]
  direction: Optional[Callable[[jax.Array, Any], Any]] = None
  basis: Optional[Callable[[ProjectorState], jax.Array]] = None

  @classmethod
  def of(cls, fn) -> Optional["Advance"]:
    """`fn` as an `Advance`: an `Advance` as it is, or a one-matrix function
    ``(state, g, r, count) -> (state, changed)`` (g and r kept as inputs)."""
    if fn is None or isinstance(fn, Advance):
      return fn
    return cls(
      inputs=lambda state, g, r: (g, r), apply=lambda state, x, d, count: fn(state, *x, count)
    )

  def __call__(self, state, g, r, count):
    """One matrix's step, the three parts composed."""
    x = self.inputs(state, g, r)
    d = None if self.direction is None else self.direction(self.basis(state), x)
    return self.apply(state, x, d, count)


class Projector(NamedTuple):
  """The pure functions that define a projector family.

  Attributes:
    rank: the requested rank r (clamped per matrix to its smaller side).
    init: ``(s, l, r, key) -> state`` for one oriented s×l matrix.
    basis: ``state -> P`` of shape (s, r), float32.
    needs_refresh: ``count -> bool scalar``: whether `refresh` runs at this
      step (evaluated once per step, for all matrices). A `RefreshSchedule`
      (as every projector here gives) is also readable on the host:
      `optax_subspace.refresh_due` answers from it.
    refresh: ``(state, g, count) -> (state, changed)``, run before the
      gradient g (s, l, float32) is projected, only on steps where
      `needs_refresh` holds. `changed` is a bool scalar: the basis moved.
    advance: optional, run every step after the projection and the inner
      update; the state it returns serves the next step. An `Advance` (its
      parts run where each is cheapest), or a one-matrix function
      ``(state, g, r, count) -> (state, changed)`` with r = basis(state)ᵀg.
    project: optional ``(state, g) -> R`` (r, l); default basis(state)ᵀ g.
    back: optional ``(state, n) -> ΔG`` (s, l); default basis(state) n.
      Both run in their input's dtype (the combinator's `projection_dtype`)
      and return float32; `refresh` and `advance` do their own math in
      float32.
    batch_basis: whether `basis` computes (a random draw and its
      orthonormalisation), so the combinator evaluates it once per step for
      all matrices of one shape in one vmapped call; False (a stored P, read
      per matrix) avoids stacking and unstacking every P each step.
    hold_basis: whether the bases computed for the matrices of one shape in
      one batched call (a refresh's; with `batch_basis`, a step's) are held
      by an optimization barrier before they are cut per matrix, and with
      `batch_basis` each cut too, an array of its own. Unheld, XLA on a GPU
      folds a step's cut into the GEMM that reads it (a dynamic-slice
      fusion) and does not autotune that GEMM; and with only the cuts held,
      a Gaussian draw and its cuts for LLaMA-1B's 168 matrices did not
      finish compiling in minutes (`project_subspace`'s
      `HOLD_COMPUTED_BASES` overrides this for a step's bases).
  """

  rank: int
  init: Callable[[int, int, int, jax.Array], ProjectorState]
  basis: Callable[[ProjectorState], jax.Array]
  needs_refresh: Callable[[jax.Array], jax.Array]
  refresh: Callable[..., tuple[ProjectorState, jax.Array]]
  advance: Optional[Any] = None
  project: Optional[Callable[[ProjectorState, jax.Array], jax.Array]] = None
  back: Optional[Callable[[ProjectorState, jax.Array], jax.Array]] = None
  batch_basis: bool = False
  hold_basis: bool = False

  def project_fn(self):
    """`project`, or the dense product with the basis."""
    if self.project is not None:
      return self.project
    return lambda state, g: dense_project(self.basis(state), g)

  def back_fn(self):
    """`back`, or the dense product with the basis."""
    if self.back is not None:
      return self.back
    return lambda state, n: dense_back(self.basis(state), n)


def dense_project(p: jax.Array, g: jax.Array) -> jax.Array:
  """R = Pᵀ g (r, l), in g's dtype, accumulated in float32."""
  return jnp.matmul(p.T.astype(g.dtype), g, preferred_element_type=jnp.float32)


def dense_back(p: jax.Array, n: jax.Array) -> jax.Array:
  """P n (s, l), in n's dtype, accumulated in float32."""
  return jnp.matmul(p.astype(n.dtype), n, preferred_element_type=jnp.float32)


def check_rank(rank) -> int:
  """Validates a rank argument (a Python int, not a traced hyperparameter)."""
  if isinstance(rank, jax.Array) or not isinstance(rank, int) or isinstance(rank, bool):
    raise TypeError(
      f"rank must be a Python int, got {type(rank).__name__}. Under"
      " optax.inject_hyperparams, name it static:"
      " inject_hyperparams(galore, static_args=('rank', 'update_every'))."
    )
  if rank <= 0:
    raise ValueError(f"rank must be positive, got {rank}.")
  return rank


def check_every(update_every, name: str = "update_every") -> int:
  """Validates a refresh period T (a Python int ≥ 1)."""
  if isinstance(update_every, jax.Array) or not isinstance(update_every, int):
    raise TypeError(
      f"{name} must be a Python int, got {type(update_every).__name__}."
      f" Under optax.inject_hyperparams, list '{name}' in static_args."
    )
  if update_every <= 0:
    raise ValueError(f"{name} must be positive, got {update_every}.")
  return update_every


def matrix_keys(leaf_index: int, num_matrices: int) -> jax.Array:
  """The PRNG keys `project_subspace` gives the matrices of one leaf.

  Leaf `leaf_index` (its position in the parameters' flatten order) gets
  ``fold_in(PRNGKey(0), leaf_index)``, split once per matrix. Projectors fold
  their own seed in. Model-level pieces that must draw the same random
  subspaces as the optimizer level (RSO) derive their keys here too.
  """
  return jax.random.split(jax.random.fold_in(jax.random.PRNGKey(0), leaf_index), num_matrices)


def first_columns(s: int, r: int) -> jax.Array:
  """The first r canonical basis vectors of R^s: a finite starting basis."""
  return jnp.eye(s, r, dtype=jnp.float32)


def usable(g: jax.Array) -> jax.Array:
  """A gradient a projector may learn from: finite and not all zero.

  GaLore's SVD fails to converge on such inputs (its issue #58); we keep the
  previous basis instead, so the projector state never becomes NaN.
  """
  return jnp.all(jnp.isfinite(g)) & jnp.any(g != 0)


def one_matrix_per_call_on_cpu(fn):
  """`fn` (arrays of one matrix in, arrays out) whose vmap calls it one matrix at a time on CPU.

  For the LAPACK-backed factorizations (eigh, Cholesky, triangular solve).
  jaxlib 0.10's CPU LAPACK kernels split a batch of two or more matrices over
  XLA's intra-op thread pool and block their own pool thread until the pieces
  are done. Independent batched calls (the refreshes or draws of different
  matrix shapes) run side by side; once as many are running as the pool has
  threads, every thread waits for pieces that no thread is free to run, and
  the program never returns (seen with gdb: the optimizer-level rso update of
  a hidden-256 LLaMA on 2 cores hung in about 1 run in 4, in spotrf/strsm;
  the LLaMA example's galore step on 8 simulated devices in ssyevd, every
  time). A call on one matrix runs in place. It is the same LAPACK routine on
  the same matrix as one iteration of the batched kernel's loop, so results
  are bit for bit the same. Other platforms keep the batched call: compiled
  for one platform, `platform_dependent` is a conditional on a constant, which
  XLA folds away.
  """
  one_at_a_time = jax.custom_batching.custom_vmap(fn)

  @one_at_a_time.def_vmap
  def _vmap_rule(axis_size, in_batched, *args):
    if not any(in_batched):
      out = fn(*args)
      return out, jax.tree_util.tree_map(lambda _: False, out)
    args = tuple(
      a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
      for a, batched in zip(args, in_batched)
    )
    # lax.map calls `one_at_a_time` unbatched; an outer vmap comes back here.
    out = jax.lax.platform_dependent(
      *args, cpu=lambda *xs: jax.lax.map(lambda x: one_at_a_time(*x), xs), default=jax.vmap(fn)
    )
    return out, jax.tree_util.tree_map(lambda _: True, out)

  return one_at_a_time


@one_matrix_per_call_on_cpu
def _cholesky_solve(gram: jax.Array, y_t: jax.Array) -> jax.Array:
  """L⁻¹ yᵀ for gram = LLᵀ (L lower triangular): a Cholesky and a triangular solve."""
  return jax.scipy.linalg.solve_triangular(jnp.linalg.cholesky(gram), y_t, lower=True)


def orthonormalize(y: jax.Array) -> jax.Array:
  """Orthonormal basis of the columns of y (s, k), k ≤ s: shifted CholeskyQR3.

  Each pass is a k×k Gram matrix, its Cholesky factor and a triangular solve:
  matrix products that batch well on accelerators, where a vmapped
  Householder QR runs one small kernel at a time (36 s for the 168 matrices
  of a LLaMA-1B tree on an H200). The first pass is shifted by 1e-5 of the
  Gram trace, so Cholesky stays defined on ill-conditioned or rank-deficient
  y; it leaves y well conditioned, and two more passes (a 1e-7 shift, then
  none) make it orthonormal to float32 rounding (Fukaya, Kannan, Nakatsukasa,
  Yamamoto, Yanagisawa, "Shifted Cholesky QR for computing the QR
  factorization of ill-conditioned matrices", SIAM J. Sci. Comput. 2020).
  """
  hi = jax.lax.Precision.HIGHEST
  s, k = y.shape
  # A rank-deficient y (a gradient of rank < k) would leave columns with no
  # direction at all; a fixed perturbation of 1e-4 of y's RMS gives them one
  # (orthogonal to the rest after the passes, and of no weight in the range).
  rms = jnp.sqrt(jnp.sum(jnp.square(y)) / (s * k))
  noise = jax.random.normal(jax.random.PRNGKey(0), (s, k), y.dtype)
  y = y + (1e-4 * rms + jnp.finfo(y.dtype).tiny) * noise

  def one_pass(y, relative_shift):
    gram = jnp.matmul(y.T, y, precision=hi)
    shift = relative_shift * jnp.trace(gram) + jnp.finfo(y.dtype).tiny
    return _cholesky_solve(gram + shift * jnp.eye(k, dtype=y.dtype), y.T).T, None

  # A scan, not an unrolled loop: the pass is compiled once.
  shifts = jnp.array([1e-5, 1e-7, 0.0], y.dtype)
  return jax.lax.scan(one_pass, y, shifts)[0]
