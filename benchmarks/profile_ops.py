#!/usr/bin/env python3
"""Per-kernel GPU time of the dynamic ops at one size (torch.profiler), to see
where a gap to the roofline comes from.

    python3 benchmarks/profile_ops.py --T 16384 --C 4096 --n 4
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import mhc_gen  # noqa: E402
from benchmarks.projection_paths import MODES  # noqa: E402
from mhc_gen import gpu  # noqa: E402
from mhc_gen import reference as R  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=16384)
    ap.add_argument("--C", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--no-profiler", action="store_true", help="one step only (for ncu)")
    ap.add_argument("--iters", type=int, default=20, help="Sinkhorn iterations")
    ap.add_argument(
        "--projection",
        choices=["gemm", "cores"],
        default="gemm",
        help="cores: bf16 x projected on CUDA cores in the fused kernels (the ROCm path)",
    )
    ap.add_argument(
        "--mode",
        choices=list(MODES),
        help="the switches of benchmarks/projection_paths.py (default: the library's own)",
    )
    args = ap.parse_args()
    if args.mode:
        for name, value in MODES[args.mode].items():
            setattr(gpu, name, value)
    if args.projection == "cores":
        gpu._gemm_projection = lambda x: False
    t, c, n = args.T, args.C, args.n
    m = R.num_logits(n)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    x = torch.randn(t, n, c, device="cuda").to(dtype).requires_grad_()
    phi = (torch.randn(n * c, m, device="cuda") * 1e-3).requires_grad_()
    alpha = torch.full((3,), 0.01, device="cuda", requires_grad=True)
    b = mhc_gen.residual_init_bias(n).cuda().requires_grad_()
    w = torch.ones(c, device="cuda", requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        with torch.no_grad():
            mhc_gen.pre_dynamic(x, phi, alpha, b, sinkhorn_iters=args.iters)
        out = mhc_gen.layer_dynamic(x, w, phi, alpha, b, sinkhorn_iters=args.iters)
        torch.autograd.grad(out, [x, w, phi, alpha, b], grad)

    for _ in range(1 if args.no_profiler else 3):
        step()
    torch.cuda.synchronize()
    if args.no_profiler:
        return
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(
        f"T={t} C={c} n={n} {args.dtype} iters={args.iters}, 5 steps"
        " (pre_dynamic fwd + layer_dynamic fwd+bwd):"
    )
    print(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
    )


if __name__ == "__main__":
    main()
