"""`restart_every`: an optax transformation started afresh every K steps."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_subspace.projectors import _base


class RestartEveryState(NamedTuple):
  """State of `restart_every`: the step count and the inner state."""

  count: jax.Array
  inner: optax.OptState


def restart_every(
  inner: optax.GradientTransformation, every: int
) -> optax.GradientTransformationExtraArgs:
  r"""Runs `inner` from a fresh state at steps 0, K, 2K, … (K = `every`).

  At those steps the inner state is replaced by ``inner.init(params)``
  (``inner.init(updates)`` when no params are passed) before the update: its
  moments are zero and its step count, hence Adam's bias correction, starts
  again. This is how each block of K steps becomes one RSO subproblem solved
  "from B = 0 with a fresh inner optimizer" (docs/methods.md, RSO).

  References:
    Chen, Zhang, Liu, Yuan, Wen, "A Memory Efficient Randomized Subspace
    Optimization Method for Training Large Language Models", ICML 2025,
    arXiv:2502.07222.

  Args:
    inner: any optax transformation.
    every: K, a Python int ≥ 1.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax.numpy as jnp, optax, optax_subspace as osub
    >>> tx = osub.restart_every(optax.adam(1e-3), 100)
    >>> state = tx.init({"b": jnp.zeros((4, 8))})
  """
  every = _base.check_every(every, "every")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return RestartEveryState(jnp.zeros([], jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    fresh = inner.init(updates if params is None else params)
    restart = state.count % every == 0
    inner_state = jax.tree_util.tree_map(
      lambda new, old: jnp.where(restart, new, old), fresh, state.inner
    )
    updates, inner_state = inner.update(updates, inner_state, params, **extra_args)
    return updates, RestartEveryState(optax.safe_increment(state.count), inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
