"""`ap-jax bench profile`: where the training step's time goes. XLA op times from a JAX profiler trace, matched to
the compiled HLO, summed per op, per kind of op and per named scope of the model (not in `all`: it measures no
speed of its own)."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Sequence

import jax

from ap_jax.bench import step as step_lib

# The model's named scopes (jax.named_scope in ap_jax/model/dit.py), most specific first: an XLA op is charged to
# the first one its source path names. Backward ops carry their forward op's scope.
PROFILE_SCOPES = ("self_attn", "cross_attn", "mlp", "modulation", "embed", "head", "optimizer", "ema")


def _op_index(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Compiled HLO text -> {instruction name: (kind, source path)}: kind is the fusion's or op's name without its
  number (`ynn_fusion`, `copy_bitcast_fusion`, `dot`, ...), the path is its op_name metadata."""
  index = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*", hlo_text, re.M):
    line = m.group(0)
    op = re.search(r'op_name="([^"]*)"', line)
    index[m.group(1)] = (re.sub(r"\.\d+$", "", m.group(1)), op.group(1) if op else "")
  return index


def _scope_of(path: str) -> str:
  parts = path.replace("(", "/").replace(")", "/").split("/")
  for scope in PROFILE_SCOPES:
    if scope in parts:
      return scope
  return "other"


def profile_benchmark(config_name: str, overrides: Sequence[str] = (), *, steps: int = 5,
                      trace_dir: str | None = None, top: int = 20) -> dict:
  """Where the training step's time goes: `steps` steps under the JAX profiler, each XLA op's time (from the
  trace) matched to the compiled HLO, summed per op, per kind of op (fusion type and the source op it came from,
  forward or backward) and per named scope of the model. The trace stays in `trace_dir` (TensorBoard / Perfetto)
  when one is given. Op times are what the runtime records per op; on a CPU they overlap when the runtime runs two
  ops at once, so their sum can exceed the step's wall time."""
  step = step_lib.training_step(config_name, overrides)
  for _ in range(2):
    step.one_step()  # compiled and warm
  index = _op_index(step.step_fn.as_text())
  with tempfile.TemporaryDirectory() as tmp:
    where = trace_dir or tmp
    start = time.perf_counter()
    with jax.profiler.trace(where, create_perfetto_trace=True):
      for _ in range(steps):
        step.one_step()
    wall_s = (time.perf_counter() - start) / steps
    traces = sorted(glob.glob(os.path.join(where, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    if not traces:
      raise RuntimeError(f"the profiler wrote no trace under {where}")
    with gzip.open(traces[-1]) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  per_op: collections.Counter = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in index:
      per_op[e["name"]] += float(e.get("dur", 0.0)) * 1e-6 / steps
  by_kind: collections.Counter = collections.Counter()
  by_scope: collections.Counter = collections.Counter()
  count: collections.Counter = collections.Counter()
  for name, seconds in per_op.items():
    kind, path = index[name]
    source = path.split("/")[-1] if path else "?"
    key = f"{kind} | {source}{' (backward)' if 'transpose(' in path else ''}"
    by_kind[key] += seconds
    count[key] += 1
    by_scope[_scope_of(path)] += seconds
  total = sum(per_op.values())
  rows = lambda counter, n: [dict(name=k, ms=1e3 * v, share=v / total if total else 0.0) for k, v in
                             counter.most_common(n)]
  return dict(config=config_name, overrides=list(overrides), steps=steps, step_wall_ms=1e3 * wall_s,
              op_ms=1e3 * total, ops_per_step=len(per_op), trace_dir=trace_dir,
              by_scope=rows(by_scope, None),
              by_kind=[dict(r, ops=count[r["name"]]) for r in rows(by_kind, top)],
              top_ops=[dict(r, kind=index[r["name"]][0], source=index[r["name"]][1]) for r in rows(per_op, top)])


def profile_table(result: dict) -> str:
  lines = [f"{result['config']} {' '.join(result['overrides'])}: step {result['step_wall_ms']:.1f} ms wall under the "
           f"profiler, {result['op_ms']:.1f} ms in {result['ops_per_step']} XLA ops", "", "| scope | ms | share |",
           "|---|---|---|"]
  lines += [f"| {r['name']} | {r['ms']:.1f} | {r['share']:.0%} |" for r in result["by_scope"]]
  lines += ["", "| kind of op (fusion type, source op) | ops | ms | share |", "|---|---|---|---|"]
  lines += [f"| {r['name']} | {r['ops']} | {r['ms']:.1f} | {r['share']:.0%} |" for r in result["by_kind"]]
  return "\n".join(lines)
