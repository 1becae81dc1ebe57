"""The projection's path at small token counts, timed under several rules in one process
(dynamic layer, bf16; each alternative between two runs of the library's own rule):

    now     the library's rules (gpu.py)
    fused   the fused kernel's own projection on CUDA cores (no per-token GEMM bound)
    fusedall  the same with no bound at all (one launch at every config)
    kernel  mhc_gen's tensor-core projection kernel from any token count (n ≤ 4)
    kernel8 the same up to n = 8

    python3 benchmarks/projection_threshold.py --rules kernel kernel8
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench  # noqa: E402

from mhc_gen import gpu  # noqa: E402

CONFIGS = [(128, 1280, 8), (256, 1280, 8), (64, 1280, 8), (32, 7168, 4), (320, 1280, 4),
           (512, 1920, 4), (1280, 2560, 4), (2560, 1280, 4)]  # fmt: skip
RULES = {
    "now": {},
    "fused": {"_GEMM_PROJECTION_MIN_TOKEN_FMA": 1 << 62},
    "fusedall": {"_GEMM_PROJECTION_MIN_TOKEN_FMA": 1 << 62, "_GEMM_PROJECTION_MIN_FMA": 1 << 62},
    "kernel": {"_PROJECTION_KERNEL_MIN_TOKENS": 0},
    "kernel8": {"_PROJECTION_KERNEL_MIN_TOKENS": 0, "_PROJECTION_KERNEL_MAX_N": 8},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rules", nargs="+", choices=[r for r in RULES if r != "now"],
                    default=["fused"])  # fmt: skip
    ap.add_argument("--fwd-only", action="store_true")
    args = ap.parse_args()
    saved = {k: getattr(gpu, k) for rule in RULES.values() for k in rule}
    copy_tbs = bench.copy_bandwidth()
    for cfg in CONFIGS:
        for rule in ["now"] + [r for alt in args.rules for r in (alt, "now")]:
            for name, value in saved.items():
                setattr(gpu, name, RULES[rule].get(name, value))
            for backward in (False,) if args.fwd_only else (False, True):
                row = bench.bench_layer(*cfg, torch.bfloat16, True, backward, 20, copy_tbs,
                                        baselines=False, with_liger=False)  # fmt: skip
                print(f"{cfg} {rule:7} {'fwd+bwd' if backward else 'fwd':7} "
                      f"ms {row['mhc_gen_ms']:.3f} graph {row['mhc_gen_graph_ms']:.3f}",
                      flush=True)  # fmt: skip
    for name, value in saved.items():
        setattr(gpu, name, value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
