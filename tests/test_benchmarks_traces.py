"""benchmarks/traces.py on a hand-written Perfetto trace of two devices with known kernels."""

import gzip
import json

import pytest

from benchmarks import traces


def _trace(path, devices):
  events = []
  for pid, (name, kernels) in enumerate(devices.items(), start=1):
    events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}})
    for tid, stream in ((1, "Stream #13(compute)"), (2, "Stream #20(nccl)"), (3, "XLA Ops")):
      events.append(
        {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": stream}}
      )
    for kernel, tid, ts, dur in kernels:
      events.append({"ph": "X", "name": kernel, "pid": pid, "tid": tid, "ts": ts, "dur": dur})
  events.append({"ph": "M", "name": "process_name", "pid": 99, "args": {"name": "/host:CPU"}})
  events.append({"ph": "X", "name": "PjitFunction", "pid": 99, "tid": 1, "ts": 0, "dur": 999})
  path.mkdir(parents=True)
  with gzip.open(path / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)


def test_timeline_splits_a_step_into_compute_exposed_collectives_and_idle(tmp_path):
  gpu0 = [
    ("sm90_xmma_gemm_f32f32_nt", 1, 0, 400),
    ("loop_add_fusion", 1, 500, 100),
    # the all-reduce overlaps the fusion for 50 µs, then runs alone for 250 µs
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 2, 550, 300),
    ("fusion.7", 3, 0, 1000),
  ]  # an XLA op span over the kernels: not a kernel
  gpu1 = [("loop_add_fusion", 1, 0, 200)]
  _trace(tmp_path / "t", {"/device:GPU:0": gpu0, "/device:GPU:1": gpu1})
  events = traces.device_events(tmp_path / "t")
  assert sorted(events) == ["/device:GPU:0", "/device:GPU:1"]
  assert len(events["/device:GPU:0"]) == 3
  t = traces.timeline(events["/device:GPU:0"], steps=2, top=2)
  # µs over 2 steps, in ms per step: span 0..850, busy 400 + 350, compute 400 + 100.
  assert t["span_ms"] == pytest.approx(0.425)
  assert t["busy_ms"] == pytest.approx(0.375)
  assert t["compute_ms"] == pytest.approx(0.25)
  assert t["exposed_collective_ms"] == pytest.approx(0.125)
  assert t["idle_ms"] == pytest.approx(0.05)
  assert t["by_kind_ms"] == pytest.approx({"gemm": 0.2, "collective": 0.15, "fusion": 0.05})
  assert [k["kernel"] for k in t["top"]] == [
    "sm90_xmma_gemm_f32f32_nt",
    "ncclDevKernel_AllReduce_Sum_f32_RING_LL",
  ]
  assert traces.kind_of("ncclDevKernel_AllReduce_Sum_f32_RING_LL") == "collective"
  assert traces.device_events(tmp_path / "none") == {}
