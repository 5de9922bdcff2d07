"""RSO (issue 4, optimizer level): the `side` option, `projectors.random`, `rso`."""

import dataclasses
import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_subspace as osub
from optax_subspace import checkpoint
from optax_subspace import projectors
from optax_subspace._leaves import path_str
from optax_subspace.projectors import _base
from optax_subspace.projectors.random import haar_factor


def _grads(params, seed):
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _basis(leaf_index, seed, subproblem, s, r, distribution="haar"):
  """P_k of the matrix of leaf `leaf_index`, as the model level draws it."""
  key = jax.random.fold_in(_base.matrix_keys(leaf_index, 1)[0], seed)
  return np.asarray(
    projectors.random_basis(jax.random.fold_in(key, subproblem), s, r, distribution), np.float64
  )


# --- project_subspace(side=...) -------------------------------------------


@pytest.mark.parametrize(
  "side,shape,low_rank",
  [
    ("smaller", (16, 8), (16, 3)),  # the 8 columns: the smaller side
    ("rows", (16, 8), (3, 8)),  # the 16 rows although they are larger
    ("cols", (8, 16), (8, 3)),  # the 16 columns although they are larger
    ("rows", (8, 8), (3, 8)),
    ("cols", (8, 8), (8, 3)),
  ],
)
def test_side_chooses_which_side_of_each_matrix_is_projected(side, shape, low_rank):
  params = {"w": jnp.ones(shape)}
  tx = osub.project_subspace(optax.adam(1e-2), projectors.svd(3, 5), side=side)
  state = jax.eval_shape(tx.init, params)
  assert state.inner[0].mu["w"].shape == low_rank
  s = shape[0] if low_rank[0] == 3 else shape[1]
  assert state.projectors["w"].basis.shape == (s, 3)


@pytest.mark.parametrize("side", ["rows", "cols"])
def test_side_projected_update_is_the_basis_times_the_inner_update(side):
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (6, 10))}
  g = _grads(params, 1)
  tx = osub.project_subspace(optax.sgd(1.0), projectors.random(3, 4), side=side)
  updates, state = tx.update(g, tx.init(params), params)
  p = np.asarray(projectors.random(3, 4).basis(state.projectors["w"]))
  assert p.shape == ((6, 3) if side == "rows" else (10, 3))
  gw = np.asarray(g["w"])
  want = -p @ p.T @ gw if side == "rows" else -gw @ p @ p.T
  np.testing.assert_allclose(updates["w"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "side,what", [("rows", "row \\(input\\) side"), ("cols", "column \\(output\\) side")]
)
def test_rank_not_below_the_chosen_side_warns_and_clamps_to_it(side, what):
  params = {"w": jnp.ones((4, 9)) if side == "rows" else jnp.ones((9, 4))}
  tx = osub.project_subspace(optax.adam(1e-3), projectors.svd(6, 5), side=side)
  with pytest.warns(UserWarning, match=f"not below the {what}"):
    state = tx.init(params)
  assert state.projectors["w"].basis.shape == (4, 4)


def test_an_unknown_side_is_rejected():
  with pytest.raises(ValueError, match="side must be one of"):
    osub.project_subspace(optax.sgd(0.1), projectors.svd(2), side="left")


# --- projectors.random -----------------------------------------------------


def _states(proj, s, r, subproblems):
  """One matrix's state at each subproblem index, batched."""
  state = proj.init(s, 1, r, jax.random.PRNGKey(3))
  every = proj.needs_refresh.every
  return jax.vmap(lambda k: proj.refresh(state, None, k * every)[0])(
    jnp.arange(subproblems, dtype=jnp.int32)
  )


def test_haar_basis_has_orthonormal_columns():
  proj = projectors.random(5, 10)
  p = jax.vmap(proj.basis)(_states(proj, 12, 5, 20))
  gram = jnp.einsum("ksr,ksq->krq", p, p)
  np.testing.assert_allclose(gram, np.broadcast_to(np.eye(5), gram.shape), atol=2e-6)


def test_haar_factor_gives_the_q_of_the_draws_qr_with_a_positive_diagonal():
  z = jax.random.normal(jax.random.PRNGKey(4), (64, 16), jnp.float32)
  m = np.asarray(haar_factor(z), np.float64)
  q, r = np.linalg.qr(np.asarray(z, np.float64))
  q = q * np.sign(np.diag(r))  # the QR with R's diagonal positive (Mezzadri)
  np.testing.assert_array_equal(np.tril(m, -1), 0.0)  # M = R⁻¹: upper triangular
  np.testing.assert_allclose(np.asarray(z, np.float64) @ m, q, atol=2e-6)


@pytest.mark.parametrize(
  "s,r,distribution", [(12, 5, "haar"), (10, 5, "haar"), (9, 5, "haar"), (12, 5, "gaussian")]
)
def test_a_regenerated_basis_is_the_model_level_draw_with_a_factor_only_for_haar_at_s_ge_2r(
  s, r, distribution
):
  proj = projectors.random(r, 4, distribution=distribution)
  state, _ = proj.refresh(proj.init(s, 3, r, jax.random.PRNGKey(5)), None, jnp.int32(8))
  assert (state.factor is not None) == (distribution == "haar" and s >= 2 * r)
  if state.factor is not None:
    assert state.factor.shape == (r, r)
  want = projectors.random_basis(jax.random.fold_in(state.key, 2), s, r, distribution)
  np.testing.assert_allclose(proj.basis(state), want, rtol=1e-5, atol=1e-6)


def test_gaussian_basis_has_identity_expected_ppt():
  # Entries N(0, 1/r): an entry of PPᵀ has variance at most 2/r, so the
  # mean of N draws deviates by σ ≤ √(2/(rN)) = 0.005 (r = 4, N = 20000);
  # asserted at 5σ.
  s, r, n = 8, 4, 20000
  proj = projectors.random(r, 1, distribution="gaussian")
  p = jax.vmap(proj.basis)(_states(proj, s, r, n))
  mean = np.asarray(jnp.einsum("ksr,ktr->st", p, p)) / n
  np.testing.assert_allclose(mean, np.eye(s), atol=5 * math.sqrt(2 / (r * n)))


def test_random_basis_is_fixed_within_a_subproblem_and_new_at_each():
  proj = projectors.random(2, 3, seed=7)
  state = proj.init(6, 4, 2, jax.random.PRNGKey(0))
  g = jnp.ones((6, 4))
  bases = []
  for count in range(7):
    if proj.needs_refresh(jnp.int32(count)):
      state, changed = proj.refresh(state, g, jnp.int32(count))
      assert bool(changed)
    assert int(state.subproblem) == count // 3
    bases.append(np.asarray(proj.basis(state)))
  np.testing.assert_array_equal(bases[0], bases[2])
  np.testing.assert_array_equal(bases[3], bases[5])
  assert np.abs(bases[0] - bases[3]).max() > 0.1
  assert np.abs(bases[3] - bases[6]).max() > 0.1


def test_random_projector_bases_follow_the_model_level_key_contract():
  # Leaf i (flatten order) draws P_k from fold_in(fold_in(matrix_keys(i, 1)
  # [0], seed), k): `optax_subspace.nn` relies on it.
  params = {"a": jnp.zeros((6, 5)), "b": jnp.zeros((8, 3))}
  tx = osub.project_subspace(optax.sgd(1.0), projectors.random(2, 2, seed=11), side="rows")
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(5):
    g = _grads(params, t)
    updates, state = update(g, state, params)
    for i, name in enumerate(("a", "b")):
      p = _basis(i, 11, t // 2, params[name].shape[0], 2)
      np.testing.assert_allclose(
        updates[name], -p @ p.T @ np.asarray(g[name]), rtol=1e-5, atol=1e-6
      )


# --- rso: the method --------------------------------------------------------


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (8, 8)])
def test_full_rank_orthogonal_single_step_subproblems_with_sgd_are_sgd(shape):
  # RSO with r = m, Haar P (orthogonal), K = 1 and no proximal term: each
  # step solves its subproblem by one SGD step from B = 0, W + P(−lr PᵀG) =
  # W − lr G. `rso` refuses r = m (no memory saved); this is the same
  # method through `project_subspace` at r = m.
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), shape), "b": jnp.zeros(shape[1])}
  tx = osub.project_subspace(
    osub.restart_every(optax.sgd(0.1), 1), projectors.random(shape[0], 1), mask=r"^w$", side="rows"
  )
  sgd = optax.sgd(0.1)
  ours, plain = params, params
  with pytest.warns(UserWarning, match="not below the row \\(input\\) side"):
    state = tx.init(params)
  sgd_state = sgd.init(params)
  for t in range(4):
    u, state = jax.jit(tx.update)(_grads(ours, t), state, ours)
    ours = optax.apply_updates(ours, u)
    v, sgd_state = sgd.update(_grads(plain, t), sgd_state, plain)
    plain = optax.apply_updates(plain, v)
  chex.assert_trees_all_close(ours, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("distribution", ["haar", "gaussian"])
def test_one_rso_step_with_sgd_moves_the_weights_by_p_times_the_sgd_step_on_b(distribution):
  params = {"b": jnp.zeros(5), "w": jax.random.normal(jax.random.PRNGKey(0), (12, 5))}
  g = _grads(params, 1)
  tx = osub.rso(
    0.1, rank=3, inner_steps=4, inner=optax.identity(), distribution=distribution, seed=2
  )
  updates, _ = tx.update(g, tx.init(params), params)
  p = _basis(1, 2, 0, 12, 3, distribution)
  np.testing.assert_allclose(
    updates["w"], -0.1 * p @ p.T @ np.asarray(g["w"]), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(updates["b"], -0.1 * np.asarray(g["b"]), rtol=1e-6)


def _regression():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(4), 3)
  x = np.asarray(jax.random.normal(k1, (32, 10)), np.float64)
  y = np.asarray(jax.random.normal(k2, (32, 4)), np.float64)
  w0 = 0.3 * np.asarray(jax.random.normal(k3, (10, 4)), np.float64)
  return x, y, w0


def test_proximal_subproblems_match_a_numpy_restatement():
  # SGD inner: B_{t+1} = B_t − lr(P_kᵀG_t + B_t/η), W = W_k + P_k B; at
  # t = K, 2K, … W_k ← W, B ← 0 and P_k is redrawn. Seven steps, K = 3:
  # two subproblem boundaries. The bias is not projected: plain SGD.
  x, y, w0 = _regression()
  lr, eta, r, k_steps = 0.05, 0.5, 3, 3

  def grad(w, b):
    res = (x @ w + b - y) / len(x)
    return x.T @ res, res.sum(0)

  tx = osub.rso(lr, rank=r, inner_steps=k_steps, proximal=eta, inner=optax.identity(), seed=1)
  params = {"b": jnp.zeros(4, jnp.float32), "w": jnp.asarray(w0, jnp.float32)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  w, b = w0.copy(), np.zeros(4)
  for t in range(7):
    if t % k_steps == 0:
      w_k, disp = w.copy(), np.zeros((r, 4))
      p = _basis(1, 1, t // k_steps, 10, r)
    gw, gb = grad(w, b)
    disp = disp - lr * (p.T @ gw + disp / eta)
    w, b = w_k + p @ disp, b - lr * gb
    gw, gb = grad(np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64))
    g = {"b": jnp.asarray(gb, jnp.float32), "w": jnp.asarray(gw, jnp.float32)}
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    np.testing.assert_allclose(params["w"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(params["b"], b, rtol=1e-5, atol=1e-6)


def test_proximal_term_pulls_the_subproblem_towards_b_zero():
  # The same constant gradient at every step: without the proximal term B
  # grows linearly; with it, B_t → −η PᵀG (the subproblem's minimiser).
  params = {"w": jnp.zeros((10, 4))}
  g = _grads(params, 0)
  moves = {}
  for eta in (None, 0.5):
    tx = osub.rso(0.2, rank=3, inner_steps=200, proximal=eta, inner=optax.identity())
    state, total = tx.init(params), jnp.zeros((10, 4))
    update = jax.jit(tx.update)
    for _ in range(100):
      u, state = update(g, state, params)
      total = total + u["w"]
    moves[eta] = total
  p = _basis(0, 0, 0, 10, 3)
  np.testing.assert_allclose(moves[None], -0.2 * 100 * p @ p.T @ g["w"], rtol=1e-4)
  np.testing.assert_allclose(moves[0.5], -0.5 * p @ p.T @ g["w"], rtol=1e-4, atol=1e-6)


def test_a_schedule_follows_the_global_step_not_the_subproblem_step():
  # Adam's direction does not depend on the learning rate, so with the
  # default inner every update under lr(t) is lr(t)/c times the update
  # under the constant c, at every step t, across subproblems, for
  # projected and unprojected leaves alike.
  schedule = lambda t: 0.01 * (1.0 + t)
  params = {"b": jnp.zeros(4), "w": jax.random.normal(jax.random.PRNGKey(0), (8, 4))}
  runs = {}
  for name, lr in (("schedule", schedule), ("constant", 0.01)):
    tx = osub.rso(lr, rank=2, inner_steps=2)
    state, out = tx.init(params), []
    for t in range(5):
      u, state = jax.jit(tx.update)(_grads(params, t), state, params)
      out.append(u)
    runs[name] = out
  for t in range(5):
    want = jax.tree_util.tree_map(lambda u: (1.0 + t) * u, runs["constant"][t])
    chex.assert_trees_all_close(runs["schedule"][t], want, rtol=1e-5, atol=1e-8)


def test_resume_across_a_subproblem_boundary_equals_an_uninterrupted_run(tmp_path):
  tx = osub.rso(0.01, rank=3, inner_steps=3, proximal=2.0, weight_decay=0.1, mask=r"kernel")
  params = {
    "dense": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (10, 6)), "bias": jnp.zeros(6)}
  }

  @jax.jit
  def step(params, state, t):
    grads = jax.tree_util.tree_map(lambda p: jnp.sin(p + t.astype(p.dtype)) + 0.1, params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def run(params, state, steps):
    for t in steps:
      params, state = step(params, state, jnp.int32(t))
    return params, state

  want = run(params, tx.init(params), range(7))
  half = run(params, tx.init(params), range(2))  # stops inside subproblem 0
  manager = ocp.CheckpointManager(tmp_path)
  osub.save_checkpoint(manager, 2, *half)
  manager.wait_until_finished()
  abstract = (jax.eval_shape(lambda p: p, params), jax.eval_shape(tx.init, params))
  restored_step, *restored = osub.restore_checkpoint(ocp.CheckpointManager(tmp_path), *abstract)
  assert restored_step == 2
  got = run(*restored, range(2, 7))  # crosses the boundaries at 3 and 6
  chex.assert_trees_all_equal(got, want)


@pytest.mark.slow
def test_runs_are_deterministic_and_the_seed_changes_the_subspaces():
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (9, 7))}

  def run(seed, jit):
    tx = osub.rso(0.01, rank=2, inner_steps=2, proximal=1.0, seed=seed)
    state, p = tx.init(params), params
    update = jax.jit(tx.update) if jit else tx.update
    for t in range(5):
      u, state = update(_grads(p, t), state, p)
      p = optax.apply_updates(p, u)
    return p

  chex.assert_trees_all_equal(run(0, True), run(0, True))
  chex.assert_trees_all_close(run(0, False), run(0, True), rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(run(1, True)["w"] - run(0, True)["w"]).max()) > 1e-3


# --- rso: state -------------------------------------------------------------


@pytest.mark.parametrize("proximal", [None, 0.5])
def test_state_per_matrix_is_a_key_an_index_a_qr_factor_and_low_rank_buffers(proximal):
  m, n, r = 64, 24, 4
  params = {"w": jnp.zeros((m, n)), "b": jnp.zeros(n)}
  state = jax.eval_shape(osub.rso(1e-3, rank=r, proximal=proximal).init, params)[0]
  projector = state.projectors["w"]
  assert [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(projector)] == [
    ((2,), jnp.uint32),
    ((), jnp.int32),
    ((r, r), jnp.float32),  # M, with P = Z·M: r² floats, not the m × r of P
  ]
  shapes = {path_str(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(state.inner)[0]}
  low_rank = sorted(k for k, v in shapes.items() if k.endswith("/w"))
  expected = [
    "inner_states/subspace/inner_state/inner/inner/mu/w",
    "inner_states/subspace/inner_state/inner/inner/nu/w",
  ]
  if proximal is not None:
    expected.insert(0, "inner_states/subspace/inner_state/displacement/w")
  assert low_rank == expected
  assert all(shapes[k] == (r, n) for k in low_rank)
  # Nothing of the matrix's size, nor of P's (m × r), anywhere.
  leaves = jax.tree_util.tree_leaves(state)
  assert max(math.prod(x.shape) for x in leaves) == r * n
  floats = sum(math.prod(x.shape) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))
  # Adam's m, v (and B) on r × n, P's factor M (r × r), Adam's m, v on the bias (n).
  assert floats == (2 + (proximal is not None)) * r * n + r * r + 2 * n


def test_a_steady_update_regenerates_p_without_a_qr():
  # Between subproblems P = Z·M: the draw and one product, no Cholesky or triangular solve (the
  # refresh's CholeskyQR2 runs once per subproblem).
  params = {"w": jnp.zeros((16, 6)), "v": jnp.zeros((12, 5))}
  tx = osub.rso(1e-3, rank=3, inner_steps=4)
  state = tx.init(params)

  def primitives(refresh):
    update = lambda g, s, p: tx.update(g, s, p, subspace_refresh=refresh)
    return str(jax.make_jaxpr(update)(params, state, params))

  assert "cholesky" not in primitives(False) and "triangular_solve" not in primitives(False)
  assert "cholesky" in primitives(True) and "triangular_solve" in primitives(True)


def test_a_stored_basis_gives_the_updates_of_the_regenerated_one():
  params = {
    "dense": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (10, 6)), "bias": jnp.zeros(6)},
    "stack": jax.random.normal(jax.random.PRNGKey(1), (2, 12, 5)),
  }
  dims = lambda path, x: osub.MatrixDims(rows=1, cols=2) if x.ndim == 3 else None

  def run(store_basis):
    tx = osub.rso(0.01, rank=3, inner_steps=3, proximal=2.0, weight_decay=0.1, dims=dims,
                  mask=r"kernel|stack", store_basis=store_basis)  # fmt: skip
    state, p, out = tx.init(params), params, []
    for t in range(7):  # subproblems start at 0, 3 and 6
      u, state = jax.jit(tx.update)(_grads(p, t), state, p)
      p = optax.apply_updates(p, u)
      out.append(p)
    return out, state

  stored, state = run(True)
  regenerated, _ = run(False)
  # The same draw, computed in two programs: equal up to the rounding of the draw's kernels
  # (bit for bit under XLA's default CPU compile; tests/conftest.py compiles unoptimised).
  chex.assert_trees_all_close(stored, regenerated, rtol=1e-6, atol=1e-7)
  # What the state keeps is the P_2 the default regenerates: the model level's draw.
  np.testing.assert_allclose(
    np.asarray(state[0].projectors["dense"]["kernel"].basis, np.float64),
    _basis(1, 0, 2, 10, 3),
    rtol=1e-6,
    atol=1e-7,
  )


def test_a_stored_basis_is_m_by_r_floats_next_to_the_key_and_index():
  m, n, r = 64, 24, 4
  params = {"w": jnp.zeros((m, n)), "b": jnp.zeros(n)}
  state = jax.eval_shape(osub.rso(1e-3, rank=r, store_basis=True).init, params)[0]
  assert [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(state.projectors["w"])] == [
    ((m, r), jnp.float32),
    ((2,), jnp.uint32),
    ((), jnp.int32),
  ]


# --- rso: bad input ---------------------------------------------------------


@pytest.mark.parametrize(
  "kwargs,error,match",
  [
    (dict(inner_steps=0), ValueError, "inner_steps must be positive"),
    (dict(inner_steps=-3), ValueError, "inner_steps must be positive"),
    (dict(rank=0), ValueError, "rank must be positive"),
    (dict(rank=-1), ValueError, "rank must be positive"),
    (dict(proximal=0.0), ValueError, "proximal must be None"),
    (dict(proximal=-1.0), ValueError, "proximal must be None"),
    (dict(proximal=float("inf")), ValueError, "proximal must be None"),
    (dict(distribution="uniform"), ValueError, "distribution must be one of"),
    (dict(inner_steps=2.5), TypeError, "inner_steps must be a Python int"),
    (dict(proximal=jnp.float32(1.0)), TypeError, "'proximal' in static_args"),
  ],
)
def test_bad_arguments_are_rejected_when_the_optimizer_is_built(kwargs, error, match):
  args = dict(rank=2, inner_steps=4) | kwargs
  with pytest.raises(error, match=match):
    osub.rso(1e-3, **args)


@pytest.mark.parametrize("rank", [8, 9])
def test_rank_not_below_the_input_side_is_an_error_at_init(rank):
  params = {"w": jnp.zeros((8, 32))}  # rank ≥ m = 8 (the input side)
  with pytest.raises(
    ValueError,
    match=r"rank \d is not below the input side"
    r" \(rows\) of 'w' \(8\)",
  ):
    osub.rso(1e-3, rank=rank).init(params)


def test_the_input_side_is_checked_even_when_it_is_the_larger_side():
  params = {"w": jnp.zeros((6, 4))}  # m = 6 > n = 4: rank 5 is fine
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    state = osub.rso(1e-3, rank=5).init(params)
  assert state[0].inner.inner_states["subspace"].inner_state.inner.inner.mu["w"].shape == (5, 4)


def test_a_layer_that_is_not_a_2d_linear_map_needs_dims():
  params = {"conv": jnp.zeros((3, 3, 8, 16))}
  with pytest.raises(ValueError, match="not 2-D.*dims=MatrixDims"):
    osub.rso(1e-3, rank=2).init(params)
  dims = osub.MatrixDims(rows=(0, 1, 2), cols=3)  # 72 inputs, 16 outputs
  state = jax.eval_shape(osub.rso(1e-3, rank=2, dims=dims).init, params)
  assert state[0].projectors["conv"].basis_shape == (72, 2)


# --- sharding ---------------------------------------------------------------


@pytest.mark.skipif(
  jax.device_count() < 8,
  reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8",
)
def test_state_shardings_read_the_projected_side_off_the_state():
  mesh = jax.make_mesh((8,), ("fsdp",), (jax.sharding.AxisType.Auto,))
  spec = jax.sharding.PartitionSpec
  params = {"a": jnp.zeros((16, 32)), "c": jnp.zeros((64, 16))}
  shardings = {n: jax.sharding.NamedSharding(mesh, spec("fsdp", None)) for n in params}
  got = osub.state_shardings(osub.rso(1e-3, rank=4, proximal=1.0), params, shardings)[0]
  # P on the rows (16 and 64), moments and B at r × n: the rows' sharding
  # moves to n (ZeRO); keys and indices are replicated.
  for leaf in jax.tree_util.tree_leaves(got.projectors):
    assert all(e is None for e in leaf.spec)
  subspace = got.inner.inner_states["subspace"].inner_state
  for buffers in (subspace.displacement, subspace.inner.inner.mu, subspace.inner.inner.nu):
    assert buffers["a"].spec == spec(None, "fsdp")  # (4, 32)
    assert buffers["c"].spec == spec(None, "fsdp")  # (4, 16)
  # A wide matrix projected on its (larger) columns: P (32 × 4) keeps the
  # columns' sharding, the moments (16 × 4) take it on their rows.
  wide = {"a": params["a"]}
  tx = osub.project_subspace(optax.adam(1e-3), projectors.svd(4), side="cols")
  got = osub.state_shardings(tx, wide, {"a": jax.sharding.NamedSharding(mesh, spec(None, "fsdp"))})
  assert got.projectors["a"].basis.spec == spec("fsdp", None)
  assert got.inner[0].mu["a"].spec == spec("fsdp", None)


def test_a_checkpoint_written_before_the_qr_factor_restores_with_it_and_resumes(
  tmp_path, monkeypatch
):
  params = {
    "w": jax.random.normal(jax.random.PRNGKey(0), (12, 6)),
    "stack": jax.random.normal(jax.random.PRNGKey(1), (2, 10, 4)),
  }
  dims = lambda path, x: osub.MatrixDims(rows=1, cols=2) if x.ndim == 3 else None
  tx = osub.rso(0.01, rank=2, inner_steps=3, dims=dims, mask=r"w|stack")
  update = jax.jit(tx.update)

  def run(p, state, steps):
    for t in steps:
      u, state = update(_grads(p, t), state, p)
      p = optax.apply_updates(p, u)
    return p, state

  p4, s4 = run(params, tx.init(params), range(4))  # subproblem 1 started at step 3
  assert s4[0].projectors["stack"].factor.shape == (2, 2, 2)
  # Written as the library wrote RSO states before RandomState.factor: no factor arrays, and
  # the signature's field lists without it.
  signature_fields = checkpoint._subspaces  # pylint: disable=protected-access

  def legacy_subspaces(params, opt_state):
    out = signature_fields(params, opt_state)
    for leaves in out.values():
      for entry in leaves.values():
        entry["fields"] = [f for f in entry["fields"] if f != "factor"]
    return out

  manager = ocp.CheckpointManager(tmp_path)
  with monkeypatch.context() as m:
    m.setattr(checkpoint, "_subspaces", legacy_subspaces)
    legacy = jax.tree_util.tree_map(
      lambda x: dataclasses.replace(x, factor=None) if isinstance(x, projectors.RandomState) else x,
      s4,
      is_leaf=lambda x: isinstance(x, projectors.RandomState),
    )
    osub.save_checkpoint(manager, 4, p4, legacy)
    manager.wait_until_finished()
  step, p, state = osub.restore_checkpoint(
    manager, jax.eval_shape(lambda x: x, params), jax.eval_shape(tx.init, params)
  )
  assert step == 4
  # The factors are computed again from the restored keys and subproblems: the run's own.
  chex.assert_trees_all_close(state, s4, rtol=1e-6, atol=1e-7)
  resumed, _ = run(p, state, range(4, 7))
  uninterrupted, _ = run(p4, s4, range(4, 7))
  chex.assert_trees_all_close(resumed, uninterrupted, rtol=1e-6, atol=1e-7)


def test_a_checkpoint_at_another_rank_fails_naming_the_rank(tmp_path):
  params = {"w": jnp.zeros((10, 6))}
  tx = osub.rso(1e-3, rank=3)
  manager = ocp.CheckpointManager(tmp_path)
  osub.save_checkpoint(manager, 0, params, tx.init(params))
  manager.wait_until_finished()
  other = osub.rso(1e-3, rank=2)
  with pytest.raises(
    osub.CheckpointMismatchError, match=r"rank differs.*'w': checkpoint 3, target 2"
  ):
    osub.restore_checkpoint(
      manager, jax.eval_shape(lambda p: p, params), jax.eval_shape(other.init, params)
    )
  galore = osub.galore(1e-3, rank=3)
  with pytest.raises(
    osub.CheckpointMismatchError,
    match=r"checkpoint RandomState\('key', 'subproblem',"
    r" 'factor', 'basis_shape'\), target SvdState\('basis',\)",
  ):
    osub.restore_checkpoint(
      manager, jax.eval_shape(lambda p: p, params), jax.eval_shape(galore.init, params)
    )
