"""`galore` and `online_subspace_descent` against a NumPy restatement of the authors' update.

The reference is written from docs/methods.md in the authors' PyTorch layout (a
weight is (out, in) = m×n; "left" P is m×r when m < n, else "right" P is
r×n, so a square weight projects its input side), in float64, independently
of the library's oriented code. Our parameters are Flax kernels (in, out),
the transpose.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_subspace as osub

LR, SCALE, B1, B2, EPS = 1e-2, 0.25, 0.9, 0.999, 1e-6


def _canonical_rows(p):
  """Sign of each row vector so that its largest-magnitude entry is positive."""
  idx = np.argmax(np.abs(p), axis=1)
  return p * np.sign(p[np.arange(p.shape[0]), idx])[:, None]


def _svd_basis(g, r):
  """The authors' get_orthogonal_matrix, with docs/methods.md's sign rule."""
  u, _, vh = np.linalg.svd(g, full_matrices=False)
  m, n = g.shape
  if m >= n:  # right: P is r×n
    return _canonical_rows(vh[:r])
  return _canonical_rows(u[:, :r].T).T  # left: P is m×r


def _project(p, g):
  m, n = g.shape
  return g @ p.T if m >= n else p.T @ g


def _back(p, n_low, shape):
  m, n = shape
  return n_low @ p if m >= n else p @ n_low


def _osd_grad(p, g):
  """docs/methods.md's closed forms of ∇‖PPᵀG̃ − G̃‖² (λ = 0, as the code)."""
  gn = g / np.linalg.norm(g)
  m, n = g.shape
  if m >= n:  # right, P r×n, B = G̃Pᵀ
    b = gn @ p.T
    return 2 * (b.T @ b @ p + p @ p.T @ b.T @ gn - 2 * b.T @ gn)
  a = gn.T @ p  # left, P m×r, A = G̃ᵀP
  return 2 * (p @ (a.T @ a) + gn @ a @ (p.T @ p) - 2 * gn @ a)


def _reference(grads_torch, r, method, gap):
  """Weights' updates (torch layout) from the authors' update rule."""
  shape = grads_torch[0].shape
  mu = nu = p = None
  p_m = p_v = None  # torch AdamW state of P
  updates = []
  osd = method.startswith("osd")

  def step_p(p, p_m, p_v, g, k):
    # torch AdamW on P: lr 1/T (constant W lr), wd 0.01 applied first,
    # eps 1e-8 after bias correction; its own step count k starts at 1.
    grad = _osd_grad(p, g)
    p_lr = 1.0 / gap
    p = p * (1 - p_lr * 0.01)
    p_m = 0.9 * p_m + 0.1 * grad
    p_v = 0.999 * p_v + 0.001 * grad**2
    m_hat = p_m / (1 - 0.9**k)
    v_hat = p_v / (1 - 0.999**k)
    return p - p_lr * m_hat / (np.sqrt(v_hat) + 1e-8), p_m, p_v

  for t, g in enumerate(grads_torch):
    if method == "galore" and t % gap == 0 or osd and t == 0:
      p = _svd_basis(g, r)
      p_m, p_v = np.zeros_like(p), np.zeros_like(p)
    elif method == "osd_code":  # the stored authors' code: P steps first
      p, p_m, p_v = step_p(p, p_m, p_v, g, t)
    low = _project(p, g)
    if mu is None:
      mu, nu = np.zeros_like(low), np.zeros_like(low)
    mu = B1 * mu + (1 - B1) * low
    nu = B2 * nu + (1 - B2) * low**2
    step = LR * np.sqrt(1 - B2 ** (t + 1)) / (1 - B1 ** (t + 1))
    n_low = mu / (np.sqrt(nu) + EPS)
    updates.append(-step * SCALE * _back(p, n_low, shape))
    if method == "osd" and t > 0:  # docs/methods.md: W with P_t, then P_{t+1}
      p, p_m, p_v = step_p(p, p_m, p_v, g, t)
  return updates


@pytest.mark.parametrize("method", ["galore", "osd", "osd_code"])
@pytest.mark.parametrize(
  "flax_shape", [(12, 20), (20, 12), (16, 16)], ids=["in<out", "in>out", "square"]
)
# Eager (op by op) costs several times the jitted run; the fast subset runs the jitted cases,
# and tests/test_conformance.py's test_jit_and_no_jit_agree ties eager to jitted for galore and
# online_subspace_descent.
@pytest.mark.parametrize("jit", [pytest.param(False, marks=pytest.mark.slow), True])
def test_matches_the_authors_update(method, flax_shape, jit):
  # GaLore refreshes at steps 0, 3, 6; OSD's P moves with lr 1/gap = 0.1.
  r, steps = 4, 7
  gap = 3 if method == "galore" else 10
  keys = jax.random.split(jax.random.PRNGKey(0), steps)
  # Low-rank-ish gradients, as real ones are: distinct singular values keep
  # the top-r subspace well defined.
  base = jax.random.normal(jax.random.PRNGKey(1), flax_shape)
  grads = [base + 0.3 * jax.random.normal(k, flax_shape) for k in keys]
  if method == "galore":
    tx = osub.galore(LR, rank=r, update_every=gap, scale=SCALE)
  else:
    tx = osub.online_subspace_descent(
      LR, rank=r, scale=SCALE, update_every=gap, step_before_projection=method == "osd_code"
    )
  params = {"kernel": jnp.zeros(flax_shape)}
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  ours = []
  for g in grads:
    u, state = update({"kernel": g}, state, params)
    ours.append(np.asarray(u["kernel"]))
  ref = _reference([np.asarray(g, np.float64).T for g in grads], r, method, gap)
  for t, (a, b) in enumerate(zip(ours, ref)):
    # Relative to the update's norm: float32 against float64.
    err = np.linalg.norm(a - b.T) / np.linalg.norm(b)
    assert err < 1e-5, f"step {t}: relative error {err:.2e}"


def test_weight_decay_is_applied_to_the_updated_weights():
  # W ← (W − lr·α·P N)(1 − lr·wd): HF AdamW decays after the Adam step.
  w = jax.random.normal(jax.random.PRNGKey(2), (6, 10))
  g = jax.random.normal(jax.random.PRNGKey(3), (6, 10))
  wd = 0.1
  plain = osub.galore(LR, rank=2, update_every=5)
  decayed = osub.galore(LR, rank=2, update_every=5, weight_decay=wd)
  u0, _ = plain.update({"w": g}, plain.init({"w": w}), {"w": w})
  u1, _ = decayed.update({"w": g}, decayed.init({"w": w}), {"w": w})
  expected = (w + u0["w"]) * (1 - LR * wd)
  np.testing.assert_allclose(np.asarray(w + u1["w"]), np.asarray(expected), rtol=1e-6)


def test_hf_adam_differs_from_optax_adam_only_by_eps_placement():
  g = {"w": jax.random.normal(jax.random.PRNGKey(4), (5,)) * 1e-4}
  hf = osub.scale_by_hf_adam(eps=1e-6)
  u_hf, _ = hf.update(g, hf.init(g))
  # eps/√(1−β2) after bias correction is the same thing at step 1.
  ox = optax.scale_by_adam(eps=1e-6 / np.sqrt(1 - 0.999))
  u_ox, _ = ox.update(g, ox.init(g))
  np.testing.assert_allclose(np.asarray(u_hf["w"]), np.asarray(u_ox["w"]), rtol=1e-5)
