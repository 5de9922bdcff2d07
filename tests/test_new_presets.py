"""The Fira, FRUGAL, APOLLO and APOLLO-Mini presets against NumPy re-statements of their papers.

Each preset's whole transformation (`project_subspace` with its residual stage or output mode,
the learning rate, an unprojected bias) runs several steps across a change of subspace on a
wide, a tall and a square matrix, and is compared with a float64 NumPy re-statement of the
paper's algorithm in the paper's own layout (tests/test_new_methods_math.py restates the
per-matrix functions the same way). The reference takes each step's basis P from the
library's projector (the SVD and the random draw are tested in tests/test_projectors.py): what
is checked here is the method around P. Also: state shapes against the analytic formulas,
jit, the state's tree (a None limiter is no child, so older checkpoints restore) and a
checkpoint round trip.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_subspace as osub
from tests.test_new_methods_math import NumpyAdam
from tests.test_new_methods_math import NumpyLimiter

LR, RANK, EVERY, STEPS = 0.01, 3, 3, 7  # subspace changes at steps 0, 3 and 6
# (m, n) of the matrix: rows projected (m ≤ n: the paper's left case, a square too: ties go to
# the rows) or columns (m > n: the right case, R = G·Q).
SHAPES = {"wide": (6, 10), "tall": (10, 6), "square": (8, 8)}
PRESETS = {
  "fira": lambda: osub.fira(LR, RANK, EVERY),
  "frugal": lambda: osub.frugal(LR, RANK, EVERY),
  "frugal_sgd": lambda: osub.frugal(LR, RANK, EVERY, rule="sgd", free_scale=0.1),
  "frugal_random": lambda: osub.frugal(LR, RANK, EVERY, projector="random"),
  "frugal_rows": lambda: osub.frugal(LR, RANK, EVERY, projector="rows"),
  "apollo": lambda: osub.apollo(LR, RANK, EVERY),
  "apollo_mini": lambda: osub.apollo_mini(LR, EVERY),
}


def _gradients(shape, seed=0):
  """Gradients whose norms jump around from step to step, so the limiters act."""
  rng = np.random.default_rng(seed)
  return [
    {"w": rng.standard_normal(shape) * rng.uniform(0.3, 3.0), "b": rng.standard_normal(4)}
    for _ in range(STEPS)
  ]


def _basis(pstate, s, distribution):
  """The P (s, r) a projector state stands for, float64 (dense also for a row selection)."""
  if hasattr(pstate, "basis"):
    return np.asarray(pstate.basis, np.float64)
  if hasattr(pstate, "indices"):
    p = np.zeros((s, pstate.indices.shape[-1]))
    p[np.asarray(pstate.indices), np.arange(p.shape[1])] = np.asarray(pstate.scales)
    return p
  r = pstate.basis_shape[1]
  return np.asarray(
    osub.projectors.random(r, EVERY, distribution=distribution).basis(pstate), np.float64
  )


def _run_library(tx, grads, jit=True, distribution="gaussian"):
  """Each step's updates and the basis P (s, r) that step used."""
  params = jax.tree_util.tree_map(lambda g: jnp.zeros(g.shape, jnp.float32), grads[0])
  state, update = tx.init(params), jax.jit(tx.update) if jit else tx.update
  updates, bases = [], []
  s = min(grads[0]["w"].shape)
  for g in grads:
    u, state = update(
      jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), g), state, params
    )
    updates.append(jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), u))
    bases.append(_basis(state[0].projectors["w"], s, distribution))
  return updates, bases, state


# ---------------------------------------------------------------- NumPy re-statements (float64)


def _split(g, p, left):
  """R and its back-projection P·R in the paper's layout (left: R = PᵀG; right: R = G·P)."""
  r = p.T @ g if left else g @ p
  return r, (p @ r if left else r @ p.T)


def _ratios(n, r, left, tensor=False):
  """‖N_j‖/‖R_j‖ along the columns (left) or the rows (right) of R; one ratio if `tensor`."""
  if tensor:
    return np.linalg.norm(n) / np.linalg.norm(r)
  k = np.linalg.norm(n, axis=0 if left else 1) / np.linalg.norm(r, axis=0 if left else 1)
  return k[None, :] if left else k[:, None]


def fira_reference(grads, bases, alpha=0.25, limiter=None):
  """Fira's Algorithm 1: W ← W − η·α·(P·N + limit((G − P·R)·diag(k))), moments kept."""
  left = grads[0]["w"].shape[0] <= grads[0]["w"].shape[1]
  adam, limiter, out = None, limiter or NumpyLimiter(1.01), []
  for g, p in zip(grads, bases):
    r, back_r = _split(g["w"], p, left)
    adam = adam or NumpyAdam(r.shape)
    n = adam(r)
    back_n = p @ n if left else n @ p.T
    out.append(-LR * alpha * (back_n + limiter((g["w"] - back_r) * _ratios(n, r, left))))
  return out


def frugal_reference(grads, bases, rule="sign_sgd", free_scale=1.0):
  """FRUGAL(Adam, signSGD | SGD): W ← W − η·(P·Adam(R) + λ·u_free); Adam restarts at a change."""
  left = grads[0]["w"].shape[0] <= grads[0]["w"].shape[1]
  out = []
  for t, (g, p) in enumerate(zip(grads, bases)):
    if t % EVERY == 0:
      adam = None
    r, back_r = _split(g["w"], p, left)
    adam = adam or NumpyAdam(r.shape)
    n = adam(r)
    free = g["w"] - back_r
    u_free = np.sign(free) if rule == "sign_sgd" else free
    out.append(-LR * ((p @ n if left else n @ p.T) + free_scale * u_free))
  return out


def apollo_reference(grads, bases, alpha, tensor, limiter=None):
  """APOLLO's Algorithm 1 with Eq. 4's limiter: W ← W − η·α·limit(G·diag(s)) (or s·G)."""
  left = grads[0]["w"].shape[0] <= grads[0]["w"].shape[1]
  adam, limiter, out = None, limiter or NumpyLimiter(1.01), []
  for g, p in zip(grads, bases):
    r, _ = _split(g["w"], p, left)
    adam = adam or NumpyAdam(r.shape)
    out.append(-LR * alpha * limiter(g["w"] * _ratios(adam(r), r, left, tensor)))
  return out


def _uncorrected_steps(grads, bases):
  """Per step, as the released codes read it: (G, P, R, P·R, Adam's direction before bias
  correction M/(√V + ε), its correction c_t = √(1 − β2ᵗ)/(1 − β1ᵗ), left)."""
  left = grads[0]["w"].shape[0] <= grads[0]["w"].shape[1]
  adam = None
  for g, p in zip(grads, bases):
    r, back_r = _split(g["w"], p, left)
    adam = adam or NumpyAdam(r.shape)
    n = adam(r)
    c = math.sqrt(1 - 0.999**adam.t) / (1 - 0.9**adam.t)
    yield g["w"], p, r, back_r, n / c, c, left


def fira_released_order_reference(grads, bases, alpha=0.25):
  """Fira as the authors' released code steps: k and the limiter from Adam's direction before
  bias correction, S = limit((G − α·P·R)·diag(k)), W ← W − η·c_t·(α·P·N + S)."""
  limiter, out = NumpyLimiter(1.01), []
  for g, p, r, back_r, n, c, left in _uncorrected_steps(grads, bases):
    s = limiter((g - alpha * back_r) * _ratios(n, r, left))
    out.append(-LR * c * (alpha * (p @ n if left else n @ p.T) + s))
  return out, limiter


def apollo_released_order_reference(grads, bases, alpha, tensor):
  """APOLLO as the authors' released code orders it: s and the limiter from Adam's direction
  before bias correction, W ← W − η·α·c_t·limit(G·diag(s))."""
  limiter, out = NumpyLimiter(1.01), []
  for g, _, r, _, n, c, left in _uncorrected_steps(grads, bases):
    out.append(-LR * alpha * c * limiter(g * _ratios(n, r, left, tensor)))
  return out, limiter


def bias_reference(grads):
  """The unprojected bias: full-size HF Adam at the learning rate, no α."""
  adam = NumpyAdam(grads[0]["b"].shape)
  return [-LR * adam(g["b"]) for g in grads]


REFERENCES = {
  "fira": fira_reference,
  "frugal": frugal_reference,
  "frugal_sgd": lambda grads, bases: frugal_reference(grads, bases, "sgd", 0.1),
  "frugal_random": frugal_reference,
  "frugal_rows": frugal_reference,
  "apollo": lambda grads, bases: apollo_reference(grads, bases, 1.0, False),
  "apollo_mini": lambda grads, bases: apollo_reference(grads, bases, np.sqrt(128), True),
}


def _assert_steps_close(ours, reference):
  for t, (a, b) in enumerate(zip(ours, reference)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max(), err_msg=f"step {t}")


# ------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_matches_its_papers_algorithm_over_steps_and_subspace_changes(name, shape):
  grads = _gradients(shape)
  updates, bases, _ = _run_library(
    PRESETS[name](), grads, distribution="haar" if name == "frugal_random" else "gaussian"
  )
  _assert_steps_close([u["w"] for u in updates], REFERENCES[name](grads, bases))
  _assert_steps_close([u["b"] for u in updates], bias_reference(grads))


@pytest.mark.parametrize("name", ["fira", "apollo"])
def test_the_limiter_acts_in_these_runs(name):
  # Otherwise the comparisons above would not test it.
  grads = _gradients(SHAPES["wide"])
  _, bases, _ = _run_library(PRESETS[name](), grads)
  limiter = NumpyLimiter(1.01)
  if name == "fira":
    fira_reference(grads, bases, limiter=limiter)
  else:
    apollo_reference(grads, bases, 1.0, False, limiter=limiter)
  assert limiter.limited > 0


@pytest.mark.parametrize("name", ["fira", "apollo"])
def test_gamma_inf_is_the_update_without_the_limiter(name):
  grads = _gradients(SHAPES["wide"])
  preset = {
    "fira": osub.fira(LR, RANK, EVERY, gamma=math.inf),
    "apollo": osub.apollo(LR, RANK, EVERY, gamma=math.inf),
  }
  updates, bases, _ = _run_library(preset[name], grads)
  limiter = NumpyLimiter(math.inf)
  if name == "fira":
    reference = fira_reference(grads, bases, limiter=limiter)
  else:
    reference = apollo_reference(grads, bases, 1.0, False, limiter=limiter)
  assert limiter.limited == 0
  _assert_steps_close([u["w"] for u in updates], reference)


@pytest.mark.parametrize("mini", [False, True], ids=["apollo", "apollo_mini"])
@pytest.mark.parametrize("shape", [SHAPES["wide"], SHAPES["tall"]], ids=["wide", "tall"])
def test_apollo_can_limit_before_the_bias_correction_as_its_released_code(shape, mini):
  grads = _gradients(shape)
  if mini:
    tx = osub.apollo_mini(LR, EVERY, released_order=True)
  else:
    tx = osub.apollo(LR, RANK, EVERY, released_order=True)
  updates, bases, _ = _run_library(tx, grads)
  alpha = np.sqrt(128) if mini else 1.0
  reference, limiter = apollo_released_order_reference(grads, bases, alpha, mini)
  assert limiter.limited > 0
  _assert_steps_close([u["w"] for u in updates], reference)
  default, _, _ = _run_library(
    osub.apollo_mini(LR, EVERY) if mini else osub.apollo(LR, RANK, EVERY), grads
  )
  # The order matters on these gradients (their norms jump, so both limiters act).
  assert not all(np.allclose(a["w"], b["w"]) for a, b in zip(updates, default))


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_fira_can_step_as_its_released_code(shape):
  grads = _gradients(shape)
  updates, bases, _ = _run_library(osub.fira(LR, RANK, EVERY, released_order=True), grads)
  reference, limiter = fira_released_order_reference(grads, bases)
  assert limiter.limited > 0
  _assert_steps_close([u["w"] for u in updates], reference)
  default, _, _ = _run_library(PRESETS["fira"](), grads)
  assert not all(np.allclose(a["w"], b["w"]) for a, b in zip(updates, default))


def test_released_order_is_only_for_a_scale_output_or_fira():
  with pytest.raises(ValueError, match="scale"):  # Fira's released order divides by it
    osub.fira(LR, RANK, EVERY, 0.0, released_order=True)
  with pytest.raises(ValueError, match="released_order"):
    osub.project_subspace(optax.adam(1.0), osub.projectors.svd(2, 5), released_order=(0.9, 0.999))
  with pytest.raises(ValueError, match="released_order"):
    osub.project_subspace(
      optax.adam(1.0), osub.projectors.svd(2, 5), output="scale", released_order=(0.9, 1.0)
    )
  with pytest.raises(ValueError, match="released_order"):  # log(0): no bias correction to undo
    osub.apollo(LR, RANK, EVERY, b1=0.0, released_order=True)


@pytest.mark.parametrize("name", ["fira", "frugal", "apollo", "apollo_mini"])
def test_jit_and_no_jit_give_the_same_updates(name):
  grads = _gradients(SHAPES["tall"], seed=3)[:4]
  a, _, _ = _run_library(PRESETS[name](), grads, jit=True)
  b, _, _ = _run_library(PRESETS[name](), grads, jit=False)
  for x, y in zip(a, b):
    np.testing.assert_allclose(x["w"], y["w"], rtol=1e-5, atol=1e-7)


def _floats(tree):
  """(total floating-point elements, the largest floating-point leaf's size)."""
  sizes = [x.size for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
  return sum(sizes), max(sizes)


@pytest.mark.parametrize("s,l", [(16, 48), (48, 16), (24, 24)])
@pytest.mark.parametrize(
  "name,r,formula",
  [
    ("fira", 4, lambda s, l, r: s * r + 2 * r * l + 1),  # P, Adam's moments of R, ‖S_{t−1}‖
    ("frugal", 4, lambda s, l, r: s * r + 2 * r * l),  # P and Adam's moments; U has none
    # P regenerated from a key and its QR factor M (r × r; s ≥ 2r here)
    ("frugal_random", 4, lambda s, l, r: r * r + 2 * r * l),
    ("apollo", 4, lambda s, l, r: 2 * r * l + 1),  # Adam's moments of R and one norm
    ("apollo_mini", 1, lambda s, l, r: 2 * l + 1),  # rank 1: O(s + l), no s×l buffer
  ],
)
def test_state_floats_follow_the_analytic_formulas(name, r, formula, s, l):
  small, large = min(s, l), max(s, l)
  factory = {
    "fira": lambda: osub.fira(LR, r),
    "frugal": lambda: osub.frugal(LR, r),
    "frugal_random": lambda: osub.frugal(LR, r, projector="random"),
    "apollo": lambda: osub.apollo(LR, r),
    "apollo_mini": lambda: osub.apollo_mini(LR),
  }[name]
  state = jax.eval_shape(factory().init, {"w": jax.ShapeDtypeStruct((s, l), jnp.float32)})
  total, largest = _floats(state)
  assert total == formula(small, large, r)
  assert largest < s * l


def test_apollo_mini_state_on_a_llama_1b_tree_is_under_one_percent_of_adamw():
  # LLaMA-1B's projected matrices (hidden 2048, MLP 5461, 24 layers), abstract: nothing is
  # allocated. AdamW keeps 2 floats per weight.
  layer = {
    "q": (2048, 2048),
    "k": (2048, 2048),
    "v": (2048, 2048),
    "o": (2048, 2048),
    "gate": (2048, 5461),
    "up": (2048, 5461),
    "down": (5461, 2048),
  }
  params = {
    f"{i}/{n}": jax.ShapeDtypeStruct(shape, jnp.float32)
    for i in range(24)
    for n, shape in layer.items()
  }
  adamw = 2 * sum(x.size for x in params.values())
  mini = _floats(jax.eval_shape(osub.apollo_mini(LR).init, params))[0]
  apollo = _floats(jax.eval_shape(osub.apollo(LR, 512).init, params))[0]
  fira = _floats(jax.eval_shape(osub.fira(LR, 512).init, params))[0]
  galore = _floats(jax.eval_shape(osub.galore(LR, 512).init, params))[0]
  assert mini <= 0.01 * adamw
  assert apollo <= galore
  assert fira == galore + 24 * 7  # one limiter norm per matrix


def test_a_state_without_a_limiter_flattens_to_the_five_fields_of_older_checkpoints():
  params = {"w": jnp.zeros((6, 10))}
  keys = lambda tx: {
    jax.tree_util.keystr(p[:2]) for p, _ in jax.tree_util.tree_flatten_with_path(tx.init(params))[0]
  }
  assert not any("limiter" in k for k in keys(osub.galore(LR, RANK)))
  assert not any("limiter" in k for k in keys(osub.frugal(LR, RANK)))
  assert any("limiter" in k for k in keys(osub.fira(LR, RANK)))
  assert any("limiter" in k for k in keys(osub.apollo(LR, RANK)))


@pytest.mark.parametrize("name", ["fira", "frugal", "apollo", "apollo_mini"])
def test_checkpoint_round_trip_resumes_bit_exact(name, tmp_path):
  grads = _gradients(SHAPES["wide"], seed=5)
  tx = PRESETS[name]()
  params = {"w": jnp.zeros((6, 10), jnp.float32), "b": jnp.zeros(4, jnp.float32)}
  as32 = lambda g: jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), g)
  update = jax.jit(tx.update)
  state = tx.init(params)
  for g in grads[:4]:
    _, state = update(as32(g), state, params)
  manager = ocp.CheckpointManager(tmp_path)
  osub.save_checkpoint(manager, 4, params, state)
  manager.wait_until_finished()
  target = jax.eval_shape(tx.init, params)
  _, _, restored = osub.restore_checkpoint(manager, params, target)
  for g in grads[4:]:
    want, state = update(as32(g), state, params)
    got, restored = update(as32(g), restored, params)
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(want["w"]))


def test_residual_and_output_options_are_checked():
  with pytest.raises(ValueError, match="residual"):
    osub.project_subspace(optax.adam(1.0), osub.projectors.svd(2), residual="fira2")
  with pytest.raises(ValueError, match="output"):
    osub.project_subspace(optax.adam(1.0), osub.projectors.svd(2), output="scaled")
  with pytest.raises(ValueError, match="back_project"):
    osub.project_subspace(optax.adam(1.0), osub.projectors.svd(2), residual="sgd", output="scale")
  stateful = osub.project_subspace(
    optax.adam(1.0), osub.projectors.svd(2), residual=optax.adam(1.0)
  )
  with pytest.raises(ValueError, match="state-free"):
    stateful.init({"w": jnp.zeros((4, 6))})


def test_a_state_free_optax_residual_is_frugals_rule():
  # optax.scale_by_sign() on G − P·R is FRUGAL's signSGD rule.
  g = {"w": jnp.asarray(np.random.default_rng(2).standard_normal((6, 10)), jnp.float32)}
  named = osub.project_subspace(
    osub.scale_by_hf_adam(),
    osub.projectors.svd(RANK, EVERY),
    residual="sign_sgd",
    residual_scale=0.5,
  )
  given = osub.project_subspace(
    osub.scale_by_hf_adam(),
    osub.projectors.svd(RANK, EVERY),
    residual=optax.scale_by_sign(),
    residual_scale=0.5,
  )
  a = named.update(g, named.init(g), g)[0]
  b = given.update(g, given.init(g), g)[0]
  np.testing.assert_array_equal(np.asarray(a["w"]), np.asarray(b["w"]))


@pytest.mark.parametrize(
  "stages",
  [
    dict(residual="fira"),
    dict(residual="sign_sgd"),
    dict(output="scale"),
    dict(output="scale_tensor"),
  ],
  ids=["fira", "sign_sgd", "scale", "scale_tensor"],
)
def test_a_batch_of_matrices_is_stepped_matrix_by_matrix_with_its_own_limiter(stages):
  # A (2, 6, 10) leaf (dims: a batch of two matrices) gives each matrix the update it gets on
  # its own: the residual, the factors and the limiter's norm are per matrix.
  rng = np.random.default_rng(4)
  grads = [rng.standard_normal((2, 6, 10)) * rng.uniform(0.3, 3.0, (2, 1, 1)) for _ in range(4)]
  make = lambda dims: osub.project_subspace(
    osub.scale_by_hf_adam(), osub.projectors.svd(RANK, 2), dims=dims, **stages
  )
  batched = make(lambda path, x: osub.MatrixDims(1, 2) if x.ndim == 3 else None)
  single = make(None)
  b_state = batched.init({"w": jnp.zeros((2, 6, 10))})
  s_state = single.init({"a": jnp.zeros((6, 10)), "b": jnp.zeros((6, 10))})
  for g in grads:
    g = jnp.asarray(g, jnp.float32)
    u, b_state = batched.update({"w": g}, b_state)
    v, s_state = single.update({"a": g[0], "b": g[1]}, s_state)
    np.testing.assert_allclose(np.asarray(u["w"]), np.stack([v["a"], v["b"]]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("granularity", ["column", "matrix"])
def test_firas_term_folded_into_n_is_the_explicit_residual_for_an_orthonormal_p(granularity):
  # c·G·D + P·(N − c·R·D) = P·N + limit((G − P·R)·D): one product with P instead of two.
  from optax_subspace import _fira  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(6)
  g = jnp.asarray(rng.standard_normal((8, 12)), jnp.float32)
  p = jnp.asarray(np.linalg.qr(rng.standard_normal((8, 3)))[0], jnp.float32)
  r = p.T @ g
  n = jnp.asarray(rng.standard_normal((3, 12)), jnp.float32)
  state = _fira.NormGrowthState(jnp.asarray(0.5, jnp.float32))  # the limiter acts
  s, explicit = _fira.fira_residual(g, p @ r, r, n, state, granularity=granularity)
  term, n_fused, fused = _fira.fused_fira_terms(g, r, n, state, granularity=granularity)
  np.testing.assert_allclose(term + p @ n_fused, p @ n + s, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(fused.previous_norm, explicit.previous_norm, rtol=1e-5)


@pytest.mark.parametrize("mini", [False, True], ids=["apollo", "apollo_mini"])
def test_apollo_with_a_stored_basis_takes_the_same_steps(mini):
  # P kept in the state (no draw per step) is the P drawn from the key: same
  # updates through a fresh projection at step EVERY; the state holds P.
  make = (
    (lambda **kw: osub.apollo_mini(LR, EVERY, **kw))
    if mini
    else (lambda **kw: osub.apollo(LR, RANK, EVERY, **kw))
  )
  grads = _gradients(SHAPES["tall"], seed=5)[: EVERY + 2]
  params = jax.tree_util.tree_map(lambda g: jnp.zeros(g.shape, jnp.float32), grads[0])

  def run(tx):
    state, out = tx.init(params), []
    for g in grads:
      u, state = jax.jit(tx.update)(jax.tree_util.tree_map(jnp.asarray, g), state, params)
      out.append(np.asarray(u["w"]))
    return out, state

  stored, state = run(make(store_basis=True))
  drawn, _ = run(make())
  for a, b in zip(stored, drawn):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  s = min(grads[0]["w"].shape)
  extra = (
    _floats(jax.eval_shape(make(store_basis=True).init, params))[0]
    - _floats(jax.eval_shape(make().init, params))[0]
  )
  assert extra == s * (1 if mini else RANK)
