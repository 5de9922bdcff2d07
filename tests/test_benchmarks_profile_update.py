"""Smoke test of benchmarks/profile_update.py on the tiny tree (CPU: no device kernels)."""

import gzip
import json

import pytest

from benchmarks import profile_update


@pytest.mark.slow
def test_profile_rows_carry_wall_time_and_kernel_breakdown(tmp_path):
  out = tmp_path / "profile_update.json"
  result = profile_update.main(
    [
      "--size",
      "tiny",
      "--reps",
      "2",
      "--methods",
      "adamw,galore_steady_unpadded,galore_refresh_unchunked",
      "--hlo-dir",
      str(tmp_path / "hlo"),
      "--out",
      str(out),
    ]
  )
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  rows = {r["method"]: r for r in result["rows"]}
  assert set(rows) == {"adamw", "galore_steady_unpadded", "galore_refresh_unchunked"}
  with gzip.open(tmp_path / "hlo" / "adamw.hlo.txt.gz", "rt") as f:
    assert "ENTRY" in f.read()
  for row in rows.values():
    assert row["wall_ms"] > 0 and row["pipelined_ms"] > 0
    # The CPU trace has host threads only: nothing is counted as a device kernel.
    assert row["kernel_ms"] == sum(row["by_kind_ms"].values())
  # The padding and chunking switches are restored after the variants' compiles.
  from optax_subspace import _chunks, _combinator  # pylint: disable=g-import-not-at-top

  assert _combinator.PRODUCT_ALIGNMENT == 8
  assert _chunks.OPTIMIZER_REFRESH_CHUNK_BYTES == 1 << 32


def test_every_profiled_name_builds_its_update():
  import optax  # pylint: disable=g-import-not-at-top

  table = profile_update.methods(16)
  assert set(table) == set(profile_update.PROFILED)
  for name, (tx, count) in table.items():
    assert isinstance(tx, optax.GradientTransformation), name
    assert count in (None, 1), name


def test_kernel_names_sort_into_kinds():
  assert profile_update.kind_of("sm90_xmma_gemm_f32f32_tf32f32_f32_nt_n") == "gemm"
  assert profile_update.kind_of("void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm>") == "gemm"
  assert profile_update.kind_of("input_transpose_fusion_192") == "copy/transpose"
  assert profile_update.kind_of("loop_add_fusion_27") == "fusion"
  assert profile_update.kind_of("input_convert_reduce_fusion") == "reduction"


@pytest.mark.slow
def test_scanned_tree_profiles_and_holds_the_same_state(tmp_path):
  """--scanned stacks each block's kernels over the layers; the subspace state is the same size."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax_subspace as osub  # pylint: disable=g-import-not-at-top
  from benchmarks import optimizer_step  # pylint: disable=g-import-not-at-top

  result = profile_update.main(
    [
      "--size",
      "tiny",
      "--reps",
      "2",
      "--scanned",
      "--methods",
      "adamw,osd_steady",
      "--out",
      str(tmp_path / "p.json"),
    ]
  )
  assert result["scanned"] and {r["method"] for r in result["rows"]} == {"adamw", "osd_steady"}
  cfg = optimizer_step.SIZES["tiny"]
  sizes = []
  for scanned in (False, True):
    shapes = optimizer_step.llama_shapes(**cfg, scanned=scanned)
    params = optimizer_step.make_tree(shapes, 0, lambda k, s: jax.numpy.zeros(s))
    grads = optimizer_step.make_tree(shapes, 1, optimizer_step.synthetic_gradient)
    assert all(
      jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(lambda g, p: g.shape == p.shape, grads, params)
      )
    )
    tx = osub.online_subspace_descent(
      1e-3,
      cfg["rank"],
      mask=optimizer_step.PROJECTED,
      dims=osub.MatrixDims(rows=1, cols=2) if scanned else None,
    )
    state = jax.eval_shape(tx.init, params)
    sizes.append(sum(x.size for x in jax.tree_util.tree_leaves(state)))
  assert sizes[0] == sizes[1]


@pytest.mark.slow
def test_host_refresh_variants_compile_without_the_refresh_cond(tmp_path):
  names = [
    "galore_steady",
    "galore_steady_host_refresh",
    "osd_steady_host_refresh",
    "grass_steady_host_refresh",
    "rso_steady_host_refresh",
    "rso_steady_stored_basis_host_refresh",
  ]
  result = profile_update.main(
    [
      "--size",
      "tiny",
      "--reps",
      "2",
      "--methods",
      ",".join(names),
      "--hlo-dir",
      str(tmp_path),
      "--out",
      str(tmp_path / "p.json"),
    ]
  )
  assert [row["method"] for row in result["rows"]] == names
  texts = {}
  for name in names:
    with gzip.open(tmp_path / f"{name}.hlo.txt.gz", "rt") as f:
      texts[name] = f.read()
  assert " conditional(" in texts["galore_steady"]
  for name in names[1:]:
    assert " conditional(" not in texts[name], name


@pytest.mark.slow
def test_methods_in_their_own_processes_give_the_same_rows(tmp_path):
  # --method-timeout-s: each method in a worker process of its own; its row has what the
  # in-process row has (and the worker's elapsed_s).
  argv = ["--size", "tiny", "--reps", "2", "--methods", "adamw,galore_steady"]
  alone = profile_update.main(
    [*argv, "--method-timeout-s", "300", "--out", str(tmp_path / "w.json")]
  )
  together = profile_update.main([*argv, "--out", str(tmp_path / "p.json")])
  assert [r["method"] for r in alone["rows"]] == ["adamw", "galore_steady"]
  for row, same in zip(alone["rows"], together["rows"]):
    assert "error" not in row, row.get("error")
    assert set(row) == set(same) | {"elapsed_s"}
    assert row["wall_ms"] > 0 and row["pipelined_ms"] > 0


@pytest.mark.slow
def test_a_method_past_its_timeout_leaves_a_row_and_the_next_one_runs(tmp_path):
  # A worker cannot start JAX and compile within 0.5 s: each method is killed and recorded,
  # and the JSON on disk has both rows.
  out = tmp_path / "t.json"
  argv = ["--size", "tiny", "--reps", "2", "--methods", "adamw,galore_steady"]
  result = profile_update.main([*argv, "--method-timeout-s", "0.5", "--out", str(out)])
  rows = json.loads(out.read_text())["rows"]
  assert rows == json.loads(json.dumps(result["rows"]))
  assert [r["method"] for r in rows] == ["adamw", "galore_steady"]
  for row in rows:
    assert row["timed_out"] and "timed out after 0.5 s" in row["error"]
