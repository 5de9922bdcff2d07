"""benchmarks/gpu_program.py: the kernels a compiled program launches, read from its HLO text."""

import json

import pytest

from benchmarks import gpu_program

# A compiled module's text as XLA's GPU backend prints it (shortened): the fused computation
# before ENTRY is not a launch; in ENTRY, parameters, views and tuples launch nothing.
COMPILED = """HloModule jit_step, is_scheduled=true

%fused_add (param_0: f32[4,8]) -> f32[4,8] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  ROOT %add.1 = f32[4,8]{1,0} add(%param_0, %param_0)
}

ENTRY %main.7 (p.1: f32[4,8], c.1: s32[]) -> (f32[4,8], s32[]) {
  %p.1 = f32[4,8]{1,0} parameter(0), metadata={op_name="p"}
  %c.1 = s32[] parameter(1)
  %copy.3 = s32[] copy(%c.1), metadata={scheduling_name="copy.3"}
  %custom-call.2 = (f32[4,8]{1,0}, s8[256]{0}) custom-call(%p.1), custom_call_target="__cublas$gemm"
  %get-tuple-element.1 = f32[4,8]{1,0} get-tuple-element(%custom-call.2), index=0
  %loop_add_fusion.27 = f32[4,8]{1,0} fusion(%get-tuple-element.1), kind=kLoop, calls=%fused_add
  %input_transpose_fusion = f32[8,4]{1,0} fusion(%loop_add_fusion.27), kind=kInput, calls=%fused_add
  %bitcast.1 = f32[4,8]{1,0} bitcast(%input_transpose_fusion)
  ROOT %tuple.1 = (f32[4,8]{1,0}, s32[]) tuple(%bitcast.1, %copy.3)
}
"""


def test_launches_counts_the_entry_instructions_that_run_kernels():
  found = gpu_program.launches(COMPILED)
  assert found == {
    "kernels": 4,
    "by_kind": {"copy/transpose": 2, "gemm": 1, "fusion": 1},
    "gemm_calls": 1,
    "copies": {"s32[]": 1},
    # copy 4 B; the GEMM's result 128 B (its 256 B of scratch space not counted); fusions 128 B.
    "bytes_written_by_kind": {"copy/transpose": 4 + 128, "gemm": 128, "fusion": 128},
    "control_flow": 0,
  }
  names = [name for name, *_ in gpu_program.entry_instructions(COMPILED)]
  assert names[:3] == ["p.1", "c.1", "copy.3"] and "add.1" not in names


def test_control_flow_is_counted_apart_from_kernels():
  text = COMPILED.replace(
    "  %bitcast.1",
    "  %conditional.1 = f32[4,8]{1,0} conditional(%c.1, %p.1), branch_computations={%fused_add}\n"
    "  %bitcast.1",
  )
  found = gpu_program.launches(text)
  assert found["control_flow"] == 1 and found["kernels"] == 4


def _profile(tmp_path, rows):
  path = tmp_path / "profile_update_tiny.json"
  path.write_text(json.dumps({"size": "tiny", "rows": rows}))
  return path


def test_cpu_run_counts_each_method_beside_its_measured_kernels(tmp_path):
  """--platform cpu: the plumbing on the CPU backend's programs (their counts mean nothing)."""
  measured = _profile(
    tmp_path,
    [
      {"method": "adamw", "kernels_per_step": 12.0},
      {"method": "osd_steady_stacked", "kernels_per_step": 99.0},
    ],
  )
  out = tmp_path / "gpu_program.json"
  result = gpu_program.main(
    [
      "--platform",
      "cpu",
      "--size",
      "tiny",
      "--methods",
      "adamw,osd_steady_host_refresh",
      "--measured",
      f"{measured},{measured}:osd_steady_stacked:osd_steady_host_refresh",
      "--out",
      str(out),
    ]
  )
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  rows = {r["method"]: r for r in result["rows"]}
  assert set(rows) == {"adamw", "osd_steady_host_refresh"}
  for row in rows.values():
    assert row["kernels"] == sum(row["by_kind"].values()) > 0
  assert rows["adamw"]["measured_kernels_per_step"] == 12.0
  assert rows["osd_steady_host_refresh"]["measured_kernels_per_step"] == 99.0
  assert rows["osd_steady_host_refresh"]["measured_as"].endswith(": osd_steady_stacked")
  assert result["target_config"] is None
  assert out.with_suffix(".png").stat().st_size > 0


def test_cpu_run_counts_the_whole_train_step_of_a_method(tmp_path):
  argv = ["--platform", "cpu", "--program", "train_step", "--size", "tiny", "--batch", "2"]
  result = gpu_program.main([*argv, "--methods", "adamw,osd", "--out", str(tmp_path / "t.json")])
  rows = {r["method"]: r for r in result["rows"]}
  assert result["program"] == "train_step" and result["batch"] == 2
  # The whole step holds the forward and backward passes: more kernels than its update alone.
  update = gpu_program.main(
    ["--platform", "cpu", "--size", "tiny", "--methods", "adamw", "--out", str(tmp_path / "u.json")]
  )
  assert rows["adamw"]["kernels"] > update["rows"][0]["kernels"]
  assert rows["osd"]["kernels"] > rows["adamw"]["kernels"]


def test_the_first_measurement_of_a_method_wins(tmp_path):
  first = _profile(tmp_path, [{"method": "adamw", "kernels_per_step": 77.0}])
  second = tmp_path / "second.json"
  second.write_text(
    json.dumps({"size": "tiny", "rows": [{"method": "adamw", "kernels_per_step": 5.0}]})
  )
  found = gpu_program.measured_kernels([str(first), str(second)])
  assert found["tiny", "adamw"][0] == 77.0


def test_compiling_for_a_gpu_without_the_cuda_plugin_says_what_to_install(monkeypatch):
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  def no_plugin(*args, **kwargs):
    raise RuntimeError("Unknown backend cuda")

  monkeypatch.setattr(topologies, "get_topology_desc", no_plugin)
  with pytest.raises(RuntimeError, match="pip install jax-cuda12-plugin=="):
    gpu_program.target_device("cuda")
