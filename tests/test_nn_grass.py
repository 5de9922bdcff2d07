"""GRASS at the model level: `optax_subspace.nn.grass`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_subspace as osub
from examples.llama.config import ModelConfig
from examples.llama.model import Llama
from optax_subspace import _chunks
from optax_subspace.nn import grass as nng

TINY = ModelConfig(16, 24, 2, 2, 32, compute_dtype="float32")
GRASS_MASK = r"(attention|mlp)/"


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


class Net(nnx.Module):
  def __init__(self, n_in, n_out, rngs, use_bias=False):
    self.proj = nnx.Linear(n_in, n_out, use_bias=use_bias, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.proj(x))


def _loss(model, x):
  return jnp.sum(jnp.sin(model(x)))


def _llama_loss(model, tokens):
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _tokens(seed, batch=2, seq=9):
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, seq), 0, TINY.vocab_size)


def _set_selection(layer, indices, scales):
  layer.grass_indices[...] = jnp.asarray(indices, jnp.int32)
  layer.grass_scales[...] = jnp.asarray(scales, jnp.float32)


def test_compressed_gradient_is_the_scaled_selected_columns_of_the_dense_one():
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 6))
  dense = Net(6, 8, nnx.Rngs(1))
  g = nnx.grad(_loss)(dense, x)["proj"]["kernel"][...]
  model = Net(6, 8, nnx.Rngs(1))
  nng.grass_layers(model, 4, mask="proj")
  sigma, rho = [1, 3, 3, 6], [0.5, 2.0, 1.5, 3.0]  # a duplicate column
  _set_selection(model.proj, sigma, rho)
  grads = nnx.grad(_loss)(model, x)
  assert set(grads["proj"].keys()) == {nng.D_NAME}  # no gradient of W
  d = np.asarray(grads["proj"][nng.D_NAME][...])
  expected = np.asarray(rho, np.float32) * np.asarray(g)[:, sigma]
  np.testing.assert_array_equal(d, expected)


@pytest.mark.slow
def test_surgery_keeps_the_outputs_identical():
  model = Llama(TINY, nnx.Rngs(0))
  tokens = _tokens(1)
  before = model(tokens)
  replaced = nng.grass_layers(model, 4)
  assert len(replaced) == 7 * TINY.layers
  assert all(
    isinstance(m, nng.GrassLinear)
    for p, m in nnx.iter_graph(model)
    if isinstance(m, (nnx.Linear, nng.GrassLinear)) and "layers" in p
  )
  np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(before))
  # With a non-zero D, the layer applies the effective kernel.
  layer = model.layers[0].mlp.up_proj
  _set_selection(layer, [0, 2, 2, 9], [1.0, 0.5, 2.0, 3.0])
  layer.grass_d[...] = jax.random.normal(jax.random.PRNGKey(2), (16, 4))
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 16))
  np.testing.assert_allclose(
    np.asarray(layer(x)), np.asarray(x @ layer.effective_kernel()), rtol=1e-5, atol=1e-6
  )
  w = np.asarray(layer.kernel[...]).copy()
  w[:, 0] += np.asarray(layer.grass_d[...])[:, 0]
  w[:, 2] += 0.5 * np.asarray(layer.grass_d[...])[:, 1] + 2.0 * np.asarray(layer.grass_d[...])[:, 2]
  w[:, 9] += 3.0 * np.asarray(layer.grass_d[...])[:, 3]
  np.testing.assert_allclose(np.asarray(layer.effective_kernel()), w, rtol=1e-6)


def test_only_d_is_a_param_and_its_shape_is_in_by_r():
  model = Net(6, 8, nnx.Rngs(1), use_bias=True)
  nng.grass_layers(model, 3, mask="proj")
  params = nnx.state(model, nnx.Param)
  shapes = {k: v[...].shape for k, v in params["proj"].items()}
  assert shapes == {nng.D_NAME: (6, 3), "bias": (8,)}


def _dots(jaxpr):
  """Output shapes of every dot_general in a jaxpr, nested ones included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(tuple(eqn.outvars[0].aval.shape))
    for sub in jax.core.jaxprs_in_params(eqn.params):
      out.extend(_dots(sub))
  return out


def test_steady_backward_forms_no_weight_gradient():
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 32))
  dense = Net(32, 48, nnx.Rngs(1))
  model = Net(32, 48, nnx.Rngs(1))
  nng.grass_layers(model, 4, mask="proj")

  def grad_fn(m):
    graphdef, state = nnx.split(m)
    f = lambda state, x: nnx.grad(_loss)(nnx.merge(graphdef, state), x)
    return f, state

  def dots(m):
    f, state = grad_fn(m)
    return _dots(jax.make_jaxpr(f)(state, x).jaxpr)

  def flops(m):
    f, state = grad_fn(m)
    return jax.jit(f).lower(state, x).compile().cost_analysis()["flops"]

  dense_dots, grass_dots = dots(dense), dots(model)
  weight_shaped = lambda shapes, a, b: {(a, b), (b, a)} & set(shapes)
  assert weight_shaped(dense_dots, 32, 48)  # dW, in either orientation
  assert not weight_shaped(grass_dots, 32, 48)
  assert weight_shaped(grass_dots, 32, 4)  # ∂L/∂D
  dense_flops, grass_flops = flops(dense), flops(model)
  # dW (2·64·32·48) replaced by dD (2·64·32·4), plus x·D and dX through D.
  assert grass_flops < dense_flops - 2 * 64 * 32 * (48 - 3 * 4)


@pytest.mark.slow
def test_refresh_norms_are_the_dense_gradients_column_norms():
  model = Llama(TINY, nnx.Rngs(0))
  tokens = _tokens(1)
  dense = nnx.grad(_llama_loss)(model, tokens)
  nng.grass_layers(model, 4)
  layers = nng._grass_modules(model)  # pylint: disable=protected-access
  norms = nng._probe_norms(model, layers, _llama_loss, (tokens,), {})  # pylint: disable=protected-access
  flat = {tuple(p): v[...] for p, v in nnx.to_flat_state(dense)}
  for (path, layer), n in zip(layers, norms):
    g = np.asarray(flat[path + ("kernel",)], np.float64)
    col = np.linalg.norm(g, axis=0)
    # _row_norms's scale by max|G|: the norms of G / max|G|.
    np.testing.assert_allclose(np.asarray(n), col / np.abs(g).max(), rtol=1e-5, atol=1e-7)
    assert not layer.probing


def _train_model_level(selection, steps, every, rank, lr, mask, cfg=TINY):
  model = Llama(cfg, nnx.Rngs(0))
  nng.grass_layers(model, rank, update_every=every, selection=selection, seed=3, mask=mask)
  opt = nnx.Optimizer(model, nng.grass_optimizer(lr), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, tokens):
    changed = nng.grass_refresh(model, opt, _llama_loss, tokens)
    loss, grads = nnx.value_and_grad(_llama_loss)(model, tokens)
    opt.update(model, grads)
    return loss, changed

  losses, changes = [], []
  for t in range(steps):
    loss, changed = step(model, opt, _tokens(100 + t))
    losses.append(float(loss))
    changes.append(changed)
  return model, losses, changes


def _train_optimizer_level(selection, steps, every, rank, lr, mask, **kw):
  model = Llama(TINY, nnx.Rngs(0))
  tx = osub.grass(lr, rank, every, selection, seed=3, mask=mask + ".*kernel", **kw)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, tokens):
    loss, grads = nnx.value_and_grad(_llama_loss)(model, tokens)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt, _tokens(100 + t))) for t in range(steps)]
  selections = {}
  for path, x in jax.tree_util.tree_flatten_with_path(opt.opt_state[0].projectors)[0]:
    name = osub._leaves.path_str(path)  # pylint: disable=protected-access
    layer, _, field = name.partition("/kernel/")  # field: indices[/value]
    field = [f for f in field.split("/") if f != "value"][0]
    selections[(layer, field)] = np.asarray(getattr(x, "value", x))
  return model, losses, selections


@pytest.mark.slow
@pytest.mark.parametrize("selection", ["topk", "multinomial", "uniform"])
def test_model_level_follows_the_optimizer_level_trajectory(selection):
  # The optimizer level on the plain model, selecting output features
  # (side="cols"), with the same keys: the same selections, resets and
  # updates, so the same effective weights.
  steps, every, rank, lr = 7, 3, 4, 1e-2  # refreshes at steps 0, 3 and 6
  grass_model, grass_losses, changes = _train_model_level(
    selection, steps, every, rank, lr, GRASS_MASK
  )
  plain_model, plain_losses, selections = _train_optimizer_level(
    selection, steps, every, rank, lr, GRASS_MASK, side="cols"
  )
  np.testing.assert_allclose(grass_losses, plain_losses, rtol=1e-5)
  # The selection moved at refresh steps only, and did at some.
  assert all(not any(bool(v) for v in c.values()) for t, c in enumerate(changes) if t % every)
  assert any(bool(v) for c in changes[every:] for v in c.values())
  plain = {tuple(p): v[...] for p, v in nnx.to_flat_state(nnx.state(plain_model, nnx.Param))}
  initial = Llama(TINY, nnx.Rngs(0)).layers[0].attention.q_proj.kernel[...]
  trained = grass_model.layers[0].attention.q_proj.effective_kernel()
  assert float(jnp.abs(trained - initial).max()) > 1e-3
  # The norms are summed in another order at the two levels, so "multinomial"'s
  # q, hence ρ = 1/√(r·q), differ in the last bits; ρ (up to 4 here) carries
  # that into the updates, which the bias correction restarted at each reset
  # (a first Adam step is ~lr·sign(g), sensitive where g is near 0) carries on.
  atol = 2e-5 if selection == "multinomial" else 3e-6
  for path, layer in nnx.iter_graph(grass_model):
    if isinstance(layer, nng.GrassLinear):
      name = "/".join(str(p) for p in path)
      np.testing.assert_array_equal(
        np.asarray(layer.grass_indices[...]), selections[(name, "indices")]
      )
      np.testing.assert_allclose(
        np.asarray(layer.grass_scales[...]), selections[(name, "scales")], rtol=1e-5
      )
      w = np.asarray(plain[tuple(path) + ("kernel",)])
      np.testing.assert_allclose(np.asarray(layer.effective_kernel()), w, rtol=1e-5, atol=atol)
  # AdamW on the unprojected leaves: an entry whose gradient is near 0 takes a step of up to
  # ~lr·sign(g) from the rounding of g, which the two levels compute in different orders.
  for path in [("embed", "embedding"), ("lm_head", "kernel"), ("layers", 1, "mlp_norm", "scale")]:
    mine = nnx.state(grass_model, nnx.Param)
    for p in path:
      mine = mine[p]
    np.testing.assert_allclose(np.asarray(mine[...]), np.asarray(plain[path]), rtol=1e-5, atol=1e-5)


# --- activation checkpointing (nnx.remat per block) ---------------------------

REMAT = dataclasses.replace(TINY, remat=True)


def _grass_llama(cfg):
  """The tiny LLaMA after `grass_layers` (rank 4), each D drawn non-zero, σ not 0…r−1."""
  model = Llama(cfg, nnx.Rngs(0))
  nng.grass_layers(model, 4)
  layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, nng.GrassLinear)]
  for i, layer in enumerate(layers):
    _set_selection(layer, [1, 5, 5, 9], [0.5, 2.0, 1.5, 3.0])
    layer.grass_d[...] = 0.1 * jax.random.normal(jax.random.PRNGKey(i), layer.grass_d.shape)
  return model


def _functional_grads(model, tokens):
  """∂L/∂Params through split, jax.jit, jax.grad and merge (copy=True, see nn.grass)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def grads(params, rest, tokens):
    return jax.grad(lambda p: _llama_loss(nnx.merge(graphdef, p, rest, copy=True), tokens))(params)

  return grads(params, rest, tokens)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["nnx", "functional"])
def test_remat_gradients_equal_the_no_remat_gradients(how):
  tokens = _tokens(4)
  take = {"nnx": nnx.jit(nnx.grad(_llama_loss)), "functional": _functional_grads}[how]
  plain, remat = (take(_grass_llama(cfg), tokens) for cfg in (TINY, REMAT))
  flat_plain, flat_remat = nnx.to_flat_state(plain), nnx.to_flat_state(remat)
  assert [p for p, _ in flat_remat] == [p for p, _ in flat_plain]
  assert any(p[-1] == nng.D_NAME for p, _ in flat_remat)
  for (path, a), (_, b) in zip(flat_plain, flat_remat):
    np.testing.assert_allclose(
      np.asarray(b[...]), np.asarray(a[...]), rtol=1e-5, atol=1e-7, err_msg=str(path)
    )


@pytest.mark.slow
def test_remat_refresh_and_train_loop_match_no_remat():
  # grass_refresh's norms pass (the probe's custom VJP) runs inside every
  # rematerialized block; selections, losses and weights must not change.
  runs = [
    _train_model_level("multinomial", 5, 2, 4, 1e-2, GRASS_MASK, cfg=cfg) for cfg in (TINY, REMAT)
  ]
  (plain, plain_losses, plain_changes), (remat, remat_losses, remat_changes) = runs
  np.testing.assert_allclose(remat_losses, plain_losses, rtol=1e-6)
  for a, b in zip(plain_changes, remat_changes):
    assert {k: bool(v) for k, v in a.items()} == {k: bool(v) for k, v in b.items()}
  layers = lambda m: [(p, l) for p, l in nnx.iter_graph(m) if isinstance(l, nng.GrassLinear)]
  for (path, a), (_, b) in zip(layers(plain), layers(remat)):
    np.testing.assert_array_equal(
      np.asarray(b.grass_indices[...]), np.asarray(a.grass_indices[...]), err_msg=str(path)
    )
    np.testing.assert_allclose(
      np.asarray(b.effective_kernel()), np.asarray(a.effective_kernel()), rtol=1e-5, atol=1e-6
    )


def test_remat_backward_still_forms_no_weight_gradient_per_block():
  tokens = _tokens(5)
  model = _grass_llama(REMAT)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  f = lambda p: jax.grad(lambda p: _llama_loss(nnx.merge(graphdef, p, rest, copy=True), tokens))(p)
  jaxpr = jax.make_jaxpr(f)(params).jaxpr
  remats = [e for e in jaxpr.eqns if e.primitive.name.startswith("remat")]
  assert len(remats) >= TINY.layers  # jax.checkpoint's primitive, once per block at least
  shapes = set(_dots(jaxpr))  # the recomputed blocks' backward included
  h, ffn = TINY.hidden, TINY.ffn
  either = lambda a, b: {(a, b), (b, a)}  # a weight-shaped product, in either orientation
  assert not (either(h, h) | either(h, ffn)) & shapes, shapes  # no dW of a GRASS layer
  assert either(h, 4) & shapes and either(ffn, 4) & shapes  # ∂L/∂D
  assert either(h, TINY.vocab_size) & shapes  # the dense head's dW, for contrast


def _arrays(tree):
  """Path -> array of every leaf of an NNX state (or pytree), for exact comparisons."""
  return {
    jax.tree_util.keystr(path): np.asarray(x)
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_refresh_merging_layer_by_layer_equals_one_chunk_and_so_do_the_steps(monkeypatch, jit):
  # A budget below every layer's bytes makes each layer's merge a chunk of its own (ordered by
  # optimization barriers); a budget above all of them is one chunk. Refreshes at every step
  # (K = 1, sampled selections) after a first update, so D and its moments are non-zero when
  # merged and reset: the same model and optimizer state after each refresh and step, bit for bit.
  def refresh(model, opt, tokens):
    return nng.grass_refresh(model, opt, _llama_loss, tokens)

  def step(model, opt, tokens):
    opt.update(model, nnx.grad(_llama_loss)(model, tokens))

  runs = []
  for budget in (1 << 40, 1):
    monkeypatch.setattr(_chunks, "REFRESH_CHUNK_BYTES", budget)
    model = Llama(REMAT, nnx.Rngs(0))
    nng.grass_layers(model, 4, update_every=1, selection="multinomial", seed=3)
    opt = nnx.Optimizer(model, nng.grass_optimizer(1e-2), wrt=nnx.Param)
    # A fresh jit per budget: the chunks are fixed when the refresh is traced. The step is
    # jitted either way (eager, its many small ops compile one by one: most of this test's time).
    run_refresh, run_step = (nnx.jit(refresh) if jit else refresh), nnx.jit(step)
    states = []
    run_step(model, opt, _tokens(0))
    for t in range(1, 3):
      changed = run_refresh(model, opt, _tokens(t))
      states.append((_arrays(changed), _arrays(nnx.state((model, opt)))))
      run_step(model, opt, _tokens(t))
      states.append(({}, _arrays(nnx.state((model, opt)))))
    runs.append(states)
  assert any(np.any(x) for x in runs[0][0][0].values())  # some selection moved
  for (want_changed, want), (got_changed, got) in zip(*runs):
    assert got_changed.keys() == want_changed.keys() and got.keys() == want.keys()
    for path in want_changed:
      np.testing.assert_array_equal(got_changed[path], want_changed[path], err_msg=path)
    for path in want:
      np.testing.assert_array_equal(got[path], want[path], err_msg=path)


class TwoNet(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(6, 8, use_bias=False, rngs=rngs)
    self.b = nnx.Linear(6, 8, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.a(x)) + jnp.tanh(self.b(x))


# Output columns 0, 1, 2 carry 1000× the gradient of the others: top-3 picks
# them whatever the weights.
_COLUMN_WEIGHTS = jnp.array([10.0, 10.0, 10.0] + [0.01] * 5)


def _weighted_loss(model, x):
  return jnp.sum(_COLUMN_WEIGHTS * model(x))


def test_refresh_merges_d_and_resets_the_moments_of_moved_layers_only():
  model = TwoNet(nnx.Rngs(1))
  nng.grass_layers(model, 3, update_every=2, mask="a|b")
  opt = nnx.Optimizer(model, nng.grass_optimizer(1e-2), wrt=nnx.Param)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 6))
  for _ in range(2):  # steps 0 (refresh) and 1
    changed = nng.grass_refresh(model, opt, _weighted_loss, x)
    opt.update(model, nnx.grad(_weighted_loss)(model, x))
  assert not any(bool(v) for v in changed.values())  # step 1: no refresh
  for layer in (model.a, model.b):
    np.testing.assert_array_equal(np.asarray(layer.grass_indices[...]), [0, 1, 2])
  model.a.grass_indices[...] = jnp.array([3, 4, 5], jnp.int32)
  before = {n: getattr(model, n).effective_kernel() for n in "ab"}
  changed = nng.grass_refresh(model, opt, _weighted_loss, x)  # step 2
  assert bool(changed["a"]) and not bool(changed["b"])
  adam = opt.opt_state[0]
  for n in "ab":
    layer = getattr(model, n)
    np.testing.assert_allclose(
      np.asarray(layer.effective_kernel()), np.asarray(before[n]), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_array_equal(np.asarray(layer.grass_d[...]), 0.0)
    for moment in (adam.mu, adam.nu):
      buf = np.asarray(moment[n][nng.D_NAME][...])
      assert (np.abs(buf).max() == 0) == (n == "a"), (n, buf)


def test_all_zero_gradients_sample_uniformly_and_keep_topk():
  zero_loss = lambda m, x: 0.0 * jnp.sum(m(x))
  x = jnp.ones((4, 6))
  for selection in ("topk", "multinomial", "uniform"):
    model = Net(6, 8, nnx.Rngs(1))
    nng.grass_layers(model, 3, update_every=1, mask="proj", selection=selection)
    opt = nnx.Optimizer(model, nng.grass_optimizer(1e-2), wrt=nnx.Param)
    changed = nng.grass_refresh(model, opt, zero_loss, x)
    scales = np.asarray(model.proj.grass_scales[...])
    assert np.all(np.isfinite(scales))
    if selection == "topk":
      assert not bool(changed["proj"])
      np.testing.assert_array_equal(np.asarray(model.proj.grass_indices[...]), [0, 1, 2])
    else:  # uniform q = 1/8: ρ = 1/√(r·q) = √(8/3)
      np.testing.assert_allclose(scales, np.sqrt(8 / 3), rtol=1e-6)


def test_non_finite_gradients_keep_the_selection():
  nan_loss = lambda m, x: jnp.nan * jnp.sum(m(x))
  model = Net(6, 8, nnx.Rngs(1))
  nng.grass_layers(model, 3, update_every=1, mask="proj", selection="multinomial")
  opt = nnx.Optimizer(model, nng.grass_optimizer(1e-2), wrt=nnx.Param)
  changed = nng.grass_refresh(model, opt, nan_loss, jnp.ones((4, 6)))
  assert not bool(changed["proj"])
  np.testing.assert_array_equal(np.asarray(model.proj.grass_indices[...]), [0, 1, 2])
  np.testing.assert_array_equal(np.asarray(model.proj.grass_scales[...]), 1.0)


def test_bad_arguments_raise_clear_errors():
  make = lambda: Net(6, 8, nnx.Rngs(1))
  with pytest.raises(ValueError, match="rank must be positive"):
    nng.grass_layers(make(), 0, mask="proj")
  with pytest.raises(ValueError, match="at most the output side"):
    nng.grass_layers(make(), 9, mask="proj")
  with pytest.raises(TypeError, match="rank must be a Python int"):
    nng.grass_layers(make(), 2.0, mask="proj")
  with pytest.raises(ValueError, match="selection must be one of"):
    nng.grass_layers(make(), 2, mask="proj", selection="random")
  with pytest.raises(ValueError, match="replacement=True"):
    nng.grass_layers(make(), 2, mask="proj", replacement=True)
  with pytest.raises(ValueError, match="update_every must be positive"):
    nng.grass_layers(make(), 2, mask="proj", update_every=0)
  with pytest.raises(ValueError, match="selects no layer"):
    nng.grass_layers(make(), 2, mask="attention")
  model = make()
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  with pytest.raises(ValueError, match="no GrassLinear"):
    nng.grass_refresh(model, opt, _loss, jnp.ones((2, 6)))
  with pytest.raises(TypeError, match="replaces an nnx.Linear"):
    nng.GrassLinear(nnx.LinearGeneral(6, (2, 4), rngs=nnx.Rngs(0)), 2)


def test_rank_equal_to_out_features_trains_every_column():
  model = Net(6, 8, nnx.Rngs(1))
  nng.grass_layers(model, 8, update_every=5, mask="proj")
  opt = nnx.Optimizer(model, nng.grass_optimizer(1e-2), wrt=nnx.Param)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 6))
  nng.grass_refresh(model, opt, _loss, x)
  np.testing.assert_array_equal(np.asarray(model.proj.grass_indices[...]), np.arange(8))


def test_grass_optimizer_scales_d_and_decays_only_the_dense_params():
  params = {"proj": {nng.D_NAME: jnp.ones((3, 2)), "bias": jnp.ones(2)}}
  grads = {"proj": {nng.D_NAME: jnp.full((3, 2), 0.5), "bias": jnp.full(2, 0.5)}}
  plain = nng.grass_optimizer(0.1)
  scaled = nng.grass_optimizer(0.1, scale=0.25, weight_decay=0.5)
  u_plain, _ = plain.update(grads, plain.init(params), params)
  u_scaled, _ = scaled.update(grads, scaled.init(params), params)
  np.testing.assert_allclose(
    np.asarray(u_scaled["proj"][nng.D_NAME]),
    0.25 * np.asarray(u_plain["proj"][nng.D_NAME]),
    rtol=1e-6,
  )
  # bias: W ← (W + u)(1 − lr·wd), i.e. u − lr·wd·(W + u)
  u = np.asarray(u_plain["proj"]["bias"])
  np.testing.assert_allclose(
    np.asarray(u_scaled["proj"]["bias"]), u - 0.1 * 0.5 * (1.0 + u), rtol=1e-6
  )


@pytest.mark.skipif(
  jax.device_count() < 8,
  reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8",
)
def test_partitioning_metadata_carries_over_to_d():
  # D (in, r) shares the kernel's input axis: its split and its out_sharding
  # metadata, as RsoLinear's B shares the output axis (one builder for both).
  mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
  P = jax.sharding.PartitionSpec

  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.Linear(
        16,
        32,
        rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("model", None)),
      )

  with jax.set_mesh(mesh):
    model = Mlp(nnx.Rngs(0))
    nng.grass_layers(model, 4, mask="up")
    specs = nnx.get_partition_spec(nnx.state(model))["up"]
    assert specs[nng.D_NAME].get_value() == P("model", None)
    assert specs["kernel"].get_value() == P("model", None)
  assert getattr(model.up, nng.D_NAME)[...].sharding.spec == P("model", None)
