"""Every kernel family once, small shapes, forward and backward: the workload that
scripts/sanitize.sh runs under compute-sanitizer's memcheck, racecheck, initcheck
and synccheck. Covers compile-time n (4, 32) and run-time n (3), the 16-byte and
the scalar path (C = 1280, 77), bf16 (the projection as a cuBLAS GEMM, r in the fused
kernel; for n = 32 the pre backward's ∂z·φᵀ as a GEMM too; at n = 4 and 2, C = 1280 and
64, also the tensor-core projection with its coefficients launch, the layer given H and the
layer backward given H, which the library takes from 4096 tokens; at n = 4 and 3 the layer
backward in two passes, also from 4096 tokens), fp16 and fp32.

    python3 scripts/sanitize_workload.py                      # every case
    python3 scripts/sanitize_workload.py --only "bfloat16 n=32 C=1100" \
        --set _FP32_GEMM_MAX_TOKENS=0                          # the cases whose label has it,
                                                               # with a gpu path constant set
(scripts/initcheck_cases.sh runs such single cases under initcheck side by side.)"""

from __future__ import annotations

import argparse
import contextlib
from unittest import mock

import torch

import mhc_gen
from mhc_gen import gpu
from mhc_gen import reference as R

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke test of the script


def families(x, w, phi, alpha, b, y):
    """Each public op, forward then backward through autograd."""
    n = x.shape[-2]
    outs = [
        mhc_gen.pre_static(x, b)[0],
        mhc_gen.pre_dynamic(x, phi, alpha, b)[0],
        mhc_gen.post_static(x, y, b),
        mhc_gen.layer_static(x, w, b),
        mhc_gen.layer_dynamic(x, w, phi, alpha, b),
    ]
    _, _, h_post, h_res = mhc_gen.pre_dynamic(x, phi, alpha, b)
    outs.append(mhc_gen.post_dynamic(x, y, h_post, h_res))
    outs.append(mhc_gen.static_coefficients(b, n)[0])
    loss = sum(o.float().square().mean() for o in outs)
    loss.backward()


# The paths the library takes from many tokens, taken here at 5: the projection kernel (z
# and Σx̄² in one pass) and H from one coefficients launch in the layer's backward.
MANY_TOKENS_PATHS = dict(_PROJECTION_KERNEL_MIN_TOKENS=0, _LAYER_BWD_H_ONCE_MIN_TOKENS=0)
# And the dynamic layer's backward in two passes (16-bit x, n ≤ 4; fp32 keeps the above).
TWO_PASS_PATHS = dict(MANY_TOKENS_PATHS, _TWO_PASS_MIN_TOKENS=0)


def _setting(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    if not name.startswith("_") or not hasattr(gpu, name) or not value.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected one of mhc_gen.gpu's _NAME=int")
    return name, int(value)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--only", default="", help="run the cases whose label contains this")
    ap.add_argument("--set", type=_setting, action="append", default=[], metavar="_NAME=INT",
                    help="patch a path constant of mhc_gen.gpu for the run")  # fmt: skip
    args = ap.parse_args()
    ran = 0
    # n = 32 at C = 1100: the layer's row groups and column chunks, with a ragged last chunk.
    cases = [((4, 1280), {}), ((4, 77), {}), ((3, 64), {}), ((32, 40), {}), ((32, 1100), {})]
    cases += [((4, 1280), MANY_TOKENS_PATHS), ((2, 64), MANY_TOKENS_PATHS)]
    cases += [((4, 1280), TWO_PASS_PATHS), ((3, 72), TWO_PASS_PATHS)]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for (n, c), paths in cases:
            path = " (two-pass)" if paths is TWO_PASS_PATHS else " (many-token paths)" * bool(paths)
            label = f"{dtype} n={n} C={c}{path}"
            if args.only not in label:
                continue
            g = torch.Generator().manual_seed(n * c)
            m = R.num_logits(n)
            leaf = dict(
                x=torch.randn(5, n, c, generator=g).to(dtype),
                w=1 + 0.1 * torch.randn(c, generator=g),
                phi=torch.randn(n * c, m, generator=g) / (n * c) ** 0.5,
                alpha=torch.tensor([1.0, 0.8, 1.2]),
                b=torch.randn(m, generator=g),
                y=torch.randn(5, c, generator=g).to(dtype),
            )
            tensors = {k: v.to(DEVICE).requires_grad_() for k, v in leaf.items()}
            patched = {**paths, **dict(args.set)}
            with mock.patch.multiple(gpu, **patched) if patched else contextlib.nullcontext():
                families(**tensors)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            print(f"ok {label}", flush=True)
            ran += 1
    if not ran:
        raise SystemExit(f"no case's label contains {args.only!r}")


if __name__ == "__main__":
    main()
