"""FRUGAL's state-free update of the gradient outside the subspace, on one matrix.

FRUGAL (Zmushko, Beznosikov, Takáč, Horváth, ICML 2025, arXiv:2411.07837)
splits each gradient in two: its projection on a low-dimensional
"state-full" subspace goes to a stateful optimizer (Adam), the rest, the
"state-free" part, to an optimizer without state (signSGD by default, or
SGD), with its own learning rate. Nothing is dropped, so the update has full
rank while the optimizer state stays low-rank. This is the per-matrix
function of `project_subspace`'s ``residual="sign_sgd"`` / ``"sgd"`` stage
(`_stages`), which the `frugal` preset runs.

Convention (as `optax_subspace.projectors`): one matrix, oriented (s, l) with
s the projected side; P (s, r) with orthonormal columns, R = PᵀG (r, l), and
the combinator's update is ΔW = −lr·α·(P·N + U) with N = inner(R) and U the
term computed here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optax_subspace import _fira

# The authors' defaults (the README of their released code):
DENSITY = 0.25  # ρ, the state-full fraction of each projected matrix: rank r = ρ·s
UPDATE_EVERY = 200  # T, steps between choices of the state-full subspace, as GaLore
RULE = "sign_sgd"  # the state-free optimizer: "sign_sgd" (default) or "sgd"
FREE_SCALE = 1.0  # state-free lr / state-full lr in pre-training ("inactive_lr_scale")
FREE_SCALE_FINE_TUNING = 0.1  # the same ratio in their fine-tuning runs
SCALE = 1.0  # α: FRUGAL has no GaLore-style scale on the state-full update
# What the state-full optimizer's state does when the subspace changes: it restarts from
# zero, step count included (the authors' code, `reset_statistics=True` by default; their
# GaLore baseline is run with it off): the combinator's on_change="reset" with a per-matrix
# Adam step count (`scale_by_hf_adam(per_matrix_count=True)`, as `grass` restarts it).
ON_CHANGE = "reset"
RULES = ("sign_sgd", "sgd")


def complement(g: jax.Array, back_r: jax.Array) -> jax.Array:
  r"""The gradient outside the subspace: G − P·R = (I − PPᵀ)G, (s, l).

  FRUGAL's state-free gradient g_free = g − P⁻¹(P(g)) (the gradient minus
  the back-projection of its projection). It is the orthogonal complement
  only when back∘project is a projection: a P with orthonormal columns
  (SVD, Haar-random), or a selection of rows with unit scales (FRUGAL's
  "rows"/"columns" coordinate choices; GRASS's top-r). A Gaussian P or
  scaled rows (ρ ≠ 1) give something else.

  Args:
    g: the oriented gradient G (s, l), float32.
    back_r: P·R (s, l), the back-projection of R = PᵀG by the projector.

  Returns:
    G − P·R, float32.
  """
  return g - back_r


def state_free_update(
  residual: jax.Array, rule: str = RULE, scale: float = FREE_SCALE
) -> jax.Array:
  r"""The state-free optimizer's direction on the residual: scale · sign(G_free) or scale · G_free.

  signSGD (Bernstein et al., arXiv:1802.04434) or SGD, FRUGAL's two
  state-free optimizers. Neither has state. The learning rate is the
  combinator's: with `scale` = (state-free lr)/(state-full lr), the term
  moves the weights by −lr·α·scale·sign(G_free), as the authors' code does
  (its state-free lr is lr × ``proj_params_lr_scale`` × ``inactive_lr_scale``,
  i.e. α × scale here). sign(0) = 0.

  Args:
    residual: G_free (s, l), from `complement`.
    rule: "sign_sgd" or "sgd".
    scale: the state-free learning rate relative to the state-full one.

  Returns:
    The term U (s, l), float32, to add to the back-projected inner update.
  """
  if rule not in RULES:
    raise ValueError(f"rule must be one of {RULES}, got {rule!r}.")
  direction = jnp.sign(residual) if rule == "sign_sgd" else residual
  return (scale * direction).astype(jnp.float32)


def frugal_residual(
  g: jax.Array,
  back_r: jax.Array,
  r: jax.Array,
  *,
  rule: str = RULE,
  scale: float = FREE_SCALE,
  transposed: bool = False,
) -> jax.Array:
  r"""FRUGAL's state-free term U (s, l) for one matrix: no state.

      U = scale · sign(G − P·R)   (rule "sign_sgd"),   U = scale · (G − P·R)   ("sgd")

  so that, with the state-full update N = Adam(R), the step is
  W ← W − lr·α·(P·N + U) (α = 1 for FRUGAL), the split of the paper's
  Algorithm 1: g_full = P(g) to the state-full optimizer, g_free = g −
  P⁻¹(g_full) to the state-free one, both updates applied at once. When the
  subspace changes (every T steps), the state-full optimizer's state is
  reset (`ON_CHANGE`); this term has none.

  When the rank equals the projected side (r = s), the state-free subspace
  is {0} and U is exactly zero: the signs of the rounding noise in G − P·R
  would otherwise move every weight by a full step.

  References:
    Zmushko, Beznosikov, Takáč, Horváth, "FRUGAL: Memory-Efficient
    Optimization by Reducing State Overhead for Scalable Training", ICML
    2025, arXiv:2411.07837.
    Bernstein, Wang, Azizzadenesheli, Anandkumar, "signSGD: Compressed
    Optimisation for Non-Convex Problems", arXiv:1802.04434.

  Args:
    g: the oriented gradient G (s, l), float32.
    back_r: P·R (s, l), the back-projection of R by the projector.
    r: R = PᵀG (r, l); only its shape is read (r = s: no complement).
    rule: "sign_sgd" or "sgd".
    scale: the state-free learning rate relative to the state-full one.
    transposed: G, P·R and U are (l, s), the transpose of the oriented
      matrix (the rules are elementwise, so only the full-rank check reads it).

  Returns:
    U (s, l), float32.
  """
  if r.shape[0] >= _fira.projected_side(g, transposed):
    if rule not in RULES:
      raise ValueError(f"rule must be one of {RULES}, got {rule!r}.")
    return jnp.zeros_like(g, jnp.float32)
  return state_free_update(complement(g, back_r), rule, scale)


def state_floats(s: int, l: int, r: int) -> int:
  r"""Floats of FRUGAL's optimizer state for one s × l matrix at rank r: s·r + 2·r·l.

  With an SVD (or stored random) basis: P (s × r) and Adam's two moments of
  R (r × l); the state-free part has none. A random basis regenerated from a
  key, or a row selection (r indices), stores less than s·r. AdamW: 2·s·l.
  """
  return s * r + 2 * r * l
