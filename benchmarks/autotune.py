#!/usr/bin/env python3
"""Autotune: time every built variant that differs only in launch knobs and record
the fastest per tuning key and token bucket in tuning/<gpu>.json, stamped with the
GPU and versions.

    python3 build.py --arch sm_90 --profile full      # the full profile has alternative tiles
    python3 benchmarks/autotune.py                    # writes tuning/<gpu>.json

Selection (mhc_gen.select) then prefers the recorded winner; a table whose stamp
does not match the running GPU and versions is ignored.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
from collections import defaultdict

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import mhc_gen  # noqa: E402
from benchmarks.bench import time_cold  # noqa: E402
from generator.spec import Op, parse  # noqa: E402
from mhc_gen import (
    gpu,  # noqa: E402
    tuning,  # noqa: E402
)
from mhc_gen import reference as R  # noqa: E402
from mhc_gen._launch import TORCH_DTYPES, target_arch  # noqa: E402


def candidates(names, arch) -> dict[str, list[str]]:
    """Tuning key -> the built variants of that key, where there is a choice."""
    groups = defaultdict(list)
    for name in names:
        spec = parse(name)
        if spec.arch is arch and not spec.op.backward:
            groups[tuning.tuning_key(spec)].append(name)
    return {k: sorted(v) for k, v in groups.items() if len(v) > 1}


def pick_winners(timings: dict[str, dict[str, float]]) -> dict[str, str]:
    """Tuning key -> the variant with the smallest time (ties: the smaller name)."""
    return {key: min(times, key=lambda name: (times[name], name)) for key, times in timings.items()}


def op_call(spec, tokens: int):
    """A zero-argument call of spec's op on random inputs of spec's shape."""
    n, c = spec.n or 4, spec.hidden or 4096
    dtype = TORCH_DTYPES[spec.dtype]
    m = R.num_logits(n)
    x = torch.randn(tokens, n, c, device="cuda").to(dtype)
    y = torch.randn(tokens, c, device="cuda").to(dtype)
    phi = torch.randn(n * c, m, device="cuda") * 1e-3
    alpha = torch.full((3,), 0.01, device="cuda")
    b = mhc_gen.residual_init_bias(n).cuda()
    w = torch.ones(c, device="cuda")
    _, h_post, h_res = mhc_gen.dynamic_coefficients(x, phi, alpha, b)
    calls = {
        Op.COEFFS_DYN: lambda: mhc_gen.dynamic_coefficients(x, phi, alpha, b),
        Op.PRE_DYN: lambda: mhc_gen.pre_dynamic(x, phi, alpha, b),
        Op.PRE_STATIC: lambda: mhc_gen.pre_static(x, b),
        Op.POST_DYN: lambda: mhc_gen.post_dynamic(x, y, h_post, h_res),
        Op.POST_STATIC: lambda: mhc_gen.post_static(x, y, b),
        Op.LAYER_DYN: lambda: mhc_gen.layer_dynamic(x, w, phi, alpha, b),
        Op.LAYER_STATIC: lambda: mhc_gen.layer_static(x, w, b),
        Op.PROJ_DYN: lambda: gpu.projection_partials(x, phi),
    }
    return calls.get(spec.op)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=[512, 2048, 8192, 32768],
        help="token counts to time at: one per token bucket (the best tile depends on it)",
    )
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    _, arch = target_arch(torch.cuda.current_device())
    gpu = torch.cuda.get_device_name()
    timings: dict[str, dict[str, float]] = {}
    for key, names in candidates(mhc_gen.kernels(), arch).items():
        for tokens in args.tokens:
            call = op_call(parse(names[0]), tokens)
            if call is None:
                break
            at = tuning.bucket_key(key, tuning.token_bucket(tokens))
            timings[at] = {}
            for name in names:
                with mhc_gen.forced_variant(name):
                    timings[at][name] = time_cold(call, args.reps)
            print(at, {k: f"{v:.4f} ms" for k, v in timings[at].items()}, flush=True)
            del call
            torch.cuda.empty_cache()
    best = pick_winners(timings)
    slug = re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_")
    out = args.out or tuning.tuning_dir() / f"{slug}.json"
    tuning.write_table(out, tuning.stamp(gpu, torch.__version__, torch.version.cuda), best)
    print(f"wrote {len(best)} winners to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
