"""Does x stay in L2 between the projection and the layer kernel when the dynamic layer runs
on token chunks? Graph ms of one dynamic layer fwd at 16384 × 4096 × 4 (bf16) against the same
tokens in chunked calls (the projection kernel forced at every size), on one GPU:

    python3 benchmarks/layer_chunks_l2.py
"""

import pathlib
import sys
from unittest import mock

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import mhc_gen  # noqa: E402
from benchmarks.bench import copy_bandwidth, layer_inputs, time_graph  # noqa: E402
from mhc_gen import gpu  # noqa: E402


def main() -> None:
    print(torch.cuda.get_device_name(), f"copy {copy_bandwidth():.2f} TB/s")
    t, c, n = 16384, 4096, 4
    x, p = layer_inputs(t, c, n, torch.bfloat16, True, False)

    def call(xs):
        return mhc_gen.layer_dynamic(xs, p["weight"], p["phi"], p["alpha"], p["b"])

    with torch.no_grad(), mock.patch.object(gpu, "_PROJECTION_KERNEL_MIN_TOKENS", 0):
        full = call(x)
        print(f"full: {time_graph(lambda: call(x), 10):.3f} ms")
        for chunk in (4096, 2048, 1024, 512, 256):
            parts = [call(x[i : i + chunk]) for i in range(0, t, chunk)]
            err = max((a - full[i * chunk : (i + 1) * chunk]).abs().max().item()
                      for i, a in enumerate(parts))  # fmt: skip
            ms = time_graph(lambda k=chunk: [call(x[i : i + k]) for i in range(0, t, k)], 4)
            print(f"chunk {chunk}: {ms:.3f} ms (max |diff| to the full call {err:.3g})")


if __name__ == "__main__":
    main()
