#!/usr/bin/env python3
"""A small GPT trained on the Python standard library's own source (byte level),
with a plain residual, with mHC (mhc_gen kernels) or with mHC (the reference).

    python3 examples/train_gpt.py --residual mhc --steps 500           # one GPU
    torchrun --nproc-per-node 2 examples/train_gpt.py --dist ddp       # DDP
    torchrun --nproc-per-node 2 examples/train_gpt.py --dist fsdp2     # FSDP2
    python3 examples/train_gpt.py --compile reduce-overhead            # torch.compile

Writes one JSON line per logged step (loss, step time, peak memory) to --jsonl.
mHC wraps both sublayers of every block: x <- H_res·x + H_postᵀ·F(H_pre·x), with
F = attention(RMSNorm(·)) and MLP(RMSNorm(·)); the streams are opened (copied
n times) after the embedding and closed (averaged) before the head.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import sys
import sysconfig
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import mhc_gen  # noqa: E402


def stdlib_bytes(limit: int) -> torch.Tensor:
    """The standard library's .py files, concatenated in path order, as bytes."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def rms_norm(norm: nn.RMSNorm, u):
    """norm(u) with its weight in u's dtype: bf16 streams keep torch's fused kernel."""
    return F.rms_norm(u, norm.normalized_shape, norm.weight.to(u.dtype), norm.eps)


class Attention(nn.Module):
    def __init__(self, c: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.RMSNorm(c)
        self.qkv = nn.Linear(c, 3 * c, bias=False)
        self.out = nn.Linear(c, c, bias=False)

    def forward(self, u):  # [B, S, C]
        b, s, c = u.shape
        q, k, v = (
            self.qkv(rms_norm(self.norm, u)).view(b, s, 3, self.heads, c // self.heads).unbind(2)
        )
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.out(y.transpose(1, 2).reshape(b, s, c))


class MLP(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.RMSNorm(c)
        self.up = nn.Linear(c, 4 * c, bias=False)
        self.down = nn.Linear(4 * c, c, bias=False)

    def forward(self, u):
        return self.down(F.gelu(self.up(rms_norm(self.norm, u))))


class Block(nn.Module):
    def __init__(self, c: int, heads: int, residual: str, n: int):
        super().__init__()
        self.residual = residual
        attn, mlp = Attention(c, heads), MLP(c)
        if residual == "plain":
            self.attn, self.mlp = attn, mlp
        else:
            impl = "reference" if residual == "mhc-reference" else "kernels"
            self.attn = mhc_gen.MHCConnection(attn, c, n, dynamic=True, impl=impl)
            self.mlp = mhc_gen.MHCConnection(mlp, c, n, dynamic=True, impl=impl)

    def forward(self, x):
        if self.residual == "plain":
            x = x + self.attn(x)
            return x + self.mlp(x)
        return self.mlp(self.attn(x))


class GPT(nn.Module):
    def __init__(self, layers: int, c: int, heads: int, seq: int, residual: str, n: int,
                 stream_dtype: torch.dtype = torch.float32):  # fmt: skip
        super().__init__()
        self.n = n if residual != "plain" else 1
        self.stream_dtype = stream_dtype
        self.embed = nn.Embedding(256, c)
        self.pos = nn.Parameter(torch.randn(seq, c) * 0.02)
        self.blocks = nn.ModuleList(Block(c, heads, residual, n) for _ in range(layers))
        self.norm = nn.RMSNorm(c)
        self.head = nn.Linear(c, 256, bias=False)

    def forward(self, tokens):  # [B, S] -> logits [B, S, 256]
        h = (self.embed(tokens) + self.pos[: tokens.shape[1]]).to(self.stream_dtype)
        x = mhc_gen.expand_streams(h, self.n) if self.n > 1 else h
        for blk in self.blocks:
            x = blk(x)
        h = mhc_gen.reduce_streams(x) if self.n > 1 else x
        return self.head(self.norm(h.float()))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--residual", choices=["plain", "mhc", "mhc-reference"], default="mhc")
    # Option names that no torchrun option starts with: torchrun's parser would take
    # an abbreviation such as --n or --log after the script as one of its own.
    ap.add_argument("--streams", type=int, default=4, help="mHC streams n")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step and process")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--bf16", action="store_true", help="autocast the sublayers to bf16")
    ap.add_argument(
        "--stream-dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="dtype of the residual stream(s) between blocks (every residual kind)",
    )
    ap.add_argument("--dist", choices=["none", "ddp", "fsdp2"], default="none")
    ap.add_argument(
        "--compile",
        choices=["none", "default", "reduce-overhead"],
        default="none",
        help="torch.compile the model (reduce-overhead: CUDA graphs, no per-op host cost)",
    )
    ap.add_argument("--data-bytes", type=int, default=20_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jsonl", type=pathlib.Path, default=None, help="JSON lines, one per step")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument(
        "--profile", type=int, default=0, help="print a torch.profiler table of N steps"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.dist == "none":
        return train(args, 0, 1)
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        summary = train(args, dist.get_rank(), dist.get_world_size())
    finally:
        # The model, its FSDP/DDP state and every pending work object are gone before
        # the group is: a group torn down under live references can abort at exit.
        gc.collect()
    dist.barrier()  # no rank tears its process group down while another still uses it
    dist.destroy_process_group()
    return summary


def train(args, rank: int, world: int) -> dict:
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    data = stdlib_bytes(args.data_bytes)
    stream_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.stream_dtype]
    model = GPT(args.layers, args.hidden, args.heads, args.seq, args.residual, args.streams,
                stream_dtype)  # fmt: skip
    model = model.to(device)
    if args.dist == "ddp":
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    elif args.dist == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for blk in model.blocks:
            fully_shard(blk)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    if args.compile != "none":
        model = torch.compile(model, mode=args.compile)
    # Every rank draws the same global batch and takes its own slice: the loss
    # matches a one-process run with batch × world sequences.
    gen = torch.Generator().manual_seed(args.seed + 1)
    log = open(args.jsonl, "w") if args.jsonl and rank == 0 else None  # noqa: SIM115
    try:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, disable=rank != 0, desc=args.residual)
    except ImportError:
        bar = None
    losses, times = [], []
    prof = None
    for step in range(args.steps):
        if args.profile and rank == 0 and step == args.steps - args.profile:
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]).__enter__()
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch * world,), generator=gen)
        mine = starts[rank * args.batch : (rank + 1) * args.batch]
        seqs = torch.stack([data[s : s + args.seq + 1] for s in mine.tolist()]).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(seqs[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), seqs[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if world > 1:
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if log and (step % args.log_every == 0 or step == args.steps - 1):
            peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
            rec = dict(step=step, loss=losses[-1], step_s=times[-1], peak_bytes=peak)
            log.write(json.dumps(rec) + "\n")
            log.flush()
    if bar is not None:
        bar.close()
    if prof is not None:
        prof.__exit__(None, None, None)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        print(f"profile of the last {args.profile} steps:\n{table}")
    warm = times[min(10, len(times) - 1) :]
    summary = dict(
        residual=args.residual,
        stream_dtype=args.stream_dtype,
        world=world,
        final_loss=sum(losses[-10:]) / len(losses[-10:]),
        median_step_s=sorted(warm)[len(warm) // 2],
        peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
    )
    if rank == 0:
        print(json.dumps(summary))
        if log:
            log.write(json.dumps(dict(summary=summary)) + "\n")
            log.close()
    return summary


if __name__ == "__main__":
    main()
