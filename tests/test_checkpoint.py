"""Orbax checkpoints: exact resume, any mesh, clear errors, no partial steps.

Two tests start a fresh Python process running this file as a script (see
`_worker` at the bottom): one resumes every preset from a checkpoint, one is
killed in the middle of a save.
"""

import functools
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_subspace as osub

RANK, EVERY, HALF = 4, 2, 3  # refreshes at 0, 2, 4: one in each half
PRESETS = {
  "galore": lambda: osub.galore(0.01, RANK, EVERY, weight_decay=0.1),
  "galore_randomized_svd": lambda: osub.galore(0.01, RANK, EVERY, projector="randomized_svd"),
  "galore_transport": lambda: osub.galore(0.01, RANK, EVERY, on_change="transport"),
  "online_subspace_descent": lambda: osub.online_subspace_descent(0.01, RANK, update_every=EVERY),
  "online_subspace_descent_paper": lambda: osub.online_subspace_descent(
    0.01, RANK, orthogonality_weight=0.1, projector_optimizer=optax.adamw(0.05)
  ),
  "grass_topk": lambda: osub.grass(0.01, RANK, EVERY),
  "grass_multinomial": lambda: osub.grass(0.01, RANK, EVERY, "multinomial", on_change="remap"),
  "rso": lambda: osub.rso(0.01, RANK, EVERY, proximal=1.0, weight_decay=0.1),
  "rso_stored_basis": lambda: osub.rso(0.01, RANK, EVERY, store_basis=True),
  # The residual and scaling outputs: their limiters' previous norms are state too.
  "fira": lambda: osub.fira(0.01, RANK, EVERY),
  "frugal": lambda: osub.frugal(0.01, RANK, EVERY),
  "apollo": lambda: osub.apollo(0.01, RANK, EVERY),
  "apollo_mini": lambda: osub.apollo_mini(0.01, EVERY),
}
NAMES = sorted(PRESETS)
SPECS = {"w1": P("fsdp", None), "w2": P("fsdp", None), "b": P()}
needs_8_devices = pytest.mark.skipif(
  jax.device_count() < 8,
  reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8",
)


def _problem():
  """Two projected matrices, (16, 32) by rows and (32, 8) by columns."""
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(k1, (64, 16))
  y = jnp.tanh(x @ jax.random.normal(k2, (16, 8)))
  params = {
    "w1": 0.3 * jax.random.normal(k3, (16, 32)),
    "w2": 0.3 * jax.random.normal(k4, (32, 8)),
    "b": jnp.zeros(8),
  }
  loss = lambda p: jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] + p["b"] - y) ** 2)
  return params, loss


@functools.lru_cache(maxsize=None)
def _step(name):
  """The jitted training step of a preset (one program per process)."""
  tx = PRESETS[name]()
  _, loss = _problem()

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  return tx, step


def _train(name, steps, params=None, state=None):
  tx, step = _step(name)
  if params is None:
    params, _ = _problem()
    state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def _manager(directory, async_save=True):
  return ocp.CheckpointManager(
    directory,
    options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=async_save),
  )


def _abstract(tx, params, shardings=None):
  """Targets for `restore_checkpoint`: shapes, dtypes and shardings."""
  params = jax.eval_shape(lambda p: p, params)
  state = jax.eval_shape(tx.init, params)
  if shardings is None:
    return params, state
  psh, ssh = shardings
  put = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  return (jax.tree_util.tree_map(put, params, psh), jax.tree_util.tree_map(put, state, ssh))


def _assert_bitwise_equal(got, want):
  got_leaves, got_def = jax.tree_util.tree_flatten(got)
  want_leaves, want_def = jax.tree_util.tree_flatten(want)
  assert got_def == want_def
  for g, w in zip(got_leaves, want_leaves):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _run_worker(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, __file__, *map(str, args)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.slow
def test_resume_in_a_fresh_process_is_bit_exact_for_every_preset(tmp_path):
  expected = {}
  for name in NAMES:
    params, state = _train(name, HALF)
    manager = _manager(tmp_path / name)  # async, Orbax's default
    osub.save_checkpoint(manager, HALF, params, state)
    manager.wait_until_finished()
    expected[name] = _train(name, HALF, params, state)  # 2N uninterrupted
  out = tmp_path / "resumed.npz"
  done = _run_worker("resume", tmp_path, out)
  assert done.returncode == 0, done.stderr[-3000:]
  resumed = np.load(out)
  for name in NAMES:
    leaves = jax.tree_util.tree_leaves(expected[name])
    got = [resumed[f"{name}/{i}"] for i in range(len(leaves))]
    _assert_bitwise_equal(got, [np.asarray(x) for x in leaves])


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_save_and_restore_every_array_of_the_state(tmp_path, async_save):
  tx, _ = _step("online_subspace_descent")
  params, state = _train("online_subspace_descent", 2)
  manager = _manager(tmp_path, async_save)
  assert osub.save_checkpoint(manager, 2, params, state)
  manager.wait_until_finished()
  step, got_params, got_state = osub.restore_checkpoint(_manager(tmp_path), *_abstract(tx, params))
  assert step == 2
  _assert_bitwise_equal((got_params, got_state), (params, state))
  # Projector bases, P's own AdamW state, counts: all came back.
  assert int(got_state[0].count) == 2
  assert got_state[0].projectors["w1"].opt_state


def _auto_mesh(shape, devices):
  names = ("data", "fsdp")[-len(shape) :]
  return jax.make_mesh(shape, names, (AxisType.Auto,) * len(shape), devices=devices)


@needs_8_devices
def test_restores_a_sharded_state_onto_4_devices_and_onto_1(tmp_path):
  name = "online_subspace_descent"
  tx, _ = _step(name)
  params, state = _train(name, 2)
  mesh8 = _auto_mesh((4, 2), jax.devices())
  psh = {n: NamedSharding(mesh8, s) for n, s in SPECS.items()}
  ssh = osub.state_shardings(tx, params, psh)
  params, state = jax.device_put(params, psh), jax.device_put(state, ssh)
  manager = _manager(tmp_path)
  osub.save_checkpoint(manager, 2, params, state)
  manager.wait_until_finished()
  for shape in ((2, 2), (1,)):
    mesh = _auto_mesh(shape, jax.devices()[: np.prod(shape)])
    target_psh = {n: NamedSharding(mesh, s) for n, s in SPECS.items()}
    target_ssh = osub.state_shardings(tx, params, target_psh)
    _, got_params, got_state = osub.restore_checkpoint(
      manager, *_abstract(tx, params, (target_psh, target_ssh))
    )
    _assert_bitwise_equal((got_params, got_state), (params, state))
    for x, s in zip(
      jax.tree_util.tree_leaves((got_params, got_state)),
      jax.tree_util.tree_leaves((target_psh, target_ssh)),
    ):
      assert x.sharding.is_equivalent_to(s, x.ndim)
      assert len(x.sharding.device_set) == np.prod(shape)


@pytest.fixture(scope="module")
def galore_rank_4(tmp_path_factory):
  directory = tmp_path_factory.mktemp("galore_rank_4")
  params, state = _train("galore", 1)
  manager = _manager(directory, async_save=False)
  osub.save_checkpoint(manager, 1, params, state)
  return manager


@pytest.mark.parametrize(
  "tx,match",
  [
    (
      osub.online_subspace_descent(0.01, RANK),
      r"method differs.*checkpoint SvdState\('basis',\), target "
      r"OnlinePcaState\('basis', 'opt_state'\)",
    ),
    (
      osub.galore(0.01, RANK, EVERY, projector="randomized_svd", weight_decay=0.1),
      r"method differs.*checkpoint SvdState.*target RandomizedSvdState",
    ),
    (
      osub.galore(0.01, 2, EVERY, weight_decay=0.1),
      r"rank differs.*'w1': checkpoint 4, target 2; 'w2': checkpoint 4,"
      r" target 2",
    ),
    (
      osub.galore(0.01, RANK, EVERY, weight_decay=0.1, mask="w1"),
      r"projected leaves differ.*checkpoint \['w1', 'w2'\], target \['w1'\]",
    ),
    (osub.galore(0.01, RANK, EVERY), r"optimizer state: only in the checkpoint: '1/count'"),
  ],
  ids=["method", "projector", "rank", "mask", "chain"],
)
def test_a_checkpoint_of_another_optimizer_fails_naming_what_differs(galore_rank_4, tx, match):
  params, _ = _problem()
  with pytest.raises(osub.CheckpointMismatchError, match=match):
    osub.restore_checkpoint(galore_rank_4, *_abstract(tx, params))


def test_a_checkpoint_of_another_parameter_tree_fails_naming_the_leaves(galore_rank_4):
  tx, _ = _step("galore")
  params, _ = _problem()
  params = {"w1": jnp.zeros((16, 64)), "w2": params["w2"], "bias": params["b"]}
  with pytest.raises(osub.CheckpointMismatchError) as error:
    osub.restore_checkpoint(galore_rank_4, *_abstract(tx, params))
  message = str(error.value)
  assert "parameter tree: only in the checkpoint: 'b'" in message
  assert "parameter tree: only in the target: 'bias'" in message
  assert "'w1': checkpoint (16, 32) float32, target (16, 64) float32" in message


def test_a_plain_orbax_checkpoint_restores_with_a_warning(tmp_path):
  tx, _ = _step("galore")
  params, state = _train("galore", 1)
  manager = _manager(tmp_path, async_save=False)
  manager.save(
    1,
    args=ocp.args.Composite(
      params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(state)
    ),
  )
  with pytest.warns(UserWarning, match="restored without checking"):
    _, got_params, got_state = osub.restore_checkpoint(manager, *_abstract(tx, params))
  _assert_bitwise_equal((got_params, got_state), (params, state))


def test_a_save_killed_midway_is_never_the_latest_step(tmp_path):
  done = _run_worker("killed-save", tmp_path)
  assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
  left = sorted(os.listdir(tmp_path))
  assert "1" in left and "2" not in left
  assert any(n.startswith("2.orbax-checkpoint-tmp") for n in left), left
  manager = _manager(tmp_path)
  assert manager.latest_step() == 1 and manager.all_steps() == [1]
  tx, _ = _step("galore")
  step, params, state = osub.restore_checkpoint(manager, *_abstract(tx, _problem()[0]))
  assert step == 1
  _assert_bitwise_equal((params, state), _train("galore", 1))


def _worker(mode, directory, out=None):
  """Runs in a fresh process: `resume` or `killed-save`."""
  directory = pathlib.Path(directory)
  if mode == "resume":
    arrays = {}
    for name in NAMES:
      tx, _ = _step(name)
      _, params, state = osub.restore_checkpoint(
        _manager(directory / name), *_abstract(tx, _problem()[0])
      )
      leaves = jax.tree_util.tree_leaves(_train(name, HALF, params, state))
      arrays.update({f"{name}/{i}": np.asarray(x) for i, x in enumerate(leaves)})
    np.savez(out, **arrays)
    return
  # killed-save: step 1 completes; step 2's data is written, then the
  # process is killed before Orbax commits it (renames its temporary dir).
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top

  async def killed(self):
    del self
    os.kill(os.getpid(), signal.SIGKILL)

  manager = _manager(directory)
  osub.save_checkpoint(manager, 1, *_train("galore", 1))
  manager.wait_until_finished()
  atomicity.AtomicRenameTemporaryPath.finalize = killed
  osub.save_checkpoint(manager, 2, *_train("galore", 2))
  manager.wait_until_finished()


if __name__ == "__main__":
  _worker(*sys.argv[1:])
