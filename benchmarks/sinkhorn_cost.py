#!/usr/bin/env python3
"""How much of the dynamic forward kernels' time the Sinkhorn costs: graph-replay ms of
layer_dynamic and pre_dynamic at 0, 5 and 20 Sinkhorn iterations, less the projection GEMM
timed alone (the kernel's share).

    python3 benchmarks/sinkhorn_cost.py
"""

from __future__ import annotations

import functools
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import mhc_gen  # noqa: E402
from benchmarks.bench import copy_bandwidth, time_graph  # noqa: E402
from mhc_gen import gpu  # noqa: E402
from mhc_gen import reference as R  # noqa: E402

SIZES = ((16384, 4096, 4), (8192, 4096, 8))
ITERS = (0, 5, 20)


def report(t: int, c: int, n: int) -> None:
    """One size's lines: the projection alone, then each op at each iteration count."""
    x = torch.randn(t, n, c, device="cuda").bfloat16()
    phi = torch.randn(n * c, R.num_logits(n), device="cuda") * 1e-3
    alpha = torch.full((3,), 0.01, device="cuda")
    b = mhc_gen.residual_init_bias(n).cuda()
    w = torch.ones(c, device="cuda")
    proj = time_graph(functools.partial(gpu._projected, x, phi))
    print(f"{t}x{c} n={n} bf16: projection {proj:.3f} ms")
    eps = dict(eps_rms=1e-6, eps_sk=1e-6, post_mult=2.0)
    for iters in ITERS:
        layer = time_graph(functools.partial(gpu.layer_dynamic, x, w, phi, alpha, b, iters, **eps))
        pre = time_graph(functools.partial(gpu.pre_dynamic, x, phi, alpha, b, iters, **eps))
        print(
            f"  iters {iters:2d}: layer {layer:.3f} (kernel {layer - proj:.3f})"
            f"  pre {pre:.3f} (kernel {pre - proj:.3f})"
        )


def main() -> None:
    print(f"{torch.cuda.get_device_name()}: copy {copy_bandwidth():.2f} TB/s")
    for size in SIZES:
        report(*size)


if __name__ == "__main__":
    main()
