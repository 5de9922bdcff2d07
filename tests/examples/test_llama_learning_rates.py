"""The example's --lr-unprojected: the kernels keep --lr, every other leaf takes its own peak."""

import math
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the examples are run from the repository root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from examples.llama import optimizers  # noqa: E402
from examples.llama.config import ConfigError, TrainConfig  # noqa: E402

PARAMS = {
  "layers": {"0": {"attention": {"q_proj": {"kernel": jnp.ones((64, 64))}}}},
  "embed": {"embedding": jnp.ones((32, 64))},
  "norm": {"scale": jnp.ones((64,))},
}


def _first_updates(cfg, moving=False):
  """The third update of `cfg`'s method; `moving`: the gradient's phase moves at every step
  (so a row selection changes), else the same gradient each step."""
  tx = optimizers.method(cfg)
  state = tx.init(PARAMS)
  for t in range(3):  # past the first warm-up step, whose rate is 0
    phase = 1.7 * t if moving else 0.0
    grads = jax.tree.map(
      lambda x: jnp.sin(jnp.arange(x.size, dtype=jnp.float32) + phase).reshape(x.shape), PARAMS
    )
    updates, state = tx.update(grads, state, PARAMS)
  return updates


# The fast subset (-m "not slow"): AdamW (no projection) and GaLore; the other methods are slow.
@pytest.mark.parametrize(
  "optimizer",
  ["adamw", "galore", *(pytest.param(o, marks=pytest.mark.slow) for o in ("grass", "rso", "osd"))],
)
def test_lr_unprojected_moves_the_rest_and_leaves_the_kernels(optimizer):
  base = dict(model_size="tiny", optimizer=optimizer, steps=20, rank=16, update_every=2)
  split = _first_updates(TrainConfig(**base, lr=1e-3, lr_unprojected=4e-3))
  low = _first_updates(TrainConfig(**base, lr=1e-3))
  high = _first_updates(TrainConfig(**base, lr=4e-3))
  kernel = lambda u: u["layers"]["0"]["attention"]["q_proj"]["kernel"]
  np.testing.assert_allclose(kernel(split), kernel(low), rtol=1e-6)
  for leaf in (lambda u: u["embed"]["embedding"], lambda u: u["norm"]["scale"]):
    np.testing.assert_allclose(leaf(split), leaf(high), rtol=1e-6)
    assert not np.allclose(leaf(split), leaf(low))


@pytest.mark.parametrize(
  "flags, message",
  [
    ({"lr_unprojected": -1e-3}, "--lr-unprojected"),
    ({"lr": -1.0}, "--lr"),
    ({"grass_selection": "best"}, "--grass-selection"),
    ({"grass_on_change": "keep"}, "--grass-on-change"),
    ({"rso_distribution": "sobol"}, "--rso-distribution"),
    ({"rso_proximal": -1.0}, "--rso-proximal"),
    (
      {"optimizer": "galore", "rso_proximal": 1.0},
      "--rso-proximal is an option of --optimizer rso",
    ),
    ({"optimizer": "rso", "grass_on_change": "remap"}, "an option of --optimizer grass"),
    ({"optimizer": "galore", "galore_warm_iterations": -1}, "--galore-warm-iterations"),
    ({"optimizer": "osd", "galore_warm_iterations": 2}, "an option of --optimizer galore"),
    ({"optimizer": "galore", "galore_warm_oversample": -1}, "--galore-warm-oversample"),
    ({"optimizer": "galore", "galore_warm_oversample": 4}, "needs --galore-warm-iterations"),
    ({"optimizer": "galore", "projection_dtype": "float16"}, "--projection-dtype"),
    ({"optimizer": "adamw", "projection_dtype": "bfloat16"}, "--projection-dtype is an option"),
  ],
)
def test_bad_learning_rate_flags_are_one_line_errors(flags, message):
  with pytest.raises(ConfigError, match=message):
    TrainConfig(**flags).validate()


def test_apollo_limiter_flags_reach_the_preset():
  # --released-order: the released code's order, whose limiter (on Adam's growing
  # uncorrected direction) acts in these first steps; without the limiter both orders give the
  # same update. The leaves APOLLO does not project are not touched by either flag.
  base = dict(model_size="tiny", optimizer="apollo", steps=20, rank=16, update_every=2)
  default = _first_updates(TrainConfig(**base))
  released = _first_updates(TrainConfig(**base, released_order=True))
  unlimited = _first_updates(TrainConfig(**base, released_order=True, limiter_gamma=math.inf))
  kernel = lambda u: u["layers"]["0"]["attention"]["q_proj"]["kernel"]
  assert not np.allclose(kernel(released), kernel(default))
  np.testing.assert_allclose(kernel(unlimited), kernel(default), rtol=1e-5)
  for u in (released, unlimited):
    np.testing.assert_array_equal(u["embed"]["embedding"], default["embed"]["embedding"])


def test_fira_released_order_flag_reaches_the_preset():
  base = dict(model_size="tiny", optimizer="fira", steps=20, rank=16, update_every=2)
  default = _first_updates(TrainConfig(**base))
  released = _first_updates(TrainConfig(**base, released_order=True))
  kernel = lambda u: u["layers"]["0"]["attention"]["q_proj"]["kernel"]
  assert not np.allclose(kernel(released), kernel(default))
  np.testing.assert_array_equal(released["embed"]["embedding"], default["embed"]["embedding"])


@pytest.mark.parametrize(
  "optimizer, update_every, flags",
  [
    ("rso", 20, {"rso_proximal": 0.1}),  # B ≠ 0 from the second step, where B/η acts
    ("rso", 20, {"rso_distribution": "gaussian"}),
    # Rows selected again at step 2 keep their moments (the gradient moves, so some change).
    ("grass", 2, {"grass_on_change": "remap"}),
    # Step 2's refresh: two rounds of subspace iteration from step 0's basis, not the eigh.
    ("galore", 2, {"galore_warm_iterations": 2}),
    ("galore", 2, {"galore_warm_iterations": 2, "galore_warm_oversample": 4}),
    # bf16 operands of the products with G round them: another update.
    ("galore", 2, {"projection_dtype": "bfloat16"}),
    ("osd", 2, {"projection_dtype": "bfloat16"}),
  ],
)
def test_method_choice_flags_reach_the_preset(optimizer, update_every, flags):
  base = dict(model_size="tiny", optimizer=optimizer, steps=20, rank=16, update_every=update_every)
  default = _first_updates(TrainConfig(**base), moving=True)
  chosen = _first_updates(TrainConfig(**base, **flags), moving=True)
  kernel = lambda u: u["layers"]["0"]["attention"]["q_proj"]["kernel"]
  assert not np.allclose(kernel(chosen), kernel(default))
  np.testing.assert_array_equal(chosen["embed"]["embedding"], default["embed"]["embedding"])
