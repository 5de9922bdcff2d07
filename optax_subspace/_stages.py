"""The residual and output stages of `project_subspace`, on one matrix.

Two seams of the pipeline (`_pipeline`) take a method's own step:

- a residual stage, after the projection: a term computed from the part of
  the gradient outside the subspace, G − P·R, added to the back-projected
  inner update before the scale α (FRUGAL: a state-free signSGD or SGD step;
  Fira: the residual scaled by the subspace's norm ratios, then limited);
- an output mode, in place of the back-projection: the full gradient G
  scaled by factors computed in the subspace, then limited (APOLLO,
  APOLLO-Mini).

`Stages` holds the options as `project_subspace` takes them; its methods
are the per-matrix functions the pipeline maps over each leaf's matrices,
oriented (s, l) with the projected side first, in float32. The mathematics
is in `_fira`, `_frugal` and `_apollo`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_subspace import _apollo
from optax_subspace import _fira
from optax_subspace import _frugal

# Residual stages by name: FRUGAL's state-free rules and Fira's two granularities.
STATE_FREE = {"sign_sgd": "sign_sgd", "sgd": "sgd"}
FIRA = {"fira": "column", "fira_matrix": "matrix"}
# Output modes: the back-projection α·P·N, or APOLLO's α·G·diag(s) (channel-wise) and
# APOLLO-Mini's α·s·G (one factor for the matrix).
OUTPUTS = {"back_project": None, "scale": "channel", "scale_tensor": "tensor"}


@dataclasses.dataclass(frozen=True)
class Stages:
  """The residual and output options of one `project_subspace`.

  Attributes:
    residual: None (drop G − P·R, GaLore), "sign_sgd" or "sgd" (FRUGAL),
      "fira" or "fira_matrix" (Fira), or a state-free optax transformation
      applied to G − P·R.
    residual_scale: the state-free term's learning rate relative to the
      subspace's (FRUGAL's λ); not read for Fira.
    output: "back_project", "scale" (APOLLO) or "scale_tensor" (APOLLO-Mini).
    gamma: γ of the norm-growth limiter (Fira and the "scale" outputs).
    released_order: None, or the (β1, β2) of an inner Adam whose
      direction is bias-corrected, for the step as the authors' released
      code orders it: a "scale" output's factors and limiter (APOLLO) and
      Fira's k and limiter see that direction before its correction
      c_t = √(1 − β2ᵗ)/(1 − β1ᵗ), which multiplies the limited update
      afterwards; Fira's residual is then G − α·P·R and its term is not
      scaled by α (docs/methods.md).
  """

  residual: Any = None
  residual_scale: float = 1.0
  output: str = "back_project"
  gamma: float = _fira.GAMMA
  released_order: Any = None

  def __post_init__(self):
    named = tuple(STATE_FREE) + tuple(FIRA)
    if not (
      self.residual is None
      or self.residual in named
      or isinstance(self.residual, optax.GradientTransformation)
    ):
      raise ValueError(
        f"residual must be None, one of {named} or a state-free optax"
        f" transformation, got {self.residual!r}."
      )
    if self.output not in OUTPUTS:
      raise ValueError(f"output must be one of {tuple(OUTPUTS)}, got {self.output!r}.")
    if self.residual is not None and self.output != "back_project":
      raise ValueError(
        "a residual term is added to the back-projection: it needs"
        f" output='back_project', got output={self.output!r}."
      )
    if not self.gamma > 1:
      raise ValueError(f"gamma must be > 1, got {self.gamma!r}.")
    if self.released_order is not None and (
      not (self.scales_output or self.fused)
      or len(self.released_order) != 2
      or not all(0 < b < 1 for b in self.released_order)
    ):
      raise ValueError(
        "released_order is the (b1, b2) of the inner Adam, each in (0, 1), for a 'scale'"
        f" output or a Fira residual; got {self.released_order!r} with output="
        f"{self.output!r}, residual={self.residual!r}."
      )

  @property
  def has_residual(self) -> bool:
    return self.residual is not None

  @property
  def scales_output(self) -> bool:
    return OUTPUTS[self.output] is not None

  @property
  def limited(self) -> bool:
    """Whether each matrix carries the limiter's previous norm (one float)."""
    return (isinstance(self.residual, str) and self.residual in FIRA) or self.scales_output

  def check_state_free(self, shape) -> None:
    """Raises at `init` for a residual transformation that keeps state."""
    if not isinstance(self.residual, optax.GradientTransformation):
      return
    state = jax.eval_shape(self.residual.init, jax.ShapeDtypeStruct(shape, jnp.float32))
    if jax.tree_util.tree_leaves(state):
      raise ValueError(
        "the residual transformation must be state-free (its state would"
        " be s×l per matrix and start afresh every step); its init gave"
        f" {state}."
      )

  @property
  def fused(self) -> bool:
    """Whether the residual folds into the back-projection (Fira: no P·R product)."""
    return isinstance(self.residual, str) and self.residual in FIRA

  # Each per-matrix method takes G (and P·R, and returns its s × l term) oriented (s, l), or
  # as its transpose (l, s) with `transposed`: how a leaf projected on its columns stores its
  # matrices, so the pipeline makes no transposed copy of G (R and N are (r, l) either way).

  def fused_terms(self, g, r, n, previous, transposed=False, released=None):
    """Fira's (c·G·D, N − c·R·D, the limiter's new previous norm): `_fira.fused_fira_terms`.

    `released`: None, or (the bias correction of this step, the scale α) for the released
    code's step (`released_order`)."""
    term, n, limit = _fira.fused_fira_terms(
      g,
      r,
      n,
      _fira.NormGrowthState(previous),
      gamma=self.gamma,
      granularity=FIRA[self.residual],
      transposed=transposed,
      released=released,
    )
    return term, n, limit.previous_norm

  def residual_term(self, g, back_r, r, n, previous, transposed=False):
    """(the term added to P·N before α, the limiter's new previous norm), FRUGAL's rules or a
    caller's state-free transformation (Fira's term folds into N: `fused_terms`)."""
    del n  # read by Fira's term only
    if isinstance(self.residual, str):
      return _frugal.frugal_residual(
        g,
        back_r,
        r,
        rule=STATE_FREE[self.residual],
        scale=self.residual_scale,
        transposed=transposed,
      ), previous
    if r.shape[0] >= _fira.projected_side(g, transposed):  # no complement: exact zero
      return jnp.zeros_like(g), previous
    # A transformation of the caller's sees G − P·R oriented, whatever it computes.
    free = _frugal.complement(g, back_r)
    free = free.T if transposed else free
    direction, _ = self.residual.update(free, self.residual.init(free))
    direction = direction.T if transposed else direction
    return (self.residual_scale * direction).astype(jnp.float32), previous

  def bias_correction(self, count):
    """c_t = √(1 − β2ᵗ)/(1 − β1ᵗ) at the inner's step t = count + 1, or None.

    None unless `released_order`. The inner's count is this
    transformation's: the presets' Adam shares one step count, started and
    stepped with the combinator's.
    """
    if self.released_order is None:
      return None
    b1, b2 = self.released_order
    t = (count + 1).astype(jnp.float32)
    return jnp.sqrt(-jnp.expm1(t * math.log(b2))) / -jnp.expm1(t * math.log(b1))

  def scaled_output(self, g, r, n, previous, transposed=False, correction=None):
    """(APOLLO's G̃ = limited G·diag(s), the limiter's new previous norm).

    With `correction` c_t (`bias_correction`), the factors and the limiter
    see N/c_t, Adam's direction before its bias correction, and the limited
    G̃ is multiplied by c_t afterwards: the released code's order.
    """
    out, limit = _apollo.apollo_output(
      g,
      r,
      n if correction is None else n / correction,
      _fira.NormGrowthState(previous),
      granularity=OUTPUTS[self.output],
      gamma=self.gamma,
      transposed=transposed,
    )
    return (out if correction is None else out * correction), limit.previous_norm
