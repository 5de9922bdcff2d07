"""APOLLO and APOLLO-Mini on one matrix: the full gradient scaled by factors from a subspace.

APOLLO (Zhu et al., MLSys 2025, arXiv:2412.05270) replaces AdamW's
element-wise scaling of the gradient by a channel-wise one (APOLLO-Mini: one
factor for the whole matrix), and estimates the factors from Adam run on a
random projection R of the gradient: the only optimizer state is R's two
moments (rank r, or 1 for APOLLO-Mini) and one norm. The update is the full
gradient G times the factors, not a back-projection. These are the per-matrix
functions of `project_subspace`'s ``output="scale"`` / ``"scale_tensor"``
mode (`_stages`), which the `apollo` and `apollo_mini` presets run.

Convention (as `optax_subspace.projectors`): one matrix, oriented (s, l) with
s the projected side; the paper's W is m × n with m ≤ n, its P is r × m and
R = P·G (r × n), so its P is our Pᵀ and its channels j ∈ [1, n] (the larger
side) are our l columns. Everything is float32.
"""

from __future__ import annotations

import math

import jax

from optax_subspace import _fira

# The paper's defaults (Sec. 4, Algorithm 1, Appendix A.4):
RANK_FRACTION = 0.25  # APOLLO's rank in pre-training: a quarter of the model width (Table 2)
SCALE = 1.0  # α for APOLLO ("set to 1 by default"; 1/2 at 1B, Appendix A.4)
MINI_RANK = 1  # APOLLO-Mini's rank
MINI_SCALE = math.sqrt(128)  # α for APOLLO-Mini, "default to set as √128" (Sec. 4.2)
UPDATE_EVERY = 200  # T, steps between fresh random projections (a new seed)
LEARNING_RATE = 0.01  # pre-training, GaLore's (Appendix A.4)
MINI_LEARNING_RATE = 0.02  # APOLLO-Mini's better pre-training runs (Table 2, ‡)
PROJECTION = "gaussian"  # P with i.i.d. N(0, 1/r) entries (Algorithm 1; Theorem A.1)
GAMMA = _fira.GAMMA  # the norm-growth limiter's γ, "by default ... γ = 1.01" (Sec. 3.2)
GRANULARITIES = ("channel", "tensor")

NormGrowthState = _fira.NormGrowthState
init_norm_growth = _fira.init_norm_growth


def scaling_factors(r: jax.Array, n: jax.Array, granularity: str = "channel") -> jax.Array:
  r"""APOLLO's gradient-scaling factors from R and its Adam direction R̃ = N.

      channel:  s_j = ‖R̃_{:,j}‖ / (‖R_{:,j}‖ + ε),  shape (l,)      (APOLLO, Eq. 5)
      tensor:   s = ‖R̃‖ / (‖R‖ + ε),  scalar                        (APOLLO-Mini)

  The paper writes the ratios without ε ("all small ε in the denominators
  removed for simplicity"); ε = 1e-8 keeps a zero gradient at 0.

  Args:
    r: R (r, l), the projected gradient.
    n: R̃ (r, l), Adam's direction on R (`scale_by_hf_adam`: bias-corrected
      M/(√V + ε)).
    granularity: "channel" (APOLLO) or "tensor" (APOLLO-Mini).

  Returns:
    The factors: (l,) for "channel", a scalar for "tensor"; float32.
  """
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}.")
  if granularity == "channel":
    return _fira.column_norm_ratio(r, n)
  return _fira.matrix_norm_ratio(r, n)


def apollo_output(
  g: jax.Array,
  r: jax.Array,
  n: jax.Array,
  state: NormGrowthState,
  *,
  granularity: str = "channel",
  gamma: float = GAMMA,
  transposed: bool = False,
) -> tuple[jax.Array, NormGrowthState]:
  r"""APOLLO's update direction for one matrix: the full G scaled, then limited (s, l).

      G̃ = G · diag(s)    (APOLLO-Mini: G̃ = s · G)
      G̃ ← G̃ · γ / max(‖G̃‖ / (‖G̃_{t−1}‖ + ε), γ)

  with s from `scaling_factors` (Algorithm 1, step 3; Eqs. 3 and 5) and the
  second line Fira's norm-growth limiter as the paper adopts it (Eq. 4, "by
  default"). The weight update is W ← W − η·α·G̃ (Algorithm 1, step 4; the
  paper's G is the negative gradient): the output stage puts G̃ where the
  back-projection P·N would be, and the combinator's scale is α.

  R is meant to come from a random P with i.i.d. N(0, 1/r) entries
  (`projectors.random(..., distribution="gaussian")`), which preserves
  column norms in expectation (‖R_{:,j}‖ ≈ ‖G_{:,j}‖, Theorem A.1), so that
  s_j ≈ √(r/n) times AdamW's channel factor (Theorem A.4) and α absorbs the
  rest. A P with orthonormal columns shrinks R by √(r/s), which enlarges s
  by √(s/r) and changes what α should be.

  What the paper leaves open and this function chooses: R̃ is the inner's
  direction as given (with `scale_by_hf_adam`, bias-corrected, so the
  limiter sees corrected values); the limiter is applied to G·diag(s) before
  α (with α constant the two orders give the same update). An APOLLO
  variant that scales R and maps it back through P with α^1.5 (found in a
  third-party reimplementation) is not in the paper's text (Algorithm 1,
  Secs. 3–4, Appendix A) and is not offered.

  References:
    Zhu, Zhang, Cong, Liu, Park, Chandra, Long, Pan, Wang, Lee, "APOLLO:
    SGD-like Memory, AdamW-level Performance", MLSys 2025,
    arXiv:2412.05270.
    Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint?", arXiv:2410.01623 (the limiter).

  Args:
    g: the oriented gradient G (s, l), float32.
    r: R = PᵀG (r, l).
    n: R̃ = inner(R) (r, l).
    state: the limiter's `NormGrowthState` for this matrix.
    granularity: "channel" (APOLLO) or "tensor" (APOLLO-Mini).
    gamma: γ of the limiter.
    transposed: G and G̃ are (l, s), the transpose of the oriented matrix
      (how a leaf projected on its columns stores it); R and R̃ stay (r, l).

  Returns:
    (G̃ (s, l) float32, new state).
  """
  factors = scaling_factors(r, n, granularity)
  scaled = g * (_fira.column_factors(factors, transposed) if granularity == "channel" else factors)
  return _fira.norm_growth_limit(scaled, state, gamma)


def state_floats(s: int, l: int, r: int) -> int:
  r"""Floats of APOLLO's optimizer state for one s × l matrix at rank r: 2·r·l + 1.

  Adam's two moments of R (r × l) and the limiter's previous norm; P is
  regenerated from a key (two uint32 and the int32 subproblem index, not
  counted here), as the paper's Table 1 counts "2nr + 2" with the seed.
  APOLLO-Mini (r = 1): 2·l + 1, no s × l buffer. AdamW: 2·s·l.
  """
  del s
  return 2 * r * l + 1
