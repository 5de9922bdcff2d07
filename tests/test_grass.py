"""GRASS: the row-selection projector `sparse_rows` and the `grass` preset."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_subspace as osub
from optax_subspace import projectors

SAMPLED = ["multinomial", "uniform"]
ALL = ["topk"] + SAMPLED


def _uneven_rows(key, s, l):
  """An s×l matrix whose row norms differ by up to 10×."""
  row_scale = jnp.linspace(0.1, 1.0, s)
  return row_scale[:, None] * jax.random.normal(key, (s, l))


def _refreshed(proj, g, count=0, key=None):
  s, l = g.shape
  state = proj.init(s, l, proj.rank, jax.random.PRNGKey(0) if key is None else key)
  return proj.refresh(state, g, jnp.int32(count))[0]


def _round_trip(proj, state, g):
  """P Pᵀ G = back(project(G))."""
  return proj.back(state, proj.project(state, g))


@pytest.mark.parametrize("selection", ALL)
def test_compressed_gradient_is_the_scaled_selected_rows(selection):
  g = _uneven_rows(jax.random.PRNGKey(1), 12, 7)
  proj = projectors.sparse_rows(5, 10, selection=selection)
  state = _refreshed(proj, g)
  r = np.asarray(proj.project(state, g))
  idx, rho = np.asarray(state.indices), np.asarray(state.scales)
  assert r.shape == (5, 7) and r.dtype == np.float32
  np.testing.assert_array_equal(r, rho[:, None] * np.asarray(g)[idx])
  assert state.indices.dtype == jnp.int32 and state.scales.shape == (5,)
  np.testing.assert_array_equal(np.asarray(state.counts), np.bincount(idx, minlength=12))


def test_state_holds_no_dense_selection_matrix():
  for selection in ALL:
    proj = projectors.sparse_rows(4, 10, selection=selection)
    state = proj.init(64, 128, 4, jax.random.PRNGKey(0))
    shapes = sorted(x.shape for x in jax.tree_util.tree_leaves(state))
    expected = [(2,), (4,), (4,), (64,)] if selection != "topk" else [(4,), (4,), (64,)]
    assert shapes == sorted(expected), (selection, shapes)


def test_topk_picks_the_largest_rows_and_its_residual_is_the_rest():
  g = jax.random.normal(jax.random.PRNGKey(2), (10, 6)) * jnp.arange(1.0, 11.0)[::-1, None] ** 0.5
  g = g[jax.random.permutation(jax.random.PRNGKey(3), 10)]
  proj = projectors.sparse_rows(4, 10)
  state = _refreshed(proj, g)
  norms = np.linalg.norm(np.asarray(g, np.float64), axis=1)
  top = np.sort(np.argsort(-norms)[:4])
  np.testing.assert_array_equal(np.asarray(state.indices), top)
  np.testing.assert_array_equal(np.asarray(state.scales), np.ones(4))
  residual = np.sum((np.asarray(g) - np.asarray(_round_trip(proj, state, g))) ** 2)
  rest = np.sum(np.delete(norms, top) ** 2)
  np.testing.assert_allclose(residual, rest, rtol=1e-6)


def _expected_variance(g, q, r):
  """E‖PPᵀG − G‖² = (1/r)(Σ‖G_i‖²/q_i − ‖G‖²) for r draws with replacement."""
  sq = np.sum(np.asarray(g, np.float64) ** 2, axis=1)
  return (np.sum(sq / q) - np.sum(sq)) / r


@pytest.mark.parametrize(
  "selection,replacement", [("multinomial", True), ("uniform", True), ("uniform", False)]
)
def test_sampled_round_trip_is_unbiased_with_the_predicted_variance(selection, replacement):
  s, l, r, n = 8, 5, 3, 20_000
  g = _uneven_rows(jax.random.PRNGKey(4), s, l)
  proj = projectors.sparse_rows(r, 1, selection=selection, replacement=replacement)
  state = proj.init(s, l, r, jax.random.PRNGKey(5))

  @jax.jit
  def sample(count):
    new = proj.refresh(state, g, count)[0]
    return _round_trip(proj, new, g)

  draws = np.asarray(
    jax.lax.map(sample, jnp.arange(n, dtype=jnp.int32), batch_size=1000), np.float64
  )
  g64 = np.asarray(g, np.float64)
  norms = np.linalg.norm(g64, axis=1)
  if not replacement:  # each row kept with probability r/s, times s/r
    variance = np.sum(g64**2) * (s / r - 1)
  elif selection == "multinomial":
    variance = _expected_variance(g, norms / norms.sum(), r)
  else:
    variance = _expected_variance(g, np.full(s, 1 / s), r)
  # Unbiased: ‖mean − G‖ within 4 standard errors √(variance / n).
  error = np.linalg.norm(draws.mean(axis=0) - g64)
  assert error < 4 * np.sqrt(variance / n), (error, np.sqrt(variance / n))
  # The variance of one draw within 5% of the formula.
  measured = np.mean(np.sum((draws - g64) ** 2, axis=(1, 2)))
  np.testing.assert_allclose(measured, variance, rtol=0.05)


def test_norm_proportional_sampling_has_less_variance_than_uniform():
  g = _uneven_rows(jax.random.PRNGKey(6), 16, 4)
  norms = np.linalg.norm(np.asarray(g, np.float64), axis=1)
  by_norm = _expected_variance(g, norms / norms.sum(), 4)
  by_square = _expected_variance(g, norms**2 / np.sum(norms**2), 4)
  uniform = _expected_variance(g, np.full(16, 1 / 16), 4)
  assert by_norm < by_square and by_norm < uniform


def test_duplicate_rows_accumulate_in_the_back_projection():
  proj = projectors.sparse_rows(3, 10, selection="multinomial")
  state = projectors.SparseRowsState(
    indices=jnp.array([2, 2, 5], jnp.int32),
    scales=jnp.array([0.5, 2.0, 3.0]),
    counts=jnp.zeros(6, jnp.int32).at[jnp.array([2, 2, 5])].add(1),
    key=jax.random.PRNGKey(0),
  )
  n = jnp.arange(12.0).reshape(3, 4)
  out = np.asarray(proj.back(state, n))
  expected = np.zeros((6, 4), np.float32)
  expected[2] = 0.5 * np.asarray(n[0]) + 2.0 * np.asarray(n[1])
  expected[5] = 3.0 * np.asarray(n[2])
  np.testing.assert_array_equal(out, expected)


def test_sampled_duplicates_add_up_to_count_over_r_q():
  # One dominant row: 4 draws out of 4 rows repeat it.
  g = jnp.array([[10.0, 0.0], [0.1, 0.1], [0.0, 0.2], [0.3, 0.0]])
  proj = projectors.sparse_rows(4, 1, selection="multinomial")
  state = _refreshed(proj, g)
  counts = np.asarray(state.counts)
  assert counts.max() > 1 and counts.sum() == 4
  norms = np.linalg.norm(np.asarray(g, np.float64), axis=1)
  q = norms / norms.sum()
  expected = (counts / (4 * q))[:, None] * np.asarray(g, np.float64)
  np.testing.assert_allclose(np.asarray(_round_trip(proj, state, g)), expected, rtol=1e-5)


def test_sampling_without_replacement_never_repeats_a_row():
  g = jnp.array([[10.0, 0.0], [0.1, 0.1], [0.0, 0.0], [0.3, 0.0]])
  proj = projectors.sparse_rows(4, 1, selection="multinomial", replacement=False)
  state = _refreshed(proj, g)
  np.testing.assert_array_equal(np.asarray(state.indices), np.arange(4))
  # The zero row had probability 0: it is kept with scale 0, not inf.
  assert np.all(np.isfinite(np.asarray(state.scales)))
  assert float(state.scales[2]) == 0.0


@pytest.mark.parametrize("selection", SAMPLED)
def test_zero_gradient_samples_uniformly_without_nan(selection):
  proj = projectors.sparse_rows(3, 1, selection=selection)
  state = _refreshed(proj, jnp.zeros((6, 4)))
  np.testing.assert_allclose(np.asarray(state.scales), np.sqrt(6 / 3), rtol=1e-6)
  seen = np.zeros(6)
  for count in range(200):
    seen += np.asarray(_refreshed(proj, jnp.zeros((6, 4)), count).counts)
  assert np.all(seen > 0)  # every row drawn: the fallback is uniform
  params = {"w": jnp.ones((6, 4))}
  tx = osub.grass(0.1, rank=3, selection=selection)
  updates, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, params), tx.init(params), params)
  assert np.all(np.isfinite(np.asarray(updates["w"])))


@pytest.mark.parametrize("selection", ALL)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradient_keeps_the_previous_selection(selection, bad):
  proj = projectors.sparse_rows(3, 5, selection=selection)
  good = _uneven_rows(jax.random.PRNGKey(7), 8, 5)
  state = _refreshed(proj, good)
  g = good.at[1, 2].set(bad)
  new, changed = jax.jit(proj.refresh)(state, g, jnp.int32(5))
  assert not bool(changed)
  chex.assert_trees_all_equal(new, state)


def test_topk_zero_gradient_keeps_the_previous_rows():
  proj = projectors.sparse_rows(3, 5)
  state = _refreshed(proj, _uneven_rows(jax.random.PRNGKey(8), 8, 5))
  new, changed = proj.refresh(state, jnp.zeros((8, 5)), jnp.int32(5))
  assert not bool(changed)
  chex.assert_trees_all_equal(new, state)


@pytest.mark.parametrize("selection", SAMPLED)
def test_sampled_selection_depends_only_on_key_and_step(selection):
  g = _uneven_rows(jax.random.PRNGKey(9), 40, 6)
  proj = projectors.sparse_rows(8, 10, selection=selection)
  a = _refreshed(proj, g, 10)
  b = jax.jit(lambda g: _refreshed(proj, g, 10))(g)
  c = _refreshed(proj, g, 20)
  d = _refreshed(proj, g, 10, key=jax.random.PRNGKey(1))
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(np.asarray(a.indices), np.asarray(c.indices))
  assert not np.array_equal(np.asarray(a.indices), np.asarray(d.indices))


def test_bad_arguments_are_rejected():
  with pytest.raises(ValueError, match="rank must be positive"):
    projectors.sparse_rows(0)
  with pytest.raises(TypeError, match="Python int"):
    projectors.sparse_rows(jnp.int32(4))
  with pytest.raises(ValueError, match="update_every must be positive"):
    projectors.sparse_rows(4, 0)
  with pytest.raises(ValueError, match="selection must be one of"):
    projectors.sparse_rows(4, selection="random")
  with pytest.raises(ValueError, match="replacement"):
    projectors.sparse_rows(4, selection="topk", replacement=True)
  with pytest.raises(ValueError, match="on_change must be one of"):
    osub.grass(1e-3, on_change="keep")
  with pytest.raises(ValueError, match="selection must be one of"):
    osub.grass(1e-3, selection="top-k")


def test_rank_above_the_rows_is_clamped_and_topk_is_then_plain_adam():
  params = {"w": jax.random.normal(jax.random.PRNGKey(10), (4, 10))}
  grads = {"w": jax.random.normal(jax.random.PRNGKey(11), (4, 10))}
  tx = osub.project_subspace(optax.adam(0.1), projectors.sparse_rows(6, 3))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    state = tx.init(params)
  assert any("rank" in str(w.message) for w in caught)
  assert state.projectors["w"].indices.shape == (4,)
  plain = optax.adam(0.1)
  plain_state = plain.init(params)
  for _ in range(3):
    updates, state = tx.update(grads, state, params)
    expected, plain_state = plain.update(grads, plain_state, params)
    chex.assert_trees_all_close(updates, expected, rtol=1e-6, atol=1e-7)


def test_multinomial_at_clamped_rank_runs_finite():
  params = {"w": jnp.ones((3, 10))}
  tx = osub.grass(0.1, rank=8, selection="multinomial")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    state = tx.init(params)
  updates, _ = jax.jit(tx.update)(params, state, params)
  assert np.all(np.isfinite(np.asarray(updates["w"])))


def _adam_moments(state):
  inner = state[0].inner  # chain: (project_subspace, lr, ...)
  return inner.mu["w"], inner.nu["w"]


@pytest.mark.parametrize("on_change", ["remap", "reset"])
def test_remap_carries_exactly_the_rows_kept_and_zeroes_new_ones(on_change):
  # Step 0 selects rows {0, 1, 2}; step 2 selects {1, 2, 5}.
  w = {"w": jnp.zeros((6, 10))}  # s = 6 rows, the smaller side
  row = lambda *norms: jnp.array(norms)[:, None] * jnp.ones((6, 10))
  g0 = {"w": row(3.0, 2.5, 2.0, 0.5, 0.1, 0.2)}
  g2 = {"w": row(0.1, 2.0, 3.0, 0.5, 0.2, 4.0)}
  b1, b2 = 0.9, 0.999
  tx = osub.grass(0.1, rank=3, update_every=2, on_change=on_change, b1=b1, b2=b2)
  state = tx.init(w)
  _, state = tx.update(g0, state, w)
  _, state = tx.update(g0, state, w)
  mu, nu = _adam_moments(state)
  np.testing.assert_array_equal(np.asarray(state[0].projectors["w"].indices), [0, 1, 2])
  _, state = tx.update(g2, state, w)
  np.testing.assert_array_equal(np.asarray(state[0].projectors["w"].indices), [1, 2, 5])
  new_mu, new_nu = _adam_moments(state)
  r = np.asarray(g2["w"])[[1, 2, 5]]  # ρ = 1
  if on_change == "remap":  # rows 1 and 2 move from slots 1, 2 to slots 0, 1
    carried_mu = np.stack([mu[1], mu[2], np.zeros(10)])
    carried_nu = np.stack([nu[1], nu[2], np.zeros(10)])
  else:
    carried_mu = carried_nu = np.zeros((3, 10))
  np.testing.assert_allclose(np.asarray(new_mu), b1 * carried_mu + (1 - b1) * r, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(new_nu), b2 * carried_nu + (1 - b2) * r**2, rtol=1e-6)


def test_remap_matrix_is_a_row_match_without_scales():
  # M = B_new B_oldᵀ: M[j, k] = 1 where the new slot j and the old slot k
  # hold the same row; a row drawn twice before is summed into it.
  proj = projectors.sparse_rows(3, 1, selection="multinomial")
  make = lambda idx, rho: projectors.SparseRowsState(
    jnp.array(idx, jnp.int32), jnp.array(rho), jnp.zeros(6, jnp.int32), jax.random.PRNGKey(0)
  )
  old = make([1, 1, 4], [0.7, 0.7, 2.0])
  new = make([1, 3, 4], [0.5, 1.5, 3.0])
  m = np.asarray(proj.basis(new).T @ proj.basis(old))
  np.testing.assert_array_equal(m, [[1, 1, 0], [0, 0, 0], [0, 0, 1]])


@pytest.mark.slow
@pytest.mark.parametrize("selection", ALL)
@pytest.mark.parametrize("on_change", ["reset", "remap"])
def test_grass_trains_a_small_model_jitted_or_not(selection, on_change):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(12), 3)
  x = jax.random.normal(k1, (64, 8))
  y = x @ jax.random.normal(k2, (8, 4))
  params = {"w1": 0.3 * jax.random.normal(k3, (8, 16)), "w2": jnp.full((16, 4), 0.1)}
  loss = lambda p: jnp.mean((x @ p["w1"] @ p["w2"] - y) ** 2)
  tx = osub.grass(0.05, rank=2, update_every=5, selection=selection, on_change=on_change)

  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  eager, jitted = (params, tx.init(params)), (params, tx.init(params))
  for _ in range(6):
    eager = step(*eager)
    jitted = jax.jit(step)(*jitted)
  chex.assert_trees_all_close(eager[0], jitted[0], rtol=1e-5, atol=1e-6)
  p, s = jitted
  for _ in range(194):
    p, s = jax.jit(step)(p, s)
  assert float(loss(p)) < 0.2 * float(loss(params))


@pytest.mark.parametrize("restart", [True, False])
def test_reset_restarts_the_bias_correction_of_the_moved_matrix_only(restart):
  # "w" selects rows {0, 1, 2} at step 0 and {1, 2, 5} at step 2 (a reset);
  # "v" keeps rows {0, 1} throughout. With restart_bias_correction, the
  # step-2 update of "w" is a fresh Adam's first step on its new rows, while
  # "v" goes on with its third; without it, both use the shared count t = 3.
  params = {"w": jnp.zeros((6, 10)), "v": jnp.zeros((4, 10))}
  row = lambda *norms: jnp.array(norms)[:, None] * jnp.ones((len(norms), 10))
  g0 = {"w": row(3.0, 2.5, 2.0, 0.5, 0.1, 0.2), "v": row(2.0, 1.0, 0.1, 0.2)}
  g2 = {"w": row(0.1, 2.0, 3.0, 0.5, 0.2, 4.0), "v": g0["v"]}
  lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-6
  tx = osub.grass(
    lr, rank=3, update_every=2, b1=b1, b2=b2, eps=eps, restart_bias_correction=restart
  )
  state = tx.init(params)
  for g in (g0, g0):
    _, state = tx.update(g, state, params)
  updates, state = tx.update(g2, state, params)

  def adam_step(m, v, t):  # HF placement: m/(√v + eps)·√(1 − β2ᵗ)/(1 − β1ᵗ)
    return m / (np.sqrt(v) + eps) * np.sqrt(1 - b2**t) / (1 - b1**t)

  r = np.asarray(g2["w"])[[1, 2, 5]]
  fresh_m, fresh_v = (1 - b1) * r, (1 - b2) * r**2
  expected_w = np.zeros((6, 10))
  expected_w[[1, 2, 5]] = -lr * adam_step(fresh_m, fresh_v, 1 if restart else 3)
  np.testing.assert_allclose(np.asarray(updates["w"]), expected_w, rtol=1e-5)
  # "v" (rows {0, 1, 2} of 4: rank 3) saw the same gradient three times.
  rv = np.asarray(g0["v"])[np.asarray(state[0].projectors["v"].indices)]
  m = (1 - b1**3) * rv
  v = (1 - b2**3) * rv**2
  expected_v = np.zeros((4, 10))
  expected_v[np.asarray(state[0].projectors["v"].indices)] = -lr * adam_step(m, v, 3)
  np.testing.assert_allclose(np.asarray(updates["v"]), expected_v, rtol=1e-5)
