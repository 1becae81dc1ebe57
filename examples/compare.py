#!/usr/bin/env python3
"""Run examples/train_gpt.py several ways and compare: loss curves (PNG), step time,
the overhead of mHC over a plain residual, and peak memory (markdown + JSON).

    python3 examples/compare.py --out results/1gpu                  # plain, mhc, mhc-reference
    python3 examples/compare.py --gpus 2 --out results/2gpu         # 1 GPU vs DDP vs FSDP2 (mhc)

Arguments after `--` go to every train_gpt.py run (e.g. -- --steps 200 --layers 12).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
TRAIN = HERE / "train_gpt.py"


def _run(name: str, cmd: list[str], out: pathlib.Path) -> dict:
    log = out / f"{name}.jsonl"
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    subprocess.run([*cmd, "--jsonl", str(log)], check=True)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    summary = rows[-1]["summary"]
    summary["name"], summary["curve"] = name, [(r["step"], r["loss"]) for r in rows[:-1]]
    return summary


def runs(args, extra: list[str]) -> list[tuple[str, list[str]]]:
    py = [sys.executable, str(TRAIN), "--bf16", *extra]
    if args.gpus == 1:
        return [(r, [*py, "--residual", r, "--batch", str(args.batch)]) for r in args.residuals]
    per_rank = str(args.batch // args.gpus)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc-per-node", str(args.gpus), str(TRAIN), "--bf16", *extra]
    return [("1gpu", [*py, "--residual", "mhc", "--batch", str(args.batch)])] + [
        (mode, [*torchrun, "--residual", "mhc", "--batch", per_rank, "--dist", mode])
        for mode in ("ddp", "fsdp2")
    ]


def report(results: list[dict], out: pathlib.Path, gpu: str) -> str:
    base = results[0]
    lines = [
        f"GPU: {gpu}; residual streams in {base.get('stream_dtype', 'fp32')}, sublayers under"
        " bf16 autocast",
        "",
        "| run | world | loss (last 10) | step (ms, median) | vs first row | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        overhead = 100 * (r["median_step_s"] / base["median_step_s"] - 1)
        lines.append(
            f"| {r['name']} | {r['world']} | {r['final_loss']:.4f} | {1e3 * r['median_step_s']:.1f}"
            f" | {overhead:+.1f}% | {r['peak_bytes'] / 2**30:.2f} |"
        )
    # The runs that should follow each other step for step: the kernels and the reference
    # (same model and data), or a multi-GPU run and the one-GPU run with the same batch.
    by_name = {r["name"]: r for r in results}
    pairs = [("mhc", "mhc-reference")] + [(m, "1gpu") for m in ("ddp", "fsdp2")]
    gaps = []
    for a, b in pairs:
        if a in by_name and b in by_name:
            steps = zip(by_name[a]["curve"], by_name[b]["curve"], strict=False)
            gaps.append(f"{a} vs {b} {max(abs(p[1] - q[1]) for p, q in steps):.4f}")
    if gaps:
        lines += ["", "Largest loss gap at a logged step: " + ", ".join(gaps)]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return text
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        steps, losses = zip(*r["curve"], strict=True)
        ax.plot(steps, losses, label=f"{r['name']} ({1e3 * r['median_step_s']:.0f} ms/step)")
    ax.set(xlabel="step", ylabel="training loss (nats/byte)", title=f"train_gpt.py on {gpu}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    return text


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8, help="global sequences per step")
    ap.add_argument("--residuals", nargs="+", default=["plain", "mhc", "mhc-reference"])
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [_run(name, cmd, args.out) for name, cmd in runs(args, extra)]
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(report(results, args.out, gpu))


if __name__ == "__main__":
    main()
