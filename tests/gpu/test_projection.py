"""The tensor-core projection (z and r in one pass over x) and the paths it opens: the
coefficients in a launch of their own, the fused layer given H (staged, on a grid of its
own), and the layer backward given H. Each against the float64 reference, outputs poisoned,
a second run bitwise the same; where two paths compute the same sums in the same order,
bitwise each other's."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mhc_gen
from generator.spec import Op, parse
from mhc_gen import gpu, reference
from mhc_gen._launch import DTYPES, forced_variant, poisoned_outputs
from mhc_gen.testing import (
    GRAD_TOLERANCES,
    TOLERANCES,
    Z_TOLERANCE,
    assert_close,
    bitwise_equal,
    one_hot_projection,
)

pytestmark = pytest.mark.gpu


def _variants() -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [k for k in mhc_gen.kernels() if parse(k).op is Op.PROJ_DYN]


def _twice(fn):
    with poisoned_outputs():
        first, second = fn(), fn()
    for a, b in zip(first, second, strict=True):
        assert bitwise_equal(a, b), "second run differs bitwise"
    return first


def _inputs(t, n, c, seed, phi_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    m = reference.num_logits(n)
    x = torch.randn(t, n, c, generator=g).bfloat16()
    phi = torch.randn(n * c, m, generator=g) * phi_scale / (n * c) ** 0.5
    alpha = torch.tensor([1.0, 0.8, 1.2])
    b = torch.randn(m, generator=g)
    w = 1 + 0.2 * torch.randn(c, generator=g)
    return x, phi, alpha, b, w


@pytest.mark.parametrize("name", _variants())
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_projection_variant(name, data):
    """z and r of every built projection variant against float64: token counts around the
    64-token block, n·C from one 64-wide k step to several thousand."""
    spec = parse(name)
    n = spec.n or data.draw(st.integers(1, 8), label="n")
    step = 64 // math.gcd(64, n)  # C such that n·C is a multiple of 64
    c = step * data.draw(st.one_of(st.integers(1, 4), st.integers(5, 600 // step + 5)), label="c")
    t = data.draw(st.one_of(st.integers(1, 70), st.sampled_from([128, 129, 300])), label="T")
    x, phi, *_ = _inputs(t, n, c, data.draw(st.integers(0, 2**31 - 1), label="seed"))
    xd = x.double().view(t, n * c)
    z_ref = xd @ phi.double()
    r_ref = torch.sqrt(xd.square().mean(-1) + 1e-6)
    xg, pg = x.cuda(), phi.cuda()
    with forced_variant(name):
        z, sq = _twice(lambda: tuple(gpu.projection_partials(xg, pg)[k] for k in ("z_in", "sq_in")))
    assert_close(z.sum(0), z_ref, "z", tol=Z_TOLERANCE)
    assert_close(torch.sqrt(sq.sum(0) / (n * c) + 1e-6), r_ref, "r")


def test_projection_rejects_what_it_cannot_serve():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    x = torch.randn(64, 4, 40, device="cuda").bfloat16()  # n·C = 160: not a multiple of 64
    phi = torch.randn(160, 24, device="cuda")
    assert not gpu._projection_kernel(x, phi)
    with pytest.raises(ValueError, match="hidden"):
        gpu.projection_partials(x, phi)
    x16 = torch.randn(64, 16, 64, device="cuda").bfloat16()
    assert not gpu._projection_kernel(x16, phi)  # n > 8: the kernel's accumulators


ONE_HOT_CASES = [(4, 64, 128), (4, 256, 300), (4, 1280, 129), (4, 4096, 5000), (2, 64, 70),
                 (8, 512, 257)]  # fmt: skip


@pytest.mark.parametrize(("n", "c", "t"), ONE_HOT_CASES)
def test_projection_reads_each_token_and_k_where_it_should(n, c, t):
    """Exact: a one-hot x picks one row of φ a token, so a misplaced swizzle, descriptor or
    fragment shows as a wrong (token, logit) and the value it read instead."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    x, phi, want = one_hot_projection(t, n, c)
    out = _twice(lambda: tuple(gpu.projection_partials(x.cuda(), phi.cuda())[k]
                               for k in ("z_in", "sq_in")))  # fmt: skip
    z, sq = (v.sum(0).cpu() for v in out)
    bad = (z != want).nonzero()
    if len(bad):
        tok, j = bad[0].tolist()
        pytest.fail(f"{len(bad)} of {z.numel()} logits wrong; first: token {tok}, logit {j}: "
                    f"{z[tok, j].item()} (want {want[tok, j].item()})")  # fmt: skip
    assert torch.equal(sq, torch.ones(t)), "Σx̄² of a one-hot token is 1"


CASES = [(1, 64, 5), (2, 32, 70), (3, 64, 129), (4, 4096, 9), (4, 1280, 64), (8, 512, 33),
         (4, 7168, 3)]  # fmt: skip


@pytest.mark.parametrize(("n", "c", "t"), CASES)
def test_ops_through_the_projection(n, c, t):
    """pre_dynamic, dynamic_coefficients and layer_dynamic with z and r from the projection
    kernel (the layer: H in one launch, then the staged kernel; C = 7168 past the staging
    limit) against float64."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    x, phi, alpha, b, w = _inputs(t, n, c, 7 * n + c + t)
    d = [v.double() for v in (x, w, phi, alpha, b)]
    h_ref = reference.dynamic_coefficients(d[0], *d[2:])
    xg, wg, pg, ag, bg = (v.cuda() for v in (x, w, phi, alpha, b))
    with mock.patch.multiple(gpu, _PROJECTION_KERNEL_MIN_TOKENS=0, _PROJECTION_KERNEL_MAX_N=8):
        assert gpu._projection_kernel(xg, pg)
        pre = _twice(lambda: mhc_gen.pre_dynamic(xg, pg, ag, bg))
        coeffs = _twice(lambda: mhc_gen.dynamic_coefficients(xg, pg, ag, bg))
        (layer,) = _twice(lambda: (mhc_gen.layer_dynamic(xg, wg, pg, ag, bg),))
    assert_close(pre[0], reference.pre(d[0], h_ref[0]), "u")
    for got, want, what in zip(coeffs, h_ref, ("H_pre", "H_post", "H_res"), strict=True):
        assert_close(got, want, what)
    assert_close(layer, reference.layer(d[0], d[1], *h_ref), "x_next", tol=TOLERANCES[x.dtype])


@pytest.mark.parametrize(("n", "c", "t"), [(4, 4096, 37), (2, 64, 300), (8, 512, 33)])
def test_layer_given_h_is_bitwise_the_layer_computing_it(n, c, t):
    """The fused layer given H from the coefficients launch (z and r from the projection
    kernel handed to both) gives bitwise the x_next of the fused kernel computing H itself
    from the same z and r: the same coefficients(), the same sums a token."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    x, phi, alpha, b, w = (v.cuda() for v in _inputs(t, n, c, n + c + t))
    with mock.patch.multiple(gpu, _PROJECTION_KERNEL_MIN_TOKENS=0, _PROJECTION_KERNEL_MAX_N=8):
        *_, z, r = gpu.dynamic_coefficients(x, phi, alpha, b, 20, 1e-6, 1e-6, 2.0)
    kw = dict(n=n, hidden=c, tokens=t, x=x, norm_weight=w)
    outs = []
    with poisoned_outputs():
        for h in (gpu._coefficients_from(z, r, alpha, b, n, 20, 1e-6, 2.0), {}):
            out = gpu.empty(x.shape, x.dtype, x.device)
            given = dict(h) if h else dict(z_in=z, r_in=r, phi=phi, alpha=alpha, bias=b)
            gpu.launch(Op.LAYER_DYN, x.device, DTYPES[x.dtype], out=out, **kw, **given)
            outs.append(out)
    assert not outs[0].isnan().any()
    assert bitwise_equal(outs[0], outs[1]), "H given differs bitwise from H computed"


@pytest.mark.parametrize(("n", "c", "t"), [(4, 4096, 33), (2, 64, 5), (8, 512, 17), (3, 77, 9)])
def test_layer_backward_h_once_is_bitwise_the_per_block_h(n, c, t):
    """The dynamic layer's backward given H from one coefficients launch on the saved z and
    r gives bitwise the gradients of its blocks computing H themselves."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    x, phi, alpha, b, w = (v.cuda() for v in _inputs(t, n, c, 3 * n + c + t))
    grads = []
    for threshold in (0, 1 << 62):
        leaves = [v.clone().requires_grad_(True) for v in (x.float(), w, phi, alpha, b)]
        xb = leaves[0].bfloat16()
        with mock.patch.object(gpu, "_LAYER_BWD_H_ONCE_MIN_TOKENS", threshold):
            out = mhc_gen.layer_dynamic(xb, *leaves[1:])
            out.float().square().sum().backward()
        grads.append([v.grad for v in leaves])
    for first, second in zip(*grads, strict=True):
        assert bitwise_equal(first, second), "H from one launch changes the gradients"


@pytest.mark.parametrize(("n", "c", "t"), [(4, 4096, 65), (1, 64, 9), (8, 512, 33)])
def test_layer_gradients_through_the_projection(n, c, t):
    """The dynamic layer's gradients with the forward through the projection kernel and the
    backward given H, against float64 autograd of the reference."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    x, phi, alpha, b, w = _inputs(t, n, c, 11 * n + c + t, phi_scale=0.5)
    g = torch.randn(t, n, c, generator=torch.Generator().manual_seed(t)).bfloat16()
    ref = [v.double().requires_grad_(True) for v in (x, w, phi, alpha, b)]
    reference.layer_dynamic(*ref).backward(g.double())
    leaves = [v.cuda().requires_grad_(True) for v in (x.float(), w, phi, alpha, b)]
    with (
        mock.patch.multiple(gpu, _PROJECTION_KERNEL_MIN_TOKENS=0, _PROJECTION_KERNEL_MAX_N=8),
        mock.patch.object(gpu, "_LAYER_BWD_H_ONCE_MIN_TOKENS", 0),
    ):
        out = mhc_gen.layer_dynamic(leaves[0].bfloat16(), *leaves[1:])
        out.backward(g.cuda())
    tol = GRAD_TOLERANCES[torch.bfloat16]
    for got, want, what in zip(leaves, ref, ("x", "w", "phi", "alpha", "b"), strict=True):
        assert_close(got.grad, want.grad, f"d{what}", tol=tol)


@pytest.mark.parametrize("iters", [20, 3, 0])
def test_coefficient_forms_are_bitwise_equal(iters):
    """The coefficients from given z and r: the compile-time-n variants (a token a thread)
    against the run-time-n variant (a warp a token), bitwise, on logits from near-uniform
    to far from it."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    names = [k for k in mhc_gen.kernels() if k.startswith("coeffs_dyn_n") and "_fp32_" in k]
    generic = next(k for k in names if parse(k).n is None and parse(k).hidden is None)
    for name in (k for k in names if parse(k).n is not None and parse(k).hidden is None):
        n, t = parse(name).n, 1000
        g = torch.Generator().manual_seed(n + iters)
        m = reference.num_logits(n)
        z = (
            torch.randn(t, m, generator=g) * 10 ** torch.randint(-2, 2, (t, 1), generator=g)
        ).cuda()
        r = (torch.rand(t, generator=g) + 0.1).cuda()
        alpha, b = torch.tensor([1.0, 0.8, 1.2]).cuda(), torch.randn(m, generator=g).cuda()
        outs = []
        for variant in (name, generic):
            with forced_variant(variant), poisoned_outputs():
                h = gpu._coefficients_from(z, r, alpha, b, n, iters, 1e-6, 2.0)
            outs.append(list(h.values()))
        for first, second in zip(*outs, strict=True):
            assert not first.isnan().any()
            assert bitwise_equal(first, second), f"{name}: differs from {generic}"


@pytest.mark.parametrize("precision", ["highest", "high"])
@pytest.mark.parametrize("t", [1, 32, 33])
def test_gemm_projection_at_few_tokens(precision, t):
    """z = x̄·φ at n = 32 through cuBLAS: an fp32 SGEMM up to _FP32_GEMM_MAX_TOKENS tokens
    where fp32 matmuls are exact, else φ split into bf16 hi + lo; both against float64."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    n, c = 32, 1280
    x, phi, *_ = _inputs(t, n, c, 11 * t)
    z_ref = x.double().view(t, n * c) @ phi.double()
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        assert gpu._fp32_gemm(t, n) == (precision == "highest" and t <= gpu._FP32_GEMM_MAX_TOKENS)
        z = gpu.projection(x.cuda(), phi.cuda())
    finally:
        torch.set_float32_matmul_precision(before)
    assert_close(z, z_ref, "z", tol=Z_TOLERANCE)
