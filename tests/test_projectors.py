"""Projectors on one matrix: the subspace they find, and what bad input does."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_subspace as osub
from optax_subspace import projectors
from optax_subspace.projectors.svd import canonical_signs
from optax_subspace.projectors.svd import warm_left_singular_vectors


def _decaying(key, s, l, decay=0.7):
  """A random s×l matrix with singular values decay**i."""
  k1, k2 = jax.random.split(key)
  u, _ = jnp.linalg.qr(jax.random.normal(k1, (s, s)))
  v, _ = jnp.linalg.qr(jax.random.normal(k2, (l, s)))
  return (u * decay ** jnp.arange(s)) @ v.T


def _top_subspace(g, r):
  u, _, _ = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
  return u[:, :r]


def _max_principal_angle(p, q):
  """Largest principal angle (radians) between the spans of p and q."""
  qp, _ = np.linalg.qr(np.asarray(p, np.float64))
  qq, _ = np.linalg.qr(np.asarray(q, np.float64))
  cosines = np.linalg.svd(qp.T @ qq, compute_uv=False)
  return float(np.arccos(np.clip(cosines.min(), -1.0, 1.0)))


def _captured_energy(p, g):
  return float(np.sum((np.asarray(p).T @ np.asarray(g)) ** 2))


@pytest.mark.parametrize(
  "make",
  [
    lambda r: projectors.svd(r, 10),
    lambda r: projectors.randomized_svd(r, 10, seed=3),
    lambda r: projectors.online_pca(r),
  ],
)
def test_refresh_finds_the_top_singular_subspace(make):
  g = _decaying(jax.random.PRNGKey(0), 12, 30)
  proj = make(4)
  state = proj.init(12, 30, 4, jax.random.PRNGKey(1))
  state, changed = jax.jit(proj.refresh)(state, g, jnp.int32(0))
  p = proj.basis(state)
  assert bool(changed)
  assert p.shape == (12, 4) and p.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(p.T @ p), np.eye(4), atol=1e-5)
  assert _max_principal_angle(p, _top_subspace(g, 4)) < 1e-3


def test_svd_signs_are_canonical():
  g = _decaying(jax.random.PRNGKey(2), 10, 20)
  proj = projectors.svd(3, 5)
  state, _ = proj.refresh(proj.init(10, 20, 3, None), g, jnp.int32(0))
  p = np.asarray(proj.basis(state))
  pivots = p[np.argmax(np.abs(p), axis=0), np.arange(3)]
  assert np.all(pivots > 0)
  # The same subspace from -g: identical basis, not a sign-flipped one.
  state_neg, _ = proj.refresh(proj.init(10, 20, 3, None), -g, jnp.int32(0))
  np.testing.assert_allclose(np.asarray(proj.basis(state_neg)), p, atol=1e-5)


@pytest.mark.slow
def test_randomized_svd_captures_the_exact_top_energy():
  # Slowly decaying spectrum: the hard case for a range finder.
  g = _decaying(jax.random.PRNGKey(4), 64, 200, decay=0.97)
  exact = _captured_energy(_top_subspace(g, 16), g)
  proj = projectors.randomized_svd(16, 10)  # defaults: p = 32, 2 iterations
  state, _ = proj.refresh(proj.init(64, 200, 16, jax.random.PRNGKey(0)), g, jnp.int32(0))
  assert _captured_energy(proj.basis(state), g) >= 0.999 * exact


def test_warm_refresh_is_exact_at_step_0_and_near_the_exact_energy_later():
  # Two gradients T steps apart whose top subspaces overlap (the second a perturbation of the
  # first), with a slowly decaying spectrum: the warm start's rounds recover ≥ 0.999 of the
  # second gradient's exact top-r energy from the first's basis.
  g0 = _decaying(jax.random.PRNGKey(20), 64, 200, decay=0.93)
  g1 = g0 + 0.3 * _decaying(jax.random.PRNGKey(21), 64, 200, decay=0.93)
  warm, exact = projectors.svd(16, 10, warm_iterations=2), projectors.svd(16, 10)
  state0, _ = jax.jit(warm.refresh)(warm.init(64, 200, 16, None), g0, jnp.int32(0))
  exact0, _ = exact.refresh(exact.init(64, 200, 16, None), g0, jnp.int32(0))
  np.testing.assert_array_equal(np.asarray(warm.basis(state0)), np.asarray(exact.basis(exact0)))
  state1, changed = jax.jit(warm.refresh)(state0, g1, jnp.int32(10))
  p = np.asarray(warm.basis(state1))
  assert bool(changed)
  np.testing.assert_allclose(p.T @ p, np.eye(16), atol=1e-5)
  captured = _captured_energy(p, g1)
  assert captured >= 0.999 * _captured_energy(_top_subspace(g1, 16), g1)
  # Not the exact basis: the start's basis kept, rotated only as far as g1 moved it.
  assert captured > _captured_energy(np.asarray(warm.basis(state0)), g1)


def test_oversampled_warm_refresh_reaches_the_exact_energy_where_the_plain_one_does_not():
  # A flatter spectrum and a larger move between refreshes: two plain rounds keep < 0.999 of the
  # exact top-r energy, two rounds on r + 16 columns with the Rayleigh–Ritz step ≥ 0.999.
  g0 = _decaying(jax.random.PRNGKey(20), 64, 200, decay=0.97)
  g1 = g0 + 0.5 * _decaying(jax.random.PRNGKey(21), 64, 200, decay=0.97)
  best = _captured_energy(_top_subspace(g1, 16), g1)

  def second_basis(proj):
    state0, _ = jax.jit(proj.refresh)(proj.init(64, 200, 16, None), g0, jnp.int32(0))
    state1, changed = jax.jit(proj.refresh)(state0, g1, jnp.int32(10))
    assert bool(changed)
    return np.asarray(proj.basis(state1))

  plain = second_basis(projectors.svd(16, 10, warm_iterations=2))
  p = second_basis(projectors.svd(16, 10, warm_iterations=2, warm_oversample=16))
  assert _captured_energy(plain, g1) < 0.999 * best
  assert _captured_energy(p, g1) >= 0.999 * best
  np.testing.assert_allclose(p.T @ p, np.eye(16), atol=1e-5)
  pivots = p[np.argmax(np.abs(p), axis=0), np.arange(16)]
  assert np.all(pivots > 0)  # the exact refresh's sign convention
  # Deterministic: the sketch is drawn from the step, so the same step gives the same basis.
  np.testing.assert_array_equal(
    p, second_basis(projectors.svd(16, 10, warm_iterations=2, warm_oversample=16))
  )


def test_warm_oversample_is_clamped_to_the_projected_side():
  # s = 20, r = 16: at most 4 extra columns; p = 16 is cut to 4, and r = s leaves none.
  g0 = jax.random.normal(jax.random.PRNGKey(6), (20, 50))
  g1 = g0 + 0.1 * jax.random.normal(jax.random.PRNGKey(7), (20, 50))
  for r in (16, 20):
    proj = projectors.svd(r, 10, warm_iterations=1, warm_oversample=16)
    state0, _ = proj.refresh(proj.init(20, 50, r, None), g0, jnp.int32(0))
    state1, _ = proj.refresh(state0, g1, jnp.int32(10))
    p = np.asarray(proj.basis(state1))
    assert p.shape == (20, r)
    np.testing.assert_allclose(p.T @ p, np.eye(r), atol=1e-5)


@pytest.mark.parametrize(
  "kwargs, error",
  [
    ({"warm_iterations": 1, "warm_oversample": -1}, ValueError),
    ({"warm_iterations": 1, "warm_oversample": 2.0}, TypeError),
    ({"warm_iterations": 1, "warm_oversample": True}, TypeError),
    ({"warm_oversample": 8}, ValueError),
  ],
)
def test_bad_warm_oversample_is_rejected(kwargs, error):
  with pytest.raises(error, match="warm_oversample"):
    projectors.svd(4, 10, **kwargs)


def test_oversampled_warm_rounds_need_a_key():
  g = jax.random.normal(jax.random.PRNGKey(8), (12, 30))
  start = jnp.eye(12)[:, :4]
  with pytest.raises(ValueError, match="key"):
    warm_left_singular_vectors(g, start, 1, oversample=4)


@pytest.mark.parametrize(
  "value, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError), (None, TypeError)]
)
def test_bad_warm_iterations_are_rejected(value, error):
  with pytest.raises(error, match="warm_iterations"):
    projectors.svd(4, 10, warm_iterations=value)


def test_randomized_svd_is_deterministic_per_key_and_step():
  g = jax.random.normal(jax.random.PRNGKey(5), (20, 40))
  proj = projectors.randomized_svd(5, 10, oversample=0, power_iters=0)
  init = proj.init(20, 40, 5, jax.random.PRNGKey(7))
  a = proj.basis(proj.refresh(init, g, jnp.int32(10))[0])
  b = proj.basis(proj.refresh(init, g, jnp.int32(10))[0])
  c = proj.basis(proj.refresh(init, g, jnp.int32(20))[0])
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_online_pca_gradient_matches_autodiff(lam):
  k1, k2 = jax.random.split(jax.random.PRNGKey(6))
  p = jax.random.normal(k1, (9, 3)) / 3
  g = jax.random.normal(k2, (9, 14))

  def loss(p):
    gn = g / jnp.linalg.norm(g)
    return jnp.sum((p @ p.T @ gn - gn) ** 2) + lam * jnp.sum((p.T @ p - jnp.eye(3)) ** 2)

  closed = projectors.online_pca_gradient(p, g, g.T @ p, lam)
  np.testing.assert_allclose(
    np.asarray(closed), np.asarray(jax.grad(loss)(p)), rtol=1e-4, atol=1e-6
  )


def test_online_pca_converges_to_the_top_subspace_of_a_fixed_gradient():
  g = _decaying(jax.random.PRNGKey(8), 16, 40, decay=0.6)
  proj = projectors.online_pca(4, optax.adam(1e-2))
  # Start far from the answer: the last 4 canonical directions.
  state = projectors.OnlinePcaState(jnp.eye(16)[:, 12:], optax.adam(1e-2).init(jnp.eye(16)[:, 12:]))
  angle0 = _max_principal_angle(state.basis, _top_subspace(g, 4))

  @jax.jit
  def step(state, count):
    return proj.advance(state, g, proj.basis(state).T @ g, count)[0]

  for t in range(1, 3001):
    state = step(state, jnp.int32(t))
  angle = _max_principal_angle(state.basis, _top_subspace(g, 4))
  assert angle0 > 1.0
  assert angle < 1e-2


def test_online_pca_does_not_step_at_step_zero():
  g = jax.random.normal(jax.random.PRNGKey(9), (6, 10))
  proj = projectors.online_pca(2)
  state = proj.init(6, 10, 2, None)
  new, changed = proj.advance(state, g, proj.basis(state).T @ g, jnp.int32(0))
  assert not bool(changed)
  np.testing.assert_array_equal(np.asarray(new.basis), np.asarray(state.basis))


# The fast subset (-m "not slow") runs the diagonal: each projector once, each bad value once.
@pytest.mark.parametrize(
  "make,bad",
  [
    pytest.param(make, bad, marks=[] if i == j else [pytest.mark.slow])
    for i, bad in enumerate([0.0, np.nan, np.inf])
    for j, make in enumerate(
      [
        lambda: projectors.svd(3, 5),
        lambda: projectors.randomized_svd(3, 5),
        lambda: projectors.online_pca(3),
      ]
    )
  ],
)
def test_unusable_gradient_keeps_the_previous_basis(make, bad):
  proj = make()
  good = jax.random.normal(jax.random.PRNGKey(10), (8, 12))
  state, _ = proj.refresh(proj.init(8, 12, 3, jax.random.PRNGKey(0)), good, jnp.int32(0))
  g = jnp.full((8, 12), bad)
  refreshed, changed = jax.jit(proj.refresh)(state, g, jnp.int32(5))
  assert not bool(changed)
  np.testing.assert_array_equal(np.asarray(proj.basis(refreshed)), np.asarray(proj.basis(state)))
  if proj.advance is not None:
    p = proj.basis(state)
    advanced, changed = jax.jit(proj.advance)(state, g, p.T @ g, jnp.int32(5))
    assert not bool(changed)
    for new, old in zip(jax.tree_util.tree_leaves(advanced), jax.tree_util.tree_leaves(state)):
      np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


def test_osd_step_skipped_by_one_matrix_of_a_stacked_leaf_keeps_its_count_alone():
  # Under the preset, a leaf of 3 matrices (a scanned kernel) whose middle matrix gets a zero
  # gradient at step 1: that matrix's P keeps its step count (vmapped `apply`), the others step.
  params = {"stack": jnp.ones((3, 16, 24)), "w": jnp.ones((16, 40))}
  dims = {"stack": osub.MatrixDims(rows=1, cols=2), "w": osub.MatrixDims(rows=0, cols=1)}
  tx = osub.online_subspace_descent(1e-2, 4, dims=dims)
  state, p, update = tx.init(params), params, jax.jit(tx.update)
  for t in range(3):
    g = jax.tree.map(lambda x, t=t: jax.random.normal(jax.random.PRNGKey(t), x.shape), params)
    if t == 1:
      g["stack"] = g["stack"].at[1].set(0.0)
    u, state = update(g, state, p)
    p = optax.apply_updates(p, u)
  counts = state[0].projectors["stack"].opt_state[0].count
  np.testing.assert_array_equal(np.asarray(counts), [2, 1, 2])
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(p))


def test_zero_first_gradient_gives_a_finite_orthonormal_basis():
  proj = projectors.svd(3, 5)
  state, _ = proj.refresh(proj.init(8, 12, 3, None), jnp.zeros((8, 12)), jnp.int32(0))
  p = np.asarray(proj.basis(state))
  assert np.all(np.isfinite(p))
  np.testing.assert_allclose(p.T @ p, np.eye(3), atol=1e-6)


@pytest.mark.parametrize("make", [projectors.svd, projectors.randomized_svd, projectors.online_pca])
def test_bad_rank_is_rejected(make):
  with pytest.raises(ValueError, match="rank must be positive"):
    make(0)
  with pytest.raises(TypeError, match="Python int"):
    make(jnp.int32(4))


def test_bad_update_every_is_rejected():
  with pytest.raises(ValueError, match="update_every must be positive"):
    projectors.svd(4, 0)


def test_canonical_signs_is_idempotent():
  p = jax.random.normal(jax.random.PRNGKey(11), (7, 3))
  once = canonical_signs(p)
  np.testing.assert_array_equal(np.asarray(canonical_signs(once)), np.asarray(once))


@pytest.mark.slow
@pytest.mark.parametrize("decay", [0.5, 0.97])
def test_randomized_svd_handles_steep_spectra_and_rank_deficiency(decay):
  steep = _decaying(jax.random.PRNGKey(12), 64, 200, decay)
  rank3 = jax.random.normal(jax.random.PRNGKey(13), (64, 3)) @ jax.random.normal(
    jax.random.PRNGKey(14), (3, 200)
  )
  ones = jnp.ones((64, 200))  # rank 1: y = GΩ has one direction only
  proj = projectors.randomized_svd(16, 10)
  for g in (steep, rank3, ones):
    state, _ = proj.refresh(proj.init(64, 200, 16, jax.random.PRNGKey(0)), g, jnp.int32(0))
    p = proj.basis(state)
    np.testing.assert_allclose(np.asarray(p.T @ p), np.eye(16), atol=1e-5)
    exact = _captured_energy(_top_subspace(g, 16), g)
    assert _captured_energy(p, g) >= 0.999 * exact
