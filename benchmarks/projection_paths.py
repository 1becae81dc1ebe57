#!/usr/bin/env python3
"""The dynamic forward through the tensor-core projection (z and r in one pass over x, the
coefficients in a launch of their own, the mixing kernels reading x once), the layer
backward given H (session 14) and the layer backward in two passes (session 15), each
against the path before it, in one process: alternating rounds of
cold (L2 flushed) and graph-replay ms, and the ms of the floor's bytes at the copy bandwidth
measured in the run.

    python3 benchmarks/projection_paths.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import pathlib
import sys
from unittest import mock

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import mhc_gen  # noqa: E402
from benchmarks.bench import (  # noqa: E402
    copy_bandwidth,
    layer_fns,
    layer_inputs,
    time_cold,
    time_graph,
)
from mhc_gen import gpu  # noqa: E402

SIZES = ((16384, 4096, 4), (8192, 4096, 8), (8192, 7168, 4), (2560, 1280, 4))
OFF = 1 << 62
# Each mode: values of mhc_gen.gpu's switches.
MODES = {
    "before": dict(
        _PROJECTION_KERNEL_MIN_TOKENS=OFF,
        _LAYER_BWD_H_ONCE_MIN_TOKENS=OFF,
        _TWO_PASS_MIN_TOKENS=OFF,
    ),
    "session 14": dict(_TWO_PASS_MIN_TOKENS=OFF),
    "two-pass bwd": dict(_TWO_PASS_MIN_TOKENS=0),
}


@contextlib.contextmanager
def mode(values: dict):
    with contextlib.ExitStack() as stack:
        for name, value in values.items():
            stack.enter_context(mock.patch.object(gpu, name, value))
        yield


def fwd_bwd(fn, x, p, g):
    def step():
        for v in (x, *p.values()):
            v.grad = None
        fn(x, p).backward(g)

    return step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    copy = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy {copy:.2f} TB/s", flush=True)
    print("| T | C | n | op | floor ms | " + " | ".join(f"{m} cold / graph" for m in MODES) + " |")
    print("|---" * (5 + len(MODES)) + "|")
    for t, c, n in SIZES:
        x, p = layer_inputs(t, c, n, torch.bfloat16, True, True)
        xd = x.detach()
        g = torch.randn_like(xd)
        y = torch.randn(t, c, device="cuda", dtype=torch.bfloat16)
        layer, static = layer_fns(True)[0], layer_fns(False)[0]
        pd = {k: v.detach() for k, v in p.items()}
        x_bytes = xd.numel() * xd.element_size()
        ops = {
            "layer_dynamic fwd": (functools.partial(layer, xd, pd), 2 * x_bytes),
            "pre_dynamic fwd": (
                functools.partial(mhc_gen.pre_dynamic, xd, pd["phi"], pd["alpha"], pd["b"]),
                x_bytes + y.numel() * 2,
            ),
            "layer_static fwd": (functools.partial(static, xd, pd), 2 * x_bytes),
            "layer_dynamic fwd+bwd": (fwd_bwd(layer, x, p, g), 5 * x_bytes),
        }
        for name, (fn, floor_bytes) in ops.items():
            cells = {m: [] for m in MODES}
            grad = contextlib.nullcontext() if "bwd" in name else torch.no_grad()
            for _ in range(args.rounds):
                for m, values in MODES.items():
                    with mode(values), grad:
                        cells[m].append(f"{time_cold(fn, 10):.3f} / {time_graph(fn, 10):.3f}")
            floor = floor_bytes / (copy * 1e12) * 1e3
            row = " | ".join("  ".join(v) for v in cells.values())
            print(f"| {t} | {c} | {n} | {name} | {floor:.3f} | {row} |", flush=True)


if __name__ == "__main__":
    main()
