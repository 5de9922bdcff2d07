"""Adam as the authors' PyTorch code computes it: HF AdamW (GaLore) and torch AdamW (OSD's P)."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax


class ScaleByHfAdamState(NamedTuple):
  """State of `scale_by_hf_adam`: step count and the two moments."""

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def _log(beta):
  return math.log(beta) if isinstance(beta, (int, float)) else jnp.log(beta)


def _scale_by_adam(b1, b2, eps, mu_dtype, eps_before_correction):
  """Adam with bias corrections as precise as torch's (see `_log`)."""

  def init_fn(params):
    mu = optax.tree.zeros_like(params, dtype=mu_dtype)
    return ScaleByHfAdamState(jnp.zeros([], jnp.int32), mu,
                              optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    # 1 − βᵗ as −expm1(t·log β) with log β taken in float64 when β is a
    # Python float: 0.999 rounded to float32 alone moves 1 − β2ᵗ by 1e-5
    # relative (torch computes these corrections in double).
    c1 = -jnp.expm1(t * _log(b1))
    c2 = jnp.sqrt(-jnp.expm1(t * _log(b2)))
    if eps_before_correction:  # HF: m/(√v + eps) · √c2/c1
      scale_fn = lambda m, v: m / (jnp.sqrt(v) + eps) * (c2 / c1)
    else:  # torch.optim.AdamW / optax: (m/c1)/(√v/√c2 + eps)
      scale_fn = lambda m, v: (m / c1) / (jnp.sqrt(v) / c2 + eps)
    new = jax.tree_util.tree_map(
        lambda m, v: scale_fn(m, v).astype(m.dtype), mu, nu
    )
    mu = optax.tree.cast(mu, mu_dtype)
    return new, ScaleByHfAdamState(count, mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_hf_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    mu_dtype: Optional[jnp.dtype] = None,
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

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> import optax, optax_subspace as osub
    >>> tx = optax.chain(osub.scale_by_hf_adam(), optax.scale(-1e-3))
  """
  return _scale_by_adam(b1, b2, eps, mu_dtype, eps_before_correction=True)


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
      _scale_by_adam(b1, b2, eps, None, eps_before_correction=False),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  )
