"""Random subspaces (RSO, and Flora/GoLore-style projections).

A random basis P (s × r) is a function of a PRNG key and the subproblem
index only, so the state stores the key and P is regenerated where it is
needed, identical on every device without communication.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from optax_subspace.projectors import _base

DISTRIBUTIONS = ("haar", "gaussian")


def random_basis(key: jax.Array, s: int, r: int,
                 distribution: str = "haar") -> jax.Array:
  """The random basis P (s, r), float32, of one matrix for one key.

  "haar": orthonormal columns, uniform on the Stiefel manifold (PᵀP = I,
  E[PPᵀ] = (r/s)·I), as RSO's theory assumes; drawn as the Q factor of a
  Gaussian matrix with a positive-diagonal R, which is what CholeskyQR
  yields (Mezzadri, "How to generate random matrices from the classical
  compact groups", arXiv:math-ph/0609050). "gaussian": i.i.d. N(0, 1/r)
  entries, so that E[PPᵀ] = I.

  References:
    Chen, Zhang, Liu, Yuan, Wen, "A Memory Efficient Randomized Subspace
    Optimization Method for Training Large Language Models", ICML 2025,
    arXiv:2502.07222.

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
    raise ValueError(
        f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")
  g = jax.random.normal(key, (s, r), jnp.float32)
  if distribution == "gaussian":
    return g / jnp.sqrt(jnp.float32(r))
  return _base.orthonormalize(g)
