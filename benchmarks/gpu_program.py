"""The kernels an update launches on an H100, counted on a machine without a GPU.

XLA compiles a program for a GPU it is only described to (`H100_TARGET`, through JAX's
compile-only topology, `jax.experimental.topologies.get_topology_desc(platform="cuda")`) as
for the GPU itself, except that it autotunes nothing: each instruction of the compiled entry
computation that runs device work is one kernel launch (a fusion, a copy, a cuBLAS GEMM call)
in the same order, with the same names, as in a profile of that program on the GPU
(`profile_update`'s `top`: fusion "loop_add_fusion.27" runs as kernel "loop_add_fusion_27").
A GEMM call may launch more than one kernel (cuBLAS's split-K reduction), so the count is a
lower bound where GEMMs run; fusions and copies are counted exactly. Checked against the
profiles of the same programs on an H100 (docs/benchmarks.md, "Kernels counted without a GPU"):
what a change to the update does to its kernels and copies can be seen here before device time
is spent on timing it.

The programs are `profile_update`'s (`profile_update.update_step`: the update and the weights'
add, parameters and state donated), with its method names and compile settings, on the LLaMA
trees of `optimizer_step.SIZES`; with ``--program train_step``, train_step's steady steps
(forward, backward and update, refreshes decided on the host) of its methods and variants on
the example's models, ``--batch`` × 256 tokens, XLA's attention (`compiled_train_step`).
Needs JAX's CUDA plugin of the installed jaxlib's version (`pip install
jax-cuda12-plugin==<jaxlib version>`; no GPU, driver or CUDA toolkit), and runs with
JAX_PLATFORMS=cpu. ``--platform cpu`` counts the CPU backend's program instead: a smoke
run of the plumbing without the plugin (its counts say nothing about a GPU).
"""

from __future__ import annotations

import collections
import json
import pathlib
import re
import time

import jax
import jax.numpy as jnp

from benchmarks import hlo_collectives
from benchmarks import optimizer_step
from benchmarks import profile_update
from benchmarks import record
from benchmarks import suites
from benchmarks import train_setups
from benchmarks import traces

# An H100 SXM5 80GB (compute capability 9.0) as XLA's GpuTargetConfig text proto: 132 SMs of
# 228 KiB shared memory (227 KiB a block opted in), 64K registers, 2048 threads each; 50 MiB of
# L2, 3.35 TB/s of HBM3, 1.98 GHz boost clock; CUDA 12.8 and cuDNN 9.7 as the runtime. XLA's
# fusion and GEMM choices read these figures.
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84929347584
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
runtime_version { major: 12 minor: 8 patch: 0 }
dnn_version_info { major: 9 minor: 7 }
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
"""
TARGET_NAME = "NVIDIA H100 80GB HBM3 (compile only)"
DEFAULT_METHODS = (
  "adamw",
  "galore_steady_host_refresh",
  "osd_steady_host_refresh",
  "rso_steady_host_refresh",
  "grass_steady_host_refresh",
)
# Entry instructions that launch nothing: operands, views and the tuples that name outputs.
NO_KERNEL = {
  "parameter",
  "constant",
  "get-tuple-element",
  "tuple",
  "bitcast",
  "opt-barrier",
  "after-all",
}
CONTROL_FLOW = {"conditional", "while", "call"}
GEMM_TARGETS = re.compile(r"cublas|gemm|matmul", re.I)


def _split_shape(rest: str) -> tuple[str, str]:
  """(shape, what follows it) of an instruction's right-hand side; a tuple shape is in
  parentheses, which may nest."""
  if not rest.startswith("("):
    shape, _, tail = rest.partition(" ")
    return shape, tail
  depth = 0
  for end, char in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      return rest[: end + 1], rest[end + 1 :]
  raise ValueError(f"unbalanced tuple shape: {rest[:80]}")


def entry_instructions(hlo_text: str) -> list[tuple[str, str, str, str]]:
  """(name, opcode, shape, custom-call target) of each instruction of the ENTRY computation of a
  compiled module's text, in program order."""
  start = hlo_text.index("\nENTRY ")
  body = hlo_text[start : hlo_text.index("\n}", start)]
  found = []
  for line in body.splitlines()[1:]:
    match = re.match(r"\s*(?:ROOT )?%(\S+) = (.*)$", line)
    if not match:
      continue
    name, rest = match.groups()
    shape, tail = _split_shape(rest)
    opcode = re.match(r"\s*([a-z][\w-]*)\(", tail).group(1)
    target = re.search(r'custom_call_target="([^"]+)"', tail)
    found.append((name, opcode, shape, target.group(1) if target else ""))
  return found


def kernel_kind(name: str, opcode: str, target: str) -> str:
  """A launching instruction's kind, as `traces.kind_of` sorts the profile's kernel names."""
  if opcode == "custom-call":
    return "gemm" if GEMM_TARGETS.search(target) else f"custom-call {target}"
  if opcode == "copy":
    return "copy/transpose"
  if opcode == "fusion":
    return traces.kind_of(name)
  return opcode


def written_bytes(shape: str, workspace: bool = True) -> int:
  """The bytes of an instruction's result (every array of a tuple), from its shape text;
  without `workspace`, not its int8 arrays (a cuBLAS call's scratch space)."""
  if not workspace:
    shape = re.sub(r"\bs8\[[\d,]*\]", "", shape)
  return hlo_collectives.shape_bytes(shape)


def launches(hlo_text: str) -> dict:
  """The kernels the compiled program's entry computation launches: their number (a GEMM call
  counted once), by kind, its GEMM calls, its copies by shape, the bytes the launches write by
  kind, and the control-flow instructions (whose bodies' kernels are not counted)."""
  by_kind, copies, written = collections.Counter(), collections.Counter(), collections.Counter()
  gemm_calls = control_flow = 0
  for name, opcode, shape, target in entry_instructions(hlo_text):
    if opcode in NO_KERNEL:
      continue
    if opcode in CONTROL_FLOW:
      control_flow += 1
      continue
    kind = kernel_kind(name, opcode, target)
    by_kind[kind] += 1
    written[kind] += written_bytes(shape, workspace=kind != "gemm")
    gemm_calls += kind == "gemm"
    if opcode == "copy":
      copies[re.sub(r"\{[^}]*\}", "", shape)] += 1
  return {
    "kernels": sum(by_kind.values()),
    "by_kind": dict(by_kind.most_common()),
    "gemm_calls": gemm_calls,
    "copies": dict(copies.most_common()),
    # What the launches write (their results, a GEMM's scratch space left out), by kind: a
    # copy's or a concatenation's cost is its bytes, not its launch.
    "bytes_written_by_kind": dict(written.most_common()),
    "control_flow": control_flow,
  }


def target_device(platform: str, target_text: str = H100_TARGET):
  """The device to compile for: the first CPU device, or a compile-only CUDA device described
  by `target_text` (a GpuTargetConfig text proto)."""
  if platform == "cpu":
    return jax.devices("cpu")[0]
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  try:
    topology = topologies.get_topology_desc(
      "gpu_program", "cuda", target_config=target_text, topology="1x1x1"
    )
  except Exception as e:  # no CUDA plugin: JAX raises its own errors for that
    raise RuntimeError(
      "compiling for a GPU without one needs JAX's CUDA plugin of jaxlib's version: "
      f"pip install jax-cuda12-plugin=={jax.__version__} ({e})"
    ) from e
  return topology.devices[0]


def compiled_update(method: str, size: str, device) -> str:
  """The compiled text of `profile_update`'s program of `method` on the LLaMA tree of `size`,
  compiled for `device`."""
  cfg = optimizer_step.SIZES[size]
  tx, _ = profile_update.methods(cfg["rank"])[method]
  sharding = jax.sharding.SingleDeviceSharding(device)
  on_device = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
  params = jax.tree_util.tree_map(
    lambda s: on_device(jax.ShapeDtypeStruct(s, jnp.float32)),
    optimizer_step.llama_shapes(**cfg),
    is_leaf=lambda x: isinstance(x, tuple),
  )
  state = jax.tree_util.tree_map(on_device, jax.eval_shape(tx.init, params))
  step = profile_update.update_step(method, tx)
  with train_setups.compile_settings(method):
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params)
    return lowered.compile().as_text()


def compiled_train_step(method: str, size: str, batch: int, device) -> str:
  """The compiled text of train_step's steady step of `method` (refreshes decided on the host,
  `--host-refresh`) on the example's LLaMA of `size`, `batch` × `train_step.SEQ` tokens,
  compiled for `device`. XLA's attention: cuDNN's, which the suite picks on a GPU, builds its
  graph with the GPU's cuDNN at compile time, so only the attention's kernels differ from the
  step timed there."""
  from benchmarks import train_step  # pylint: disable=g-import-not-at-top
  from examples.llama.config import ModelConfig  # pylint: disable=g-import-not-at-top

  fields = train_setups.model_fields(
    train_step.SIZES[size], train_step.VOCAB, False, "float32", False
  )
  train_setups.use_attention("xla")
  setup = train_setups.build(
    method, ModelConfig(**fields), batch=batch, seq=train_step.SEQ, host_refresh=True
  )
  sharding = jax.sharding.SingleDeviceSharding(device)
  abstract = jax.tree_util.tree_map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), setup.abstract
  )
  with train_setups.compile_settings(method):
    return setup.step.lower(*abstract).compile().as_text()


def measured_kernels(entries) -> dict:
  """(size, method here) -> (kernels per step, "file: method there") from profile_update JSONs
  measured on a GPU. An entry is a JSON's path (each row under its own name) or
  "PATH:THERE:HERE" (its row THERE as method HERE: a program another commit measured under
  another name); the first entry that gives a (size, method) wins. Name only programs that
  are the same as the ones compiled here (a default flipped since changes a name's program)."""
  found = {}
  for entry in entries:
    path, *renamed = entry.split(":")
    result = json.loads(pathlib.Path(path).read_text())
    for row in result["rows"]:
      there = row["method"]
      if not row.get("kernels_per_step") or renamed and there != renamed[0]:
        continue
      here = renamed[1] if renamed else there
      source = f"{pathlib.Path(path).name}: {there}"
      found.setdefault((result["size"], here), (row["kernels_per_step"], source))
  return found


def plot(result: dict, path) -> None:
  """One panel per size: each method's kernels counted here beside those measured (0: none)."""
  sizes = list(dict.fromkeys(row["size"] for row in result["rows"]))
  fig, axes = record.subplots(1, len(sizes), figsize=(5.5 * len(sizes), 4.2), squeeze=False)
  for ax, size in zip(axes[0], sizes):
    rows = [row for row in result["rows"] if row["size"] == size]
    record.bars(
      ax,
      [re.sub(r"_host_refresh$|_steady", "", row["method"]) for row in rows],
      {
        "counted (compile only)": [row["kernels"] for row in rows],
        "measured (profile)": [row.get("measured_kernels_per_step", 0) for row in rows],
      },
      f"{size}: kernels per {result.get('program', 'update').replace('_', ' ')},"
      f" {result['target']}",
      "kernels",
    )
  record.save(fig, path)


def main(argv=None) -> dict:
  # --measured: profile_update JSONs whose kernels per step go beside the counts
  # (`measured_kernels`: "PATH" or "PATH:THERE:HERE", comma-separated); --target: a
  # GpuTargetConfig text proto instead of H100_TARGET.
  args = suites.script_parser(
    __doc__,
    size="60m",
    methods=",".join(DEFAULT_METHODS),
    platform=["cuda", "cpu"],
    program=["update", "train_step"],
    batch=64,
    target="",
    measured="",
    hlo_dir="",
    commit="",
  ).parse_args(argv)
  target_text = pathlib.Path(args.target).read_text() if args.target else H100_TARGET
  device = target_device(args.platform, target_text)
  measured = measured_kernels([p for p in args.measured.split(",") if p])
  sizes = [s for s in args.size.split(",") if s]
  result = {
    **record.provenance("gpu_program", argv),
    "target": TARGET_NAME if args.platform == "cuda" else device.device_kind,
    "target_config": target_text if args.platform == "cuda" else None,
    "counting": "kernels: instructions of the compiled entry computation that launch device"
    " work, each GEMM call counted once (cuBLAS may launch more: a lower bound there);"
    " measured_kernels_per_step: profile_update's count of the same program on the GPU",
    "rows": [],
  }
  result["commit"] = args.commit or result["commit"]
  if args.program == "train_step":
    known = train_setups.METHODS + train_setups.VARIANTS
    compiled = lambda method, size: compiled_train_step(method, size, args.batch, device)
  else:
    known = profile_update.PROFILED
    compiled = lambda method, size: compiled_update(method, size, device)
  result["program"] = args.program
  result["batch"] = args.batch if args.program == "train_step" else None
  for size in sizes:
    for method in suites.chosen(args.methods, known):
      started = time.perf_counter()
      text = compiled(method, size)
      row = {"size": size, "method": method, **launches(text)}
      row["compile_s"] = round(time.perf_counter() - started, 1)
      if (size, method) in measured:
        row["measured_kernels_per_step"], row["measured_as"] = measured[size, method]
      if args.hlo_dir:
        record.write_hlo(pathlib.Path(args.hlo_dir) / f"{size}_{method}.hlo.txt.gz", text)
      result["rows"].append(row)
      record.write_json(args.out, result)
      seen = row.get("measured_kernels_per_step", "")
      print(
        f"{size:>5} {method:<50} {row['kernels']:6d} kernels"
        f"{f' (measured {seen:.0f})' if seen else ''}  {row['by_kind']}",
        flush=True,
      )
  plot(result, pathlib.Path(args.out).with_suffix(".png"))
  return result
