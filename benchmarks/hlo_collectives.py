"""Collectives of a compiled HLO module (its text), counted by kind with their sizes in bytes.

No JAX here: the parser reads the text XLA writes (`compiled.as_text()`, or an `--xla_dump_to`
file) for any backend. Sizes are array sizes per device, not wire traffic: an all-gather is
counted by its result (the gathered array), the others by their operand. `collective_bytes`
splits the steady path (what every call runs; while loops times their known trip counts) from
the branches of each conditional; `summarize` reduces that to bytes gathered, reduced and moved.
"""

from __future__ import annotations

import math
import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
}


def shape_bytes(text):
  """Total bytes of every array type (e.g. f32[512,2048]{1,0}) in `text`."""
  return sum(
    DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text)
    if dtype in DTYPE_BYTES
  )


def _group_size(line):
  """Devices per replica group of a collective, in any of XLA's notations."""
  m = re.search(r"replica_groups=mesh\[([^\]]*)\].*?\{('[^}]*)\}", line)
  if m:  # mesh['axis_0'=4,'axis_1'=2] {'axis_1'}
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
  m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)  # [4,2]<=[8]
  if m:
    return int(m.group(2))
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)  # {{0,1},{2,3}}
  if m:
    return len(m.group(1).split(","))
  return None  # collective-permute: source_target_pairs


def _operands(line, op):
  """Operand names of `op(...)` on an HLO line."""
  start = line.index(op + "(") + len(op) + 1
  depth = 1
  for i in range(start, len(line)):
    depth += {"(": 1, ")": -1}.get(line[i], 0)
    if depth == 0:
      break
  return re.findall(r"%([\w.\-]+)", line[start:i])


def parse_collectives(hlo):
  """Collectives of a compiled HLO module, by computation.

  Returns (collectives, calls, conditionals, entry): collectives maps a computation to [(kind,
  operand bytes, result bytes, group size)]; calls maps it to [(callee, trip count)] (a while
  loop's known trip count, 1 otherwise); conditionals lists (computation, [branches]).
  """
  collectives, calls, conditionals, entry, current = {}, {}, [], None, None
  op_re = re.compile(r"\s(" + "|".join(KINDS) + r")(-start)?\(")
  types = {}  # instruction name -> its result type (names are module-wide)
  for line in hlo.splitlines():
    m = re.match(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", line)
    if m:
      rhs = m.group(2)
      types[m.group(1)] = rhs[: rhs.index(")") + 1] if rhs.startswith("(") else rhs.split(" ")[0]
  for line in hlo.splitlines():
    head = re.match(r"^(ENTRY )?%(\S+) .*\{$", line)
    if head:
      current = head.group(2)
      entry = current if head.group(1) else entry
      collectives[current], calls[current] = [], []
      continue
    if current is None or " = " not in line:
      continue
    name, rhs = line.split(" = ", 1)
    m = op_re.search(rhs)
    if m:
      kind, op = m.group(1), m.group(1) + (m.group(2) or "")
      operand_bytes = sum(shape_bytes(types.get(o, "")) for o in _operands(rhs, op))
      result_bytes = shape_bytes(types[name.strip().split("%")[-1]])
      if m.group(2):  # async start: its result tuple holds operands, outputs
        result_bytes -= operand_bytes
      collectives[current].append((kind, operand_bytes, result_bytes, _group_size(rhs)))
    trips = 1
    if " while(" in rhs:
      t = re.search(r'"known_trip_count":\{"n":"(\d+)"', rhs)
      trips = int(t.group(1)) if t else None
    for attr in ("body", "condition", "to_apply", "calls"):
      for callee in re.findall(attr + r"=%([\w.\-]+)", rhs):
        calls[current].append((callee, trips if attr == "body" else 1))
    if " conditional(" in rhs:
      branches = []
      for group in re.findall(r"branch_computations=\{([^}]*)\}", rhs):
        branches += re.findall(r"%([\w.\-]+)", group)
      branches += re.findall(r"(?:true|false)_computation=%([\w.\-]+)", rhs)
      conditionals.append((current, branches))
      for b in branches:
        calls[current].append((b, "branch"))
  return collectives, calls, conditionals, entry


def _totals(collectives, calls, root):
  """Per-kind bytes of everything `root` runs (loops times their trips), not entering
  conditional branches; whether any loop had no known count."""
  out = {k: {"count": 0, "operand_bytes": 0, "result_bytes": 0, "group_sizes": []} for k in KINDS}
  unknown = False
  todo = [(root, 1)]
  while todo:
    comp, mult = todo.pop()
    for kind, ob, rb, g in collectives.get(comp, []):
      row = out[kind]
      row["count"] += mult
      row["operand_bytes"] += mult * ob
      row["result_bytes"] += mult * rb
      if g not in row["group_sizes"]:
        row["group_sizes"].append(g)
    for callee, trips in calls.get(comp, []):
      if trips == "branch":
        continue
      if trips is None:
        unknown, trips = True, 1
      todo.append((callee, mult * trips))
  return {k: v for k, v in out.items() if v["count"]}, unknown


def collective_bytes(hlo):
  """Steady-path totals, and totals per branch of each conditional that has collectives."""
  collectives, calls, conditionals, entry = parse_collectives(hlo)
  steady, unknown = _totals(collectives, calls, entry)
  branches = []
  for parent, names in conditionals:
    per = []
    for name in names:
      t, u = _totals(collectives, calls, name)
      unknown |= u
      per.append({"computation": name, "collectives": t})
    if any(b["collectives"] for b in per):
      branches.append({"in": parent, "branches": per})
  return {
    "steady": steady,
    "conditional_branches": branches,
    "loops_without_known_trip_count": unknown,
  }


def summarize(counted) -> dict:
  """Steady-path bytes by role: gathered (all-gather results), reduced (all-reduce and
  reduce-scatter operands), moved (all-to-all and collective-permute operands), and the largest
  conditional branch's total."""
  steady = counted["steady"]
  get = lambda kind, key: steady.get(kind, {}).get(key, 0)
  out = {
    "gather": get("all-gather", "result_bytes"),
    "reduce": get("all-reduce", "operand_bytes") + get("reduce-scatter", "operand_bytes"),
    "moved": get("all-to-all", "operand_bytes") + get("collective-permute", "operand_bytes"),
  }
  out["total"] = out["gather"] + out["reduce"] + out["moved"]
  branch_totals = [0]
  for cond in counted["conditional_branches"]:
    for branch in cond["branches"]:
      branch_totals.append(
        sum(
          v["result_bytes"] if k == "all-gather" else v["operand_bytes"]
          for k, v in branch["collectives"].items()
        )
      )
  out["largest_branch_total"] = max(branch_totals)
  return out


def by_shape(hlo) -> list:
  """[kind, result type, count] of every collective in the module (steady path and branches):
  tells weight-sized arrays from activation-sized ones (batch × seq × …)."""
  op = re.compile(r"= (\(.*?\)|\S+) (" + "|".join(KINDS) + r")(?:-start)?\(")
  counts = {}
  for line in hlo.splitlines():
    m = op.search(line)
    if m:
      key = (m.group(2), re.sub(r"\{[\d,]*\}|/\*index=\d+\*/", "", m.group(1)))
      counts[key] = counts.get(key, 0) + 1
  return [[kind, shape, n] for (kind, shape), n in sorted(counts.items())]
