"""Device kernels from a `jax.profiler` Perfetto trace: by kind, by device, and on a timeline.

`profile_update` sums one device's kernels by kind; `timeline` also asks what a multi-device
step's time is made of on each device: kernels running (compute, collectives), collectives that
no compute kernel overlaps (exposed communication), and the device idle between kernels (waiting
for the host or for another device).
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re

# First match wins: NCCL's kernels ("ncclDevKernel_AllReduce_Sum_f32_RING_LL") before
# "reduction", which their names would also match.
KINDS = (
  (
    "collective",
    re.compile(
      r"nccl|all[-_]?reduce|all[-_]?gather|reduce[-_]?scatter"
      r"|all[-_]?to[-_]?all|collective[-_]?permute",
      re.I,
    ),
  ),
  ("gemm", re.compile(r"gemm|cutlass|xmma|cublas|sm\d+_.*(tn|nt|nn|tt)|triton_gemm|matmul", re.I)),
  ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset", re.I)),
  ("reduction", re.compile(r"reduc", re.I)),
  ("fusion", re.compile(r"fusion|loop_|input_|wrapped_", re.I)),
)


def kind_of(name: str) -> str:
  for kind, pattern in KINDS:
    if pattern.search(name):
      return kind
  return "other"


def device_events(trace_dir: pathlib.Path) -> dict[str, list[tuple[str, float, float]]]:
  """Device name ("/device:GPU:0") -> [(kernel name, start µs, duration µs)] of its streams."""
  files = sorted(pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz"))
  if not files:
    return {}
  with gzip.open(files[-1], "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  devices = {
    e["pid"]: str(e["args"]["name"])
    for e in events
    if e.get("ph") == "M"
    and e.get("name") == "process_name"
    and "/device:" in str(e.get("args", {}).get("name", ""))
  }
  # Kernels sit on the device tracks' stream threads; XLA op and module rows on the same pid are
  # spans over them (named like the HLO op or "XLA Modules"), so keep the stream rows only.
  threads = [
    (e["pid"], e["tid"], str(e.get("args", {}).get("name", "")))
    for e in events
    if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in devices
  ]
  streams = {(pid, tid) for pid, tid, name in threads if re.search(r"stream", name, re.I)}
  if not streams:  # another trace layout: every device row but the HLO op/module spans
    streams = {
      (pid, tid)
      for pid, tid, name in threads
      if not re.search(r"XLA (Ops|Modules)|TraceMe|Steps", name)
    }
  found = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams:
      found[devices[e["pid"]]].append(
        (e["name"], float(e.get("ts", 0.0)), float(e.get("dur", 0.0)))
      )
  return dict(found)


def _union(intervals) -> float:
  """Total length covered by (start, end) intervals."""
  total, reach = 0.0, float("-inf")
  for start, end in sorted(intervals):
    if end > reach:
      total += end - max(start, reach)
      reach = end
  return total


def timeline(kernels: list[tuple[str, float, float]], steps: int, top: int = 10) -> dict:
  """What `steps` steps of one device's kernels [(name, start µs, dur µs)] took, ms per step.

  span: first kernel's start to last kernel's end; busy: time any kernel runs (streams
  overlap); compute: time any non-collective kernel runs; exposed_collective: time only
  collectives run; idle: span − busy (no kernel: the device waits for the host or its peers).
  """
  per = 1e3 * steps
  compute = [(t, t + d) for n, t, d in kernels if kind_of(n) != "collective"]
  collective = [(t, t + d) for n, t, d in kernels if kind_of(n) == "collective"]
  span = (max(t + d for _, t, d in kernels) - min(t for _, t, _ in kernels)) if kernels else 0.0
  busy = _union(compute + collective)
  return {
    "span_ms": span / per,
    "busy_ms": busy / per,
    "compute_ms": _union(compute) / per,
    "exposed_collective_ms": (busy - _union(compute)) / per,
    "idle_ms": (span - busy) / per,
    **summary(kernels, steps, top),
  }


def summary(kernels: list[tuple[str, float, float]], steps: int, top: int = 10) -> dict:
  """Kernels [(name, start µs, dur µs)] of `steps` steps, per step: their number, their time
  by kind (`KINDS`, ms) and the `top` kernels by time (ms, share of all, calls, kind)."""
  per = 1e3 * steps
  by_kind, by_name, calls = (collections.Counter() for _ in range(3))
  for name, _, dur in kernels:
    by_kind[kind_of(name)] += dur
    by_name[name] += dur
    calls[name] += 1
  total = sum(by_kind.values())
  return {
    "kernels_per_step": len(kernels) / steps,
    "by_kind_ms": {k: v / per for k, v in by_kind.most_common()},
    "top": [
      {
        "kernel": k[:160],
        "ms": v / per,
        "share": v / total if total else None,
        "calls_per_step": calls[k] / steps,
        "kind": kind_of(k),
      }
      for k, v in by_name.most_common(top)
    ],
  }
