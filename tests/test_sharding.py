"""Sharded state: shardings follow the parameters, updates match one device.

Runs on simulated CPU devices: XLA_FLAGS=--xla_force_host_platform_device_count=8
(set in .ci/run). Meshes (8,) ("fsdp",) and (4, 2) ("data", "fsdp").
"""

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_subspace as osub
from optax_subspace._leaves import path_str

pytestmark = pytest.mark.skipif(
  jax.device_count() < 8,
  reason="needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8",
)

RANK, EVERY, STEPS = 4, 2, 3  # refreshes at steps 0 and 2
DIMS = lambda path, x: osub.MatrixDims(1, 2) if x.ndim == 3 else None
PRESETS = {
  "galore": lambda: osub.galore(0.01, RANK, EVERY, dims=DIMS, weight_decay=0.1),
  "galore_randomized_svd": lambda: osub.galore(
    0.01, RANK, EVERY, dims=DIMS, projector="randomized_svd"
  ),
  "galore_transport": lambda: osub.galore(0.01, RANK, EVERY, dims=DIMS, on_change="transport"),
  "online_subspace_descent": lambda: osub.online_subspace_descent(
    0.01, RANK, update_every=EVERY, dims=DIMS
  ),
  "online_subspace_descent_paper": lambda: osub.online_subspace_descent(
    0.01, RANK, orthogonality_weight=0.1, dims=DIMS, projector_optimizer=optax.adamw(0.05)
  ),
  "grass_topk": lambda: osub.grass(0.01, RANK, EVERY, dims=DIMS),
  "grass_multinomial": lambda: osub.grass(
    0.01, RANK, EVERY, "multinomial", on_change="remap", dims=DIMS
  ),
  "rso": lambda: osub.rso(0.01, RANK, EVERY, proximal=1.0, dims=DIMS),
  "rso_stored_basis": lambda: osub.rso(0.01, RANK, EVERY, dims=DIMS, store_basis=True),
  "fira": lambda: osub.fira(0.01, RANK, EVERY, dims=DIMS),
  "frugal": lambda: osub.frugal(0.01, RANK, EVERY, dims=DIMS),
  "apollo": lambda: osub.apollo(0.01, RANK, EVERY, dims=DIMS),
  "apollo_mini": lambda: osub.apollo_mini(0.01, EVERY, dims=DIMS),
}
NAMES = sorted(PRESETS)
# Every case of a matrix under FSDP: sharded on its projected (smaller) side
# ("a", "stack"), on its kept side ("b"), with the columns projected ("c"),
# a batch of matrices ("stack"), and an unprojected leaf ("bias").
SHAPES = {"a": (16, 32), "b": (16, 64), "c": (64, 16), "stack": (2, 16, 32), "bias": (32,)}
SPECS = {
  "a": P("fsdp", None),
  "b": P(None, "fsdp"),
  "c": P("fsdp", None),
  "stack": P(None, "fsdp", None),
  "bias": P("fsdp"),
}
MESHES = {"8": ((8,), ("fsdp",)), "4x2": ((4, 2), ("data", "fsdp"))}
# Sharded and one-device runs differ by the order of float32 sums, which an
# SVD refresh amplifies by 1/(eigenvalue gap). Measured on the CPU (8
# simulated devices): at most 1.3e-8 on an update entry (updates reach
# 1e-2) and 9.5e-6 on a state entry (bases and P's AdamW state, entries up
# to ~1); asserted with about 3x margin.
UPDATE_ATOL, STATE_ATOL, RTOL = 5e-8, 3e-5, 1e-5


@functools.lru_cache(maxsize=None)
def _params():
  keys = jax.random.split(jax.random.PRNGKey(0), len(SHAPES))
  return {
    n: np.asarray(0.1 * jax.random.normal(k, s)) for k, (n, s) in zip(keys, sorted(SHAPES.items()))
  }


@functools.lru_cache(maxsize=None)
def _grads(step):
  """Full-rank gradients with a decaying spectrum (σ_k = 0.8^k), so the
  top-r subspace is well separated and a refresh is stable to float32
  rounding."""
  out = {}
  for j, (name, shape) in enumerate(sorted(SHAPES.items())):
    rng = np.random.default_rng([step, j])
    if len(shape) == 1:
      out[name] = rng.standard_normal(shape, np.float32)
      continue
    *batch, m, n = shape
    k = min(m, n)
    u = rng.standard_normal((*batch, m, k), np.float32)
    v = rng.standard_normal((*batch, k, n), np.float32)
    sigma = (0.8 ** np.arange(k)).astype(np.float32)
    out[name] = np.einsum("...mk,k,...kn->...mn", u, sigma, v)
  return out


def _mesh(name, axis_type=AxisType.Auto):
  shape, axes = MESHES[name]
  return jax.make_mesh(shape, axes, (axis_type,) * len(axes))


def _auto_mesh(shape, axes):
  # Auto axes: jit's in/out shardings drive XLA's partitioner ("pjit").
  return jax.make_mesh(shape, axes, (AxisType.Auto,) * len(axes))


def _param_shardings(mesh):
  return {n: NamedSharding(mesh, s) for n, s in SPECS.items()}


def _step_fn(tx):
  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  return step


@functools.lru_cache(maxsize=None)
def _run(name, mesh_name=None, axis_type=AxisType.Auto):
  """STEPS steps of preset `name`, on one device or sharded on a mesh.

  Returns the updates of every step, the final state, the state's shardings
  and the compiled step's HLO text (None on one device). On a mesh with
  Explicit axes the step is a plain `jax.jit`: the shardings come with the
  arrays' types.
  """
  tx = PRESETS[name]()
  params = _params()
  abstract = jax.eval_shape(tx.init, params)
  if mesh_name is None:
    psh = ssh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  else:
    psh = _param_shardings(_mesh(mesh_name, axis_type))
    ssh = osub.state_shardings(tx, params, psh, dims=DIMS)
  init = jax.jit(tx.init, out_shardings=ssh)
  if axis_type == AxisType.Explicit:
    step = jax.jit(_step_fn(tx))
  else:
    step = (
      jax.jit(_step_fn(tx), in_shardings=(psh, ssh, psh), out_shardings=(psh, ssh, psh))
      .lower(params, abstract, params)
      .compile()
    )
  params = jax.device_put(params, psh)
  state = init(params)
  updates = []
  for t in range(STEPS):
    params, state, u = step(jax.device_put(_grads(t), psh), state, params)
    updates.append(u)
  hlo = None if mesh_name is None or axis_type == AxisType.Explicit else (step.as_text())
  return updates, state, ssh, hlo


def _per_device_bytes(abstract, shardings):
  return sum(
    math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
    for x, s in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings))
  )


def test_state_shardings_follow_the_parameters_axis_by_axis():
  mesh = _mesh("4x2")
  tx = optax.MultiSteps(PRESETS["galore_randomized_svd"](), 2)
  shardings = osub.state_shardings(tx, _params(), _param_shardings(mesh), dims=DIMS)
  sub = shardings.inner_opt_state[0]  # the project_subspace state
  spec = lambda s: tuple(s.spec) + (None,) * 3
  # Basis (s × r): the projected side's sharding, r replicated.
  assert spec(sub.projectors["a"].basis)[:2] == ("fsdp", None)
  assert spec(sub.projectors["stack"].basis)[:3] == (None, "fsdp", None)
  # Kept side sharded: the basis (16 × 4) is replicated, like every key.
  assert spec(sub.projectors["b"].basis)[:2] == (None, None)
  for leaf in ("a", "b", "c", "stack"):
    assert all(e is None for e in sub.projectors[leaf].key.spec)
  # Low-rank moments: the kept side's sharding; moved there (ZeRO) for the
  # leaves sharded only on their projected side.
  for moments in (sub.inner.mu, sub.inner.nu):
    assert spec(moments["a"])[:2] == (None, "fsdp")  # (r, 32)
    assert spec(moments["b"])[:2] == (None, "fsdp")  # (r, 64)
    assert spec(moments["c"])[:2] == ("fsdp", None)  # (64, r)
    assert spec(moments["stack"])[:3] == (None, None, "fsdp")  # (2, r, 32)
    assert moments["bias"].spec == SPECS["bias"]
  # Full-size buffers (MultiSteps' accumulated gradients) follow the params.
  for name, s in SPECS.items():
    assert shardings.acc_grads[name].spec == s
  assert sub.count.spec == P() and shardings.mini_step.spec == P()


# Every preset runs on the (8,) mesh with Explicit axes (JAX's default) and on the (4, 2) mesh
# with Auto axes (the run test_compiled_update_gathers_no_full_parameter_outside_the_refresh
# reads the HLO of, so its compile is shared); the other two mesh/axis pairings, (8,) Auto and
# (4, 2) Explicit, run on three presets of distinct state: an SVD basis with weight decay
# (galore), a trained basis with its own AdamW state (online_subspace_descent_paper) and a
# sampled index set remapped on a change (grass_multinomial). (Every pairing on every preset,
# 48 cases, passed when this grid was cut to 30 to keep CI's time.) The fast subset
# (-m "not slow") is the (8,) Explicit row of galore and RSO (FAST_SHARDED_PRESETS); there,
# test_compiled_update_gathers_no_full_parameter_outside_the_refresh steps GRASS and OSD (their
# variants) and GaLore's transport on the (4, 2) mesh.
MESH_PAIRING_PRESETS = ("galore", "grass_multinomial", "online_subspace_descent_paper")
FAST_SHARDED_PRESETS = ("galore", "rso")
SHARDED_CASES = [
  pytest.param(
    name,
    mesh_name,
    axis_type,
    id=f"{name}-{mesh_name}-{axis_id}",
    marks=[]
    if (mesh_name, axis_id) == ("8", "explicit") and name in FAST_SHARDED_PRESETS
    else [pytest.mark.slow],
  )
  for name in NAMES
  for mesh_name in sorted(MESHES)
  for axis_type, axis_id in ((AxisType.Auto, "auto"), (AxisType.Explicit, "explicit"))
  if (mesh_name, axis_id) in {("8", "explicit"), ("4x2", "auto")} or name in MESH_PAIRING_PRESETS
]


@pytest.mark.parametrize("name,mesh_name,axis_type", SHARDED_CASES)
def test_sharded_updates_equal_one_device_across_a_refresh(name, mesh_name, axis_type):
  # Explicit axes are jax.make_mesh's default: the update runs them as Auto
  # inside (project_subspace's update_fn) and keeps the state's shardings.
  want_updates, want_state, _, _ = _run(name)
  got_updates, got_state, shardings, _ = _run(name, mesh_name, axis_type)
  chex.assert_trees_all_close(got_updates, want_updates, rtol=RTOL, atol=UPDATE_ATOL)
  chex.assert_trees_all_close(got_state, want_state, rtol=RTOL, atol=STATE_ATOL)
  for x, s in zip(jax.tree_util.tree_leaves(got_state), jax.tree_util.tree_leaves(shardings)):
    assert x.sharding.is_equivalent_to(s, x.ndim)


@pytest.mark.slow
def test_an_update_on_an_explicit_mesh_also_runs_without_jit():
  mesh = _mesh("4x2", AxisType.Explicit)
  tx = PRESETS["galore"]()
  psh = _param_shardings(mesh)
  params = jax.device_put(_params(), psh)
  state = jax.jit(tx.init, out_shardings=osub.state_shardings(tx, _params(), psh, dims=DIMS))(
    params
  )
  updates, new_state = tx.update(jax.device_put(_grads(0), psh), state, params)
  chex.assert_trees_all_close(updates, _run("galore")[0][0], rtol=RTOL, atol=UPDATE_ATOL)
  for x, y in zip(jax.tree_util.tree_leaves(new_state), jax.tree_util.tree_leaves(state)):
    assert jax.typeof(x).sharding.spec == jax.typeof(y).sharding.spec


def test_per_device_state_bytes_shrink_with_the_fsdp_axis():
  tx = PRESETS["online_subspace_descent"]()
  params = _params()
  abstract = jax.eval_shape(tx.init, params)
  total = _per_device_bytes(
    abstract, jax.tree_util.tree_map(lambda _: NamedSharding(_mesh("8"), P()), abstract)
  )
  sizes = []
  for fsdp in (1, 2, 4, 8):
    mesh = _auto_mesh((8 // fsdp, fsdp), ("data", "fsdp"))
    shardings = osub.state_shardings(tx, params, _param_shardings(mesh), dims=DIMS)
    sizes.append(_per_device_bytes(abstract, shardings))
  assert sizes[0] == total
  assert all(a > b for a, b in zip(sizes, sizes[1:])), sizes
  # What stays whole on every device: the bases of "b" and "c" (their kept
  # side is the sharded one), keys, counts: 2·16·4 floats + scalars.
  replicated = 2 * 16 * RANK * 4 * 3  # basis + its AdamW mu, nu (OSD)
  assert sizes[-1] <= total / 8 + replicated + 256, (sizes, total)


def _all_gathers_by_computation(hlo: str):
  """{computation: [element counts of its all-gathers' outputs]}, and the
  computations called from a conditional (transitively)."""
  gathers, calls, branches, current = {}, {}, set(), None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%(\S+) .*\{$", line)
    if head:
      current = head.group(1)
      gathers[current], calls[current] = [], set()
      continue
    if current is None:
      continue
    if " all-gather(" in line or " all-gather-start(" in line:
      out = line.split("=", 1)[1].split("all-gather")[0]
      for dims in re.findall(r"\w+\[([\d,]*)\]", out):
        gathers[current].append(math.prod(int(d) for d in dims.split(",") if d))
    calls[current].update(re.findall(r"%([\w.\-]+)", line.split("=", 1)[-1]))
    if " conditional(" in line:
      for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
        branches.update(re.findall(r"%([\w.\-]+)", group))
      branches.update(re.findall(r"(?:true|false)_computation=%([\w.\-]+)", line))
  reach, todo = set(), list(branches)
  while todo:
    c = todo.pop()
    if c in reach or c not in calls:
      continue
    reach.add(c)
    todo.extend(calls[c])
  return gathers, reach


# The fast subset (-m "not slow") runs it for GaLore's transport, GRASS's multinomial selection
# and OSD's paper projector optimizer: with FAST_SHARDED_PRESETS, GaLore, GRASS, OSD and RSO
# each on a mesh.
FAST_GATHER_PRESETS = ("galore_transport", "grass_multinomial", "online_subspace_descent_paper")


@pytest.mark.parametrize(
  "name",
  [n if n in FAST_GATHER_PRESETS else pytest.param(n, marks=pytest.mark.slow) for n in NAMES],
)
def test_compiled_update_gathers_no_full_parameter_outside_the_refresh(name):
  hlo = _run(name, "4x2")[3]
  gathers, in_refresh = _all_gathers_by_computation(hlo)
  assert in_refresh, "no conditional (refresh) found in the compiled update"
  smallest = min(math.prod(SHAPES[n]) for n in ("a", "b", "c"))
  every_step = {
    c: g for c, g in gathers.items() if c not in in_refresh and any(n >= smallest for n in g)
  }
  assert not every_step, f"full-size all-gathers every step: {every_step}"
  # Documented (docs/scaling.md): the refresh may gather whole gradients
  # (svd: those sharded on s; randomized_svd: those sharded on l), never
  # more than the parameters hold.
  refresh = [n for c in in_refresh for n in gathers[c]]
  assert max(refresh, default=0) <= sum(math.prod(s) for s in SHAPES.values())


@pytest.mark.slow
def test_random_projector_keys_and_bases_are_identical_on_every_device():
  state = _run("galore_randomized_svd", "4x2")[1]
  sub = state[0]
  for leaf in ("b", "c"):  # replicated bases: every device's copy is equal
    for x in (sub.projectors[leaf].key, sub.projectors[leaf].basis):
      shards = [np.asarray(s.data) for s in x.addressable_shards]
      assert len(shards) == 8
      for s in shards[1:]:
        np.testing.assert_array_equal(s, shards[0])


def test_an_unmatched_full_size_buffer_is_replicated_with_a_warning():
  flat = optax.GradientTransformation(  # one flat buffer for the whole tree
    lambda p: jnp.zeros(sum(x.size for x in jax.tree_util.tree_leaves(p))),
    lambda u, s, p=None: (u, s),
  )
  tx = optax.chain(PRESETS["galore"](), flat)
  with pytest.warns(UserWarning, match="could not match.*'1'"):
    shardings = osub.state_shardings(tx, _params(), _param_shardings(_mesh("8")), dims=DIMS)
  assert shardings[1].spec == P()


def test_takes_a_flax_nnx_param_state():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  model = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.Linear(32, 16, rngs=nnx.Rngs(1)))
  params = nnx.state(model, nnx.Param)
  specs = jax.tree_util.tree_map(lambda x: P("fsdp", None) if x.ndim == 2 else P(), params)
  tx = osub.galore(0.01, RANK, mask="kernel")
  shardings = osub.state_shardings(tx, params, specs, mesh=_mesh("8"))
  got = {path_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  # (16, 32) by rows: P sharded; (32, 16) by columns, sharded on its rows
  # (the kept side): P replicated; both moments on the 32 side. Projector
  # states sit outside the nnx.Param (no "value" in their paths).
  assert got["0/projectors/layers/0/kernel/basis"] == P("fsdp", None)
  assert got["0/projectors/layers/1/kernel/basis"] == P(None, None)
  assert got["0/inner/mu/layers/0/kernel/value"] == P(None, "fsdp")
  assert got["0/inner/nu/layers/1/kernel/value"] == P("fsdp", None)
  assert got["0/inner/mu/layers/0/bias/value"] == P()


def test_the_state_plan_gives_the_matrix_axes_and_other_dims_are_refused():
  # The state's plan records each leaf's matrix axes, so `dims` need not be repeated; given,
  # it must be the optimizer's.
  mesh = _mesh("8")
  tx = PRESETS["galore"]()
  assert osub.state_shardings(tx, _params(), _param_shardings(mesh)) == osub.state_shardings(
    tx, _params(), _param_shardings(mesh), dims=DIMS
  )
  other = lambda path, x: osub.MatrixDims(0, (1, 2)) if x.ndim == 3 else None
  with pytest.raises(ValueError, match="same `dims` as the optimizer"):
    osub.state_shardings(tx, _params(), _param_shardings(mesh), dims=other)


def test_partition_specs_need_a_mesh():
  tx = PRESETS["galore"]()
  with pytest.raises(ValueError, match="mesh="):
    osub.state_shardings(tx, _params(), SPECS, dims=DIMS)
  shardings = osub.state_shardings(tx, _params(), SPECS, dims=DIMS, mesh=_mesh("8"))
  assert shardings[0].projectors["a"].basis.spec == P("fsdp", None)


# ZeRO-1 over a "data" axis: the split each matrix would get on its first axis, and the one
# `update_shardings` moves to the kept side (a, b, stack project their rows; c its columns).
ZERO_BASE = {
  "a": P("data", None),
  "b": P("data", None),
  "c": P(None, "data"),
  "stack": P(None, "data", None),
  "bias": P("data"),
}
ZERO_KEPT = {
  "a": P(None, "data"),
  "b": P(None, "data"),
  "c": P("data", None),
  "stack": P(None, None, "data"),
  "bias": P("data"),
}


def _zero_run(name, specs):
  """STEPS steps of preset `name` with gradients, parameters and state split as ZeRO-1 would
  split the update (`specs` for the parameters); (updates, HLO of the step)."""
  tx = PRESETS[name]()
  params = _params()
  mesh = _auto_mesh((8,), ("data",))
  psh = {n: NamedSharding(mesh, s) for n, s in specs.items()}
  ssh = osub.state_shardings(tx, params, psh, dims=DIMS)
  step = (
    jax.jit(_step_fn(tx), in_shardings=(psh, ssh, psh), out_shardings=(psh, ssh, psh))
    .lower(params, jax.eval_shape(tx.init, params), params)
    .compile()
  )
  state = jax.jit(tx.init, out_shardings=ssh)(jax.device_put(params, psh))
  params, updates = jax.device_put(params, psh), []
  for t in range(STEPS):
    params, state, u = step(jax.device_put(_grads(t), psh), state, params)
    updates.append(u)
  return updates, step.as_text()


@pytest.mark.parametrize(
  "name", ["galore", pytest.param("online_subspace_descent", marks=pytest.mark.slow)]
)
def test_update_shardings_split_projected_matrices_on_their_kept_side(name):
  tx = PRESETS[name]()
  mesh = _auto_mesh((8,), ("data",))
  split = osub.update_shardings(tx, _params(), ZERO_BASE, dims=DIMS, mesh=mesh)
  assert {n: s.spec for n, s in split.items()} == ZERO_KEPT
  # Same updates as one device; and outside the refresh no all-gather of a low-rank factor
  # (r × l) or more, where the split of the projected side gathers them every step.
  want = _run(name)[0]
  for specs, gathers_expected in ((ZERO_KEPT, False), (ZERO_BASE, True)):
    updates, hlo = _zero_run(name, specs)
    for got, ref in zip(updates, want):
      chex.assert_trees_all_close(got, ref, atol=UPDATE_ATOL, rtol=RTOL)
    gathers, in_refresh = _all_gathers_by_computation(hlo)
    low_rank = RANK * 32  # r × l of matrix "a"
    every_step = [n for c, g in gathers.items() if c not in in_refresh for n in g if n >= low_rank]
    assert bool(every_step) == gathers_expected, (specs, every_step)


@pytest.mark.parametrize("name", ["grass_topk", "rso"])
def test_update_shardings_on_the_kept_side_keep_grass_and_rso_exact(name):
  # GRASS selects rows by their norms over the (now split) kept side; RSO projects the rows
  # (input side) whatever the shape: both still take the one-device steps.
  tx = PRESETS[name]()
  mesh = _auto_mesh((8,), ("data",))
  split = osub.update_shardings(tx, _params(), ZERO_BASE, dims=DIMS, mesh=mesh)
  updates, _ = _zero_run(name, {n: s.spec for n, s in split.items()})
  for got, ref in zip(updates, _run(name)[0]):
    chex.assert_trees_all_close(got, ref, atol=UPDATE_ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ["galore", "fira", "frugal"])
def test_padded_products_on_a_mesh_equal_one_device(name):
  # A kept side of 36, no multiple of PRODUCT_ALIGNMENT: R = PᵀG and the back-projection run on
  # zero-padded copies, the latter held by an optimization barrier (GaLore's; Fira's, whose
  # term joins it; not FRUGAL's). Sharded on its projected side, as one device.
  tx = PRESETS[name]()
  rng = np.random.default_rng(0)
  params = {"w": 0.1 * rng.standard_normal((16, 36), np.float32)}
  grads = [{"w": rng.standard_normal((16, 36), np.float32)} for _ in range(STEPS)]

  def run(psh):
    step = jax.jit(_step_fn(tx))
    p = jax.device_put(params, psh)
    state, updates = jax.jit(tx.init)(p), []
    for g in grads:
      p, state, u = step(jax.device_put(g, psh), state, p)
      updates.append(u)
    return updates, step.lower(jax.device_put(grads[0], psh), state, p).as_text()

  one, _ = run(jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  sharded, text = run({"w": NamedSharding(_mesh("8"), P("fsdp", None))})
  chex.assert_trees_all_close(sharded, one, atol=UPDATE_ATOL, rtol=RTOL)
  assert "stablehlo.pad" in text
  assert ("optimization_barrier" in text) == (name != "frugal")
