"""`project_subspace`: selection, shapes, N-D leaves, subspace changes, bad input."""

import functools
import math
import re
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_subspace as osub
from optax_subspace import _combinator
from optax_subspace import projectors


def _grads(params, seed):
  key = jax.random.PRNGKey(seed)
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _run(tx, params, steps, jit=True, seed=0):
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for t in range(steps):
    updates, state = update(_grads(params, seed + t), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


# The fast subset (-m "not slow"): each shape once, eager for the wide one, jitted for the others.
@pytest.mark.parametrize(
  "shape,jit",
  [
    pytest.param(shape, jit, marks=[] if jit == (shape != (6, 10)) else [pytest.mark.slow])
    for jit in (False, True)
    for shape in ((6, 10), (10, 6), (8, 8))
  ],
)
def test_rank_equal_to_smaller_side_with_sgd_is_plain_sgd(shape, jit):
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), shape), "b": jnp.zeros(shape[1])}
  tx = osub.project_subspace(optax.sgd(0.1), projectors.svd(min(shape), 2), mask=r"^w$")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # rank = smaller side warns; tested below
    ours, _ = _run(tx, params, 5, jit)
  plain, _ = _run(optax.sgd(0.1), params, 5, jit)
  chex.assert_trees_all_close(ours, plain, atol=1e-5, rtol=1e-5)


def test_rank_not_below_smaller_side_warns_and_clamps():
  params = {"w": jnp.ones((4, 9))}
  tx = osub.project_subspace(optax.adam(1e-3), projectors.svd(6, 5))
  with pytest.warns(UserWarning, match="not below the smaller side"):
    state = tx.init(params)
  assert state.projectors["w"].basis.shape == (4, 4)
  assert state.inner[0].mu["w"].shape == (4, 9)


def _state_sizes(tx, params):
  shapes = jax.eval_shape(tx.init, params)
  return [math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes) if x.ndim > 0]


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (48, 48)])
def test_galore_state_is_projector_plus_two_low_rank_moments(shape):
  m, n, r = *shape, 8
  params = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
  sizes = _state_sizes(osub.galore(1e-3, rank=r), params)
  assert sum(sizes) == r * min(m, n) + 2 * r * max(m, n)
  assert m * n not in sizes  # no m×n buffer anywhere


def test_osd_state_adds_the_projector_optimizer_state():
  m, n, r = 40, 24, 6
  params = {"w": jax.ShapeDtypeStruct((m, n), jnp.float32)}
  sizes = _state_sizes(osub.online_subspace_descent(1e-3, rank=r), params)
  # P, P's two Adam moments, the weights' two low-rank moments.
  assert sum(sizes) == 3 * r * min(m, n) + 2 * r * max(m, n)
  assert m * n not in sizes


def test_unprojected_leaves_keep_full_size_state():
  params = {"w": jnp.ones((16, 32)), "emb": jnp.ones((50, 16))}
  state = osub.galore(1e-3, rank=4, mask="^w$").init(params)
  assert state[0].inner.mu["emb"].shape == (50, 16)
  assert state[0].inner.mu["w"].shape == (4, 32)
  assert isinstance(state[0].projectors["emb"], optax.MaskedNode)


@pytest.mark.slow
def test_stacked_layers_are_a_batch_of_independent_matrices():
  stacked = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 12))
  tx = osub.galore(1e-2, rank=2, update_every=2, dims=osub.MatrixDims(rows=1, cols=2))
  per_layer = osub.galore(1e-2, rank=2, update_every=2)
  state, state_l = tx.init({"k": stacked}), per_layer.init({str(i): stacked[i] for i in range(3)})
  for t in range(4):
    g = jax.random.normal(jax.random.PRNGKey(10 + t), stacked.shape)
    u, state = tx.update({"k": g}, state, {"k": stacked})
    u_l, state_l = per_layer.update(
      {str(i): g[i] for i in range(3)}, state_l, {str(i): stacked[i] for i in range(3)}
    )
    for i in range(3):
      np.testing.assert_allclose(u["k"][i], u_l[str(i)], rtol=2e-5, atol=1e-7)
  assert state[0].projectors["k"].basis.shape == (3, 8, 2)


def test_attention_kernel_folds_heads_into_one_side():
  # (embed, heads, head_dim) = (16, 2, 12) is the 16×24 matrix of its reshape.
  kernel = jax.random.normal(jax.random.PRNGKey(2), (16, 2, 12))
  tx3 = osub.galore(1e-2, rank=3, dims=osub.MatrixDims(rows=0, cols=(1, 2)))
  tx2 = osub.galore(1e-2, rank=3)
  g = jax.random.normal(jax.random.PRNGKey(3), kernel.shape)
  u3, _ = tx3.update({"k": g}, tx3.init({"k": kernel}), {"k": kernel})
  u2, _ = tx2.update(
    {"k": g.reshape(16, 24)}, tx2.init({"k": kernel.reshape(16, 24)}), {"k": kernel.reshape(16, 24)}
  )
  np.testing.assert_allclose(u3["k"].reshape(16, 24), u2["k"], rtol=1e-5, atol=1e-7)


def test_out_projection_with_rows_after_cols_is_transposed_consistently():
  # (heads, head_dim, embed) with rows=(0, 1): a 24×16 matrix.
  kernel = jax.random.normal(jax.random.PRNGKey(4), (2, 12, 16))
  g = jax.random.normal(jax.random.PRNGKey(5), kernel.shape)
  tx = osub.galore(1e-2, rank=3, dims=osub.MatrixDims(rows=(0, 1), cols=2))
  tx_t = osub.galore(1e-2, rank=3, dims=osub.MatrixDims(rows=2, cols=(0, 1)))
  u, _ = tx.update({"k": g}, tx.init({"k": kernel}), {"k": kernel})
  u_t, _ = tx_t.update({"k": g}, tx_t.init({"k": kernel}), {"k": kernel})
  # Transposing the roles keeps the smaller side (16): the same update.
  np.testing.assert_allclose(u["k"], u_t["k"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
  "mask",
  [
    r"attn/.*kernel",
    lambda path, leaf: path.startswith("attn") and leaf.ndim == 2,
    {"attn": {"kernel": True, "bias": False}, "embed": False},
    osub.leaf_predicate(lambda path, leaf: path.startswith("attn") and leaf.ndim == 2),
    lambda params: jax.tree_util.tree_map_with_path(
      lambda path, x: path[0].key == "attn" and x.ndim == 2, params
    ),
    lambda params: {"attn": {"kernel": True, "bias": False}, "embed": False},
  ],
  ids=[
    "regex",
    "two_argument_callable",
    "tree",
    "leaf_predicate",
    "optax_callable",
    "optax_callable_tree",
  ],
)
def test_mask_selects_by_path_regex_callable_or_pytree(mask):
  params = {"attn": {"kernel": jnp.ones((8, 16)), "bias": jnp.ones(16)}, "embed": jnp.ones((30, 8))}
  state = osub.project_subspace(optax.adam(1e-3), projectors.svd(2, 5), mask=mask).init(params)
  assert state.inner[0].mu["attn"]["kernel"].shape == (2, 16)
  assert state.inner[0].mu["embed"].shape == (30, 8)


def test_a_callable_mask_follows_optax_and_a_per_leaf_one_is_explicit():
  # optax's convention (optax.masked, optax.contrib.galore): mask(params) is
  # a tree of bools, or a prefix of the params' structure. A per-leaf
  # predicate is leaf_predicate(fn); a bare callable of (path, leaf) still
  # works, with a DeprecationWarning naming leaf_predicate.
  params = {"attn": {"q": jnp.ones((8, 16)), "k": jnp.ones((8, 16))}, "embed": jnp.ones((30, 8))}

  def low_rank(tx):
    state = tx.init(params)
    return {k: v.shape for k, v in state[0].inner.mu["attn"].items()}, (
      state[0].inner.mu["embed"].shape
    )

  prefix = lambda p: {"attn": True, "embed": False}  # True for a whole subtree
  assert low_rank(osub.galore(1e-3, 2, mask=prefix)) == ({"q": (2, 16), "k": (2, 16)}, (30, 8))
  by_leaf = osub.leaf_predicate(lambda path, x: path == "attn/q")
  assert low_rank(osub.galore(1e-3, 2, mask=by_leaf)) == ({"q": (2, 16), "k": (8, 16)}, (30, 8))
  with pytest.warns(DeprecationWarning, match="leaf_predicate"):
    osub.galore(1e-3, 2, mask=lambda path, x: path == "attn/q").init(params)
  # The same callable selects the same leaves as it masks in optax.masked.
  chosen = lambda p: jax.tree_util.tree_map(lambda x: x.shape == (8, 16), p)
  state = optax.masked(optax.adam(1e-3), chosen).init(params)
  assert isinstance(state.inner_state[0].mu["embed"], optax.MaskedNode)
  assert low_rank(osub.galore(1e-3, 2, mask=chosen))[1] == (30, 8)
  with pytest.raises(ValueError, match="mask.*does not match the parameters"):
    osub.galore(1e-3, 2, mask=lambda p: {"attn": True}).init(params)


@pytest.mark.slow
def test_flax_nnx_paths_have_no_value_suffix_at_init_or_update():
  # init gets nnx.Params ("up/kernel/value" in jax's key paths), update the
  # plain arrays nnx.Optimizer passes ("up/kernel"): a mask sees "up/kernel"
  # both times, so a regex anchored on the kernel name selects it.
  from flax import nnx  # pylint: disable=g-import-not-at-top

  model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
  seen = set()

  def leaf(path, x):
    seen.add(path)
    return path.endswith("kernel")

  tx = osub.galore(1e-2, 2, mask=osub.leaf_predicate(leaf))
  anchored = osub.galore(1e-2, 2, mask=r"kernel$")
  opts = [nnx.Optimizer(model, t, wrt=nnx.Param) for t in (tx, anchored)]
  grads = nnx.grad(lambda m: jnp.mean(m(jnp.ones((2, 8))) ** 2))(model)
  for opt in opts:
    opt.update(model, grads)
  assert seen == {"layers/0/kernel", "layers/0/bias", "layers/1/kernel", "layers/1/bias"}
  for opt in opts:
    assert opt.opt_state[0].projectors["layers"][0]["kernel"].basis.shape == (8, 2)


def test_bad_input_is_rejected_at_init_with_a_clear_message():
  params = {"w": jnp.ones((8, 16)), "ids": jnp.ones((8, 16), jnp.int32), "k3": jnp.ones((4, 8, 16))}
  sub = lambda **kw: osub.project_subspace(optax.adam(1e-3), projectors.svd(2, 5), **kw)
  with pytest.raises(ValueError, match="matches no parameter path"):
    sub(mask="nothing_like_this").init(params)
  with pytest.raises(ValueError, match="does not match the parameters"):
    sub(mask={"w": True}).init(params)
  with pytest.raises(TypeError, match="floating-point"):
    sub(mask="ids").init(params)
  with pytest.raises(ValueError, match="not 2-D"):
    sub(mask="k3").init(params)
  with pytest.raises(ValueError, match="does not fit leaf"):
    sub(mask="k3", dims=osub.MatrixDims(rows=1, cols=3)).init(params)
  with pytest.raises(ValueError, match="repeats an axis"):
    sub(mask="k3", dims=osub.MatrixDims(rows=1, cols=1)).init(params)
  with pytest.raises(ValueError, match="on_change"):
    sub(on_change="rotate")


# The fast subset (-m "not slow"): each projector once, a zero gradient for one, NaN for two.
@pytest.mark.parametrize(
  "make,bad",
  [
    pytest.param(make, bad, marks=[] if (i + j) % 2 == 0 else [pytest.mark.slow])
    for i, bad in enumerate([0.0, np.nan])
    for j, make in enumerate(
      [
        lambda: osub.galore(1e-2, rank=2, update_every=2),
        lambda: osub.galore(1e-2, rank=2, update_every=2, projector="randomized_svd"),
        lambda: osub.online_subspace_descent(1e-2, rank=2),
      ]
    )
  ],
)
def test_bad_gradients_never_poison_the_projector(make, bad):
  params = {"w": jax.random.normal(jax.random.PRNGKey(6), (6, 10))}
  tx = make()
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t, scale in enumerate([1.0, bad, bad, 1.0, 1.0]):
    g = {"w": jax.random.normal(jax.random.PRNGKey(t), (6, 10)) * scale}
    _, state = update(g, state, params)
    basis = state[0].projectors["w"].basis
    assert bool(jnp.all(jnp.isfinite(basis))), f"step {t}"


def test_bf16_gradients_keep_float32_projectors_and_bf16_updates():
  params = {"w": jnp.ones((8, 16), jnp.bfloat16)}
  tx = osub.galore(1e-2, rank=2)
  g = {"w": jax.random.normal(jax.random.PRNGKey(7), (8, 16), jnp.bfloat16)}
  updates, state = tx.update(g, tx.init(params), params)
  assert state[0].projectors["w"].basis.dtype == jnp.float32
  assert updates["w"].dtype == jnp.bfloat16
  assert state[0].inner.mu["w"].dtype == jnp.bfloat16


def _swap_projector():
  """A projector whose refresh at step 1 swaps its two basis vectors."""

  def init(s, l, r, key):
    return projectors.SvdState(jnp.eye(s, r))

  def refresh(state, g, count):
    del g
    swapped = state.basis[:, ::-1]
    return projectors.SvdState(jnp.where(count == 1, swapped, state.basis)), (count == 1)

  return projectors.Projector(2, init, lambda s: s.basis, lambda count: count >= 1, refresh)


def test_transport_carries_moments_into_the_new_basis():
  params = {"w": jnp.zeros((4, 6))}
  g0 = {"w": jax.random.normal(jax.random.PRNGKey(8), (4, 6))}
  kept, moved, reset = (
    osub.project_subspace(optax.scale_by_adam(), _swap_projector(), on_change=mode)
    for mode in ("keep", "transport", "reset")
  )
  states = [tx.update(g0, tx.init(params), params)[1] for tx in (kept, moved, reset)]
  zero = {"w": jnp.zeros((4, 6))}
  after = [tx.update(zero, st, params)[1].inner for tx, st in zip((kept, moved, reset), states)]
  before = states[0].inner
  b1, b2 = 0.9, 0.999
  # The basis swapped its two vectors: transport permutes the moment rows,
  # so P_new m_new = P_old m_old (the full-space momentum is unchanged).
  np.testing.assert_allclose(after[1].mu["w"], b1 * before.mu["w"][::-1], rtol=1e-6)
  np.testing.assert_allclose(after[1].nu["w"], b2 * before.nu["w"][::-1], rtol=1e-6)
  np.testing.assert_allclose(after[0].mu["w"], b1 * before.mu["w"], rtol=1e-6)
  np.testing.assert_array_equal(after[2].mu["w"], 0.0)
  np.testing.assert_array_equal(after[2].nu["w"], 0.0)


def test_transport_reads_moments_by_field_name_and_state_type():
  # A field's name says how it moves (mu: M·m; nu: (M⊙M)·v), except in a
  # state whose names mislead: optax.adan's v averages gradient differences
  # (linear) and its n is the second moment.
  from optax_subspace import _leaves, _transport  # pylint: disable=g-import-not-at-top

  params = {"w": jnp.zeros((4, 6))}
  key_paths = [kp for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  plans, _ = _leaves.plan_leaves(params, 2)

  def kinds(opt):
    tx = osub.project_subspace(opt, projectors.svd(2, 2), on_change="transport")
    found = _transport.low_rank_buffers(tx.init(params).inner, plans, key_paths)
    return sorted((name, kind) for _, name, kind in found.values())

  assert kinds(optax.adam(1e-3)) == [("mu", "first"), ("nu", "second")]
  assert kinds(optax.adan(1e-3)) == [
    ("g", "first"),
    ("m", "first"),
    ("n", "second"),
    ("v", "first"),
  ]
  with pytest.raises(ValueError, match="'step_sizes'.*neither a first"):
    osub.project_subspace(optax.rprop(1e-3), projectors.svd(2, 2), on_change="transport").init(
      params
    )


def test_transported_second_moment_stays_non_negative():
  params = {"w": jnp.zeros((10, 20))}
  tx = osub.project_subspace(optax.scale_by_adam(), projectors.svd(3, 2), on_change="transport")
  _, state = _run(tx, params, 7)
  assert bool(jnp.all(state.inner.nu["w"] >= 0))


def test_inner_sees_projected_parameters():
  w = jax.random.normal(jax.random.PRNGKey(9), (6, 10))
  # add_decayed_weights(1) returns its params argument as the update.
  tx = osub.project_subspace(optax.add_decayed_weights(1.0), projectors.svd(3, 5))
  g = {"w": jax.random.normal(jax.random.PRNGKey(10), (6, 10))}
  u, state = tx.update({"w": jnp.zeros((6, 10))}, tx.init({"w": w}), {"w": w})
  p = state.projectors["w"].basis  # the step-0 refresh of a zero gradient
  np.testing.assert_allclose(u["w"], p @ (p.T @ w) + 0.0, rtol=1e-5, atol=1e-6)
  del g


def test_same_seed_same_result_and_different_seed_differs():
  params = {"w": jax.random.normal(jax.random.PRNGKey(11), (12, 20))}
  # No oversampling or power iteration: the subspace depends on the draw.
  run = lambda seed: _run(
    osub.galore(
      1e-2, projector=projectors.randomized_svd(3, 2, oversample=0, power_iters=0, seed=seed)
    ),
    params,
    5,
  )[0]
  a, b, c = run(0), run(0), run(1)
  chex.assert_trees_all_equal(a, b)
  assert not np.allclose(a["w"], c["w"])


@pytest.mark.parametrize(
  "make",
  [
    lambda **kw: osub.galore(1e-2, rank=3, update_every=2, **kw),
    lambda **kw: osub.online_subspace_descent(1e-2, rank=3, **kw),
  ],
)
def test_bf16_projection_products_stay_close_to_float32(make):
  params = {"w": jax.random.normal(jax.random.PRNGKey(12), (16, 24))}
  exact, _ = _run(make(), params, 4)
  fast, state = _run(make(projection_dtype=jnp.bfloat16), params, 4)
  assert state[0].projectors["w"].basis.dtype == jnp.float32
  delta = lambda p: np.asarray(p["w"] - params["w"])
  err = np.linalg.norm(delta(fast) - delta(exact)) / np.linalg.norm(delta(exact))
  assert err < 3e-2  # bf16 operands: 8 mantissa bits


def _with_setting(monkeypatch, module, name, value, make, params, seed):
  """(params and state after 4 jitted steps, the update's lowered text) with
  the constant `name` of `module` set to `value` while tracing."""
  monkeypatch.setattr(module, name, value)
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  grads = [jax.tree.map(lambda x, k=k: jax.random.normal(k, x.shape), params) for k in keys]
  tx = make()
  state, p = tx.init(params), params
  update = jax.jit(tx.update)
  hlo = update.lower(grads[0], state, p).as_text()
  for g in grads:
    u, state = update(g, state, p)
    p = optax.apply_updates(p, u)
  return (p, state), hlo


@pytest.mark.parametrize(
  "make",
  [
    lambda: osub.galore(1e-2, 4, 2),
    # OSD's P steps and RSO's products: the slow set (the fast subset pads GaLore's products).
    pytest.param(lambda: osub.online_subspace_descent(1e-2, 4), marks=pytest.mark.slow),
    pytest.param(lambda: osub.rso(1e-2, 4, 2), marks=pytest.mark.slow),
    # FRUGAL's P·R on the padded R, Fira's folded back-projection.
    lambda: osub.frugal(1e-2, 4, 2),
    pytest.param(lambda: osub.fira(1e-2, 4, 2), marks=pytest.mark.slow),
  ],
  ids=["galore", "osd", "rso", "frugal", "fira"],
)
def test_zero_padded_products_change_no_value(make, monkeypatch):
  # Kept sides of 37 and 45 are not multiples of PRODUCT_ALIGNMENT: the dense
  # products run on zero-padded copies, which must give the unpadded result
  # (to float32 rounding of the reordered sums), refreshes and OSD's P steps
  # included, and add a pad to the compiled update.
  params = {"a": jnp.ones((24, 37)), "b": jnp.ones((45, 16)), "c": jnp.ones((16, 16))}

  run = lambda alignment: _with_setting(
    monkeypatch, _combinator, "PRODUCT_ALIGNMENT", alignment, make, params, 0
  )
  (padded, hlo_padded), (plain, hlo_plain) = run(8), run(1)
  chex.assert_trees_all_close(padded, plain, atol=1e-6, rtol=1e-6)
  assert "stablehlo.pad" in hlo_padded and "stablehlo.pad" not in hlo_plain


def _products_at(monkeypatch, name, values, make, params):
  """The dense products (dot_generals) of the lowered update with the combinator's constant
  `name` at each of two `values`, whose 4 steps (`_with_setting`) leave equal states."""
  runs = [_with_setting(monkeypatch, _combinator, name, v, make, params, 0) for v in values]
  chex.assert_trees_all_close(runs[0][0], runs[1][0], atol=1e-6, rtol=1e-6)
  return [hlo.count("stablehlo.dot_general") for _, hlo in runs]


@pytest.mark.parametrize(
  "make",
  [
    lambda: osub.galore(1e-2, 4, 2),
    pytest.param(lambda: osub.online_subspace_descent(1e-2, 4), marks=pytest.mark.slow),
    pytest.param(lambda: osub.rso(1e-2, 4, 2), marks=pytest.mark.slow),
    # R = PᵀG stacked; a residual term keeps the back-projection per leaf; APOLLO has none.
    pytest.param(lambda: osub.fira(1e-2, 4, 2), marks=pytest.mark.slow),
    pytest.param(lambda: osub.apollo(1e-2, 4, 2), marks=pytest.mark.slow),
  ],
  ids=["galore", "osd", "rso", "fira", "apollo"],
)
def test_stacked_products_change_no_value(make, monkeypatch):
  # Below STACKED_PRODUCT_ELEMENTS the products of matrices of one (s, l, r) run as one
  # batched product: here the two 24 × 37 leaves, padded; the two 16 × 16 ones; and the
  # 16 × 45 leaf with the two 45 × 16 ones, which are projected on their columns and join it
  # transposed (and padded, since stacked, l = 45 is the rows' stride). The same steps,
  # refreshes and OSD's P steps included, with fewer products in the compiled update.
  params = {
    "a": jnp.ones((24, 37)),
    "a2": jnp.ones((24, 37)),
    "b": jnp.ones((45, 16)),
    "b2": jnp.ones((45, 16)),
    "d": jnp.ones((16, 45)),
    "c": jnp.ones((16, 16)),
    "c2": jnp.ones((16, 16)),
  }
  stacked, own = _products_at(monkeypatch, "STACKED_PRODUCT_ELEMENTS", (1 << 20, 0), make, params)
  assert stacked < own


@pytest.mark.parametrize(
  "make",
  [
    lambda: osub.galore(1e-2, 4, 2),
    pytest.param(lambda: osub.online_subspace_descent(1e-2, 4), marks=pytest.mark.slow),
    pytest.param(lambda: osub.fira(1e-2, 4, 2), marks=pytest.mark.slow),
    pytest.param(lambda: osub.apollo(1e-2, 4, 2), marks=pytest.mark.slow),
  ],
  ids=["galore", "osd", "fira", "apollo"],
)
def test_columns_stacked_as_stored_change_no_value(make, monkeypatch):
  # COLUMNS_STACKED_AS_STORED: the leaves projected on their columns (b, b2: 45 × 16, P on the
  # 16 side) stack as stored, apart from the 16 × 45 leaf they otherwise join transposed; the
  # same steps, refreshes and OSD's P steps included, with their own batched products (one
  # more each way).
  params = {
    "a": jnp.ones((24, 37)),
    "b": jnp.ones((45, 16)),
    "b2": jnp.ones((45, 16)),
    "d": jnp.ones((16, 45)),
    "d2": jnp.ones((16, 45)),
  }
  setting = "COLUMNS_STACKED_AS_STORED"
  stored, joined = _products_at(monkeypatch, setting, (True, False), make, params)
  assert stored > joined


def test_small_projector_steps_stacked_change_no_value(monkeypatch):
  # The small matrices whose products run stacked take OSD's steps on P stacked too, one
  # call per (s, r) (STACK_SMALL_PROJECTOR_STEPS), or per leaf: the same P's and moments, and
  # the stacked program concatenates the states it steps.
  params = {"a": jnp.ones((24, 37)), "a2": jnp.ones((24, 37)), "b": jnp.ones((45, 24))}
  make = lambda: osub.online_subspace_descent(1e-2, 4)
  (stacked, hlo_stacked), (per_leaf, hlo_per_leaf) = [
    _with_setting(monkeypatch, _combinator, "STACK_SMALL_PROJECTOR_STEPS", on, make, params, 0)
    for on in (True, False)
  ]
  chex.assert_trees_all_close(stacked, per_leaf, atol=1e-6, rtol=1e-6)
  cats = lambda hlo: hlo.count("stablehlo.concatenate")
  assert cats(hlo_stacked) > cats(hlo_per_leaf)


@pytest.mark.parametrize(
  "make",
  [
    lambda: osub.rso(1e-2, 4, 2),
    pytest.param(lambda: osub.apollo(1e-2, 4, 2), marks=pytest.mark.slow),
  ],
  ids=["rso", "apollo"],
)
def test_bases_drawn_as_product_stacks_change_no_value(make, monkeypatch):
  # BASES_AS_PRODUCT_STACKS: the computed bases of the matrices whose products run stacked
  # are drawn in those stacks and not cut one by one, so the compiled update no longer
  # concatenates their cuts again for the products (XLA folds the concatenation of the
  # stack's slices back into the stack). The same steps.
  params = {f"a{i}": jnp.ones((24, 40)) for i in range(3)} | {"c": jnp.ones((16, 16))}
  params |= {"c2": jnp.ones((16, 16)), "big": jnp.ones((64, 40))}
  runs = []
  for on in (False, True):
    (p, _), _ = _with_setting(
      monkeypatch, _combinator, "BASES_AS_PRODUCT_STACKS", on, make, params, 0
    )
    tx = make()
    update = jax.jit(lambda g, s, q, tx=tx: tx.update(g, s, q))
    compiled = update.lower(params, tx.init(params), params).compile().as_text()
    runs.append((p, compiled.count("concatenate(")))
  (plain, cats_plain), (folded, cats_folded) = runs
  chex.assert_trees_all_close(folded, plain, atol=1e-6, rtol=1e-6)
  assert cats_folded < cats_plain


@pytest.mark.parametrize(
  "make",
  [lambda: osub.rso(1e-2, 4, 2), lambda: osub.apollo(1e-2, 4, 2)],
  ids=["rso", "apollo"],
)
def test_held_computed_bases_change_no_value(make, monkeypatch):
  # Held bases (the default of RSO's Haar P and of APOLLO's Gaussian one) are a barrier on the
  # bases a projector computes stacked and one on their per-leaf cuts: the same bases, so the
  # same steps.
  params = {"a": jnp.ones((24, 40)), "b": jnp.ones((48, 16)), "c": jnp.ones((16, 16))}
  run = lambda on: _with_setting(
    monkeypatch, _combinator, "HOLD_COMPUTED_BASES", on, make, params, 0
  )
  (held, hlo_on), (plain, hlo_off) = run(True), run(False)
  chex.assert_trees_all_equal(held, plain)
  barrier = "stablehlo.optimization_barrier"
  assert hlo_on.count(barrier) > hlo_off.count(barrier)
  _, hlo_default = run(None)
  assert hlo_default == hlo_on


@pytest.mark.parametrize(
  "make",
  [
    lambda: osub.galore(1e-2, 4, update_every=2),
    lambda: osub.online_subspace_descent(1e-2, 4),
  ],
  ids=["galore", "osd"],
)
def test_refresh_in_chunks_changes_no_value(make, monkeypatch):
  # OPTIMIZER_REFRESH_CHUNK_BYTES bounds the gradients one batched refresh stacks: with
  # a cap below one matrix every leaf is refreshed under its own cond, in
  # order; the trajectory (refreshes at steps 0 and 2 for GaLore, step 0 and
  # the P steps for OSD) must be the one-call-per-shape result, to float32
  # rounding (a batch of one takes another eigensolver path than a batch of
  # four: bases differ by ~2e-6 here).
  params = {f"w{i}": jnp.ones((12, 20)) for i in range(4)}
  params["v"] = jnp.ones((20, 12))
  from optax_subspace import _chunks  # pylint: disable=g-import-not-at-top

  run = lambda chunk_bytes: _with_setting(
    monkeypatch, _chunks, "OPTIMIZER_REFRESH_CHUNK_BYTES", chunk_bytes, make, params, 3
  )
  (whole, hlo_whole), (chunked, hlo_chunked) = run(1 << 28), run(1)
  chex.assert_trees_all_close(whole, chunked, atol=1e-5, rtol=1e-5)
  # One refresh cond per leaf, not one.
  assert hlo_chunked.count("stablehlo.case") == 5 * hlo_whole.count("stablehlo.case")


def test_osd_step_on_p_per_leaf_equals_the_stacked_step():
  # The combinator runs OSD's ∇P stacked by (s, r) (`Advance.direction`) and the optimizer
  # step on P per leaf (`Advance.apply`); an `Advance` without a direction computes ∇P in
  # `apply`, per leaf. Same trajectory, to float32 rounding of the batched products.
  params = {
    "a": jnp.ones((12, 20)),
    "b": jnp.ones((12, 20)),
    "c": jnp.ones((20, 12)),
    "d": jnp.ones((3, 12, 20)),
  }
  dims = lambda path, x: osub.MatrixDims(rows=1, cols=2) if x.ndim == 3 else None
  grads = [_grads(params, seed) for seed in range(4)]
  runs = []
  for split in (True, False):
    projector = projectors.online_pca(4, optax.adamw(1e-2, weight_decay=0.01))
    if not split:
      adv = projector.advance
      projector = projector._replace(
        advance=projectors.Advance(
          inputs=adv.inputs,
          apply=lambda st, x, _, count, adv=adv: adv.apply(
            st, x, adv.direction(st.basis.astype(jnp.float32), x), count
          ),
        )
      )
    tx = osub.project_subspace(optax.adam(1e-2), projector, dims=dims)
    state, p = tx.init(params), params
    update = jax.jit(tx.update)
    for g in grads:
      u, state = update(g, state, p)
      p = optax.apply_updates(p, u)
    runs.append((p, state))
  chex.assert_trees_all_close(runs[0], runs[1], atol=1e-6, rtol=1e-6)


def test_an_advance_given_as_one_function_takes_the_same_steps():
  # `Projector.advance` may be one function (state, g, r, count) -> (state, changed), as
  # before `Advance`: run per matrix on G and R, it takes OSD's steps.
  params = {"a": jnp.ones((12, 20)), "c": jnp.ones((20, 12))}
  grads = [_grads(params, seed) for seed in range(3)]
  runs = []
  for as_function in (False, True):
    projector = projectors.online_pca(4, optax.adamw(1e-2, weight_decay=0.01))
    if as_function:
      adv = projector.advance
      projector = projector._replace(advance=lambda st, g, r, count: adv(st, g, r, count))
    tx = osub.project_subspace(optax.adam(1e-2), projector)
    state, p = tx.init(params), params
    for g in grads:
      u, state = jax.jit(tx.update)(g, state, p)
      p = optax.apply_updates(p, u)
    runs.append((p, state))
  chex.assert_trees_all_close(runs[0], runs[1], atol=1e-6, rtol=1e-6)


def test_refresh_chunk_bytes_argument_sets_the_chunks_and_rejects_bad_values():
  # The argument does what the module default does: 1 byte is one chunk (one cond) per leaf.
  params = {f"w{i}": jnp.ones((12, 20)) for i in range(4)}
  g = _grads(params, 0)
  conds = lambda **kw: (
    jax.jit(osub.galore(1e-2, 4, 2, **kw).update)
    .lower(g, osub.galore(1e-2, 4, 2, **kw).init(params), params)
    .as_text()
    .count("stablehlo.case")
  )
  assert conds(refresh_chunk_bytes=1) == 4 * conds()
  (p1, s1), (p2, s2) = [
    _run(osub.galore(1e-2, 4, 2, refresh_chunk_bytes=b), params, 3) for b in (1, None)
  ]
  chex.assert_trees_all_close((p1, s1), (p2, s2), atol=1e-5, rtol=1e-5)
  for bad in (0, -1, 1.5, True, "4GiB"):
    with pytest.raises(ValueError, match="refresh_chunk_bytes"):
      osub.project_subspace(optax.adam(1e-2), projectors.svd(4, 2), refresh_chunk_bytes=bad)


def test_column_projected_updates_come_in_the_leaf_layout_with_the_same_values():
  # A leaf projected on its columns (more rows than columns) gets Nᵀ·Pᵀ in its own layout. Its
  # updates are the transposes of those of the transposed leaf (projected on its rows) under
  # the transposed gradients: the same oriented matrices; and the compiled steady update holds
  # no transposed copy of the leaf's full size (an earlier path swapped it to (s, l) and back).
  down = {"w": jnp.ones((48, 16))}
  up = {"w": jnp.ones((16, 48))}
  tx = osub.galore(1e-2, 4, 10**6)

  def run(params, transpose):
    state, p, ups = tx.init(params), params, []
    for seed in range(3):
      g = jax.tree_util.tree_map(lambda x: x.T if transpose else x, _grads(down, seed))
      u, state = jax.jit(tx.update)(g, state, p)
      p = optax.apply_updates(p, u)
      ups.append(u["w"])
    return ups

  for a, b in zip(run(down, False), run(up, True)):
    chex.assert_trees_all_close(a, b.T, atol=1e-6, rtol=1e-6)
  hlo = jax.jit(tx.update).lower(down, tx.init(down), down).compile().as_text()
  assert not re.findall(r"= f32\[48,16\]\{0,1\}", hlo.split("ENTRY")[1])


def test_stacked_leaves_run_their_projector_step_without_stacking_copies(monkeypatch):
  # OSD's ∇P runs stacked over the leaves of one (s, r); a leaf that is already a batch of
  # OWN_BATCH_MATRICES matrices or more (a scanned model's kernel) runs its own. Same values;
  # and the step stacks neither P nor G·Rᵀ (P-shaped) nor ‖G‖² (the refresh branch's stacks of
  # the states, 3 P-shaped, are there either way).
  params = {"q": jnp.ones((8, 12, 20)), "k": jnp.ones((8, 12, 20)), "w": jnp.ones((12, 20))}
  dims = lambda path, x: osub.MatrixDims(rows=1, cols=2) if x.ndim == 3 else None
  make = lambda: osub.online_subspace_descent(1e-2, 4, dims=dims)
  # The products with G and N per leaf, so that only the step's stacks are counted.
  monkeypatch.setattr(_combinator, "STACKED_PRODUCT_ELEMENTS", 0)
  (own, hlo_own), (stacked, hlo_stacked) = [
    _with_setting(monkeypatch, _combinator, "OWN_BATCH_MATRICES", n, make, params, 0)
    for n in (8, 10**6)
  ]
  chex.assert_trees_all_close(own, stacked, atol=1e-5, rtol=1e-5)
  stacks = lambda hlo, shape: len(re.findall(rf"concatenate.*-> tensor<{shape}xf32>", hlo))
  assert stacks(hlo_stacked, "17x12x4") == stacks(hlo_own, "17x12x4") + 2
  assert stacks(hlo_stacked, "17") == 1 and stacks(hlo_own, "17") == 0


STATIC_REFRESH_METHODS = {
  # (transformation, is step t a refresh step): the rule a caller applies on the host.
  "galore": (lambda: osub.galore(1e-2, 4, update_every=2), lambda t: t % 2 == 0),
  "osd": (lambda: osub.online_subspace_descent(1e-2, 4), lambda t: t == 0),
  "rso": (lambda: osub.rso(1e-2, 4, 2), lambda t: t % 2 == 0),
  "grass": (lambda: osub.grass(1e-2, 4, update_every=2), lambda t: t % 2 == 0),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STATIC_REFRESH_METHODS))
def test_static_subspace_refresh_gives_the_same_steps_with_no_cond(name):
  # The host's answer to "does step t refresh?" replaces the refresh conds:
  # the same updates over refreshes and steady steps (the same computations,
  # minus the conditionals; XLA may fuse them otherwise: float32 rounding),
  # and a steady step's program has no conditional left (on a GPU, each one
  # is a host sync).
  make, due = STATIC_REFRESH_METHODS[name]
  params = {"w": jnp.ones((12, 20)), "v": jnp.ones((20, 12)), "b": jnp.zeros(20)}
  tx = optax.chain(optax.clip_by_global_norm(1.0), make())  # passed through a chain
  runs = {}
  for static in (False, True):
    state, updates = tx.init(params), []
    for t in range(5):
      kwargs = {"subspace_refresh": due(t)} if static else {}
      step = jax.jit(functools.partial(tx.update, **kwargs))
      u, state = step(_grads(params, t), state, params)
      updates.append(u)
    runs[static] = (updates, state)
  chex.assert_trees_all_close(runs[True], runs[False], rtol=1e-5, atol=1e-6)
  g = _grads(params, 0)
  compiled = lambda f: jax.jit(f).lower(g, runs[True][1], params).compile().as_text()
  steady = compiled(functools.partial(tx.update, subspace_refresh=False))
  assert " conditional(" in compiled(tx.update) and " conditional(" not in steady


WRAPPERS = {
  "chain": lambda tx: optax.chain(optax.clip_by_global_norm(1.0), tx),
  # rebuilds the transformation at every update
  "inject_hyperparams": lambda tx: optax.inject_hyperparams(
    lambda scale: optax.chain(tx, optax.scale(scale))
  )(scale=1.0),
  "multisteps": lambda tx: optax.MultiSteps(tx, every_k_schedule=1),
  "masked": lambda tx: optax.masked(tx, lambda p: jax.tree_util.tree_map(lambda _: True, p)),
}


# The fast subset (-m "not slow") runs the diagonal of the grid: each method once and each
# wrapper once (sorted, the i-th method in the i-th wrapper).
@pytest.mark.parametrize(
  "name,wrapper",
  [
    pytest.param(
      name,
      wrapper,
      marks=[] if i == j else [pytest.mark.slow],
    )
    for i, name in enumerate(sorted(STATIC_REFRESH_METHODS))
    for j, wrapper in enumerate(sorted(WRAPPERS))
  ],
)
def test_refresh_due_reads_the_projectors_schedule_through_any_wrapper(name, wrapper):
  # The schedule belongs to the projector and travels in the state: the host
  # reads it there, so no caller writes a method's schedule again.
  make, due = STATIC_REFRESH_METHODS[name]
  params = {"w": jnp.ones((12, 20)), "b": jnp.zeros(20)}
  tx = WRAPPERS[wrapper](make())
  state = tx.init(params)
  step = jax.jit(tx.update, static_argnames="subspace_refresh")
  answers = []
  for t in range(5):
    answers.append(osub.refresh_due(state, t))
    updates, state = step(_grads(params, t), state, params, subspace_refresh=answers[-1])
    jax.block_until_ready(state)
    assert all(np.all(np.isfinite(u)) for u in jax.tree_util.tree_leaves(updates))
  assert answers == [due(t) for t in range(5)]


def test_refresh_due_reads_an_nnx_optimizer_state():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  model = nnx.Linear(12, 20, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, osub.galore(1e-2, 4, update_every=2, mask="kernel"), wrt=nnx.Param)
  grads = nnx.grad(lambda m: jnp.mean(m(jnp.ones((2, 12))) ** 2))(model)
  answers = []
  for t in range(3):
    answers.append(osub.refresh_due(opt.opt_state, t))
    opt.update(model, grads, subspace_refresh=answers[-1])
  assert answers == [True, False, True]


def test_a_wrong_static_refresh_is_an_error_at_the_next_refresh_due():
  params = {"w": jnp.ones((12, 20)), "b": jnp.zeros(20)}
  tx = optax.chain(optax.clip_by_global_norm(1.0), osub.galore(1e-2, 4, update_every=2))
  step = jax.jit(tx.update, static_argnames="subspace_refresh")
  state = tx.init(params)
  _, state = step(_grads(params, 0), state, params, subspace_refresh=True)
  _, state = step(_grads(params, 1), state, params, subspace_refresh=True)
  jax.block_until_ready(state)  # what a logged loss does: the step is computed
  # Step 1 does not refresh (T = 2): recorded in the state, raised on the host.
  with pytest.raises(
    osub.RefreshScheduleError, match=r"step 1 got subspace_refresh=True.*says False"
  ):
    osub.refresh_due(state, 2)
  # The state's count is what the schedule reads: another step is an error.
  with pytest.raises(osub.RefreshScheduleError, match="has taken 0 steps"):
    osub.refresh_due(tx.init(params), 3)
  # An abstract state has no count to check: the schedule alone answers.
  assert osub.refresh_due(jax.eval_shape(tx.init, params), 3) is False
  with pytest.raises(TypeError, match="on the host"):
    jax.jit(lambda s: osub.refresh_due(s, 0))(tx.init(params))


def test_refresh_due_without_one_schedule():
  params = {"w": jnp.ones((12, 20))}
  assert osub.refresh_due(optax.adam(1e-3).init(params), 0) is None
  custom = projectors.svd(4, 2)._replace(needs_refresh=lambda c: c % 2 == 0)
  with pytest.raises(ValueError, match="declares no RefreshSchedule"):
    osub.refresh_due(osub.project_subspace(optax.adam(1e-3), custom).init(params), 0)
  both = optax.chain(
    osub.project_subspace(optax.adam(1e-3), projectors.svd(4, 2)),
    osub.project_subspace(optax.sgd(1e-3), projectors.svd(4, 3)),
  )
  with pytest.raises(ValueError, match="different schedules"):
    osub.refresh_due(both.init(params), 0)
  assert osub.refresh_schedule(osub.online_subspace_descent(1e-2, 4).init(params)) == (
    projectors.RefreshSchedule(None)
  )


def test_a_wrong_static_refresh_poisons_the_projected_updates_and_a_traced_one_is_refused():
  params = {"w": jnp.ones((12, 20)), "b": jnp.zeros(20)}
  tx = osub.galore(1e-2, 4, update_every=2)
  state = tx.init(params)
  g = _grads(params, 0)
  # Step 0 refreshes; claiming it does not trains no other method: w's update is NaN.
  updates, _ = jax.jit(functools.partial(tx.update, subspace_refresh=False))(g, state, params)
  assert np.all(np.isnan(updates["w"])) and np.all(np.isfinite(updates["b"]))
  with pytest.raises(TypeError, match="subspace_refresh must be None, True or False"):
    jax.jit(lambda g, s, p, r: tx.update(g, s, p, subspace_refresh=r))(
      g, state, params, jnp.array(True)
    )


@pytest.mark.parametrize(
  "stages",
  [{}, {"residual": "sign_sgd"}, {"residual": "fira"}, {"output": "scale"}],
  ids=["back_project", "frugal", "fira", "apollo"],
)
@pytest.mark.parametrize("schedule", [False, True], ids=["constant", "schedule"])
def test_a_learning_rate_inside_takes_the_steps_of_one_chained_after(stages, schedule):
  # The rate folded into N before the back-projection (and into α for the
  # other outputs) gives the chain's steps: projected leaves of both sides, a
  # stacked leaf, and an unprojected one at its own rate.
  params = {
    "rows": jnp.ones((6, 10)),
    "cols": jnp.ones((10, 6)),
    "stacked": jnp.ones((2, 8, 8)),
    "bias": jnp.ones((10,)),
  }
  mask = {"rows": True, "cols": True, "stacked": True, "bias": False}
  dims = {"rows": None, "cols": None, "stacked": osub.MatrixDims(1, 2), "bias": None}
  lr = optax.linear_schedule(0.1, 0.02, 4) if schedule else 0.05
  bias_lr = optax.linear_schedule(0.3, 0.1, 4) if schedule else 0.2
  common = dict(scale=0.5, mask=mask, dims=dims, **stages)
  projector = projectors.svd(3, 2)
  inside = osub.project_subspace(
    optax.scale_by_adam(), projector, learning_rate=lr, unprojected_learning_rate=bias_lr, **common
  )
  labels = {"rows": "p", "cols": "p", "stacked": "p", "bias": "u"}
  after = optax.chain(
    osub.project_subspace(optax.scale_by_adam(), projector, **common),
    optax.partition(
      {"p": optax.scale_by_learning_rate(lr), "u": optax.scale_by_learning_rate(bias_lr)}, labels
    ),
  )
  got, _ = _run(inside, params, 5)
  want, _ = _run(after, params, 5)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  assert not np.allclose(got["rows"], params["rows"])


def test_learning_rate_arguments_are_checked():
  make = lambda **kw: osub.project_subspace(optax.scale_by_adam(), projectors.svd(2, 5), **kw)
  with pytest.raises(ValueError, match="learning_rate must be positive"):
    make(learning_rate=-1e-3)
  with pytest.raises(ValueError, match="unprojected_learning_rate must be positive"):
    make(learning_rate=1e-3, unprojected_learning_rate=0.0)
  with pytest.raises(ValueError, match="unprojected_learning_rate needs learning_rate"):
    make(unprojected_learning_rate=1e-3)
  with pytest.raises(TypeError, match="learning_rate must be None, a float or an optax schedule"):
    make(learning_rate="1e-3")


def _producers_back_to_a_product(jaxpr, var):
  """The primitives that make `var`, walking back through first operands to a dot_general."""
  made_by = {id(v): eqn for eqn in jaxpr.eqns for v in eqn.outvars}
  chain = []
  while id(var) in made_by and (not chain or chain[-1] != "dot_general"):
    eqn = made_by[id(var)]
    chain.append(eqn.primitive.name)
    var = eqn.invars[0]
  return chain


@pytest.mark.parametrize("schedule", [False, True], ids=["constant", "schedule"])
def test_a_projected_update_is_the_back_projection_itself(schedule, monkeypatch):
  # What lets XLA fold apply_updates' add into the product on a GPU (cuBLAS β = 1):
  # no multiply (α, the NaN guard of a host-told refresh, the learning rate)
  # between the product and the update, on either side. Per leaf, as matrices above
  # STACKED_PRODUCT_ELEMENTS run (stacked, the two would share one batched product).
  monkeypatch.setattr(_combinator, "STACKED_PRODUCT_ELEMENTS", 0)
  params = {"rows": jnp.ones((8, 16)), "cols": jnp.ones((16, 8)), "bias": jnp.ones((16,))}
  lr = optax.linear_schedule(0.1, 0.01, 10) if schedule else 0.1
  tx = osub.galore(lr, rank=2, update_every=5)
  state = tx.init(params)
  jaxpr = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p, subspace_refresh=False)[0])(
    params, state, params
  ).jaxpr
  out = dict(zip(sorted(params), jaxpr.outvars))  # dict leaves flatten in sorted key order
  assert _producers_back_to_a_product(jaxpr, out["rows"]) == ["dot_general"]
  assert _producers_back_to_a_product(jaxpr, out["cols"]) == ["dot_general"]
  assert "dot_general" not in _producers_back_to_a_product(jaxpr, out["bias"])
