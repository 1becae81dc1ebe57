"""The dynamic layer's backward in two passes over x and G (mhc/layer_backward_two_pass.cuh):
every built variant that serves it against float64 autograd of the reference, outputs
poisoned, a second run bitwise the same; and the gate that decides when it runs."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mhc_gen
from generator.spec import DType, Op, parse
from mhc_gen import gpu, reference
from mhc_gen._launch import forced_variant, poisoned_outputs
from mhc_gen.testing import GRAD_TOLERANCES, assert_close, bitwise_equal

pytestmark = pytest.mark.gpu

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _variants() -> list[str]:
    """Built layer_bwd_dyn variants of 16-bit dtypes at n ≤ 4 or any n."""
    if not torch.cuda.is_available():
        return []
    return [
        k
        for k in mhc_gen.kernels()
        if (s := parse(k)).op is Op.LAYER_BWD_DYN
        and s.dtype.value in DTYPES
        and (s.n is None or s.n <= gpu._TWO_PASS_MAX_N)
    ]


def _inputs(t, n, c, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    m = reference.num_logits(n)
    x = torch.randn(t, n, c, generator=g).to(dtype)
    phi = torch.randn(n * c, m, generator=g) * 0.5 / (n * c) ** 0.5
    alpha = torch.tensor([1.0, 0.8, 1.2])
    b = torch.randn(m, generator=g)
    w = 1 + 0.2 * torch.randn(c, generator=g)
    grad = torch.randn(t, n, c, generator=g).to(dtype)
    return x, w, phi, alpha, b, grad


def _gradients(x, w, phi, alpha, b, grad):
    """(∂x, ∂w, ∂φ, ∂α, ∂b) of mhc_gen's layer on the GPU, with the two-pass backward."""
    leaves = [v.cuda().float().requires_grad_(True) for v in (x, w, phi, alpha, b)]
    with mock.patch.object(gpu, "_TWO_PASS_MIN_TOKENS", 0):
        out = mhc_gen.layer_dynamic(leaves[0].to(x.dtype), *leaves[1:])
        assert gpu._two_pass_backward(grad.cuda(), out, leaves[1])
        out.backward(grad.cuda())
    return [v.grad for v in leaves]


@pytest.mark.parametrize("name", _variants())
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_two_pass_gradients(name, data):
    """Gradients against float64: token counts around the 16-token tile, C from one
    8-wide vector to past several 256-column blocks (and not a multiple of them)."""
    spec = parse(name)
    n = spec.n or data.draw(st.integers(1, gpu._TWO_PASS_MAX_N), label="n")
    c = 8 * data.draw(st.one_of(st.integers(1, 40), st.sampled_from([160, 512])), label="c/8")
    t = data.draw(st.one_of(st.integers(1, 40), st.sampled_from([100, 257])), label="T")
    dtype = DTYPES[spec.dtype.value]
    x, w, phi, alpha, b, grad = _inputs(t, n, c, dtype, data.draw(st.integers(0, 2**31 - 1)))
    ref = [v.double().requires_grad_(True) for v in (x, w, phi, alpha, b)]
    reference.layer_dynamic(*ref).backward(grad.double())
    with forced_variant(name), poisoned_outputs():
        first = _gradients(x, w, phi, alpha, b, grad)
        second = _gradients(x, w, phi, alpha, b, grad)
    tol = GRAD_TOLERANCES[dtype]
    for got, again, want, what in zip(first, second, ref, ("x", "w", "phi", "alpha", "b"),
                                      strict=True):  # fmt: skip
        assert bitwise_equal(got, again), f"d{what}: a second run differs bitwise"
        assert_close(got, want.grad, f"d{what}", tol=tol)


@pytest.mark.parametrize(
    ("n", "c", "t"), [(4, 4096, 33), (4, 7168, 17), (4, 8192, 5), (2, 1280, 70), (3, 4104, 300)]
)
def test_two_pass_gradients_at_model_sizes(n, c, t):
    """The selected variants at the hidden sizes the benchmarks run."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    x, w, phi, alpha, b, grad = _inputs(t, n, c, torch.bfloat16, n + c + t)
    ref = [v.double().requires_grad_(True) for v in (x, w, phi, alpha, b)]
    reference.layer_dynamic(*ref).backward(grad.double())
    with poisoned_outputs():
        got = _gradients(x, w, phi, alpha, b, grad)
    for g, want, what in zip(got, ref, ("x", "w", "phi", "alpha", "b"), strict=True):
        assert_close(g, want.grad, f"d{what}", tol=GRAD_TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize(("n", "c", "t"), [(4, 512, 100), (2, 1000, 47), (3, 264, 129)])
def test_two_pass_blocks_walking_many_tiles(n, c, t):
    """The ∂x kernel's blocks each taking several 16-token tiles in turn (its grid sized as
    for a one-SM GPU), as they do from 4096 tokens on a real one: the ∂w partials summed
    over the tiles, the scalars and tiles reused."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    x, w, phi, alpha, b, grad = _inputs(t, n, c, torch.bfloat16, 5 * n + c + t)
    ref = [v.double().requires_grad_(True) for v in (x, w, phi, alpha, b)]
    reference.layer_dynamic(*ref).backward(grad.double())
    with mock.patch.object(gpu, "_sm_count", lambda device: 1):
        assert gpu._layer_dx_splits(t, c, None) < -(-t // 16)
        with poisoned_outputs():
            first = _gradients(x, w, phi, alpha, b, grad)
            second = _gradients(x, w, phi, alpha, b, grad)
    for got, again, want, what in zip(first, second, ref, ("x", "w", "phi", "alpha", "b"),
                                      strict=True):  # fmt: skip
        assert bitwise_equal(got, again), f"d{what}: a second run differs bitwise"
        assert_close(got, want.grad, f"d{what}", tol=GRAD_TOLERANCES[torch.bfloat16])


def test_two_pass_gate():
    """It runs only where its kernels serve: CUDA, 16-bit x, n ≤ 4, C a multiple of 8,
    16-byte aligned x, G and w, enough tokens."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")

    def case(t=8, n=4, c=64, dtype=torch.bfloat16, offset=0):
        base = torch.randn(t * n * c + offset, device="cuda").to(dtype)
        x = base[offset:].view(t, n, c)
        w = torch.ones(c, device="cuda")
        return gpu._two_pass_backward(x, x, w)

    with mock.patch.object(gpu, "_TWO_PASS_MIN_TOKENS", 0):
        assert case()
        assert case(dtype=torch.float16)
        assert not case(dtype=torch.float32)
        assert not case(n=5)
        assert not case(c=60)
        assert not case(offset=1)
        assert not case(t=0)  # nothing to sum: the one-kernel path's zeros
    assert not case()  # 8 tokens: below the threshold


@pytest.mark.parametrize("iters", [20, 3, 0])
def test_token_kernel_forms_are_bitwise_equal(iters):
    """Pre's token kernel with no ∂u (as the layer's backward runs it): the compile-time-n
    variants (a token a thread) against the run-time-n variant (a warp a token), bitwise."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    names = [k for k in mhc_gen.kernels() if k.startswith("pre_bwd_dyn_n") and "_bf16_" in k]
    generic = next(k for k in names if parse(k).n is None and parse(k).hidden is None)
    compiled = [k for k in names if (parse(k).n or 99) <= 8 and parse(k).hidden is None]
    assert compiled, "no compile-time-n variant to compare"
    for name in compiled:
        n, t, c = parse(name).n, 1000, 64
        m = reference.num_logits(n)
        g = torch.Generator().manual_seed(n + iters)
        # Logits |α·z/r| up to ≈ 10: far past that, Sinkhorn's divisors reach eps and its
        # backward overflows to NaN in either form (seen at 400: z ~ 40, r ~ 0.1).
        z = (
            torch.randn(t, m, generator=g) * 10 ** torch.randint(-2, 1, (t, 1), generator=g)
        ).cuda()
        r = (torch.rand(t, generator=g) + 0.5).cuda()
        alpha, b = torch.tensor([1.0, 0.8, 1.2]).cuda(), torch.randn(m, generator=g).cuda()
        ups = [torch.randn(t, *s, generator=g).cuda() for s in ((n,), (n,), (n, n))]
        outs = []
        for variant in (name, generic):
            with forced_variant(variant), poisoned_outputs():
                dl, dz, da, sc = gpu._pre_token_grad_buffers(t, n, iters, z.device)
                gpu.launch(Op.PRE_BWD_DYN, z.device, DType.BF16, n=n, hidden=c, tokens=t,
                           sinkhorn_iters=iters, eps_sk=1e-6, post_mult=2.0, alpha=alpha, bias=b,
                           grad_h_pre_in=ups[0], grad_h_post_in=ups[1], grad_h_res_in=ups[2],
                           z_in=z, r_in=r, grad_logits=dl, grad_z=dz, grad_alpha_tok=da,
                           scratch=sc)  # fmt: skip
            outs.append((dl, dz, da, sc[:, : n + 1]))
        for what, first, second in zip(
            ("dlogits", "dz", "dalpha", "H_pre, dr"), *outs, strict=True
        ):
            assert not first.isnan().any(), f"{name}: {what} not written"
            assert bitwise_equal(first, second), f"{name}: {what} differs from the warp form"
