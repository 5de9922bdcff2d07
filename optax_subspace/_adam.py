"""Adam as the authors' PyTorch code computes it: HF AdamW (GaLore) and torch AdamW (OSD's P)."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax


class ScaleByHfAdamState(NamedTuple):
  """State of `scale_by_hf_adam`: step count and the two moments.

  `count` is one int32 scalar, or with ``per_matrix_count=True`` a tree like
  the parameters with one count per matrix of each leaf (shape
  ``leaf.shape[:-2]``: ``()`` for a matrix or a vector).
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def _log(beta):
  return math.log(beta) if isinstance(beta, (int, float)) else jnp.log(beta)


def _matrix_counts(params):
  """One zero step count per matrix of each leaf: shape ``leaf.shape[:-2]``."""
  return jax.tree_util.tree_map(lambda x: jnp.zeros(jnp.shape(x)[:-2], jnp.int32), params)


def _against(c, x):
  """A per-matrix figure `c` (shape ``x.shape[:-2]``) broadcast against `x`."""
  return jnp.reshape(c, jnp.shape(c) + (1,) * (jnp.ndim(x) - jnp.ndim(c)))


def scale_by_precise_adam(b1, b2, eps, mu_dtype, eps_before_correction, per_matrix_count=False):
  """Adam with bias corrections as precise as torch's (see `_log`)."""

  def init_fn(params):
    mu = optax.tree.zeros_like(params, dtype=mu_dtype)
    count = _matrix_counts(params) if per_matrix_count else jnp.zeros([], jnp.int32)
    return ScaleByHfAdamState(count, mu, optax.tree.zeros_like(params))

  def corrections(count):
    # 1 − βᵗ as −expm1(t·log β) with log β taken in float64 when β is a
    # Python float: 0.999 rounded to float32 alone moves 1 − β2ᵗ by 1e-5
    # relative (torch computes these corrections in double).
    t = count.astype(jnp.float32)
    return -jnp.expm1(t * _log(b1)), jnp.sqrt(-jnp.expm1(t * _log(b2)))

  def scale(m, v, c1, c2):
    if eps_before_correction:  # HF: m/(√v + eps) · √c2/c1
      return m / (jnp.sqrt(v) + eps) * (c2 / c1)
    return (m / c1) / (jnp.sqrt(v) / c2 + eps)  # torch.optim.AdamW / optax

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    if per_matrix_count:
      count = jax.tree_util.tree_map(optax.safe_increment, state.count)
      new = jax.tree_util.tree_map(
        lambda m, v, c: scale(m, v, *(_against(x, m) for x in corrections(c))).astype(m.dtype),
        mu,
        nu,
        count,
      )
    else:
      count = optax.safe_increment(state.count)
      c1, c2 = corrections(count)
      new = jax.tree_util.tree_map(lambda m, v: scale(m, v, c1, c2).astype(m.dtype), mu, nu)
    mu = optax.tree.cast(mu, mu_dtype)
    return new, ScaleByHfAdamState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_hf_adam(
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-6,
  mu_dtype: Optional[jnp.dtype] = None,
  per_matrix_count: bool = False,
) -> optax.GradientTransformation:
  r"""Adam whose eps is added to the un-bias-corrected √v (HF AdamW).

  With m_t, v_t the usual moving averages,

      N_t = m_t / (√v_t + eps) · √(1 − β2ᵗ) / (1 − β1ᵗ),

  the update of `transformers.AdamW(correct_bias=True)` and of the GaLore
  authors' optimizer, before the learning rate. It equals `optax.scale_by_adam`
  with eps replaced by eps/√(1 − β2ᵗ): early steps are damped less. The bias
  corrections are computed as precisely as torch's (in float64 for Python
  float betas), so trajectories match the authors' to float32 rounding.

  References:
    Kingma and Ba, "Adam: A Method for Stochastic Optimization",
    arXiv:1412.6980 (the algorithm; the eps placement is HF's).
    Zhao et al., "GaLore", arXiv:2403.03507 (uses this placement, eps 1e-6).

  Args:
    b1: β1, decay of the first moment.
    b2: β2, decay of the second moment.
    eps: added to √v before bias correction.
    mu_dtype: dtype of the first moment (default: the gradient's).
    per_matrix_count: keep one step count t per matrix (per leading index of
      a leaf with batch axes) instead of one for all leaves, so that
      `project_subspace(..., on_change="reset")`, which zeros the moments of
      a matrix whose basis changed, also restarts that matrix's bias
      correction, as a fresh torch optimizer state does. Without it the
      shared t runs on and the first steps after a reset are 1.4-5x too long
      (m/√v of fresh moments, corrected for an old t).

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import optax, optax_subspace as osub
    >>> tx = optax.chain(osub.scale_by_hf_adam(), optax.scale(-1e-3))
  """
  return scale_by_precise_adam(
    b1, b2, eps, mu_dtype, eps_before_correction=True, per_matrix_count=per_matrix_count
  )


def torch_adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01):
  """`torch.optim.AdamW` as an optax transformation (its defaults).

  Decoupled weight decay W ← W − lr·wd·W before the Adam step, eps added
  after bias correction, corrections as precise as torch's. The default
  optimizer of the Online Subspace Descent authors' projector.

  References:
    Loshchilov and Hutter, "Decoupled Weight Decay Regularization",
    arXiv:1711.05101.

  Args:
    learning_rate: float or optax schedule.
    b1, b2, eps, weight_decay: torch's defaults.

  Returns:
    An `optax.GradientTransformation` (needs `params` in `update`).

  Example:
    >>> import optax_subspace as osub
    >>> tx = osub.torch_adamw(1e-3)
  """
  return optax.chain(
    scale_by_precise_adam(b1, b2, eps, None, eps_before_correction=False),
    optax.add_decayed_weights(weight_decay),
    optax.scale_by_learning_rate(learning_rate),
  )
