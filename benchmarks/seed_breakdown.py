#!/usr/bin/env python3
"""Where a seed config's call goes: host time to issue it, its time as bench.py takes it
(alone, L2 flushed), graph replay, and each kernel it launches (µs a call, grid).

    python3 benchmarks/seed_breakdown.py                   # the nine seed configs
    python3 benchmarks/seed_breakdown.py --configs 32,1280,32 --H static --pass fwd

A call whose cold time exceeds its graph time by more than the flush hides is host-bound;
one whose kernels sum to its graph time is bound by them.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks.bench import SEED_CONFIGS, layer_fns, layer_inputs, time_cold, time_graph  # noqa: E402


def _call(t, c, n, dynamic, backward):
    x, p = layer_inputs(t, c, n, torch.bfloat16, dynamic, backward)
    ours, _ = layer_fns(dynamic)
    grad = torch.randn_like(x) if backward else None
    params = [x, *p.values()]

    def call():
        out = ours(x, p)
        if backward:
            torch.autograd.grad(out, params, grad)

    return call


def _issue_us(fn, calls=50) -> float:
    """Median host µs to issue fn() with the GPU idle (each call after a synchronize)."""
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def _kernels(fn, calls=10):
    """[(name, µs a call, launches a call, grid)] from torch.profiler's trace."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    total, count, grid = collections.Counter(), collections.Counter(), {}
    for e in events:
        if e.get("cat") != "kernel":
            continue
        name = e["name"]
        total[name] += e.get("dur", 0)
        count[name] += 1
        grid[name] = e.get("args", {}).get("grid")
    return [(k, total[k] / calls, count[k] / calls, grid[k]) for k, _ in total.most_common()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configs", nargs="*", help="T,C,n (default: the seed's nine)")
    ap.add_argument("--H", choices=["static", "dynamic", "both"], default="both")
    ap.add_argument("--pass", dest="pass_", choices=["fwd", "fwd+bwd", "both"], default="both")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    configs = (
        [tuple(map(int, s.split(","))) for s in args.configs] if args.configs else SEED_CONFIGS
    )
    kinds = {"static": [False], "dynamic": [True], "both": [False, True]}[args.H]
    passes = {"fwd": [False], "fwd+bwd": [True], "both": [False, True]}[args.pass_]
    print(torch.cuda.get_device_name(), "bf16; µs a call")
    for t, c, n in configs:
        for dynamic in kinds:
            for backward in passes:
                fn = _call(t, c, n, dynamic, backward)
                cold = time_cold(fn, args.reps) * 1e3
                graph = (time_graph(fn) or float("nan")) * 1e3
                issue = _issue_us(fn)
                rows = _kernels(fn)
                gpu = sum(r[1] for r in rows)
                h = "dynamic" if dynamic else "static"
                p = "fwd+bwd" if backward else "fwd"
                print(
                    f"\n{t}x{c}x{n} {h} {p}: cold {cold:.1f}  graph {graph:.1f}  "
                    f"issue {issue:.1f}  kernels {gpu:.1f} in {sum(r[2] for r in rows):.0f}"
                )
                for name, us, k, grid in rows:
                    print(f"  {us:8.1f} x{k:<4.0f} {str(grid):16s} {name[:110]}")


if __name__ == "__main__":
    main()
