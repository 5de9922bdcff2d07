"""`unprojected_learning_rate`: the leaves a preset does not project get their own learning rate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_subspace as osub
from optax_subspace import nn as osnn

MASK = r"kernel"
PRESETS = {
  "galore": lambda lr, **kw: osub.galore(lr, rank=2, update_every=3, mask=MASK, **kw),
  "osd": lambda lr, **kw: osub.online_subspace_descent(lr, rank=2, mask=MASK, **kw),
  "grass": lambda lr, **kw: osub.grass(lr, rank=2, update_every=3, mask=MASK, **kw),
  "rso": lambda lr, **kw: osub.rso(lr, rank=2, inner_steps=3, mask=MASK, **kw),
}


def _params_and_grads():
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(3), 4)
  params = {
    "kernel": jax.random.normal(k1, (6, 8)),
    "embedding": jax.random.normal(k2, (5, 4)),
    "scale": jnp.ones((4,)),
  }
  grads = [
    {
      "kernel": jax.random.normal(k, (6, 8)),
      "embedding": jax.random.normal(k, (5, 4)),
      "scale": jax.random.normal(k, (4,)),
    }
    for k in (k3, k4, k3, k4)
  ]
  return params, grads


def _updates(tx, params, grads):
  state, out = tx.init(params), []
  for g in grads:
    u, state = tx.update(g, state, params)
    out.append(u)
  return out


# The fast subset (-m "not slow"): GaLore with weight decay, GRASS without.
@pytest.mark.parametrize(
  "name,weight_decay",
  [
    pytest.param(
      n, wd, marks=[] if (n, wd) in {("galore", 0.1), ("grass", 0.0)} else [pytest.mark.slow]
    )
    for wd in (0.0, 0.1)
    for n in sorted(PRESETS)
  ],
)
def test_unprojected_leaves_follow_their_own_rate_and_kernels_keep_theirs(name, weight_decay):
  make = PRESETS[name]
  params, grads = _params_and_grads()
  split = _updates(
    make(1e-2, unprojected_learning_rate=3e-2, weight_decay=weight_decay), params, grads
  )
  kernels_rate = _updates(make(1e-2, weight_decay=weight_decay), params, grads)
  rest_rate = _updates(make(3e-2, weight_decay=weight_decay), params, grads)
  for mine, low, high in zip(split, kernels_rate, rest_rate):
    np.testing.assert_allclose(mine["kernel"], low["kernel"], rtol=1e-6, atol=1e-9)
    for leaf in ("embedding", "scale"):
      np.testing.assert_allclose(mine[leaf], high[leaf], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_no_unprojected_rate_is_the_single_rate(name):
  params, grads = _params_and_grads()
  same = _updates(PRESETS[name](1e-2, unprojected_learning_rate=1e-2), params, grads)
  single = _updates(PRESETS[name](1e-2), params, grads)
  for a, b in zip(same, single):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9), a, b)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("bad", [0.0, -1e-3])
def test_a_rate_that_is_not_positive_is_rejected(name, bad):
  with pytest.raises(ValueError, match="unprojected_learning_rate must be positive"):
    PRESETS[name](1e-2, unprojected_learning_rate=bad)


MODEL_LEVEL = {
  "grass_optimizer": lambda lr, **kw: osnn.grass_optimizer(lr, **kw),
  "rso_optimizer": lambda lr, **kw: osnn.rso_optimizer(lr, inner_steps=2, **kw),
}


@pytest.mark.parametrize("name", sorted(PRESETS) + sorted(MODEL_LEVEL))
@pytest.mark.parametrize("rates", ["learning_rate", "unprojected_learning_rate"])
def test_every_optimizer_rejects_a_rate_that_is_not_positive_or_not_a_number(name, rates):
  make = {**PRESETS, **MODEL_LEVEL}[name]
  build = (
    (lambda lr: make(lr))
    if rates == "learning_rate"
    else (lambda lr: make(1e-2, unprojected_learning_rate=lr))
  )
  for bad in (0.0, -1e-3):
    with pytest.raises(ValueError, match=f"^{rates} must be positive"):
      build(bad)
  with pytest.raises(TypeError, match=f"^{rates} must be None, a float or an optax schedule"):
    build("1e-3")


@pytest.mark.parametrize(
  "factor, make",
  [
    ("grass_d", lambda lr, **kw: osnn.grass_optimizer(lr, **kw)),
    ("rso_b", lambda lr, **kw: osnn.rso_optimizer(lr, inner_steps=2, **kw)),
  ],
)
def test_model_level_optimizers_give_the_dense_params_their_own_rate(factor, make):
  # The factors (GRASS's D, RSO's B) keep `learning_rate`; every other Param takes the other.
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(5), 3)
  params = {
    "q_proj": {factor: jax.random.normal(k1, (6, 2))},
    "embed": {"embedding": jax.random.normal(k2, (5, 4))},
  }
  grads = [jax.tree.map(lambda x, i=i: jnp.cos(x + i), params) for i in range(3)]
  split = _updates(make(1e-2, unprojected_learning_rate=3e-2), params, grads)
  low = _updates(make(1e-2), params, grads)
  high = _updates(make(3e-2), params, grads)
  for mine, a, b in zip(split, low, high):
    np.testing.assert_allclose(mine["q_proj"][factor], a["q_proj"][factor], rtol=1e-6)
    np.testing.assert_allclose(mine["embed"]["embedding"], b["embed"]["embedding"], rtol=1e-6)


@pytest.mark.parametrize("bad", [0.0, -1.0, "1e-2"])
def test_osd_rejects_a_peak_learning_rate_that_is_not_positive(bad):
  # P's learning rate is lr / (peak · T): a zero peak was a ZeroDivisionError.
  with pytest.raises(ValueError, match="^peak_learning_rate must be a number > 0"):
    PRESETS["osd"](1e-2, peak_learning_rate=bad)
