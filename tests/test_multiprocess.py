"""The library across processes: 2 JAX processes × 4 CPU devices, one mesh over both.

One program (`_worker`, this file run as a script) runs in both processes (`_multiprocess`):
five presets of tests/test_sharding.py (`NAMES`) for its STEPS steps on a ("fsdp",) mesh of the 8
devices of both processes, with the state placed by `state_shardings`; each saves its state
from both processes (Orbax), restores it onto a (4, 2) mesh, and restores checkpoints this
(one) process wrote. The test compares what the processes wrote with one-process runs:
updates and states with the sharding tests' tolerances, selections and keys bit for bit
between the processes, checkpoints bit for bit in both directions.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import traceback

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import _multiprocess
import optax_subspace as osub

if __name__ == "__main__":  # a process of the job: join it before anything asks for devices
  _multiprocess.initialize(*sys.argv[1:4])

NUM_PROCESSES, LOCAL_DEVICES = 2, 4
# The presets of tests/test_sharding.py run here: each method once, GRASS with both its
# deterministic (top-k) and its sampled selection. (Each program costs seconds of compilation
# in both processes, on the 2 cores the suite runs on.)
NAMES = ("galore", "grass_multinomial", "grass_topk", "online_subspace_descent", "rso")
# Checkpoints written by this process and restored by the two.
FROM_ONE = ("grass_multinomial", "online_subspace_descent", "rso")
COLLECTIVES = re.compile(
  r"\b(all-reduce|all-gather|reduce-scatter|collective-permute|all-to-all)"
  r"(-start)?\("
)


def _sharding_tests():
  import test_sharding  # pylint: disable=g-import-not-at-top

  return test_sharding


def _flat(tree) -> dict:
  """{path: numpy array} of a tree (key paths as strings)."""
  return {osub_path(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _flat_arrays(tree) -> dict:
  return {osub_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def osub_path(key_path) -> str:
  from optax_subspace._leaves import path_str  # pylint: disable=g-import-not-at-top

  return path_str(key_path)


def _manager(directory):
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(max_to_keep=1))


def _targets(tx, params, param_shardings, dims):
  """ShapeDtypeStructs with shardings: what `restore_checkpoint` restores onto."""
  ssh = osub.state_shardings(tx, params, param_shardings, dims=dims)
  put = lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s)
  abstract_state = jax.eval_shape(tx.init, params)
  return (
    jax.tree_util.tree_map(put, params, param_shardings),
    jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, ssh
    ),
  )


# ---------------------------------------------------------------------------------------------
# The program both processes run


def _worker(out, from_one):
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  ts = _sharding_tests()  # after initialize: its import asks for the devices
  out, pid = pathlib.Path(out), jax.process_index()
  assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (
    NUM_PROCESSES,
    NUM_PROCESSES * LOCAL_DEVICES,
    LOCAL_DEVICES,
  )
  mesh = jax.make_mesh((8,), ("fsdp",), (AxisType.Auto,))
  mesh42 = jax.make_mesh((4, 2), ("data", "fsdp"), (AxisType.Auto,) * 2)
  psh = {n: NamedSharding(mesh, s) for n, s in ts.SPECS.items()}
  psh42 = {n: NamedSharding(mesh42, s) for n, s in ts.SPECS.items()}

  def put(tree, shardings):  # every process holds the global values; each places its shards
    return jax.tree_util.tree_map(
      lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
      tree,
      shardings,
    )

  gather = lambda tree: _flat(multihost_utils.process_allgather(tree, tiled=True))
  arrays, local, info = {}, {}, {}
  for name in NAMES:
    tx = ts.PRESETS[name]()
    params = ts._params()
    ssh = osub.state_shardings(tx, params, psh, dims=ts.DIMS)
    init = jax.jit(tx.init, out_shardings=ssh)
    step = jax.jit(ts._step_fn(tx), in_shardings=(psh, ssh, psh), out_shardings=(psh, ssh, psh))
    p = put(params, psh)
    state = init(p)
    updates = []
    for t in range(ts.STEPS):
      p, state, u = step(put(ts._grads(t), psh), state, p)
      updates.append(u)
    for key, value in gather((updates, state)).items():
      arrays[f"{name}/{key}"] = value
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    info[name] = {
      "specs": {osub_path(k): str(s.spec) for k, s in jax.tree_util.tree_flatten_with_path(ssh)[0]},
      # Each leaf sits on the sharding state_shardings gave it; a split one spans both
      # processes (no process holds all of it).
      "placed": all(
        x.sharding.is_equivalent_to(s, x.ndim)
        for (_, x), s in zip(leaves, jax.tree_util.tree_leaves(ssh))
      ),
      "split_span_processes": all(
        not x.is_fully_addressable for _, x in leaves if not x.sharding.is_fully_replicated
      ),
      "replicated": [osub_path(k) for k, x in leaves if x.sharding.is_fully_replicated],
    }
    # What each process holds of the replicated leaves (keys, selections, counts, and the
    # bases of matrices split on their kept side), read locally: no gather.
    for k, x in leaves:
      if x.sharding.is_fully_replicated:
        shards = [np.asarray(s.data) for s in x.addressable_shards]
        assert all(np.array_equal(s, shards[0]) for s in shards), (name, k)
        local[f"{name}/{osub_path(k)}"] = shards[0]

    # Orbax: both processes save; restored onto another mesh shape (4 × 2) on both.
    manager = _manager(out / "checkpoints" / name)
    osub.save_checkpoint(manager, ts.STEPS, p, state)
    manager.wait_until_finished()
    _, rp, rs = osub.restore_checkpoint(manager, *_targets(tx, params, psh42, ts.DIMS))
    assert all(x.sharding.mesh.shape == mesh42.shape for x in jax.tree_util.tree_leaves((rp, rs)))
    for key, value in gather((rp, rs)).items():
      arrays[f"{name}/restored42/{key}"] = value
    for key, value in gather(p).items():
      arrays[f"{name}/params/{key}"] = value
    if name == NAMES[0]:  # targets without shardings: each process gets a copy on its device
      _, rp, rs = osub.restore_checkpoint(
        manager, jax.eval_shape(lambda x: x, params), jax.eval_shape(tx.init, params)
      )
      for k, x in _flat_arrays((rp, rs)).items():
        assert x.is_fully_addressable and x.devices() == {jax.local_devices()[0]}, k
        local[f"{name}/unsharded/{k}"] = np.asarray(x)
    if name in FROM_ONE:  # a checkpoint of one process, restored onto both
      _, rp, rs = osub.restore_checkpoint(
        _manager(pathlib.Path(from_one) / name), *_targets(tx, params, psh, ts.DIMS)
      )
      for key, value in gather((rp, rs)).items():
        arrays[f"{name}/from_one/{key}"] = value

  # Random bases and sampled selections from a replicated key: each process draws them itself.
  replicated = NamedSharding(mesh, P())
  draws = {
    "random_basis": lambda key: osub.projectors.random_basis(key, 16, 4),
    "multinomial": lambda key: jax.random.choice(
      key, 16, (4,), replace=False, p=jax.nn.softmax(jax.random.normal(key, (16,)))
    ),
  }
  info["draws"] = {}
  key = jax.device_put(np.asarray(jax.random.PRNGKey(3)), replicated)
  for what, draw in draws.items():
    compiled = jax.jit(draw, in_shardings=replicated, out_shardings=replicated).lower(key).compile()
    info["draws"][what] = COLLECTIVES.findall(compiled.as_text())
    local[f"draw/{what}"] = np.asarray(compiled(key).addressable_shards[0].data)

  np.savez(out / f"local{pid}.npz", **local)
  if pid == 0:
    np.savez(out / "global.npz", **arrays)
    (out / "info.json").write_text(json.dumps(info))
  print(f"process {pid}: done", flush=True)


# ---------------------------------------------------------------------------------------------
# The test: one job of 2 processes (its start and compilation, in both processes on the 2
# cores of CI, cost most of a minute: paid once), checked part by part


@pytest.mark.slow
def test_the_library_on_two_processes_matches_one_process(tmp_path):
  run = _two_process_run(tmp_path)
  for name in NAMES:
    _check_an_update_on_a_mesh_over_two_processes_equals_one_device(run, name)
  _check_state_shardings_on_a_two_process_mesh_are_the_one_process_ones(run)
  _check_random_and_sparse_selections_are_identical_on_both_processes(run)
  _check_a_checkpoint_saved_by_two_processes_restores_exactly_on_another_mesh(run)
  _check_a_checkpoint_saved_by_two_processes_restores_exactly_on_one(run)
  _check_a_checkpoint_restores_onto_each_process_without_target_shardings(run)
  _check_a_checkpoint_saved_by_one_process_restores_exactly_on_two(run)


def _two_process_run(root):
  """Runs the program on 2 processes; what they wrote."""
  ts = _sharding_tests()
  from_one, saved = root / "from_one", {}
  for name in FROM_ONE:  # written here, by one process on one device
    state = ts._run(name)[1]
    params = ts._params()
    manager = _manager(from_one / name)
    osub.save_checkpoint(manager, ts.STEPS, params, state)
    manager.wait_until_finished()
    saved[name] = _flat((params, state))
  out = root / "out"
  out.mkdir()
  _multiprocess.run(
    _multiprocess.python(
      __file__, "{coordinator}", "{num_processes}", "{process_id}", out, from_one
    ),
    NUM_PROCESSES,
    LOCAL_DEVICES,
    timeout_s=300,
  )
  return {
    "dir": out,
    "global": dict(np.load(out / "global.npz")),
    "local": [dict(np.load(out / f"local{i}.npz")) for i in range(NUM_PROCESSES)],
    "info": json.loads((out / "info.json").read_text()),
    "saved_by_one": saved,
  }


def _prefixed(arrays, prefix):
  return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def _check_an_update_on_a_mesh_over_two_processes_equals_one_device(run, name):
  ts = _sharding_tests()
  want_updates, want_state, _, _ = ts._run(name)
  got = _prefixed(run["global"], f"{name}/")
  want = _flat((want_updates, want_state))
  got = {k: v for k, v in got.items() if k in want}
  assert sorted(got) == sorted(want)
  updates = lambda d: {k: v for k, v in d.items() if k.startswith("0/")}
  state = lambda d: {k: v for k, v in d.items() if k.startswith("1/")}
  assert updates(want) and state(want)
  try:
    chex.assert_trees_all_close(updates(got), updates(want), rtol=ts.RTOL, atol=ts.UPDATE_ATOL)
    chex.assert_trees_all_close(state(got), state(want), rtol=ts.RTOL, atol=ts.STATE_ATOL)
  except AssertionError as error:
    raise AssertionError(f"{name}: {error}") from None


def _check_state_shardings_on_a_two_process_mesh_are_the_one_process_ones(run):
  ts = _sharding_tests()
  abstract = AbstractMesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  for name in NAMES:
    info = run["info"][name]
    want = osub.state_shardings(
      ts.PRESETS[name](),
      ts._params(),
      {n: NamedSharding(abstract, s) for n, s in ts.SPECS.items()},
      dims=ts.DIMS,
    )
    assert info["specs"] == {
      osub_path(k): str(s.spec) for k, s in jax.tree_util.tree_flatten_with_path(want)[0]
    }, name
    assert info["placed"] and info["split_span_processes"], name
    assert any(spec != str(P()) for spec in info["specs"].values())


def _check_random_and_sparse_selections_are_identical_on_both_processes(run):
  first, second = run["local"]
  assert sorted(first) == sorted(second)
  # The replicated leaves of the random and sparse methods: RSO's keys, GRASS's rows, scales
  # and keys; then every replicated leaf (counts, bases of matrices split on their kept side).
  for pattern in (
    r"^rso/.*key$",
    r"^grass_multinomial/.*(indices|scales|key)$",
    r"^grass_topk/.*indices$",
  ):
    keys = [k for k in first if re.search(pattern, k)]
    assert keys, pattern
    for k in keys:
      np.testing.assert_array_equal(first[k], second[k], err_msg=k)
  for k in first:
    np.testing.assert_array_equal(first[k], second[k], err_msg=k)
  # Drawn by each process from the replicated key: the compiled draws hold no collective.
  assert run["info"]["draws"] == {"random_basis": [], "multinomial": []}
  assert first["draw/random_basis"].shape == (16, 4)


def _check_a_checkpoint_saved_by_two_processes_restores_exactly_on_another_mesh(run):
  _sharding_tests()
  arrays = run["global"]
  for name in NAMES:
    params = _prefixed(arrays, f"{name}/params/")
    state = {k[2:]: v for k, v in _prefixed(arrays, f"{name}/").items() if k.startswith("1/")}
    restored = _prefixed(arrays, f"{name}/restored42/")
    assert params and state
    assert sorted(restored) == sorted([f"0/{k}" for k in params] + [f"1/{k}" for k in state])
    for k, v in params.items():
      np.testing.assert_array_equal(restored[f"0/{k}"], v, err_msg=f"{name} {k}")
    for k, v in state.items():
      np.testing.assert_array_equal(restored[f"1/{k}"], v, err_msg=f"{name} {k}")


def _check_a_checkpoint_saved_by_two_processes_restores_exactly_on_one(run):
  ts = _sharding_tests()
  devices = jax.devices()[:4] if jax.device_count() >= 4 else jax.devices()[:1]
  mesh = jax.make_mesh((len(devices),), ("fsdp",), (AxisType.Auto,), devices=devices)
  psh = {n: NamedSharding(mesh, s) for n, s in ts.SPECS.items()}
  for name in NAMES:
    tx = ts.PRESETS[name]()
    step, params, state = osub.restore_checkpoint(
      _manager(run["dir"] / "checkpoints" / name), *_targets(tx, ts._params(), psh, ts.DIMS)
    )
    assert step == ts.STEPS
    want = _prefixed(run["global"], f"{name}/")
    got = _flat((params, state))
    for k, v in got.items():
      saved = want[f"params/{k[2:]}"] if k.startswith("0/") else want[k]
      np.testing.assert_array_equal(v, saved, err_msg=f"{name} {k}")


def _check_a_checkpoint_restores_onto_each_process_without_target_shardings(run):
  name = NAMES[0]
  want = _prefixed(run["global"], f"{name}/")
  for local in run["local"]:
    got = _prefixed(local, f"{name}/unsharded/")
    assert got
    for k, v in got.items():
      saved = want[f"params/{k[2:]}"] if k.startswith("0/") else want[k]
      np.testing.assert_array_equal(v, saved, err_msg=k)


def _check_a_checkpoint_saved_by_one_process_restores_exactly_on_two(run):
  for name in FROM_ONE:
    got = _prefixed(run["global"], f"{name}/from_one/")
    want = run["saved_by_one"][name]
    assert sorted(got) == sorted(want)
    for k, v in want.items():
      np.testing.assert_array_equal(got[k], v, err_msg=f"{name} {k}")


# ---------------------------------------------------------------------------------------------
# The harness itself: a hung or failed process never holds up the suite

HANG = (
  "import subprocess, sys, time; subprocess.Popen(['sleep', '120']);"
  "sys.exit(int(sys.argv[1])) if sys.argv[2] == '0' else time.sleep(120)"
)


def test_the_harness_kills_hung_processes_and_their_children_at_the_deadline():
  start = time.monotonic()
  results = _multiprocess.run(
    _multiprocess.python("-c", HANG, "0", "{process_id}"), timeout_s=3, check=False
  )
  assert time.monotonic() - start < 10
  assert [r.returncode for r in results] == [0, -signal.SIGKILL]
  assert [r.killed for r in results] == [False, True]
  with pytest.raises(_multiprocess.ProcessesFailed, match="process 1: killed by the harness"):
    _multiprocess.run(_multiprocess.python("-c", HANG, "0", "{process_id}"), timeout_s=1)


def test_the_harness_ends_the_others_soon_after_one_process_fails():
  start = time.monotonic()
  results = _multiprocess.run(
    _multiprocess.python("-c", HANG, "3", "{process_id}"), timeout_s=100, check=False, grace_s=1
  )
  assert time.monotonic() - start < 10
  assert [r.returncode for r in results] == [3, -signal.SIGKILL]
  # The processes' groups are gone: no `sleep 120` of theirs is left (SIGKILL is delivered at
  # once, the process ends a moment later).
  groups = ",".join(str(r.pid) for r in results)
  for _ in range(50):
    left = subprocess.run(
      ["pgrep", "-f", "sleep 120", "-g", groups], capture_output=True, text=True
    ).stdout
    if not left:
      break
    time.sleep(0.1)
  assert left == ""


# Process 1 dies after joining the job; process 0 (the coordinator, which notices a missing
# process only after JAX's heartbeat timeout, 100 s) waits for it in a collective.
COLLECTIVE_WITHOUT_PEER = """
import os, sys
sys.path.insert(0, sys.argv[1])
import _multiprocess
_multiprocess.initialize(*sys.argv[2:5])
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
if jax.process_index() == 1:
  os._exit(1)
mesh = jax.make_mesh((jax.device_count(),), ("x",))
x = jax.make_array_from_callback((8,), NamedSharding(mesh, P("x")), lambda i: np.ones(8)[i])
print("entering the collective", flush=True)
print(jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))(x))
"""


@pytest.mark.slow  # two processes that start JAX (the fast subset checks the harness without)
def test_a_process_stuck_in_a_collective_is_ended_soon_after_its_peer_fails():
  start = time.monotonic()
  results = _multiprocess.run(
    _multiprocess.python(
      "-c",
      COLLECTIVE_WITHOUT_PEER,
      pathlib.Path(__file__).parent,
      "{coordinator}",
      "{num_processes}",
      "{process_id}",
    ),
    timeout_s=120,
    check=False,
    grace_s=5,
  )
  assert time.monotonic() - start < 60, _multiprocess.describe(results)
  assert [(r.returncode, r.killed) for r in results] == [(-signal.SIGKILL, True), (1, False)], (
    _multiprocess.describe(results)
  )
  assert "entering the collective" in results[0].stdout


if __name__ == "__main__":
  try:
    _worker(*sys.argv[4:])
  except BaseException:  # pylint: disable=broad-except
    # Exit now: the interpreter's exit would wait for the other process at JAX's shutdown
    # barrier (minutes), which that one, stuck in a collective, never reaches.
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
