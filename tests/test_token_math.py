"""The kernels' per-token math (templates/include/mhc/token_math.h), compiled
for the host, against mhc_gen.reference."""

import ctypes

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mhc_gen import reference


@pytest.fixture(scope="module")
def lib(host_shim):
    lib = host_shim("token_math")
    lib.shim_token_rms.restype = ctypes.c_float
    lib.shim_token_rms.argtypes = [ctypes.c_float, ctypes.c_longlong, ctypes.c_float]
    return lib


def _p(t):
    return ctypes.c_void_p(t.data_ptr())


def _coefficients(lib, z, r, alpha, b, n, iters, eps_sk=1e-6, post_mult=2.0):
    h_pre, h_post, h_res = torch.empty(n), torch.empty(n), torch.empty(n, n)
    lib.shim_coefficients(
        None if z is None else _p(z), ctypes.c_float(r), _p(alpha), _p(b), n,
        ctypes.c_float(post_mult), iters, ctypes.c_float(eps_sk), _p(h_pre), _p(h_post), _p(h_res),
    )  # fmt: skip
    return h_pre, h_post, h_res


def _logits(z, r, alpha, b, n):
    """h̃ = α·z/r + b in float64, α by group (pre, post, res)."""
    a = alpha.double()
    scale = torch.cat([a[0].expand(n), a[1].expand(n), a[2].expand(n * n)])
    return scale * z.double() / r + b.double()


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 32),
    iters=st.sampled_from([0, 1, 5, 20]),
    scale=st.sampled_from([0.1, 1.0, 4.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_dynamic_epilogue_matches_reference(lib, n, iters, scale, seed):
    g = torch.Generator().manual_seed(seed)
    m = reference.num_logits(n)
    z = torch.randn(m, generator=g) * scale
    r = float(torch.rand((), generator=g)) + 0.5
    alpha = torch.rand(3, generator=g) + 0.01
    b = torch.randn(m, generator=g)
    got = _coefficients(lib, z, r, alpha, b, n, iters)
    want = reference.coefficients_from_logits(_logits(z, r, alpha, b, n), n, sinkhorn_iters=iters)
    for gv, wv in zip(got, want, strict=True):
        torch.testing.assert_close(gv.double(), wv, rtol=2e-5, atol=2e-6)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 32), seed=st.integers(0, 2**31 - 1))
def test_static_epilogue_is_bias_only(lib, n, seed):
    b = torch.randn(reference.num_logits(n), generator=torch.Generator().manual_seed(seed)) * 3
    got = _coefficients(lib, None, 1.0, torch.zeros(3), b, n, 20)
    want = reference.static_coefficients(b.double(), n)
    for gv, wv in zip(got, want, strict=True):
        torch.testing.assert_close(gv.double(), wv, rtol=2e-5, atol=2e-6)


def test_extreme_logits_stay_finite(lib):
    n = 8
    b = torch.randn(reference.num_logits(n), generator=torch.Generator().manual_seed(23)) * 1e4
    h_pre, h_post, h_res = _coefficients(lib, None, 1.0, torch.zeros(3), b, n, 20)
    assert torch.isfinite(h_res).all() and torch.isfinite(h_pre).all()
    # exp(L - max L) underflows for all but the largest logits, and the entries
    # near eps_sk are ill-conditioned: fp32 and fp64 may then disagree, but the
    # result stays a sub-stochastic matrix.
    assert (h_res >= 0).all() and (h_res.sum(-1) <= 1 + 1e-5).all()


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 32),
    iters=st.sampled_from([0, 1, 7, 20, 64]),
    scale=st.sampled_from([0.3, 1.0, 3.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_sinkhorn_backward_matches_autograd(lib, n, iters, scale, seed):
    """The exact derivative of the unrolled iterations, against float64 autograd."""
    g = torch.Generator().manual_seed(seed)
    m = reference.num_logits(n)
    b = torch.randn(m, generator=g) * scale
    ups = [torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, n, generator=g)]
    got = torch.empty(m)
    lib.shim_coefficients_backward(None, ctypes.c_float(1.0), _p(torch.zeros(3)), _p(b), n,
                                   ctypes.c_float(2.0), iters, ctypes.c_float(1e-6),
                                   *(_p(u) for u in ups), _p(got))  # fmt: skip
    bd = b.double().requires_grad_()
    outs = reference.static_coefficients(bd, n, sinkhorn_iters=iters)
    (want,) = torch.autograd.grad(outs, [bd], [u.double() for u in ups])
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 8), iters=st.sampled_from([0, 3, 20]), seed=st.integers(0, 2**31 - 1))
def test_dynamic_coefficient_backward_matches_autograd(lib, n, iters, seed):
    """∂h̃ of H from logits α·z/r + b (the dynamic H), against float64 autograd through the
    logits, with some upstream ∂H absent (null: zero)."""
    g = torch.Generator().manual_seed(seed)
    m = reference.num_logits(n)
    z, b = torch.randn(m, generator=g), torch.randn(m, generator=g)
    r, alpha = float(torch.rand((), generator=g)) + 0.5, torch.rand(3, generator=g) + 0.1
    ups = [torch.randn(n, generator=g), None, torch.randn(n, n, generator=g)]
    got = torch.empty(m)
    up_ptrs = [None if u is None else _p(u) for u in ups]
    lib.shim_coefficients_backward(_p(z), ctypes.c_float(r), _p(alpha), _p(b), n,
                                   ctypes.c_float(2.0), iters, ctypes.c_float(1e-6), *up_ptrs,
                                   _p(got))  # fmt: skip
    logits = _logits(z, r, alpha, b, n).requires_grad_()
    outs = reference.coefficients_from_logits(logits, n, sinkhorn_iters=iters)
    grads = [u.double() if u is not None else torch.zeros(n, dtype=torch.float64) for u in ups]
    (want,) = torch.autograd.grad(outs, [logits], grads)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_token_rms(lib):
    x = torch.randn(4 * 100)
    want = float(torch.sqrt(x.double().square().mean() + 1e-6))
    got = lib.shim_token_rms(ctypes.c_float(float(x.double().square().sum())), x.numel(), 1e-6)
    assert abs(got - want) <= 1e-6 * want


def test_bf16_rounding_matches_torch(lib):
    x = torch.cat([torch.randn(10_000) * 100, torch.tensor([0.0, -0.0, float("inf"), 1e-40])])
    out = torch.empty_like(x)
    lib.shim_bf16_round(_p(x), _p(out), x.numel())
    torch.testing.assert_close(out, x.bfloat16().float(), rtol=0, atol=0)
    nan = torch.tensor([float("nan")])
    lib.shim_bf16_round(_p(nan), _p(out), 1)
    assert torch.isnan(out[0])
