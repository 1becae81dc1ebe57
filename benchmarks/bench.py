#!/usr/bin/env python3
"""mhc_gen benchmark: the seed's layer (F = RMSNorm·w) and the single ops, against
the eager reference, torch.compile of the reference and (dynamic H, where it is
installed) Liger-Kernel's mHC, in one run on one GPU.

    python3 benchmarks/bench.py --out results/        # JSON, markdown, PNG plots

Times are medians of CUDA-event timings, each call alone with L2 flushed (as the
seed times); CUDA-graph replay time is the mean over a captured loop. Bandwidth
counts the bytes the op must move (each input read once, each output written
once) and is given as a fraction of a device-to-device copy measured in the
same run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import mhc_gen  # noqa: E402
from mhc_gen import reference as R  # noqa: E402

# The seed's nine table configs (T, C, n), then large ones.
SEED_CONFIGS = [
    (320, 1280, 4),
    (512, 1920, 4),
    (1280, 2560, 4),
    (2560, 1280, 4),
    (128, 1280, 8),
    (256, 1280, 8),
    (32, 1280, 32),
    (64, 1280, 32),
    (128, 1280, 32),
]
LARGE_CONFIGS = [(16384, 4096, 4), (8192, 7168, 4), (8192, 4096, 8), (2048, 4096, 16),
                 (1024, 4096, 32)]  # fmt: skip
# Where the performance issue states Liger-Kernel's times: Liger's first call at a shape
# autotunes its Triton kernels (≈ 47 s at 16384 × 4096 on an H100), so by default it runs only
# here (--liger all: every dynamic row). With torch.compile's compiles the whole benchmark
# still took ≈ 700 s there (BENCHMARKS.md, session 10).
LIGER_CONFIGS = [(16384, 4096, 4), (8192, 7168, 4)]

_FLUSH = None


def flush_l2():
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    _FLUSH.zero_()


def time_cold(fn, reps: int) -> float:
    """Median ms of fn() with L2 flushed before each call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        flush_l2()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_graph(fn, loops: int = 20) -> float | None:
    """Mean ms per call of fn() replayed from a CUDA graph of `loops` calls."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(loops):
                fn()
        g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / (5 * loops)
    except Exception:  # noqa: BLE001 - a baseline that cannot be captured has no graph time
        return None


def copy_bandwidth(rounds: int = 3) -> float:
    """TB/s of a 1 GiB device-to-device copy (bytes read + written): the best of a few
    medians, so that a slow start (one run measured 2.59 against 3.00 TB/s on the same
    GPU type, and reported post at 105% of it) does not inflate every "% copy"."""
    a = torch.empty(2**30, dtype=torch.int8, device="cuda")
    b = torch.empty_like(a)
    ms = min(time_cold(lambda: b.copy_(a), 20) for _ in range(rounds))
    return 2 * a.numel() / (ms * 1e-3) / 1e12


def layer_inputs(t, c, n, dtype, dynamic, requires_grad):
    g = torch.Generator(device="cuda").manual_seed(0)
    m = R.num_logits(n)
    x = torch.randn(t, n, c, device="cuda", generator=g).to(dtype).requires_grad_(requires_grad)
    p = dict(
        weight=torch.ones(c, device="cuda"),
        b=mhc_gen.residual_init_bias(n).cuda(),
        phi=torch.randn(n * c, m, device="cuda", generator=g) * 1e-3,
        alpha=torch.full((3,), 0.01, device="cuda"),
    )
    if not dynamic:
        p.pop("phi"), p.pop("alpha")
    for v in p.values():
        v.requires_grad_(requires_grad)
    return x, p


def layer_fns(dynamic):
    if dynamic:
        ours = lambda x, p: mhc_gen.layer_dynamic(x, p["weight"], p["phi"], p["alpha"], p["b"])  # noqa: E731
        ref = lambda x, p: R.layer_dynamic(x, p["weight"], p["phi"], p["alpha"], p["b"])  # noqa: E731
    else:
        ours = lambda x, p: mhc_gen.layer_static(x, p["weight"], p["b"])  # noqa: E731
        ref = lambda x, p: R.layer_static(x, p["weight"], p["b"])  # noqa: E731
    return ours, ref


def _liger():
    """Liger-Kernel's mHC functions (Triton), or None where it is not installed."""
    try:
        from liger_kernel.transformers import functional
    except ImportError:
        return None
    except Exception as e:  # noqa: BLE001 - a baseline that cannot load is reported, not fatal
        print(f"liger_kernel did not import: {e!r}", file=sys.stderr)
        return None
    return functional if hasattr(functional, "liger_mhc_coeffs") else None


def liger_layer(liger):
    """The seed's dynamic layer through Liger-Kernel: its coefficients (φ in bf16, as it
    recommends for tensor cores), its pre and post kernels, torch's RMSNorm between them.
    Liger has no static-H mode."""

    def layer(x, p):
        a = p["alpha"]
        h_pre, h_post, h_res = liger.liger_mhc_coeffs(
            x, p["phi"].to(torch.bfloat16), p["b"], a[0], a[1], a[2],
            tmax=R.SINKHORN_ITERS, rms_eps=R.EPS_RMS, sinkhorn_eps=R.EPS_SK,
            post_mult=R.POST_MULT,
        )  # fmt: skip
        y = R.rms_norm(liger.liger_mhc_pre(x, h_pre), p["weight"])
        return liger.liger_mhc_post_res(x, y.to(x.dtype), h_post, h_res)

    return layer


_COMPILED = {}


def _compiled(dynamic: bool):
    """torch.compile of the reference layer, shape-generic so one compile serves all configs."""
    if dynamic not in _COMPILED:
        _COMPILED[dynamic] = torch.compile(layer_fns(dynamic)[1], dynamic=True)
    return _COMPILED[dynamic]


def bench_layer(t, c, n, dtype, dynamic, backward, reps, copy_tbs, baselines=True,
                with_liger=True):  # fmt: skip
    x, p = layer_inputs(t, c, n, dtype, dynamic, backward)
    ours, ref = layer_fns(dynamic)
    grad = torch.randn_like(x) if backward else None
    params = [x, *p.values()]

    def run(fn):
        def call():
            out = fn(x, p)
            if backward:
                torch.autograd.grad(out, params, grad)

        return call

    row = dict(
        T=t,
        C=c,
        n=n,
        dtype=str(dtype).split(".")[1],
        H="dynamic" if dynamic else "static",
        pass_="fwd+bwd" if backward else "fwd",
    )
    timed = [("mhc_gen", ours)]
    if baselines:
        timed += [("eager", ref), ("compile", _compiled(dynamic))]
    liger = _liger() if dynamic and baselines and with_liger else None
    if liger is not None:
        liger = liger_layer(liger)
        timed.append(("liger", liger))
    for name, fn in timed:
        started = time.perf_counter()  # wall time of the baseline's timing, compiles included
        try:
            row[f"{name}_ms"] = ms = time_cold(run(fn), reps)
            # About 5 ms of work per captured graph: slow baselines replay fewer calls.
            row[f"{name}_graph_ms"] = time_graph(run(fn), max(1, min(20, int(5 / ms))))
        except Exception as e:  # noqa: BLE001 - a failing baseline is reported, not fatal
            row[f"{name}_ms"] = None
            row[f"{name}_error"] = repr(e)[:200]
        row[f"{name}_wall_s"] = round(time.perf_counter() - started, 1)
    if liger is not None:
        # A baseline is only a baseline if it computes the same layer: its distance to ours.
        with torch.no_grad():
            want = ours(x, p).float()
            got = liger(x, p).float()
        row["liger_rel_err"] = float((got - want).norm() / want.norm())
    b = x.element_size()
    floor_bytes = t * (2 * n * c * b) * (3 if backward else 1)  # fwd: read x, write x_next
    row["floor_bytes"] = floor_bytes
    if row.get("mhc_gen_ms"):
        tbs = floor_bytes / (row["mhc_gen_ms"] * 1e-3) / 1e12
        row["mhc_gen_TBps"] = tbs
        row["pct_copy"] = 100 * tbs / copy_tbs
        for base in ("eager", "compile", "liger"):
            if row.get(f"{base}_ms"):
                row[f"speedup_vs_{base}"] = row[f"{base}_ms"] / row["mhc_gen_ms"]
    return row


def bench_ops(t, c, n, dtype, reps, copy_tbs):
    """The single forward ops at one size: achieved bandwidth against the copy."""
    x, p = layer_inputs(t, c, n, dtype, True, False)
    y = torch.randn(t, c, device="cuda").to(dtype)
    _, h_post, h_res = mhc_gen.dynamic_coefficients(x, p["phi"], p["alpha"], p["b"])
    b = x.element_size()
    ops = {
        "post_dynamic": (
            lambda: mhc_gen.post_dynamic(x, y, h_post, h_res),
            t * (2 * n * c * b + c * b + 4 * (n + n * n)),
        ),
        "post_static": (lambda: mhc_gen.post_static(x, y, p["b"]), t * (2 * n * c * b + c * b)),
        "pre_static": (lambda: mhc_gen.pre_static(x, p["b"]), t * (n * c * b + c * b)),
        "pre_dynamic": (
            lambda: mhc_gen.pre_dynamic(x, p["phi"], p["alpha"], p["b"]),
            t * (n * c * b + c * b + 4 * (2 * n + n * n)),
        ),
        "layer_dynamic": (
            lambda: mhc_gen.layer_dynamic(x, p["weight"], p["phi"], p["alpha"], p["b"]),
            t * 2 * n * c * b,
        ),
    }
    rows = []
    for name, (fn, nbytes) in ops.items():
        ms = time_cold(fn, reps)
        # Also in graph replay: GPU time alone, where the cold call's time can hold host time
        # (the L2 flush before it hides only as much host work as the flush takes).
        graph_ms = time_graph(fn)
        tbs = nbytes / (ms * 1e-3) / 1e12
        row = dict(op=name, T=t, C=c, n=n, dtype=str(dtype).split(".")[1], ms=ms, TBps=tbs)
        row.update(pct_copy=100 * tbs / copy_tbs, graph_ms=graph_ms)
        if graph_ms:
            row["graph_pct_copy"] = 100 * nbytes / (graph_ms * 1e-3) / 1e12 / copy_tbs
        rows.append(row)
    return rows


def markdown(meta, layer_rows, op_rows) -> str:
    out = [
        f"GPU: {meta['gpu']}; torch {meta['torch']}; copy bandwidth {meta['copy_TBps']:.2f} TB/s"
        + (f" (at the end: {meta['copy_TBps_end']:.2f})" if "copy_TBps_end" in meta else ""),
        "",
    ]
    liger = any("liger_ms" in r or "liger_error" in r for r in layer_rows)
    out += [
        "| T | C | n | H | pass | mhc_gen ms | graph ms | eager ms | compile ms "
        + ("| Liger ms | × Liger " if liger else "")
        + "| × eager | × compile | % copy |",
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if liger else "") + "---|",
    ]

    def f(v, fmt="{:.3f}"):
        return "—" if v is None else fmt.format(v)

    for r in layer_rows:
        lig = f"| {f(r.get('liger_ms'))} | {f(r.get('speedup_vs_liger'), '{:.1f}×')} "
        out.append(
            f"| {r['T']} | {r['C']} | {r['n']} | {r['H']} | {r['pass_']} "
            f"| {f(r.get('mhc_gen_ms'))} "
            f"| {f(r.get('mhc_gen_graph_ms'))} | {f(r.get('eager_ms'))} | {f(r.get('compile_ms'))} "
            + (lig if liger else "")
            + f"| {f(r.get('speedup_vs_eager'), '{:.1f}×')} "
            f"| {f(r.get('speedup_vs_compile'), '{:.1f}×')} "
            f"| {f(r.get('pct_copy'), '{:.0f}%')} |"
        )
    errs = [r["liger_rel_err"] for r in layer_rows if "liger_rel_err" in r]
    if errs:
        out += ["", f"Liger-Kernel's output against mhc_gen's: relative error ≤ {max(errs):.1e}."]
    out += [
        "",
        "| op | T | C | n | dtype | ms | TB/s | % copy | graph ms | % copy (graph) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in op_rows:
        out.append(
            f"| {r['op']} | {r['T']} | {r['C']} | {r['n']} | {r['dtype']} | {r['ms']:.3f} "
            f"| {r['TBps']:.2f} | {r['pct_copy']:.0f}% | {f(r.get('graph_ms'))} "
            f"| {f(r.get('graph_pct_copy'), '{:.0f}%')} |"
        )
    return "\n".join(out) + "\n"


def plots(outdir: pathlib.Path, layer_rows, op_rows) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots", file=sys.stderr)
        return
    rows = [r for r in layer_rows if r.get("speedup_vs_eager")]
    fig, ax = plt.subplots(figsize=(12, 4))
    ax.bar(range(len(rows)), [r["speedup_vs_eager"] for r in rows])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(
        [f"{r['T']}×{r['C']} n{r['n']}\n{r['H'][:3]} {r['pass_']}" for r in rows],
        fontsize=6,
        rotation=90,
    )
    ax.set_ylabel("speedup over eager reference")
    ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(outdir / "speedup.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([r["op"] for r in op_rows], [r["pct_copy"] for r in op_rows])
    ax.set_ylabel("% of device-to-device copy bandwidth")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(outdir / "roofline.png", dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench_results"))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="seed configs only, forward only")
    ap.add_argument("--ops", action="store_true", help="the single-op table only (every n)")
    ap.add_argument(
        "--config",
        action="append",
        metavar="T,C,n",
        help="only these layer configs (repeatable), e.g. 16384,4096,4",
    )
    ap.add_argument(
        "--no-baselines", action="store_true", help="mhc_gen only (an A/B of two builds)"
    )
    ap.add_argument("--no-ops", action="store_true", help="the layer table only")
    ap.add_argument(
        "--liger",
        choices=["issue", "all", "none"],
        default="issue",
        help="Liger-Kernel rows: the issue's two configs (default), every dynamic row, none",
    )
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_baselines:
        # Why torch.compile compiles the reference again at a new shape (≈ 40 s each at the
        # large configs' fwd+bwd): the log says which guard failed.
        torch._logging.set_logs(recompiles=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    copy_tbs = copy_bandwidth()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, copy_TBps=copy_tbs)
    print(f"{meta['gpu']}: copy {copy_tbs:.2f} TB/s", flush=True)
    started = time.perf_counter()
    layer_rows, op_rows = [], []

    def save():  # after every row: a run cut short still leaves its results
        (args.out / "results.json").write_text(
            json.dumps(dict(meta=meta, layer=layer_rows, ops=op_rows), indent=1)
        )
        (args.out / "results.md").write_text(markdown(meta, layer_rows, op_rows))

    for dtype in () if args.no_ops else (torch.bfloat16, torch.float32):
        op_rows += bench_ops(16384, 4096, 4, dtype, args.reps, copy_tbs)
    if not (args.quick or args.no_ops):
        for t, n in ((8192, 8), (4096, 16), (2048, 32)):  # n = 8, 16, 32: no cliff
            op_rows += bench_ops(t, 4096, n, torch.bfloat16, args.reps, copy_tbs)
    save()
    configs = [] if args.ops else SEED_CONFIGS + ([] if args.quick else LARGE_CONFIGS)
    if args.config:
        configs = [tuple(int(v) for v in cfg.split(",")) for cfg in args.config]
    for t, c, n in configs:
        for dynamic in (False, True):
            for backward in (False,) if args.quick else (False, True):
                with_liger = args.liger == "all" or (
                    args.liger == "issue" and (t, c, n) in LIGER_CONFIGS
                )
                row = bench_layer(
                    t, c, n, torch.bfloat16, dynamic, backward, args.reps, copy_tbs,
                    baselines=not args.no_baselines, with_liger=with_liger,
                )  # fmt: skip
                layer_rows.append(row)
                row["elapsed_s"] = round(time.perf_counter() - started, 1)
                print(json.dumps(row), flush=True)
                save()
    # The copy again at the end: a large change means the GPU's state drifted in the run.
    meta["copy_TBps_end"] = copy_bandwidth()
    save()
    plots(args.out, layer_rows, op_rows)
    print(markdown(meta, layer_rows, op_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
