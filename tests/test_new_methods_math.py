"""Fira, FRUGAL and APOLLO's per-matrix mathematics against NumPy re-statements of the papers.

Each re-statement is float64 and written in its paper's own layout (P on the
left of an m × n gradient when m ≤ n, on the right otherwise; "columns" or
"channels" along the side that is not projected), from the paper's algorithm:
Fira's Algorithm 1 (arXiv:2410.01623), FRUGAL's split with a state-free
signSGD or SGD (arXiv:2411.07837), APOLLO's Algorithm 1 with the norm-growth
limiter of its Eq. 4 (arXiv:2412.05270). The library's float32 functions are
driven as the combinator will drive them (the matrix oriented with its
projected side first, Adam on R, back-projection by P) over several steps
that cross a change of subspace, on both orientations and a square matrix.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_subspace as osub
from optax_subspace import _apollo
from optax_subspace import _fira
from optax_subspace import _frugal
from optax_subspace import projectors

B1, B2, EPS = 0.9, 0.999, 1e-6
LR = 0.01
STEPS, EVERY = 7, 3  # subspace changes at steps 0, 3 and 6
HI = jax.lax.Precision.HIGHEST
# (m, n) of the weight's gradient, the rank, and the paper's layout: P on the left (m ≤ n) or on
# the right (m > n; a square matrix goes right in GaLore's and Fira's code).
CASES = [((6, 10), 3, "left"), ((10, 6), 3, "right"), ((8, 8), 3, "right")]
IDS = ["wide", "tall", "square"]


# ---------------------------------------------------------------- NumPy re-statements (float64)


class NumpyAdam:
  """Adam's direction as Fira's Algorithm 1 writes it: √(1 − β2ᵗ)/(1 − β1ᵗ) · M/(√V + ε)."""

  def __init__(self, shape):
    self.m, self.v, self.t = np.zeros(shape), np.zeros(shape), 0

  def __call__(self, r):
    self.t += 1
    self.m = B1 * self.m + (1 - B1) * r
    self.v = B2 * self.v + (1 - B2) * r * r
    return math.sqrt(1 - B2**self.t) / (1 - B1**self.t) * self.m / (np.sqrt(self.v) + EPS)


class NumpyLimiter:
  """Fira's Eqn. 12 / APOLLO's Eq. 4: if ‖x‖/‖x_{t−1}‖ > γ then x ← x/‖x‖ · γ‖x_{t−1}‖."""

  def __init__(self, gamma=1.01):
    self.gamma, self.previous, self.limited = gamma, None, 0

  def __call__(self, x):
    norm = np.linalg.norm(x)
    if self.previous and norm / self.previous > self.gamma:
      x = x / norm * self.gamma * self.previous
      self.limited += 1
    self.previous = np.linalg.norm(x)
    return x


def _gradients(shape, seed=0, steps=STEPS):
  """A sequence of gradients whose norms jump around, so the limiter acts."""
  rng = np.random.default_rng(seed)
  return [rng.standard_normal(shape) * rng.uniform(0.3, 3.0) for _ in range(steps)]


def _svd_basis(g, rank, side):
  """The paper's P: top-r left (m×r) or right (n×r) singular vectors of G, float64."""
  u, _, vt = np.linalg.svd(g, full_matrices=False)
  return u[:, :rank] if side == "left" else vt[:rank].T


def fira_reference(grads, rank, side, alpha=0.25, gamma=1.01):
  """Fira, Algorithm 1 (Adam), in the paper's layout; returns each step's ΔW and the limiter."""
  adam, limiter, out = None, NumpyLimiter(gamma), []
  for t, g in enumerate(grads):
    if t % EVERY == 0:
      p = _svd_basis(g, rank, side)
    if side == "left":  # R = PᵀG (r×n), columns j of R and of G
      r = p.T @ g
      adam = adam or NumpyAdam(r.shape)
      n = adam(r)
      k = np.linalg.norm(n, axis=0) / np.linalg.norm(r, axis=0)
      s = (g - p @ r) * k[None, :]
      back = p @ n
    else:  # footnote 4: R = G·Q (m×r); the factors run along the m rows
      r = g @ p
      adam = adam or NumpyAdam(r.shape)
      n = adam(r)
      k = np.linalg.norm(n, axis=1) / np.linalg.norm(r, axis=1)
      s = (g - r @ p.T) * k[:, None]
      back = n @ p.T
    out.append(-LR * alpha * (back + limiter(s)))  # G̃ = α(P N + S); W ← W − η G̃
  return out, limiter


def frugal_reference(grads, rank, side, rule="sign_sgd", free_scale=1.0):
  """FRUGAL(Adam, signSGD | SGD): the state-full state restarts at every new subspace."""
  out = []
  for t, g in enumerate(grads):
    if t % EVERY == 0:
      p = _svd_basis(g, rank, side)
      adam = None  # reset: moments and step count
    if side == "left":
      g_full = p.T @ g
      adam = adam or NumpyAdam(g_full.shape)
      u_full = p @ adam(g_full)
      g_free = g - p @ g_full
    else:
      g_full = g @ p
      adam = adam or NumpyAdam(g_full.shape)
      u_full = adam(g_full) @ p.T
      g_free = g - g_full @ p.T
    u_free = np.sign(g_free) if rule == "sign_sgd" else g_free
    out.append(-LR * (u_full + free_scale * u_free))
  return out


def _gaussian(rng, r, d):
  """APOLLO's P (r × d), i.i.d. N(0, 1/r) entries."""
  return rng.standard_normal((r, d)) / math.sqrt(r)


def apollo_reference(grads, rank, side, granularity, alpha, gamma=1.01, seed=1):
  """APOLLO / APOLLO-Mini, Algorithm 1 plus the limiter of Eq. 4, in the paper's layout.

  Channels are the larger side: columns for m ≤ n (R = P·G, P r×m), rows otherwise (R = G·Pᵀ,
  P r×n). Returns each step's ΔW and the random P of each step, for the library to reuse.
  """
  rng = np.random.default_rng(seed)
  adam, limiter, out, bases = None, NumpyLimiter(gamma), [], []
  for t, g in enumerate(grads):
    if t % EVERY == 0:
      p = _gaussian(rng, rank, g.shape[0] if side == "left" else g.shape[1])
    bases.append(p)
    r = p @ g if side == "left" else g @ p.T
    adam = adam or NumpyAdam(r.shape)
    r_tilde = adam(r)
    if granularity == "tensor":
      scaled = np.linalg.norm(r_tilde) / np.linalg.norm(r) * g
    elif side == "left":
      scaled = g * (np.linalg.norm(r_tilde, axis=0) / np.linalg.norm(r, axis=0))[None, :]
    else:
      scaled = g * (np.linalg.norm(r_tilde, axis=1) / np.linalg.norm(r, axis=1))[:, None]
    out.append(-LR * alpha * limiter(scaled))  # W ← W − η·α·G·diag(s)
  return out, bases, limiter


# ------------------------------------------- the library's functions, driven as the combinator will


def _orient(x, side):
  """The oriented matrix (s, l): the projected side first."""
  return x if side == "left" else x.T


def _dot(a, b):
  return jnp.matmul(a, b, precision=HI)


class Subspace:
  """R = PᵀG, Adam on R (`scale_by_hf_adam`), back-projections: one oriented matrix."""

  def __init__(self):
    self.adam = osub.scale_by_hf_adam(B1, B2, EPS)
    self.state = None

  def step(self, g, p):
    r = _dot(p.T, g)
    if self.state is None:
      self.state = self.adam.init(r)
    n, self.state = self.adam.update(r, self.state)
    return r, n


def fira_library(grads, bases, side, alpha=0.25, gamma=_fira.GAMMA):
  sub, limit, out = Subspace(), _fira.init_norm_growth(), []
  for g64, p64 in zip(grads, bases):
    g, p = jnp.asarray(_orient(g64, side), jnp.float32), jnp.asarray(p64, jnp.float32)
    r, n = sub.step(g, p)
    s, limit = _fira.fira_residual(g, _dot(p, r), r, n, limit, gamma=gamma)
    out.append(_orient(np.asarray(-LR * alpha * (_dot(p, n) + s), np.float64), side))
  return out


def frugal_library(grads, bases, side, rule="sign_sgd", free_scale=1.0):
  out = []
  for t, (g64, p64) in enumerate(zip(grads, bases)):
    if t % EVERY == 0:
      sub = Subspace()  # on_change="reset", with Adam's count restarting too
    g, p = jnp.asarray(_orient(g64, side), jnp.float32), jnp.asarray(p64, jnp.float32)
    r, n = sub.step(g, p)
    u = _frugal.frugal_residual(g, _dot(p, r), r, rule=rule, scale=free_scale)
    out.append(_orient(np.asarray(-LR * (_dot(p, n) + u), np.float64), side))
  return out


def apollo_library(grads, bases, side, granularity, alpha, gamma=_apollo.GAMMA):
  sub, limit, out = Subspace(), _apollo.init_norm_growth(), []
  for g64, p64 in zip(grads, bases):
    g = jnp.asarray(_orient(g64, side), jnp.float32)
    p = jnp.asarray(p64.T, jnp.float32)  # the paper's P (r × s) is our Pᵀ
    r, n = sub.step(g, p)
    scaled, limit = _apollo.apollo_output(g, r, n, limit, granularity=granularity, gamma=gamma)
    out.append(_orient(np.asarray(-LR * alpha * scaled, np.float64), side))
  return out


def _svd_bases(grads, rank, side):
  bases = []
  for t, g in enumerate(grads):
    if t % EVERY == 0:
      p = _svd_basis(g, rank, side)
    bases.append(p)
  return bases


def _assert_steps_close(ours, reference):
  assert len(ours) == len(reference)
  for t, (a, b) in enumerate(zip(ours, reference)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max(), err_msg=f"step {t}")


# ------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("shape,rank,side", CASES, ids=IDS)
def test_fira_matches_its_algorithm_1_over_steps_and_a_subspace_change(shape, rank, side):
  grads = _gradients(shape)
  reference, limiter = fira_reference(grads, rank, side)
  assert limiter.limited > 0  # the limiter acted on some step
  _assert_steps_close(fira_library(grads, _svd_bases(grads, rank, side), side), reference)


@pytest.mark.parametrize("rule", ["sign_sgd", "sgd"])
@pytest.mark.parametrize("shape,rank,side", CASES, ids=IDS)
def test_frugal_matches_its_split_with_a_state_free_rule_and_resets_at_a_change(
  shape, rank, side, rule
):
  grads = _gradients(shape)
  reference = frugal_reference(grads, rank, side, rule, free_scale=0.1)
  ours = frugal_library(grads, _svd_bases(grads, rank, side), side, rule, free_scale=0.1)
  _assert_steps_close(ours, reference)


@pytest.mark.parametrize(
  "granularity,rank,alpha",
  [("channel", 3, _apollo.SCALE), ("tensor", 1, _apollo.MINI_SCALE)],
  ids=["apollo", "apollo_mini"],
)
@pytest.mark.parametrize(
  "shape,side", [((6, 10), "left"), ((10, 6), "right"), ((8, 8), "left")], ids=IDS
)
def test_apollo_matches_its_algorithm_1_with_the_limiter(shape, side, granularity, rank, alpha):
  grads = _gradients(shape)
  reference, bases, limiter = apollo_reference(grads, rank, side, granularity, alpha)
  assert limiter.limited > 0
  _assert_steps_close(apollo_library(grads, bases, side, granularity, alpha), reference)


def test_an_infinite_gamma_turns_the_limiter_off():
  """γ = inf: Fira's and APOLLO's updates without the limiter (not inf/inf = NaN)."""
  grads = _gradients((6, 10))
  reference, limiter = fira_reference(grads, 3, "left", gamma=math.inf)
  assert limiter.limited == 0 and limiter.previous
  ours = fira_library(grads, _svd_bases(grads, 3, "left"), "left", gamma=math.inf)
  _assert_steps_close(ours, reference)
  assert not np.allclose(ours[-1], fira_reference(grads, 3, "left")[0][-1])  # 1.01 limits
  reference, bases, limiter = apollo_reference(grads, 3, "left", "channel", 1.0, gamma=math.inf)
  assert limiter.limited == 0
  _assert_steps_close(apollo_library(grads, bases, "left", "channel", 1.0, math.inf), reference)


def test_frugal_at_full_rank_has_no_state_free_term():
  g = jnp.asarray(np.random.default_rng(0).standard_normal((5, 7)), jnp.float32)
  p = jnp.asarray(_svd_basis(np.asarray(g, np.float64), 5, "left"), jnp.float32)
  r = _dot(p.T, g)
  assert not np.any(np.asarray(_frugal.frugal_residual(g, _dot(p, r), r)))
  s, _ = _fira.fira_residual(g, _dot(p, r), r, r, _fira.init_norm_growth())
  assert not np.any(np.asarray(s))


@pytest.mark.parametrize("method", ["fira", "frugal", "apollo", "apollo_mini"])
def test_a_zero_gradient_gives_a_zero_update_and_no_nan(method):
  rng = np.random.default_rng(0)
  p, _ = np.linalg.qr(rng.standard_normal((6, 2)))
  p = jnp.asarray(p, jnp.float32)
  sub, limit = Subspace(), _fira.init_norm_growth()
  for g in [np.zeros((6, 9)), np.zeros((6, 9)), rng.standard_normal((6, 9)), np.zeros((6, 9))]:
    g = jnp.asarray(g, jnp.float32)
    r, n = sub.step(g, p)
    if method == "fira":
      u, limit = _fira.fira_residual(g, _dot(p, r), r, n, limit)
    elif method == "frugal":
      u = _frugal.frugal_residual(g, _dot(p, r), r)
    else:
      u, limit = _apollo.apollo_output(
        g, r, n, limit, granularity="channel" if method == "apollo" else "tensor"
      )
    for x in jax.tree_util.tree_leaves((u, limit)):
      assert np.all(np.isfinite(np.asarray(x)))
    if not np.any(np.asarray(g)):
      assert not np.any(np.asarray(u))


def test_the_limiter_caps_growth_at_exactly_gamma():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5)), jnp.float32)
  state = _fira.NormGrowthState(jnp.float32(2.0))
  limited, new = _fira.norm_growth_limit(10.0 * x / jnp.linalg.norm(x), state, gamma=1.01)
  np.testing.assert_allclose(float(jnp.linalg.norm(limited)), 1.01 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(float(new.previous_norm), 1.01 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(
    np.asarray(limited / jnp.linalg.norm(limited)),
    np.asarray(x / jnp.linalg.norm(x)),
    rtol=1e-5,
    atol=1e-6,
  )


def test_the_limiter_leaves_slower_growth_and_the_first_step_alone():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 5)), jnp.float32)
  first, state = _fira.norm_growth_limit(x, _fira.init_norm_growth())
  np.testing.assert_array_equal(np.asarray(first), np.asarray(x))
  slower, _ = _fira.norm_growth_limit(1.005 * x, state, gamma=1.01)
  np.testing.assert_allclose(np.asarray(slower), np.asarray(1.005 * x), rtol=1e-6)
  shrinking, _ = _fira.norm_growth_limit(0.1 * x, state, gamma=1.01)
  np.testing.assert_allclose(np.asarray(shrinking), np.asarray(0.1 * x), rtol=1e-6)


def test_fira_matrix_granularity_is_one_norm_ratio_for_the_whole_matrix():
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.standard_normal((6, 9)), jnp.float32)
  p = jnp.asarray(np.linalg.qr(rng.standard_normal((6, 2)))[0], jnp.float32)
  r, n = Subspace().step(g, p)
  s, _ = _fira.fira_residual(g, _dot(p, r), r, n, _fira.init_norm_growth(), granularity="matrix")
  ratio = np.linalg.norm(np.asarray(n)) / np.linalg.norm(np.asarray(r))
  np.testing.assert_allclose(np.asarray(s), ratio * np.asarray(g - _dot(p, r)), rtol=1e-5)


def test_apollo_with_the_identity_projection_is_channel_wise_adamw():
  """At P = I the factors are those of the paper's Eq. 3 (AdamW coarsened per channel)."""
  grads = _gradients((5, 8), steps=3)
  adam, sub = NumpyAdam((5, 8)), Subspace()
  for g64 in grads:
    g = jnp.asarray(g64, jnp.float32)
    r, n = sub.step(g, jnp.eye(5, dtype=jnp.float32))
    full = adam(g64)
    factors = np.linalg.norm(full, axis=0) / np.linalg.norm(g64, axis=0)
    np.testing.assert_allclose(np.asarray(_apollo.scaling_factors(r, n)), factors, rtol=1e-5)


def _floats(tree):
  return sum(
    int(np.prod(x.shape))
    for x in jax.tree_util.tree_leaves(tree)
    if jnp.issubdtype(x.dtype, jnp.floating)
  )


@pytest.mark.parametrize("s,l", [(2048, 2048), (2048, 5461)])
def test_state_shapes_follow_the_analytic_formulas(s, l):
  """Per matrix, from `jax.eval_shape`: APOLLO-Mini is 2l + 1 floats (no s×l buffer)."""
  adam = osub.scale_by_hf_adam()
  key = jax.random.PRNGKey(0)
  limiter = jax.eval_shape(_fira.init_norm_growth)
  for rank, floats in [(1, _apollo.state_floats(s, l, 1)), (256, _apollo.state_floats(s, l, 256))]:
    projector = projectors.random(rank, distribution=_apollo.PROJECTION)
    state = jax.eval_shape(
      lambda: (adam.init(jnp.zeros((rank, l))), projector.init(s, l, rank, key))
    )
    assert _floats((state, limiter)) == floats
    assert all(int(np.prod(x.shape)) < s * l for x in jax.tree_util.tree_leaves(state))
  assert _apollo.state_floats(s, l, 1) == 2 * l + 1
  svd_state = jax.eval_shape(
    lambda: (adam.init(jnp.zeros((512, l))), projectors.svd(512).init(s, l, 512, key))
  )
  assert _floats(svd_state) == _frugal.state_floats(s, l, 512) == s * 512 + 2 * 512 * l
  assert _floats((svd_state, limiter)) == _fira.state_floats(s, l, 512)


def test_the_functions_jit_and_vmap_over_a_batch_of_matrices_as_one_by_one():
  """The combinator will vmap them over a leaf's batch axes (stacked layers) and buckets."""
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.standard_normal((3, 6, 9)), jnp.float32)
  p = jnp.asarray(
    np.stack([np.linalg.qr(rng.standard_normal((6, 2)))[0] for _ in range(3)]), jnp.float32
  )
  r = jnp.einsum("bsr,bsl->brl", p, g, precision=HI)
  n = jnp.tanh(r)  # any inner direction
  back_r = jnp.einsum("bsr,brl->bsl", p, r, precision=HI)
  limit = _fira.NormGrowthState(jnp.asarray([0.0, 1.0, 50.0], jnp.float32))

  def all_three(g, back_r, r, n, limit):
    fira = _fira.fira_residual(g, back_r, r, n, limit)
    frugal = _frugal.frugal_residual(g, back_r, r)
    apollo = _apollo.apollo_output(g, r, n, limit, granularity="tensor")
    return fira, frugal, apollo

  batched = jax.jit(jax.vmap(all_three))(g, back_r, r, n, limit)
  for i in range(3):
    one = all_three(g[i], back_r[i], r[i], n[i], jax.tree_util.tree_map(lambda x: x[i], limit))
    for a, b in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(one)):
      np.testing.assert_allclose(np.asarray(a[i]), np.asarray(b), rtol=1e-6, atol=1e-7)
