"""RSO at the model level: `optax_subspace.nn` (RsoLinear, rso_layers, merges, optimizer).

The sharded test needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8
(set in .ci/run); the rest runs on one.
"""

import contextlib
import dataclasses
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from examples.llama.config import ModelConfig
from examples.llama.model import Llama
import optax_subspace as osub
from optax_subspace import nn as osnn
from optax_subspace import _chunks
from optax_subspace.projectors import _base
from optax_subspace.projectors import random_basis

TINY = ModelConfig(hidden=16, ffn=24, heads=2, layers=2, vocab_size=32, compute_dtype="float32")
RANK = 4


@pytest.fixture(autouse=True)
def _full_precision():
  with jax.default_matmul_precision("highest"):
    yield


def _llama(seed=0, cfg=TINY):
  return Llama(cfg, nnx.Rngs(seed))


def _tokens(seed, batch=2, seq=9):
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, seq), 0, TINY.vocab_size)


def _loss(model, tokens):
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _linear(m=8, n=6, use_bias=False, seed=0, **kw):
  return nnx.Linear(m, n, use_bias=use_bias, rngs=nnx.Rngs(seed), **kw)


def _effective_kernels(model):
  """Path -> W + P·B of every RsoLinear (W of every other kernel)."""
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, osnn.RsoLinear):
      out["/".join(map(str, path))] = np.asarray(
        node.kernel[...] + node.rso_basis[...] @ node.rso_b[...]
      )
    elif isinstance(node, nnx.Linear):
      out["/".join(map(str, path))] = np.asarray(node.kernel[...])
  return out


# --- the layer -------------------------------------------------------------------


@pytest.mark.slow
def test_surgery_keeps_the_models_outputs_at_b_zero():
  model = _llama()
  tokens = _tokens(0)
  before = model(tokens)
  paths = osnn.rso_layers(model, RANK)
  assert len(paths) == 7 * TINY.layers
  assert all(re.search(r"(attention|mlp)/", p) for p in paths)
  np.testing.assert_array_equal(model(tokens), before)


def test_only_b_is_a_param_and_w_p_are_frozen_variables():
  layer = osnn.RsoLinear(_linear(use_bias=True), RANK)
  params = nnx.state(layer, nnx.Param)
  assert set(params.keys()) == {"rso_b", "bias"}
  assert params["rso_b"].shape == (RANK, 6)
  assert isinstance(layer.kernel, osnn.FrozenKernel)
  assert isinstance(layer.rso_basis, osnn.RsoBasis)
  assert layer.rso_basis[...].dtype == jnp.float32


def test_grad_of_b_at_zero_is_projected_weight_gradient_exactly():
  # Integer-valued x, P and ∂L/∂y make every product exact in float32, so
  # ∂L/∂B = (xP)ᵀ∂L/∂y and Pᵀ∂L/∂W = Pᵀ(xᵀ∂L/∂y) must agree bit for bit.
  linear = _linear()
  x = jnp.asarray(np.random.RandomState(0).randint(-3, 4, (5, 8)), jnp.float32)
  cot = jnp.asarray(np.random.RandomState(1).randint(-3, 4, (5, 6)), jnp.float32)
  grad_w = jax.grad(lambda w: jnp.sum((x @ w) * cot))(linear.kernel[...])
  layer = osnn.RsoLinear(linear, RANK)
  layer.rso_basis.value = jnp.asarray(
    np.random.RandomState(2).randint(-2, 3, (8, RANK)), jnp.float32
  )
  grads = nnx.grad(lambda m: jnp.sum(m(x) * cot))(layer)
  np.testing.assert_array_equal(grads["rso_b"][...], layer.rso_basis[...].T @ grad_w)


@pytest.mark.slow
def test_grad_of_b_at_zero_is_projected_weight_gradient_in_llama():
  model = _llama()
  tokens = _tokens(1)
  full = nnx.grad(_loss)(model, tokens)
  osnn.rso_layers(model, RANK)
  low = nnx.grad(_loss)(model, tokens)
  layer = model.layers[1].mlp.down_proj
  np.testing.assert_allclose(
    low["layers"][1]["mlp"]["down_proj"]["rso_b"][...],
    layer.rso_basis[...].T @ full["layers"][1]["mlp"]["down_proj"]["kernel"][...],
    rtol=1e-5,
    atol=1e-7,
  )
  # Gradients exist only for B and the full-size parameters: no dW anywhere.
  assert "kernel" not in low["layers"][1]["mlp"]["down_proj"]


def _residuals_text(f, *args):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(f, *args)
  return out.getvalue()


def _residual_shapes(f, *args):
  return [
    tuple(int(d) for d in m.group(1).split(",") if d)
    for m in re.finditer(r"\[([0-9,]*)\]", _residuals_text(f, *args))
  ]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_backward_saves_xp_not_x(dtype):
  batch, m, n = 32, 64, 48
  layer = osnn.RsoLinear(_linear(m, n, use_bias=True, dtype=dtype), 8)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, m))

  def f(params, x):  # differentiable in B, the bias and the input
    y = nnx.merge(graphdef, params, rest)(x)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)))

  shapes = _residual_shapes(f, params, x)
  assert (batch, 8) in shapes, shapes  # x·P, in the compute dtype
  assert re.search(
    rf"{jnp.dtype(dtype).name.replace('bfloat16', 'bf16').replace('float32', 'f32')}"
    rf"\[{batch},8\]",
    _residuals_text(f, params, x),
  )
  assert (batch, m) not in shapes, shapes  # not x
  assert (m, n) in shapes  # W, for ∂L/∂x: a parameter, not an activation
  # The plain layer, for contrast, keeps x.
  plain = _linear(m, n, use_bias=True, dtype=dtype)
  graphdef2, params2 = nnx.split(plain)
  shapes2 = _residual_shapes(
    lambda p, x: jnp.sum(jnp.sin(nnx.merge(graphdef2, p)(x).astype(jnp.float32))), params2, x
  )
  assert (batch, m) in shapes2


def _product_case(dtype, batch=(3, 5), m=12, n=10, r=4, seed=0):
  """x, W, P, B of one RsoLinear product, B away from zero."""
  kx, kw, kp, kb = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(kx, batch + (m,)).astype(dtype)
  w = 0.1 * jax.random.normal(kw, (m, n))
  p = random_basis(kp, m, r, "haar")
  b = 0.1 * jax.random.normal(kb, (r, n))
  return x, w, p, b


def _layer_with(w, p, b, dtype):
  layer = osnn.RsoLinear(
    nnx.Linear(*w.shape, use_bias=False, dtype=dtype, rngs=nnx.Rngs(0)), p.shape[1]
  )
  layer.kernel.value, layer.rso_basis.value, layer.rso_b.value = w, p, b
  return layer


def test_custom_vjp_equals_autodiff_of_the_plain_formula_in_float32():
  x, w, p, b = _product_case(jnp.float32)
  cot = jax.random.normal(jax.random.PRNGKey(9), x.shape[:-1] + (w.shape[1],))
  layer = _layer_with(w, p, b, jnp.float32)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def layer_loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params, rest)(x) * cot)

  def plain_loss(b, x, w, p):  # y = x·W + (x·P)·B, differentiated by JAX
    return jnp.sum((x @ w + (x @ p) @ b) * cot)

  y = layer(x)
  np.testing.assert_allclose(y, x @ w + (x @ p) @ b, rtol=1e-5, atol=1e-6)
  got_b, got_x = jax.grad(layer_loss, argnums=(0, 1))(params, x)
  want_b, want_x, want_w, want_p = jax.grad(plain_loss, argnums=(0, 1, 2, 3))(b, x, w, p)
  np.testing.assert_allclose(got_b["rso_b"][...], want_b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-6)
  # W and P are constants of the subproblem: zero cotangent even when differentiated.
  graphdef, params, frozen, rest = nnx.split(layer, nnx.Param, osnn.FrozenKernel, ...)
  grad_w = jax.grad(lambda frozen: jnp.sum(nnx.merge(graphdef, params, frozen, rest)(x) * cot))(
    frozen
  )
  assert float(jnp.abs(grad_w["kernel"][...]).max()) == 0.0
  assert float(jnp.abs(want_w).max()) > 0 and float(jnp.abs(want_p).max()) > 0


def test_custom_vjp_in_bfloat16_rounds_the_effective_kernel_once_and_accumulates_db_in_f32():
  x, w, p, b = _product_case(jnp.bfloat16)
  cot = jax.random.normal(jax.random.PRNGKey(9), x.shape[:-1] + (w.shape[1],), jnp.bfloat16)
  layer = _layer_with(w, p, b, jnp.bfloat16)
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  # Forward: x·bf16(W + P·B), P·B from bf16 P and B summed with W in float32, as the
  # full-weight layer computes x·bf16(W).
  kernel = (
    w
    + jnp.matmul(p.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
  ).astype(jnp.bfloat16)
  y = layer(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y, x @ kernel)
  got_b, got_x = jax.grad(
    lambda params, x: jnp.sum((nnx.merge(graphdef, params, rest)(x) * cot).astype(jnp.float32)),
    argnums=(0, 1),
  )(params, x)
  got_b = got_b["rso_b"][...]
  assert got_b.dtype == jnp.float32 and got_x.dtype == jnp.bfloat16
  # ∂L/∂B = (x·P)ᵀ·∂L/∂y from the bf16 x·P, accumulated and returned in float32.
  xp = (x @ p.astype(jnp.bfloat16)).astype(jnp.float32).reshape(-1, p.shape[1])
  want_b = xp.T @ cot.astype(jnp.float32).reshape(-1, w.shape[1])
  np.testing.assert_allclose(got_b, want_b, rtol=1e-5, atol=1e-5)
  # ∂L/∂x = ∂L/∂y·bf16(W + P·B)ᵀ: the float32 reference up to bf16 rounding.
  want_x = cot.astype(jnp.float32) @ (w + p @ b).T
  np.testing.assert_allclose(got_x.astype(jnp.float32), want_x, rtol=0.05, atol=0.05)


def _weight_sized_products(layer, x):
  """What each dot_general of ∂(Σ layer(x))/∂(Params, x) with an in×out result contracts."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
  jaxpr = jax.make_jaxpr(
    jax.grad(lambda params, x: jnp.sum(nnx.merge(graphdef, params, rest)(x)), argnums=(0, 1))
  )(params, x)
  shape = (layer.in_features, layer.out_features)
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape in (shape, shape[::-1]):
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        found.append([eqn.invars[0].aval.shape[a] for a in lhs_contract])
      for sub in jax.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  return found


def test_backward_forms_no_weight_gradient_product():
  # A weight gradient xᵀ·∂L/∂y is an in×out product over the batch axes; the only
  # in×out product RsoLinear may form is P·B, over r (for W + P·B).
  x, w, p, b = _product_case(jnp.float32, batch=(6, 7))
  rank = p.shape[1]
  assert all(c == [rank] for c in _weight_sized_products(_layer_with(w, p, b, jnp.float32), x))
  assert [6, 7] in _weight_sized_products(_linear(*w.shape), x)  # the plain layer's dW


def test_layer_keeps_dtype_bias_and_precision_semantics():
  linear = _linear(use_bias=True, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 8))
  expected = linear(x)
  layer = osnn.RsoLinear(linear, RANK)
  y = layer(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y, expected)
  assert layer.kernel[...].dtype == jnp.float32
  assert layer.rso_b[...].dtype == jnp.float32


# --- the key contract and merges -----------------------------------------------


def test_each_layer_draws_the_optimizer_levels_basis_for_its_leaf():
  model = _llama()
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  leaf_of = {
    "/".join(str(k.key) for k in kp[:-2]): i
    for i, (kp, _) in enumerate(flat)
    if kp[-2].key == "kernel"
  }
  osnn.rso_layers(model, RANK, distribution="gaussian", seed=7)
  for k in range(2):
    for path, node in nnx.iter_graph(model):
      if isinstance(node, osnn.RsoLinear):
        i = leaf_of["/".join(map(str, path))]
        key = jax.random.fold_in(jax.random.fold_in(_base.matrix_keys(i, 1)[0], 7), k)
        np.testing.assert_array_equal(
          node.rso_basis[...], random_basis(key, node.in_features, RANK, "gaussian")
        )
    osnn.merge_and_redraw(model)


def test_merge_folds_pb_into_w_and_starts_the_next_subproblem():
  model = _llama()
  osnn.rso_layers(model, RANK)
  layer = model.layers[0].attention.q_proj
  old_p = layer.rso_basis[...]
  layer.rso_b.value = jax.random.normal(jax.random.PRNGKey(0), layer.rso_b.shape)
  effective = _effective_kernels(model)
  tokens = _tokens(2)
  before = model(tokens)
  osnn.merge_and_redraw(model)
  for path, w in _effective_kernels(model).items():
    np.testing.assert_allclose(w, effective[path], rtol=1e-6, atol=1e-7)
  assert not np.any(np.asarray(layer.rso_b[...]))
  assert int(layer.rso_subproblem[...]) == 1
  assert not np.allclose(layer.rso_basis[...], old_p)
  np.testing.assert_allclose(model(tokens), before, rtol=1e-5, atol=1e-6)


def test_merge_if_due_merges_after_updates_k_2k():
  layer = osnn.RsoLinear(_linear(), RANK)
  for step in range(1, 8):
    osnn.merge_if_due(layer, step, 3)
    assert int(layer.rso_subproblem[...]) == step // 3
  osnn.merge_if_due(layer, 0, 3)
  assert int(layer.rso_subproblem[...]) == 2


def _arrays(tree):
  """Path -> array of every leaf of an NNX state (or pytree), for exact comparisons."""
  return {
    jax.tree_util.keystr(path): np.asarray(x)
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def test_refresh_chunks_split_each_group_at_the_byte_budget(monkeypatch):
  monkeypatch.setattr(_chunks, "REFRESH_CHUNK_BYTES", 10)
  items = [("a", 4), ("b", 4), ("a", 4), ("a", 4), ("a", 30), ("b", 4), ("a", 1)]
  got = _chunks.chunks(range(len(items)), lambda i: items[i][0], lambda i: items[i][1])
  # Runs of one group in their order, at most 10 bytes; a 30-byte item is a chunk alone.
  assert got == [("a", [0, 2]), ("a", [3]), ("a", [4]), ("a", [6]), ("b", [1, 5])]


@pytest.mark.slow
@pytest.mark.parametrize("distribution", ["gaussian", "haar"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_merge_layer_by_layer_equals_one_chunk_and_so_does_the_next_step(
  monkeypatch, jit, distribution
):
  # A budget below every layer's bytes makes each layer a chunk of its own (ordered by optimization
  # barriers under jit); a budget above all of them is one chunk per (in, r, distribution), one
  # vmapped draw each. Same W, P, B and k afterwards, bit for bit, and so the same next update;
  # but jitted on the CPU, XLA computes a batch of one matrix with other kernels than a batch of
  # 12, so the draw (the Haar draw's CholeskyQR2 products; under the tests' unoptimised compile,
  # tests/conftest.py, also the Gaussian draw's transcendental functions) and the update,
  # through P, differ in float32 rounding.
  tokens = _tokens(3)

  def step(model, opt, tokens):
    opt.update(model, nnx.grad(_loss)(model, tokens))

  runs = []
  for budget in (1 << 40, 1):
    monkeypatch.setattr(_chunks, "REFRESH_CHUNK_BYTES", budget)
    model = _llama()
    osnn.rso_layers(model, RANK, distribution=distribution)
    layers = [node for _, node in nnx.iter_graph(model) if isinstance(node, osnn.RsoLinear)]
    for i, layer in enumerate(layers):
      layer.rso_b.value = 0.1 * jax.random.normal(jax.random.PRNGKey(i), layer.rso_b.shape)
    opt = nnx.Optimizer(model, osnn.rso_optimizer(0.01, inner_steps=2, proximal=1.0), wrt=nnx.Param)
    # A fresh function per budget: the chunks are fixed when the merge is traced.
    merge = lambda model: osnn.merge_and_redraw(model)  # pylint: disable=unnecessary-lambda
    merge, update = (nnx.jit(merge), nnx.jit(step)) if jit else (merge, step)
    merge(model)
    merged = _arrays(nnx.state(model))
    update(model, opt, tokens)
    runs.append((merged, _arrays(nnx.state((model, opt)))))
  (one_merged, one_stepped), (each_merged, each_stepped) = runs
  assert int(model.layers[0].mlp.down_proj.rso_subproblem[...]) == 1
  rounded = jit
  for stage, want, got in (("merge", one_merged, each_merged), ("step", one_stepped, each_stepped)):
    assert got.keys() == want.keys()
    for path in want:
      if rounded and (stage == "step" or "rso_basis" in path):
        np.testing.assert_allclose(got[path], want[path], rtol=1e-6, atol=1e-7, err_msg=path)
      else:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)


# --- a basis shared by layers reading one input (share_basis) ----------------------


def _members(model, block=0):
  attention, mlp = model.layers[block].attention, model.layers[block].mlp
  return attention, mlp


def test_share_basis_gives_siblings_one_basis_drawn_for_the_first_and_redraws_it_once():
  model = _llama()
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  leaf_of = {
    "/".join(str(k.key) for k in kp[:-2]): i
    for i, (kp, _) in enumerate(flat)
    if kp[-2].key == "kernel"
  }
  osnn.rso_layers(model, RANK, distribution="gaussian", seed=7, share_basis=osnn.SHARE_QKV_GATE_UP)
  layers = [node for _, node in nnx.iter_graph(model) if isinstance(node, osnn.RsoLinear)]
  for i, layer in enumerate(layers):
    layer.rso_b.value = 0.1 * jax.random.normal(jax.random.PRNGKey(i), layer.rso_b.shape)
  # Per block one basis for q/k/v, one for gate/up, and o_proj's and down_proj's own: 4, not 7.
  assert len(jax.tree_util.tree_leaves(nnx.state(model, osnn.RsoBasis))) == 2 * 4 * TINY.layers
  effective = _effective_kernels(model)
  for k in range(2):
    for block in range(TINY.layers):
      attention, mlp = _members(model, block)
      assert attention.q_proj.rso_basis is attention.k_proj.rso_basis is attention.v_proj.rso_basis
      assert mlp.gate_proj.rso_basis is mlp.up_proj.rso_basis
      assert attention.o_proj.rso_basis is not attention.q_proj.rso_basis
      # The group's first leaf draws: Params flatten by sorted names, so k_proj for q/k/v.
      for owner in (attention.k_proj, attention.o_proj, mlp.gate_proj, mlp.down_proj):
        path = next("/".join(map(str, p)) for p, n in nnx.iter_graph(model) if n is owner)
        key = jax.random.fold_in(jax.random.fold_in(_base.matrix_keys(leaf_of[path], 1)[0], 7), k)
        np.testing.assert_array_equal(
          owner.rso_basis[...], random_basis(key, owner.in_features, RANK, "gaussian")
        )
        assert int(owner.rso_subproblem[...]) == k
    if k == 0:
      osnn.merge_and_redraw(model)
      # Every member merged W + P_0·B with the basis it trained in, before P was redrawn.
      for path, w in _effective_kernels(model).items():
        np.testing.assert_allclose(w, effective[path], rtol=1e-6, atol=1e-7, err_msg=path)
      assert not any(np.any(np.asarray(layer.rso_b[...])) for layer in layers)


# Eager is slow (each operation compiled on its own); the fast subset runs the jitted case.
@pytest.mark.parametrize(
  "jit", [pytest.param(False, marks=pytest.mark.slow), True], ids=["eager", "jit"]
)
def test_shared_basis_gradients_are_the_projected_weight_gradients(jit):
  # Each member's ∂L/∂B at B = 0 is Pᵀ·∂L/∂W with the group's one P (and stays so under jit, where
  # the members' x·P products are one).
  model = _llama()
  full = nnx.jit(nnx.grad(_loss))(model, _tokens(1))  # the dense reference, jitted either way
  osnn.rso_layers(model, RANK, share_basis=osnn.SHARE_QKV_GATE_UP)
  grad = nnx.jit(nnx.grad(_loss)) if jit else nnx.grad(_loss)
  grads = grad(model, _tokens(1))
  for block in range(TINY.layers):
    for part, names in (
      ("attention", ("q_proj", "k_proj", "v_proj")),
      ("mlp", ("gate_proj", "up_proj")),
    ):
      module = getattr(model.layers[block], part)
      for name in names:
        p = getattr(module, name).rso_basis[...]
        np.testing.assert_allclose(
          grads["layers"][block][part][name]["rso_b"][...],
          p.T @ full["layers"][block][part][name]["kernel"][...],
          rtol=1e-5,
          atol=1e-6,
        )


def _input_products(model, tokens):
  """Instructions of a compiled gradient that make a (tokens, RANK) array from a basis: x·P.

  Counted on the optimised HLO (any opcode: the CPU compiler turns these dots into fusions,
  its batch axes flattened or not), so products merged by the compiler count once."""
  graphdef, state = nnx.split(model)  # shared Variables are one leaf here (jax.jit of the
  # module as a pytree would pass each sharer's copy as an argument of its own)
  grad = lambda state, tokens: nnx.grad(_loss)(nnx.merge(graphdef, state), tokens)
  hlo = jax.jit(grad).lower(state, tokens).compile().as_text()
  b, s = tokens.shape[0], tokens.shape[1] - 1
  shape = rf"f32\[(?:{b * s}|{b},{s}),{RANK}\]"
  return len(re.findall(rf"= {shape}\S* (?!parameter)[\w-]+\([^\n]*rso_basis", hlo))


def test_shared_basis_keeps_one_input_product_per_input():
  tokens = _tokens(0, seq=7)  # 2 × 6 tokens: no basis (16 × RANK) has the products' shape
  counts = []
  for share in (None, osnn.SHARE_QKV_GATE_UP):
    model = _llama()
    osnn.rso_layers(model, RANK, share_basis=share)
    counts.append(_input_products(model, tokens))
  # Unshared: x·P of each of the 7 layers of a block; shared: one per input (q/k/v, o, gate/up,
  # down), so one b×r activation per input lives until the backward.
  assert counts == [7 * TINY.layers, 4 * TINY.layers]


@pytest.mark.slow
def test_shared_basis_train_loop_jit_matches_eager():
  batches = [_tokens(s) for s in range(5)]
  results = []
  for jit in (False, True):
    model = _llama()
    osnn.rso_layers(model, RANK, share_basis=osnn.SHARE_QKV_GATE_UP)
    _train_model_level(
      model, osnn.rso_optimizer(0.01, inner_steps=2, proximal=1.0), batches, 2, jit=jit
    )
    attention, mlp = _members(model, 1)
    assert int(attention.k_proj.rso_subproblem[...]) == 2
    assert attention.q_proj.rso_basis is attention.v_proj.rso_basis
    assert mlp.gate_proj.rso_basis is mlp.up_proj.rso_basis
    results.append(_effective_kernels(model))
  for path in results[0]:
    np.testing.assert_allclose(results[1][path], results[0][path], rtol=1e-5, atol=1e-6)


def test_shared_basis_needs_layers_of_one_input_width():
  with pytest.raises(ValueError, match="in_features"):
    osnn.rso_layers(_llama(), RANK, share_basis=r"gate_proj|up_proj|down_proj")
  a = osnn.RsoLinear(_linear(8, 6), RANK)
  with pytest.raises(ValueError, match="equal"):
    osnn.RsoLinear(_linear(8, 5), RANK - 1, share_basis_of=a)
  with pytest.raises(TypeError, match="RsoLinear"):
    osnn.RsoLinear(_linear(8, 5), RANK, share_basis_of=_linear(8, 5))


# --- errors ------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, -1, 8, 9])
def test_rank_must_be_positive_and_below_the_input_side(rank):
  with pytest.raises(ValueError, match="rank"):
    osnn.RsoLinear(_linear(8, 16), rank)
  with pytest.raises(ValueError, match="rank"):
    osnn.rso_layers(_llama(), rank if rank <= 0 else TINY.hidden + rank - 8)


def test_rank_must_be_an_int():
  with pytest.raises(TypeError, match="rank"):
    osnn.rso_layers(_llama(), 2.0)


def test_unknown_distribution_is_an_error():
  with pytest.raises(ValueError, match="distribution"):
    osnn.rso_layers(_llama(), RANK, distribution="uniform")


def test_layers_that_are_not_2d_linear_maps_are_refused():
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(8, 8, rngs=rngs)
      self.general = nnx.LinearGeneral(8, (2, 4), rngs=rngs)
      self.einsum = nnx.Einsum("ab,bc->ac", (8, 8), rngs=rngs)

  with pytest.raises(ValueError, match="general is an nnx.LinearGeneral"):
    osnn.rso_layers(Model(nnx.Rngs(0)), 2, mask="general")
  with pytest.raises(ValueError, match="einsum is an nnx.Einsum"):
    osnn.rso_layers(Model(nnx.Rngs(0)), 2, mask="einsum")
  with pytest.raises(TypeError, match="nnx.Linear"):
    osnn.RsoLinear(nnx.LinearGeneral(8, (2, 4), rngs=nnx.Rngs(0)), 2)
  linear = _linear()
  linear.kernel.value = jnp.zeros((2, 8, 6))
  with pytest.raises(ValueError, match="2-D"):
    osnn.RsoLinear(linear, 2)


def test_mask_that_selects_nothing_and_repeated_surgery_are_errors():
  with pytest.raises(ValueError, match="selects no layer"):
    osnn.rso_layers(_llama(), RANK, mask="nowhere")
  model = _llama()
  osnn.rso_layers(model, RANK, mask="attention/")
  with pytest.raises(ValueError, match="already has RsoLinear"):
    osnn.rso_layers(model, RANK, mask="mlp/")
  with pytest.raises(ValueError, match="no RsoLinear"):
    osnn.merge_and_redraw(_llama())


@pytest.mark.parametrize("k", [0, -2])
def test_inner_steps_must_be_positive(k):
  with pytest.raises(ValueError, match="inner_steps"):
    osnn.rso_optimizer(0.1, inner_steps=k)
  with pytest.raises(ValueError, match="inner_steps"):
    osnn.merge_if_due(osnn.RsoLinear(_linear(), 2), 1, k)


@pytest.mark.parametrize("eta", [0.0, -1.0, float("inf"), True])
def test_proximal_eta_must_be_positive(eta):
  with pytest.raises(ValueError, match="proximal"):
    osnn.rso_optimizer(0.1, inner_steps=2, proximal=eta)


# --- the optimizer and the train loop ----------------------------------------------


def _train_model_level(model, tx, batches, inner_steps, jit):
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def step(model, opt, tokens):
    grads = nnx.grad(_loss)(model, tokens)
    opt.update(model, grads)
    osnn.merge_if_due(model, opt.step[...], inner_steps)

  step = nnx.jit(step) if jit else step
  for tokens in batches:
    step(model, opt, tokens)
  return opt


@pytest.mark.slow
def test_rso_optimizer_restarts_only_b_and_merges_every_k():
  model = _llama()
  osnn.rso_layers(model, RANK)
  tx = osnn.rso_optimizer(0.01, inner_steps=2, eps_placement="optax")
  opt = _train_model_level(model, tx, [_tokens(s) for s in range(3)], 2, jit=False)
  state = opt.opt_state
  restarted = state.inner_states["rso"].inner_state[0]
  full_adam = state.inner_states["full"].inner_state[0]
  assert int(restarted.count) == 3
  assert int(full_adam.count) == 3  # never restarted
  # B's Adam restarted at update 2: its own count is 1 after update 3.
  assert int(restarted.inner.count) == 1
  assert int(model.layers[0].mlp.up_proj.rso_subproblem[...]) == 1


def test_proximal_term_adds_b_over_eta_to_the_gradient():
  layer = osnn.RsoLinear(_linear(), RANK)
  layer.rso_b.value = jnp.ones_like(layer.rso_b[...])
  tx = osnn.rso_optimizer(1.0, inner_steps=5, proximal=0.5, inner=optax.identity())
  params = nnx.state(layer, nnx.Param)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_array_equal(updates["rso_b"][...], -2.0 * np.ones((RANK, 6)))


@pytest.mark.slow
def test_jitted_train_loop_matches_eager():
  batches = [_tokens(s) for s in range(5)]
  results = []
  for jit in (False, True):
    model = _llama()
    osnn.rso_layers(model, RANK)
    _train_model_level(
      model, osnn.rso_optimizer(0.01, inner_steps=2, proximal=1.0), batches, 2, jit=jit
    )
    assert int(model.layers[1].attention.o_proj.rso_subproblem[...]) == 2
    results.append(_effective_kernels(model))
  for path in results[0]:
    np.testing.assert_allclose(results[1][path], results[0][path], rtol=1e-5, atol=1e-6)


# --- activation checkpointing (nnx.remat per block) -------------------------------


def _rso_llama(remat):
  """The tiny LLaMA after `rso_layers`, every B drawn non-zero (the same for both `remat`)."""
  model = _llama(cfg=dataclasses.replace(TINY, remat=remat))
  osnn.rso_layers(model, RANK)
  layers = [node for _, node in nnx.iter_graph(model) if isinstance(node, osnn.RsoLinear)]
  for i, layer in enumerate(layers):
    layer.rso_b.value = 0.1 * jax.random.normal(jax.random.PRNGKey(i), layer.rso_b.shape)
  return model


def _functional_grads(model, tokens):
  """∂L/∂Params as benchmarks/rso_memory.py takes them: split, jax.jit, jax.grad, merge."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def grads(params, rest, tokens):
    return jax.grad(lambda p: _loss(nnx.merge(graphdef, p, rest, copy=True), tokens))(params)

  return grads(params, rest, tokens)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["nnx", "functional"])
def test_remat_gradients_equal_the_no_remat_gradients(how):
  tokens = _tokens(4)
  take = {"nnx": nnx.jit(nnx.grad(_loss)), "functional": _functional_grads}[how]
  plain, remat = (take(_rso_llama(r), tokens) for r in (False, True))
  flat_plain, flat_remat = nnx.to_flat_state(plain), nnx.to_flat_state(remat)
  assert [p for p, _ in flat_remat] == [p for p, _ in flat_plain]
  assert any(p[-1] == "rso_b" for p, _ in flat_remat)
  assert not any(p[-1] == "kernel" and "layers" in p for p, _ in flat_remat)  # no dW
  for (path, a), (_, b) in zip(flat_plain, flat_remat):
    np.testing.assert_allclose(b[...], a[...], rtol=1e-5, atol=1e-7, err_msg=str(path))


@pytest.mark.slow
def test_remat_train_loop_with_merges_matches_no_remat():
  batches = [_tokens(s) for s in range(5)]
  results = []
  for remat in (False, True):
    model = _rso_llama(remat)
    _train_model_level(
      model, osnn.rso_optimizer(0.01, inner_steps=2, proximal=1.0), batches, 2, jit=True
    )
    assert int(model.layers[0].mlp.down_proj.rso_subproblem[...]) == 2
    results.append(_effective_kernels(model))
  for path in results[0]:
    np.testing.assert_allclose(results[1][path], results[0][path], rtol=1e-5, atol=1e-6)


def test_remat_keeps_block_inputs_and_each_block_recomputes_keeping_xp():
  model = _rso_llama(remat=True)
  tokens = _tokens(5)
  batch, seq = tokens.shape[0], tokens.shape[1] - 1
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  shapes = _residual_shapes(
    lambda p: _loss(nnx.merge(graphdef, p, rest, copy=True), tokens), params
  )
  # Across blocks only their inputs (batch, seq, hidden) are kept: no x·P, no FFN-wide tensor.
  assert (batch, seq, RANK) not in shapes, shapes
  assert (batch, seq, TINY.ffn) not in shapes, shapes
  assert shapes.count((batch, seq, TINY.hidden)) >= TINY.layers
  # In the backward each block reruns its forward, whose residuals are x·P for every
  # RsoLinear (7 per block) and fewer activation bytes than the plain block keeps.
  x = jax.random.normal(jax.random.PRNGKey(6), (batch, seq, TINY.hidden))

  def block_residuals(block):
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    return _residual_shapes(
      lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest, copy=True)(x)), params, x
    )

  rso_block = block_residuals(model.layers[0])
  plain_block = block_residuals(_llama(cfg=dataclasses.replace(TINY, remat=True)).layers[0])
  activation_size = lambda shapes: sum(int(np.prod(s)) for s in shapes if len(s) >= 3)
  assert rso_block.count((batch, seq, RANK)) == 7, rso_block
  assert (batch, seq, RANK) not in plain_block
  assert activation_size(rso_block) < activation_size(plain_block)


@pytest.mark.slow
@pytest.mark.skipif(
  jax.device_count() < 8,
  reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8",
)
def test_sharded_train_loop_matches_one_device_and_keeps_shardings():
  mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
  batches = [_tokens(s) for s in range(5)]
  cfg = ModelConfig(hidden=16, ffn=32, heads=2, layers=2, vocab_size=32, compute_dtype="float32")
  reference = _llama(cfg=cfg)
  osnn.rso_layers(reference, RANK)
  _train_model_level(reference, osnn.rso_optimizer(0.01, inner_steps=2), batches, 2, True)

  model = _llama(cfg=cfg)
  state = nnx.state(model)
  # Every 2-D parameter sharded on its output axis, the rest replicated.
  shardings = jax.tree.map(
    lambda x: NamedSharding(mesh, P(None, "model") if x.ndim == 2 else P()), state
  )
  nnx.update(model, jax.device_put(state, shardings))
  osnn.rso_layers(model, RANK)
  down = model.layers[0].mlp.down_proj
  assert down.rso_b[...].sharding.spec == P(None, "model")
  assert down.rso_basis[...].sharding.spec == P(None, None)
  before = {k: v.sharding for k, v in _flat_arrays(model).items()}
  _train_model_level(model, osnn.rso_optimizer(0.01, inner_steps=2), batches, 2, True)
  after = _flat_arrays(model)
  for name in ("kernel", "rso_b"):
    for key in after:
      if key.endswith(name) and after[key].ndim == 2:
        assert after[key].sharding.is_equivalent_to(before[key], 2), key
  # Sharded reductions sum in another order; Adam passes the rounding on
  # (1e-5 of the 0.05 the weights move in 5 steps at lr 0.01).
  expected = _effective_kernels(reference)
  for path, w in _effective_kernels(model).items():
    np.testing.assert_allclose(w, expected[path], rtol=1e-5, atol=1e-5)


def _flat_arrays(model):
  flat = jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]
  return {"/".join(str(k.key) for k in kp if hasattr(k, "key")): x for kp, x in flat}


# --- the same trajectory as the optimizer level ------------------------------------


def _train_optimizer_level(model, tx, batches):
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, tokens):
    opt.update(model, nnx.grad(_loss)(model, tokens))

  for tokens in batches:
    step(model, opt, tokens)


def _all_weights(model):
  """Every parameter path -> value, with W + P·B in place of each RsoLinear's kernel."""
  out = {}
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Variable) or isinstance(node, osnn.RsoBasis):
      continue
    name = "/".join(map(str, path))
    if name.endswith("rso_b"):
      continue
    value = node[...]
    if isinstance(node, osnn.FrozenKernel):
      layer = model
      for p in path[:-1]:
        layer = layer[p] if isinstance(p, int) else getattr(layer, p)
      value = value + layer.rso_basis[...] @ layer.rso_b[...]
    out[name] = np.asarray(value)
  return out


# Both levels compute the same steps; they differ only in rounding: the model
# level forms ∂L/∂B = (xP)ᵀ∂L/∂y, the optimizer level Pᵀ(xᵀ∂L/∂y). SGD keeps
# that rounding at float32 level; Adam divides by √v + eps and so scales an
# absolute gradient error by up to lr/eps: 2e4 with the default eps 1e-6
# (errors ~1e-5 after 7 steps), 20 with eps 1e-3.
DIRECTIONS = {
  "sgd": (lambda: optax.identity(), 1e-7),
  "adam_eps_1e-3": (lambda: osub.scale_by_hf_adam(eps=1e-3), 1e-7),
  "default_adam": (lambda: None, 3e-5),
}


# Each direction once, and the proximal term on and off: SGD and the default Adam with it,
# Adam with eps 1e-3 without it. (Adam eps 1e-3 with proximal 0.5, a fourth case, passed when it
# was dropped to keep CI's time: its two parts are each checked by another case.)
@pytest.mark.slow
@pytest.mark.parametrize(
  "direction,proximal",
  [("sgd", 2.0), ("adam_eps_1e-3", None), ("default_adam", 0.5)],
)
def test_model_and_optimizer_level_take_the_same_steps(direction, proximal):
  inner_steps, steps, seed = 3, 7, 3  # merges after updates 3 and 6: 3 subproblems
  lr = optax.linear_schedule(0.02, 0.005, steps)
  make_inner, atol = DIRECTIONS[direction]
  batches = [_tokens(s) for s in range(steps)]

  plain = _llama()
  _train_optimizer_level(
    plain,
    osub.rso(
      lr,
      RANK,
      inner_steps,
      proximal,
      inner=make_inner(),
      seed=seed,
      mask=r"(attention|mlp)/.*kernel",
    ),
    batches,
  )

  model = _llama()
  osnn.rso_layers(model, RANK, seed=seed)
  _train_model_level(
    model,
    osnn.rso_optimizer(lr, inner_steps=inner_steps, proximal=proximal, inner=make_inner()),
    batches,
    inner_steps,
    jit=True,
  )
  assert int(model.layers[0].attention.q_proj.rso_subproblem[...]) == 2

  want, got = _all_weights(plain), _all_weights(model)
  assert set(got) == set(want)
  moved = 0.0
  initial = _all_weights(_llama())
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=atol, err_msg=name)
    moved = max(moved, float(np.max(np.abs(want[name] - initial[name]))))
  assert moved > 1e-3  # the comparison is not between untrained models


@pytest.mark.skipif(
  jax.device_count() < 8,
  reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8",
)
def test_partitioning_metadata_carries_over_to_b_and_p_and_through_a_jitted_merge():
  mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))

  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.Linear(
        16,
        32,
        rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model")),
      )

  with jax.set_mesh(mesh):
    model = Mlp(nnx.Rngs(0))
    osnn.rso_layers(model, RANK, mask="up")
    specs = nnx.get_partition_spec(nnx.state(model))["up"]
    assert specs["rso_b"].get_value() == P(None, "model")
    assert specs["rso_basis"].get_value() == P(None, None)
    assert specs["kernel"].get_value() == P(None, "model")
    nnx.jit(osnn.merge_and_redraw)(model)
  assert model.up.kernel[...].sharding.spec == P(None, "model")
  assert model.up.rso_b[...].sharding.spec == P(None, "model")
  assert int(model.up.rso_subproblem[...]) == 1
