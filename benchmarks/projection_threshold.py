"""The projection's path at small token counts, timed both ways in one process: the fused
kernel's own projection on CUDA cores (the per-token bound off) against the GEMM path where
one token's n·C·m multiply-adds pass gpu._GEMM_PROJECTION_MIN_TOKEN_FMA (dynamic layer, bf16).

    python3 benchmarks/projection_threshold.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench  # noqa: E402

from mhc_gen import gpu  # noqa: E402

CONFIGS = [(128, 1280, 8), (256, 1280, 8), (64, 1280, 8), (32, 7168, 4), (320, 1280, 4),
           (512, 1920, 4)]  # fmt: skip


def main() -> int:
    bound = gpu._GEMM_PROJECTION_MIN_TOKEN_FMA
    copy_tbs = bench.copy_bandwidth()
    for cfg in CONFIGS:
        for token_bound, name in ((1 << 62, "fused"), (bound, "bound"), (1 << 62, "fused")):
            gpu._GEMM_PROJECTION_MIN_TOKEN_FMA = token_bound
            for backward in (False, True):
                row = bench.bench_layer(*cfg, torch.bfloat16, True, backward, 20, copy_tbs,
                                        baselines=False, with_liger=False)  # fmt: skip
                print(f"{cfg} {name:5} {'fwd+bwd' if backward else 'fwd':7} "
                      f"ms {row['mhc_gen_ms']:.3f} graph {row['mhc_gen_graph_ms']:.3f}",
                      flush=True)  # fmt: skip
    gpu._GEMM_PROJECTION_MIN_TOKEN_FMA = bound
    return 0


if __name__ == "__main__":
    sys.exit(main())
