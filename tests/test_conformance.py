"""One suite every preset goes through (as optax/contrib/_common_test.py does).

A new method joins by adding one line to `PRESETS`: a factory from a learning
rate (float or schedule) to a transformation.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_subspace as osub
from optax_subspace._leaves import path_str

LR = 0.05
PRESETS = {
  "galore": lambda lr: osub.galore(lr, rank=2, update_every=3),
  "galore_randomized_svd": lambda lr: osub.galore(
    lr, rank=2, update_every=3, projector="randomized_svd"
  ),
  "galore_transport": lambda lr: osub.galore(lr, rank=2, update_every=3, on_change="transport"),
  "grass_topk": lambda lr: osub.grass(lr, rank=2, update_every=3),
  "grass_multinomial": lambda lr: osub.grass(lr, rank=2, update_every=3, selection="multinomial"),
  "online_subspace_descent": lambda lr: osub.online_subspace_descent(
    lr, rank=2, update_every=3, peak_learning_rate=LR
  ),
  "online_subspace_descent_code_order": lambda lr: osub.online_subspace_descent(
    lr, rank=2, update_every=3, peak_learning_rate=LR, step_before_projection=True
  ),
  "online_subspace_descent_paper": lambda lr: osub.online_subspace_descent(
    lr, rank=2, orthogonality_weight=0.1, projector_optimizer=optax.adamw(5 * LR)
  ),
  "galore_warm_refresh": lambda lr: osub.galore(
    lr, rank=2, update_every=3, projector=osub.projectors.svd(2, 3, warm_iterations=1)
  ),
  "rso": lambda lr: osub.rso(lr, rank=2, inner_steps=3, proximal=1.0),
  "fira": lambda lr: osub.fira(lr, rank=2, update_every=3),
  # SGD on the rest: signSGD (the default) turns the entries of G − P·R that are near 0 into
  # full steps whose signs differ between two float32 orders of the same sums.
  "frugal": lambda lr: osub.frugal(lr, rank=2, update_every=3, rule="sgd"),
  "apollo": lambda lr: osub.apollo(lr, rank=2, update_every=3),
  "apollo_mini": lambda lr: osub.apollo_mini(lr, update_every=3),
}
NAMES = sorted(PRESETS)
# The fast subset (-m "not slow") puts each method through some of the checks (see _presets),
# with its default projector and selection; the variants (the randomized SVD, whose refresh
# compiles slowest by far, transport, multinomial selection, OSD's code order and its paper's
# projector optimizer) run in the slow set. The fast subset still steps most variants:
# tests/test_sharding.py's compiled update on the (4, 2) mesh (three updates across a refresh:
# transport, multinomial, OSD's paper projector optimizer), and the projectors, selections and
# transport in tests/test_projectors.py, tests/test_grass.py and tests/test_combinator.py.
FAST_PRESETS = ("galore", "grass_topk", "online_subspace_descent", "rso")


def _presets(check: int):
  """Every preset, for the `check`-th check below; one of FAST_PRESETS in the fast subset.

  It rotates over the checks, so each method goes through two or three of them there (and every
  preset through every check in the slow set).
  """
  fast = {FAST_PRESETS[check % 4]}
  return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in NAMES]


def _problem(dtype=jnp.float32):
  """A two-layer linear regression whose weights are projected matrices.

  w2 is random, not constant: with a constant w2 every column of w1's gradient is the same, a
  rank-1 gradient whose rank-2 subspace is half rounding noise, which Adam on R then scales up
  to full steps; two float32 orders of the same sums (MultiSteps' running mean against the mean)
  then disagree far beyond rounding."""
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(k1, (64, 8))
  y = x @ jax.random.normal(k2, (8, 4)) + 0.5
  params = {
    "w1": 0.3 * jax.random.normal(k3, (8, 16)),
    "w2": 0.1 + 0.05 * jax.random.normal(k4, (16, 4)),
    "b": jnp.zeros(4),
  }
  params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)

  def loss(p):
    pred = (x.astype(dtype) @ p["w1"] @ p["w2"] + p["b"]).astype(jnp.float32)
    return jnp.mean((pred - y) ** 2)

  return params, loss


def _train(tx, steps, dtype=jnp.float32, jit=True):
  params, loss = _problem(dtype)
  state = tx.init(params)

  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step) if jit else step
  for _ in range(steps):
    params, state = step(params, state)
  return params, state, float(loss(params))


@pytest.mark.parametrize("name", _presets(0))
def test_a_small_model_trains(name):
  params, loss = _problem()
  _, _, final = _train(PRESETS[name](LR), 150)
  assert final < 0.1 * float(loss(params))


@pytest.mark.parametrize("name", _presets(1))
def test_jit_and_no_jit_agree(name):
  a, _, _ = _train(PRESETS[name](LR), 4, jit=False)
  b, _, _ = _train(PRESETS[name](LR), 4, jit=True)
  # Parameters are O(1); eager and compiled float32 differ by rounding (the
  # refresh's eigh amplifies it slightly), not by more.
  chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", _presets(2))
def test_inject_hyperparams_matches_and_exposes_the_learning_rate(name):
  injected = optax.inject_hyperparams(lambda learning_rate: PRESETS[name](learning_rate))(
    learning_rate=LR
  )
  a, state, _ = _train(injected, 4)
  b, _, _ = _train(PRESETS[name](LR), 4)
  chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.hyperparams["learning_rate"], LR)


@pytest.mark.parametrize("name", _presets(3))
def test_a_constant_schedule_equals_a_float(name):
  a, _, _ = _train(PRESETS[name](optax.constant_schedule(LR)), 4)
  b, _, _ = _train(PRESETS[name](LR), 4)
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", _presets(4))
def test_multisteps_applies_the_mean_gradient_once(name):
  params, loss = _problem()
  g1 = jax.grad(loss)(params)
  g2 = jax.tree_util.tree_map(lambda g: 0.5 * g, g1)
  multi = optax.MultiSteps(PRESETS[name](LR), every_k_schedule=2)
  state = multi.init(params)
  u1, state = multi.update(g1, state, params)
  chex.assert_trees_all_equal(u1, jax.tree_util.tree_map(jnp.zeros_like, u1))
  u2, _ = multi.update(g2, state, params)
  single = PRESETS[name](LR)
  mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, g1, g2)
  expected, _ = single.update(mean, single.init(params), params)
  # MultiSteps averages as a running mean: float32 rounding differs.
  chex.assert_trees_all_close(u2, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", _presets(5))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_state_shapes_and_dtypes_are_stable_and_updates_keep_dtype(name, dtype):
  params, loss = _problem(dtype)
  tx = PRESETS[name](LR)
  state0 = tx.init(params)
  grads = jax.grad(loss)(params)
  updates, state1 = jax.jit(tx.update)(grads, state0, params)
  _, state2 = jax.jit(tx.update)(grads, state1, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(state0, state1, state2)
  chex.assert_trees_all_equal_dtypes(updates, params)


@pytest.mark.parametrize("name", _presets(6))
def test_chains_after_gradient_clipping_with_donated_state(name):
  tx = optax.chain(optax.clip_by_global_norm(0.1), PRESETS[name](LR))
  params, loss = _problem()
  state = tx.init(params)

  @jax.jit
  def reference_step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  donated_step = jax.jit(reference_step.__wrapped__, donate_argnums=(0, 1))
  expected, _ = reference_step(params, state)
  got, _ = donated_step(
    jax.tree_util.tree_map(jnp.copy, params), jax.tree_util.tree_map(jnp.copy, state)
  )
  chex.assert_trees_all_close(got, expected, rtol=1e-6, atol=1e-7)


class _Mlp(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(8, 16, rngs=rngs)
    self.down = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.down(nnx.relu(self.up(x)))


@pytest.mark.parametrize("name", _presets(7))
def test_trains_a_flax_nnx_model_through_nnx_optimizer(name):
  model = _Mlp(nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (32, 8))
  y = jnp.sin(x[:, :4])
  optimizer = nnx.Optimizer(model, PRESETS[name](0.02), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  first = float(step(model, optimizer))
  for _ in range(60):
    last = float(step(model, optimizer))
  assert last < 0.5 * first
  # The inner first moment of up/kernel (wherever the preset's inner state
  # keeps it) is low-rank: r × larger side.
  first_moments = [
    x.shape
    for p, x in jax.tree_util.tree_flatten_with_path(optimizer.opt_state[0].inner)[0]
    if path_str(p).endswith("mu/up/kernel/value")
  ]
  rank = 1 if name == "apollo_mini" else 2  # APOLLO-Mini is rank 1 by definition
  assert first_moments == [(rank, 16)]


@pytest.mark.parametrize("name", _presets(8) + ["adamw"])
def test_nnx_optimizer_compiles_the_train_step_once(name):
  # nnx.Optimizer wraps every array of the state in a Variable and rebuilds
  # the containers inside Variables after each update: a projector state
  # held inside the parameter's nnx.Param came back as an nnx.State at
  # step 2, which traced (and compiled) the step a second time.
  model = _Mlp(nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (32, 8))
  make = (lambda lr: optax.adamw(lr)) if name == "adamw" else PRESETS[name]
  optimizer = nnx.Optimizer(model, make(0.02), wrt=nnx.Param)
  traces = []

  @nnx.jit
  def step(model, optimizer):
    traces.append(1)
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  structure = jax.tree_util.tree_structure(nnx.state(optimizer))
  for _ in range(3):
    step(model, optimizer)
  assert len(traces) == 1
  assert jax.tree_util.tree_structure(nnx.state(optimizer)) == structure


# Any optax optimizer inside project_subspace (as optax/_src/alias_test.py
# sweeps its aliases): (factory, learning rate, what on_change="transport"
# does with its state: "moves" it into the new basis, or "raises" at init).
# Adafactor factors its second moment (v_row, v_col) only on matrices whose
# two largest sides reach min_dim_size_to_factor: at 2 here, as at 128 on
# a real model's low-rank R.
OPTAX_OPTIMIZERS = {
  "adam": (optax.adam, 0.05, "moves"),
  "adamw": (lambda lr: optax.adamw(lr, weight_decay=1e-4), 0.05, "moves"),
  "lion": (optax.lion, 0.005, "moves"),
  "sgd_momentum": (lambda lr: optax.sgd(lr, momentum=0.9), 0.02, "moves"),
  "sgd_nesterov": (lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True), 0.02, "moves"),
  "rmsprop": (optax.rmsprop, 0.01, "moves"),
  "rmsprop_centered": (lambda lr: optax.rmsprop(lr, centered=True), 0.01, "raises"),
  "adagrad": (optax.adagrad, 0.3, "moves"),
  "adafactor": (optax.adafactor, 0.05, "moves"),
  "adafactor_factored": (lambda lr: optax.adafactor(lr, min_dim_size_to_factor=2), 0.05, "raises"),
  "adabelief": (optax.adabelief, 0.05, "moves"),
  "lamb": (optax.lamb, 0.05, "moves"),
  "yogi": (optax.yogi, 0.05, "moves"),
  "novograd": (optax.novograd, 0.05, "moves"),
  "adan": (optax.adan, 0.05, "moves"),
  "amsgrad": (optax.amsgrad, 0.05, "moves"),
  "radam": (optax.radam, 0.05, "moves"),
  "nadam": (optax.nadam, 0.05, "moves"),
  "adamax": (optax.adamax, 0.05, "moves"),
  "adadelta": (optax.adadelta, 5.0, "moves"),
  "sm3": (optax.sm3, 0.3, "raises"),
  "rprop": (optax.rprop, 0.01, "raises"),
}
# In the fast subset: a moment-based and a momentum-based state that move into the new basis,
# and both kinds that refuse it (a centred second moment, a factored one); the rest are slow.
FAST_SWEEP = ("adam", "adafactor_factored", "rmsprop_centered", "sgd_momentum")
SWEEP = [
  n if n in FAST_SWEEP else pytest.param(n, marks=pytest.mark.slow)
  for n in sorted(OPTAX_OPTIMIZERS)
]


def _train_fused(tx, steps):
  """`_train` with the steps in one compiled loop (one compile per run)."""
  params, loss = _problem()

  @jax.jit
  def run(params, state):
    def step(_, carry):
      params, state = carry
      updates, state = tx.update(jax.grad(loss)(params), state, params)
      return optax.apply_updates(params, updates), state

    return jax.lax.fori_loop(0, steps, step, (params, state))

  params, state = run(params, tx.init(params))
  return params, state, float(loss(params))


@pytest.mark.parametrize("name", SWEEP)
def test_any_optax_optimizer_trains_in_the_subspace_with_low_rank_state(name):
  make, lr, transport = OPTAX_OPTIMIZERS[name]
  params, loss = _problem()
  sub = lambda on_change: osub.project_subspace(
    make(lr), osub.projectors.svd(2, 3), on_change=on_change
  )
  # Every inner-state buffer of a projected leaf (found by its key path) is
  # at most r × l: none is full size.
  low_rank = {"w1": 2 * 16, "w2": 16 * 2}  # (8, 16) -> (2, 16); (16, 4) -> (16, 2)
  for path, x in jax.tree_util.tree_flatten_with_path(
    jax.eval_shape(sub("keep").init, params).inner
  )[0]:
    leaf = next((k.key for k in reversed(path) if getattr(k, "key", None) in low_rank), None)
    if leaf is not None:
      assert x.size <= low_rank[leaf], (path_str(path), x.shape)
  # on_change="transport" moves the inner state into each new basis (a
  # refresh every 3 steps), or refuses it with a clear error at init.
  if transport == "raises":
    with pytest.raises(ValueError, match="on_change='transport' cannot move"):
      sub("transport").init(params)
    tx = sub("keep")
  else:
    tx = sub("transport")
  trained, state, final = _train_fused(tx, 120)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves((trained, state)))
  assert final < 0.5 * float(loss(params)), final


def test_presets_under_inject_hyperparams_need_static_ints():
  params, _ = _problem()
  with pytest.raises(TypeError, match="static_args"):
    optax.inject_hyperparams(osub.galore)(learning_rate=LR, rank=2).init(params)
  tx = optax.inject_hyperparams(osub.galore, static_args=("rank", "update_every"))(
    learning_rate=LR, rank=2, update_every=3
  )
  a, _, _ = _train(tx, 3)
  b, _, _ = _train(osub.galore(LR, rank=2, update_every=3), 3)
  chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)
