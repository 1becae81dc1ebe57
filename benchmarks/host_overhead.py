#!/usr/bin/env python3
"""Host time per call of the mHC ops: what a small, launch-bound model pays in
Python and dispatch before any kernel runs.

    python3 benchmarks/host_overhead.py              # GPU: tiny tensors, kernels run
    python3 benchmarks/host_overhead.py --mock       # CPU: the GPU path, launches stubbed
    python3 benchmarks/host_overhead.py --profile    # + the top cProfile entries
    python3 benchmarks/host_overhead.py --cold --T 320 --C 1280   # as bench.py times a call

--cold times each call alone after a synchronize, as bench.py does (the GPU idles
until the host has issued the call), and says where that time goes: the host's
time to issue the call, then torch.profiler's operators by self CPU time.

On a GPU the tensors are so small (T = 8 by default) that the host, not the GPU, sets
the pace: time per call over many calls is the host's cost. --mock runs the GPU path's
Python (validation, custom-op autograd, allocation, launch arguments) on CPU tensors
with the kernel launch replaced by a stub: a check of our own Python, not of the
dispatch module or CUDA's launch cost. Best of several repeats, in µs.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import pathlib
import pstats
import statistics
import sys
import time
import types

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import mhc_gen  # noqa: E402
from mhc_gen import _launch, _loader, gpu, library  # noqa: E402
from mhc_gen import reference as R  # noqa: E402


def _stub_launches() -> None:
    """The GPU path on CPU tensors: everything down to the dispatch module's launch call
    (variant selection, pointer list, stream query), which is a no-op."""
    from generator.profiles import specs_for
    from generator.spec import Arch

    names = sorted(s.name for s in specs_for(Arch.SM90))
    module = types.SimpleNamespace(launch=lambda *args: None)
    _loader.module = lambda backend: module
    _loader.table = functools.cache(lambda backend: {n: i for i, n in enumerate(names)})
    _launch.target_arch = lambda index: ("cuda", Arch.SM90)
    _launch.device_name = lambda index: "mock"
    _launch._raw_stream = lambda index: 0
    torch.cuda.current_device = lambda: 0
    library._on_cpu = lambda t: False
    gpu._phi_splits = lambda t, k, device: 4
    gpu._sm_count = lambda device: 132
    gpu._fused_layer_backward = lambda x: True  # the path CUDA takes at these sizes


def _best_us(fn, sync, calls: int, repeats: int = 15) -> float:
    for _ in range(20):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def _cold(fn, calls: int) -> tuple[float, float]:
    """Median µs of (host time to issue fn(), event time of fn()), each call alone."""
    issue, device = [], []
    for i in range(calls + 5):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        if i >= 5:
            issue.append((t1 - t0) * 1e6)
            device.append(start.elapsed_time(end) * 1e3)
    return statistics.median(issue), statistics.median(device)


def cold_report(args, device) -> None:
    """Each case timed alone (as bench.py times it), then its profile."""
    from torch.profiler import ProfilerActivity, profile

    print("                                 issue µs  event µs (each call alone)")
    for name, fn in cases(args, device).items():
        issue, event = _cold(fn, args.calls)
        print(f"  {name:30s} {issue:8.1f}  {event:8.1f}", flush=True)
    if args.profile:
        for name, fn in cases(args, device).items():
            if "fwd+bwd" not in name:
                continue
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                _cold(fn, 20)
            print(f"--- {name}: torch.profiler, 25 calls")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def cases(args, device):
    n, c, t = args.n, args.C, args.T
    m = R.num_logits(n)
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    x = torch.randn(t, n, c, device=device, dtype=dt, requires_grad=True)
    phi = (0.01 * torch.randn(n * c, m, device=device)).requires_grad_()
    alpha = torch.full((3,), 0.01, device=device, requires_grad=True)
    b = torch.zeros(m, device=device, requires_grad=True)
    w = torch.ones(c, device=device, requires_grad=True)
    sub = torch.nn.Identity()

    def connection():
        u, _, h_post, h_res = mhc_gen.pre_dynamic(x, phi, alpha, b)
        return mhc_gen.post_dynamic(x, sub(u), h_post, h_res)

    def backward(fn):
        def run():
            out = fn()
            out.backward(torch.ones_like(out))

        return run

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    layer = lambda: mhc_gen.layer_dynamic(x, w, phi, alpha, b)  # noqa: E731
    y = x[:, 0].detach().contiguous()
    static = lambda: mhc_gen.post_static(x, y, b)  # noqa: E731

    def reference():
        h_pre, h_post, h_res = R.dynamic_coefficients(x, phi, alpha, b)
        return R.post(x, sub(R.pre(x, h_pre)), h_post, h_res)

    return {
        "one torch op (x + 1, no grad)": no_grad(lambda: x + 1),
        "reference connection fwd+bwd": backward(reference),
        "connection fwd (no grad)": no_grad(connection),
        "connection fwd+bwd": backward(connection),
        "layer_dynamic fwd (no grad)": no_grad(layer),
        "layer_dynamic fwd+bwd": backward(layer),
        "layer_static fwd (no grad)": no_grad(lambda: mhc_gen.layer_static(x, w, b)),
        "layer_static fwd+bwd": backward(lambda: mhc_gen.layer_static(x, w, b)),
        "post_static fwd (no grad)": no_grad(static),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--T", type=int, default=8)
    ap.add_argument("--C", type=int, default=64)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--mock", action="store_true", help="CPU tensors, kernel launches stubbed")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="print the top cProfile entries (with --cold: torch.profiler's operators)",
    )
    ap.add_argument("--cold", action="store_true", help="each call alone, as bench.py times it")
    args = ap.parse_args()
    if args.mock:
        _stub_launches()
        device, sync, where = torch.device("cpu"), lambda: None, "CPU, launches stubbed"
    else:
        if not torch.cuda.is_available():
            sys.exit("no GPU: run with --mock to time the GPU path's Python on CPU")
        device, sync = torch.device("cuda"), torch.cuda.synchronize
        where = torch.cuda.get_device_name()
    print(f"host µs per call, T={args.T} n={args.n} C={args.C} {args.dtype}, {where}")
    if args.cold:
        if args.mock:
            sys.exit("--cold times CUDA events: run it on a GPU")
        cold_report(args, device)
        return
    for name, fn in cases(args, device).items():
        print(f"  {name:30s} {_best_us(fn, sync, args.calls):8.1f}", flush=True)
    if args.profile:
        # The backward on this thread (not autograd's device thread), so that cProfile sees it.
        with torch.autograd.set_multithreading_enabled(False):
            for name, fn in cases(args, device).items():
                print(f"--- {name}")
                prof = cProfile.Profile()
                prof.runcall(lambda fn=fn: [fn() for _ in range(args.calls)])
                pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
