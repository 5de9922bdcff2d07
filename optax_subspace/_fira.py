"""Fira's residual term on one matrix: norm-based scaling and the norm-growth limiter.

Fira (Chen et al., arXiv:2410.01623) keeps GaLore's subspace Adam and adds
back the part of the gradient GaLore drops, G − P·PᵀG, scaled column by
column by how much Adam scaled the projected gradient, then smooths the
norm of that term from step to step (the norm-growth limiter, which APOLLO
reuses). These are the per-matrix functions of `project_subspace`'s
``residual="fira"`` stage (`_stages`), which the `fira` preset runs.

Convention (as `optax_subspace.projectors`): one matrix, oriented (s, l) with
s the projected side; P is (s, r) with orthonormal columns, R = PᵀG (r, l),
N = inner(R) (r, l) the inner optimizer's update direction, and the
combinator's update is ΔW = −lr·α·(P·N + S). The paper writes the left case
(m ≤ n, P m×r, R r×n) and its footnote 4 the right one (R = G·Q, m×r): both
are the oriented case here, whose "columns" are the l entries of the side
that is not projected. Everything is float32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

GAMMA = 1.01  # γ of the norm-growth limiter, "set to 1.01 across all experiments" (Sec. 4.3)
SCALE = 0.25  # α, GaLore's scale, which Fira keeps (Algorithm 1; the authors' 60M script)
UPDATE_EVERY = 200  # T, steps between SVD refreshes of P (the authors' pre-training scripts)
LEARNING_RATE = 0.01  # pre-training, "the same learning rate 0.01 as used in GaLore" (Sec. 5.1)
# Guard of the norm ratios' denominators ("+ ε" in Algorithm 1; 1e-8 in the authors' code).
NORM_EPS = 1e-8
GRANULARITIES = ("column", "matrix")


class NormGrowthState(NamedTuple):
  """State of the norm-growth limiter for one matrix.

  Attributes:
    previous_norm: ‖S_{t−1}‖ after limiting, float32 scalar. 0 means there
      is no previous step to compare with (the first step, or one whose
      term was zero): that step is not limited.
  """

  previous_norm: jax.Array


def init_norm_growth() -> NormGrowthState:
  """The limiter's state before the first step: no previous norm."""
  return NormGrowthState(jnp.zeros([], jnp.float32))


def norm_growth_limit(
  x: jax.Array, state: NormGrowthState, gamma: float = GAMMA
) -> tuple[jax.Array, NormGrowthState]:
  r"""Caps the growth of ‖x‖ from one step to the next at the factor γ.

      x ← x · γ / max(‖x‖ / (‖x_{t−1}‖ + ε), γ)

  i.e. if ‖x‖ > γ·‖x_{t−1}‖ then x is rescaled to norm γ·‖x_{t−1}‖ (up to
  ε = `NORM_EPS`), otherwise it is left alone; ‖x_{t−1}‖ is the norm the
  previous step *returned* (after limiting). Fira, Eqn. 12 and Algorithm 1
  (x = S_t, the scaled residual); APOLLO, Eq. 4 (x = G̃_t, the scaled
  gradient).

  Neither paper says what the first step compares with; the authors' code
  records the first norm without limiting, and so does this function. A
  previous norm of exactly 0 (a zero term) is treated the same way; there
  the authors' code would shrink every later step to norm γ·1e-8.

  References:
    Chen, Feng, Li, Lai, Yue, Yuan, Wang, "Fira: Can We Achieve Full-rank
    Training of LLMs Under Low-rank Constraint?", arXiv:2410.01623.

  Args:
    x: the term to limit (any shape), float32.
    state: the limiter's `NormGrowthState`.
    gamma: γ > 1, the largest growth allowed per step; inf: no limit.

  Returns:
    (limited x, new state).
  """
  factor, state = limit_factor(jnp.linalg.norm(x), state, gamma)
  return x * factor, state


def limit_factor(
  norm: jax.Array, state: NormGrowthState, gamma: float = GAMMA
) -> tuple[jax.Array, NormGrowthState]:
  """`norm_growth_limit`'s factor γ / max(‖x‖ / (‖x_{t−1}‖ + ε), γ) from ‖x‖, and its new state.

  γ = inf turns the limiter off (factor 1; the formula would give inf/inf).
  """
  if math.isinf(gamma):
    return jnp.ones_like(norm), NormGrowthState(norm.astype(jnp.float32))
  previous = state.previous_norm
  ratio = jnp.where(previous > 0, norm / (previous + NORM_EPS), 0.0)
  factor = gamma / jnp.maximum(ratio, gamma)
  return factor, NormGrowthState((norm * factor).astype(jnp.float32))


def fused_fira_terms(
  g: jax.Array,
  r: jax.Array,
  n: jax.Array,
  state: NormGrowthState,
  *,
  gamma: float = GAMMA,
  granularity: str = "column",
  transposed: bool = False,
  released: tuple | None = None,
) -> tuple[jax.Array, jax.Array, NormGrowthState]:
  r"""`fira_residual` regrouped so that the update needs one product with P: (c·G·D, N − c·R·D).

      P·N + c·(G − P·R)·D = c·G·D + P·(N − c·R·D)

  with D = diag(k) (or the scalar k of "matrix") and c the limiter's factor, so the
  back-projection of N − c·R·D replaces both P·N and the product P·R that `fira_residual`
  needs. The limiter reads ‖S‖ = ‖(G − P·R)·D‖ as √(‖G·D‖² − ‖R·D‖²), exact when PᵀP = I
  (an SVD basis): (I − PPᵀ) is then an orthogonal projection and R·D = Pᵀ(G·D).

  With `released` = (b, α) the step is the authors' released code's (`fira_residual` lists
  its three departures): k and the limiter see N/b, Adam's direction before its bias
  correction b, the residual is G − α·P·R, and ΔW = α·P·N + b·S, so that after the
  combinator's α the terms are (b/α)·c·G·D and N − b·c·R·D, with ‖(G − α·P·R)·D‖² =
  ‖G·D‖² − α(2 − α)·‖R·D‖² for an orthonormal P.

  Args:
    g: the oriented gradient G (s, l), float32.
    r: R = PᵀG (r, l).
    n: N = inner(R) (r, l).
    state: the limiter's `NormGrowthState` for this matrix.
    gamma: γ of the limiter.
    granularity: "column" or "matrix", as `fira_residual`.
    transposed: as in `fira_residual` (G and c·G·D are (l, s)).
    released: None (Algorithm 1), or (b, α): the bias correction b = √(1 − β2ᵗ)/(1 − β1ᵗ)
      of this step and the scale α, for the released code's step.

  Returns:
    (c·G·D (s, l), N − c·R·D (r, l), new state); at r = s, (0, N, state).
  """
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
  if r.shape[0] >= projected_side(g, transposed):
    return jnp.zeros_like(g), n, state
  # Algorithm 1: S = (G − P·R)·D joins P·N. Released code: w = α, term and R·D scaled by b/α.
  if released is None:
    seen, w, u = n, 1.0, 1.0
  else:
    b, alpha = released
    seen, w, u = n / b, alpha, b / alpha
  column = granularity == "column"
  k, r_norms = _norm_ratio(r, seen, axis=0 if column else None)
  g_d = g * (column_factors(k, transposed) if column else k)
  r_d = r * (k[None, :] if column else k)
  # ‖R·D‖² from the norms k is made of (Σ_j k_j²·‖R_{:,j}‖²), not from another pass over R.
  rd2 = jnp.sum(jnp.square(k * r_norms))
  norm = jnp.sqrt(jnp.maximum(jnp.sum(g_d * g_d) - w * (2 - w) * rd2, 0.0))
  factor, state = limit_factor(norm, state, gamma)
  return (u * factor) * g_d, n - (u * w * factor) * r_d, state


def projected_side(g: jax.Array, transposed: bool = False) -> int:
  """s, the projected side of G: (s, l), or (l, s) when `transposed`."""
  return g.shape[-1] if transposed else g.shape[-2]


def column_factors(k: jax.Array, transposed: bool = False) -> jax.Array:
  """k (l,) shaped to scale G's columns, G·diag(k): G (s, l), or Gᵀ (l, s) when `transposed`."""
  return k[:, None] if transposed else k[None, :]


def column_norm_ratio(r: jax.Array, n: jax.Array) -> jax.Array:
  r"""k_j = ‖N_{:,j}‖ / (‖R_{:,j}‖ + ε) for each column j of R (r, l): shape (l,).

  How much the inner optimizer scaled column j of the projected gradient.
  Fira, Eqn. 11 (the column-level scaling factor φ_t(R_t)_j, the K of
  Algorithm 1); APOLLO, Eq. 5 (the channel-wise factor s_j^R). A zero
  column of R gives 0 (its N column is zero too for Adam-like inners).
  """
  return _norm_ratio(r, n, axis=0)[0]


def matrix_norm_ratio(r: jax.Array, n: jax.Array) -> jax.Array:
  r"""φ = ‖N‖ / (‖R‖ + ε), one factor for the whole matrix (scalar).

  Fira, Eqns. 9–10 (the matrix-level scaling factor, "Fira-matrix"); APOLLO,
  Algorithm 1 (APOLLO-Mini's tensor-wise factor s^R).
  """
  return _norm_ratio(r, n, axis=None)[0]


def _norm_ratio(r: jax.Array, n: jax.Array, axis) -> tuple[jax.Array, jax.Array]:
  """(‖N‖ / (‖R‖ + ε), ‖R‖) over `axis` (0: per column; None: the whole matrix)."""
  r_norms = jnp.linalg.norm(r, axis=axis)
  return jnp.linalg.norm(n, axis=axis) / (r_norms + NORM_EPS), r_norms


def fira_residual(
  g: jax.Array,
  back_r: jax.Array,
  r: jax.Array,
  n: jax.Array,
  state: NormGrowthState,
  *,
  gamma: float = GAMMA,
  granularity: str = "column",
) -> tuple[jax.Array, NormGrowthState]:
  r"""Fira's term for the gradient outside the subspace, limited: S_t (s, l).

      S_t = (G − P·R) · diag(k),  k_j = ‖N_{:,j}‖ / (‖R_{:,j}‖ + ε)
      S_t ← S_t · γ / max(‖S_t‖ / (‖S_{t−1}‖ + ε), γ)

  G − P·R = (I − PPᵀ)G is the residual GaLore drops (Sec. 4.1, Algorithm 1's
  second output of the projection); k is the column-level scaling of Eqn. 11
  (``granularity="matrix"``: the single factor of Eqn. 10); the second line
  is the norm-growth limiter of Eqn. 12. The weight update is then
  W ← W − η·α·(P·N + S_t) (Algorithm 1): S_t is added to the back-projected
  N *before* the scale α.

  The authors' released code departs from Algorithm 1 in three ways, which
  this function does not follow: its residual is G − α·P·R (its
  back-projection multiplies by α), its update is α·P·N + S_t (no α on S_t),
  and k and the limiter see N before Adam's bias correction (applied to the
  whole update afterwards).

  When the rank equals the projected side (r = s), the complement is {0}
  and S_t is exactly zero (not the rounding noise of G − P·R).

  References:
    Chen, Feng, Li, Lai, Yue, Yuan, Wang, "Fira: Can We Achieve Full-rank
    Training of LLMs Under Low-rank Constraint?", arXiv:2410.01623.

  Args:
    g: the oriented gradient G (s, l), float32.
    back_r: P·R (s, l), the back-projection of R by the projector (the
      combinator computes it with the projector's own ``back``).
    r: R = PᵀG (r, l).
    n: N = inner(R) (r, l), the inner optimizer's direction (Fira: Adam's
      bias-corrected M/(√V + ε)).
    state: the limiter's `NormGrowthState` for this matrix.
    gamma: γ of the limiter.
    granularity: "column" (Fira, Eqn. 11) or "matrix" (Fira-matrix, Eqn. 10).

  Returns:
    (S_t (s, l) float32, new state).
  """
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
  if r.shape[0] >= g.shape[0]:
    return jnp.zeros_like(g), state
  if granularity == "column":
    scaling = column_norm_ratio(r, n)[None, :]
  else:
    scaling = matrix_norm_ratio(r, n)
  return norm_growth_limit((g - back_r) * scaling, state, gamma)


def state_floats(s: int, l: int, r: int) -> int:
  r"""Floats of Fira's optimizer state for one s × l matrix at rank r: s·r + 2·r·l + 1.

  GaLore's (the SVD basis P, s × r, and Adam's two moments of R, r × l) plus
  the limiter's previous norm, "one parameter ‖S_{t−1}‖ for each weight
  matrix" (Sec. 4.3, Table 2: mr + 2nr + 1). AdamW: 2·s·l.
  """
  return s * r + 2 * r * l + 1
