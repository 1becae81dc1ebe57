"""mhc_gen as a PyTorch citizen: torch.compile(fullgraph=True), CUDA-graph
capture and replay, autocast, and a short training run against the reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mhc_gen

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no GPU", allow_module_level=True)


class Attention(nn.Module):
    """Causal single-head self-attention on u [B, S, C]."""

    def __init__(self, c: int):
        super().__init__()
        self.qkv = nn.Linear(c, 3 * c)
        self.out = nn.Linear(c, c)

    def forward(self, u):
        q, k, v = self.qkv(u).chunk(3, dim=-1)
        return self.out(nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))


class Block(nn.Module):
    """A transformer block: mHC around attention, mHC around an MLP, then the seed's layer."""

    def __init__(self, c: int, n: int, dynamic: bool, impl: str = "kernels"):
        super().__init__()
        mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))
        self.attn = mhc_gen.MHCConnection(Attention(c), c, n, dynamic, impl=impl)
        self.mlp = mhc_gen.MHCConnection(mlp, c, n, dynamic, impl=impl)
        self.norm = mhc_gen.MHCLayer(c, n, dynamic, impl=impl)

    def forward(self, x):
        return self.norm(self.mlp(self.attn(x)))


class Model(nn.Module):
    def __init__(self, vocab=64, c=64, n=4, blocks=2, dynamic=True, impl="kernels"):
        super().__init__()
        self.n = n
        self.embed = nn.Embedding(vocab, c)
        self.blocks = nn.ModuleList(Block(c, n, dynamic, impl) for _ in range(blocks))
        self.head = nn.Linear(c, vocab)

    def forward(self, tokens):  # [B, S] -> logits [B·S, vocab]
        x = mhc_gen.expand_streams(self.embed(tokens), self.n)  # [B, S, n, C]
        for blk in self.blocks:
            x = blk(x)
        return self.head(mhc_gen.reduce_streams(x)).flatten(0, 1)


def _batch(seed, vocab=64, batch=4, seq=64):
    """Next token = a fixed function of the previous token: learnable with attention."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    target = (tokens * 7 + 3) % vocab
    return tokens.cuda(), target.flatten().cuda()


def _loss_and_grads(model, tokens, target):
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(tokens), target)
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("dynamic", [True, False])
def test_compile_fullgraph(dynamic):
    torch.manual_seed(0)
    model = Model(dynamic=dynamic).cuda()
    tokens, target = _batch(1)
    eager_loss, eager_grads = _loss_and_grads(model, tokens, target)
    compiled = torch.compile(model, fullgraph=True)
    loss, grads = _loss_and_grads(compiled, tokens, target)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dynamic", [True, False])
def test_cuda_graph_capture_and_replay(dynamic):
    """Forward and backward captured once, replayed on new inputs: the results of
    an eager run of an identical model (no host syncs in any op)."""
    torch.manual_seed(0)
    model = Model(dynamic=dynamic).cuda()
    eager = copy.deepcopy(model)
    static_tokens, static_target = (t.clone() for t in _batch(2))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up on a side stream, as the capture will run
            _loss_and_grads(model, static_tokens, static_target)
    torch.cuda.current_stream().wait_stream(s)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = nn.functional.cross_entropy(model(static_tokens), static_target)
        static_loss.backward()
    graph_grads = [p.grad for p in model.parameters()]  # buffers the replays write
    for seed in (3, 4):
        tokens, target = _batch(seed)
        static_tokens.copy_(tokens)
        static_target.copy_(target)
        graph.replay()
        eager_loss, eager_grads = _loss_and_grads(eager, tokens, target)
        # Not bitwise: torch's embedding backward accumulates with atomics.
        torch.testing.assert_close(static_loss, eager_loss, rtol=1e-6, atol=1e-6)
        for g, e in zip(graph_grads, eager_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_autocast_bf16():
    torch.manual_seed(0)
    model = Model(dynamic=True).cuda()
    tokens, target = _batch(5)
    fp32_loss, _ = _loss_and_grads(model, tokens, target)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(model, tokens, target)
    assert all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(loss, fp32_loss, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("dynamic", [True, False])
def test_training_matches_reference(dynamic):
    """A few hundred steps: the loss curve of the kernels tracks the reference's."""
    curves = {}
    for impl in ("kernels", "reference"):
        torch.manual_seed(0)
        model = Model(dynamic=dynamic, impl=impl).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for step in range(300):
            tokens, target = _batch(100 + step)
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(tokens), target)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        curves[impl] = torch.tensor(losses)
    k, r = curves["kernels"], curves["reference"]
    assert k[-20:].mean() < 0.5 * k[:20].mean(), "the model did not learn"
    assert (k - r).abs().max() < 2e-2 * r.abs().max(), f"curves diverge: {(k - r).abs().max()}"
