"""Every built backward variant: gradients against float64 reference autograd.

Random upstream gradients (never only ones), α = 1 with random b and φ (H_res
far from uniform) as well as α = 0.01, run-time n drawn from 1..32 (3 and 5
included), C not a multiple of 8, T = 1, every dtype. A second run must give
bitwise the same gradients.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mhc_gen
from generator.spec import Op, parse
from mhc_gen import gpu
from mhc_gen import reference as R
from mhc_gen._launch import TORCH_DTYPES
from mhc_gen.testing import GRAD_TOLERANCES, assert_close, bitwise_equal, relative_error, widened

pytestmark = pytest.mark.gpu

BACKWARD = [
    name
    for name in (mhc_gen.kernels() if torch.cuda.is_available() else [])
    if parse(name).op.backward
]

ANY_N = st.one_of(st.sampled_from([1, 3, 5, 8, 32]), st.integers(1, 32))


def _case(spec, data):
    n = spec.n if spec.n is not None else data.draw(ANY_N, label="n")
    if spec.hidden is not None:
        c = spec.hidden
    else:
        c = data.draw(st.one_of(st.integers(1, 40), st.integers(41, 300)) if n <= 8
                      else st.integers(1, 64), label="C")  # fmt: skip
    if spec.op in (Op.PRE_BWD_DYN, Op.PHI_GRAD_DYN, Op.LAYER_BWD_DYN) and n * c < 8:
        # h̃ depends on x̄/r, so ∂x is orthogonal to x̄ up to eps_rms: for tiny n·C the
        # exact ∂x is O(eps) and any fp32 result is cancellation noise.
        c = -(-8 // n)
    if spec.op in (Op.LAYER_BWD_DYN, Op.LAYER_BWD_STATIC) and c == 1 and spec.dtype.value != "fp32":
        c = 7  # see test_layer_gradients: ∂w would be one token-sum of ±dy
    t = data.draw(st.one_of(st.just(1), st.integers(1, 33)), label="T")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    alpha = data.draw(st.sampled_from([0.01, 1.0]), label="alpha")
    iters = data.draw(st.sampled_from([20, 20, 3, 1, 0]), label="iters")
    return n, c, t, seed, alpha, iters


def _inputs(n, c, t, seed, alpha, dtype):
    g = torch.Generator().manual_seed(seed)
    m = R.num_logits(n)
    x = torch.randn(t, n, c, generator=g).to(dtype)
    return dict(
        x=x,
        y=torch.randn(t, c, generator=g).to(dtype),
        phi=torch.randn(n * c, m, generator=g) / (n * c) ** 0.5,
        alpha=torch.tensor([alpha, 0.8 * alpha, 1.2 * alpha]),
        b=torch.randn(m, generator=g),
        w=1 + 0.2 * torch.randn(c, generator=g),
    )


def _grads(fn, inputs, names, device, dtype, seed, up_dtype):
    """Gradients of Σ (fn(inputs) · random) w.r.t. names; inputs cast to dtype on
    device. The random upstream gradients are rounded to up_dtype (the kernel
    run's x dtype) in both runs, so that both differentiate the same loss."""
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = {
        k: v.to(device=device, dtype=dtype if k in ("x", "y") else param_dtype).requires_grad_(
            k in names
        )
        for k, v in inputs.items()
    }
    outs = fn(leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = 0
    for o in outs:
        up = torch.randn(o.shape, generator=g, dtype=torch.float64).to(up_dtype)
        up = up.to(device=device, dtype=o.dtype)
        loss = loss + (o * up).sum()
    return torch.autograd.grad(loss, [leaves[k] for k in names])


def _h_post_res(v, iters):
    h = R.dynamic_coefficients(v["x"], v["phi"], v["alpha"], v["b"], sinkhorn_iters=iters)
    return h[1].detach().float(), h[2].detach().float()


def _families(iters):
    kw = dict(sinkhorn_iters=iters)
    return {
        Op.POST_BWD_DYN: (
            lambda v: mhc_gen.post_dynamic(v["x"], v["y"], v["h_post"], v["h_res"]),
            lambda v: R.post(v["x"], v["y"], v["h_post"], v["h_res"]),
            ("x", "y", "h_post", "h_res"),
        ),
        Op.POST_BWD_STATIC: (
            lambda v: mhc_gen.post_static(v["x"], v["y"], v["b"], **kw),
            lambda v: R.post(
                v["x"], v["y"], *R.static_coefficients(v["b"], v["x"].shape[1], **kw)[1:]
            ),
            ("x", "y", "b"),
        ),  # fmt: skip
        Op.PRE_BWD_DYN: (
            lambda v: mhc_gen.pre_dynamic(v["x"], v["phi"], v["alpha"], v["b"], **kw),
            lambda v: (lambda h: (R.pre(v["x"], h[0]), *h))(
                R.dynamic_coefficients(v["x"], v["phi"], v["alpha"], v["b"], **kw)
            ),
            ("x", "phi", "alpha", "b"),
        ),
        Op.PRE_BWD_STATIC: (
            lambda v: mhc_gen.pre_static(v["x"], v["b"], **kw),
            lambda v: R.pre(v["x"], R.static_coefficients(v["b"], v["x"].shape[1], **kw)[0]),
            ("x", "b"),
        ),
        Op.COEFFS_BWD_STATIC: (
            lambda v: mhc_gen.static_coefficients(v["b"], v["x"].shape[1], **kw),
            lambda v: R.static_coefficients(v["b"], v["x"].shape[1], **kw),
            ("b",),
        ),
        Op.PHI_GRAD_DYN: (
            lambda v: mhc_gen.dynamic_coefficients(v["x"], v["phi"], v["alpha"], v["b"], **kw),
            lambda v: R.dynamic_coefficients(v["x"], v["phi"], v["alpha"], v["b"], **kw),
            ("x", "phi", "alpha", "b"),
        ),
        Op.LAYER_BWD_DYN: (
            lambda v: mhc_gen.layer_dynamic(v["x"], v["w"], v["phi"], v["alpha"], v["b"], **kw),
            lambda v: R.layer_dynamic(v["x"], v["w"], v["phi"], v["alpha"], v["b"], **kw),
            ("x", "w", "phi", "alpha", "b"),
        ),
        Op.LAYER_BWD_STATIC: (
            lambda v: mhc_gen.layer_static(v["x"], v["w"], v["b"], **kw),
            lambda v: R.layer_static(v["x"], v["w"], v["b"], **kw),
            ("x", "w", "b"),
        ),
    }


def _check(fn, ref, names, v, dtype, seed, what):
    dev = torch.device("cuda")
    with mhc_gen.poisoned_outputs():
        got = _grads(fn, v, names, dev, dtype, seed, dtype)
        again = _grads(fn, v, names, dev, dtype, seed, dtype)
    for a, b_, name in zip(got, again, names, strict=True):
        assert bitwise_equal(a, b_), f"{what}: ∂{name} differs bitwise on a second run"
    want = _grads(ref, v, names, "cpu", torch.float64, seed, dtype)
    tols = [GRAD_TOLERANCES[dtype]] * len(names)
    if dtype == torch.float32:  # as close as float32 arithmetic can get (see widened)
        ref32 = _grads(ref, v, names, "cpu", torch.float32, seed, dtype)
        tols = [widened(t, relative_error(r, e)) for t, r, e in zip(tols, ref32, want, strict=True)]
    for a, e, name, tol in zip(got, want, names, tols, strict=True):
        assert_close(a, e, f"{what}: ∂{name}", tol=tol)


def test_backward_variants_are_built():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    assert BACKWARD, "no backward kernels built"


@pytest.mark.parametrize("name", BACKWARD)
@settings(max_examples=5, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(data=st.data())
def test_backward_variant(name, data):
    spec = parse(name)
    n, c, t, seed, alpha, iters = _case(spec, data)
    dtype = TORCH_DTYPES[spec.dtype] if spec.op.needs_x else torch.float32
    v = _inputs(n, c, t, seed, alpha, dtype)
    h_post, h_res = _h_post_res({k: u.double() for k, u in v.items()}, iters)
    v["h_post"], v["h_res"] = h_post, h_res
    fn, ref, names = _families(iters)[spec.op]
    # ∂x of the dynamic pre: inside the kernel, or (the default for n ≥ 16 on CUDA) with
    # ∂z·φᵀ as a GEMM after the kernel's phases 1-2.
    gemm = data.draw(st.booleans(), label="dz_phi_gemm")
    # ∂φ: cuBLAS GEMMs on CUDA by default; the variant under test is the ROCm path's kernel.
    phi_kernel = spec.op is Op.PHI_GRAD_DYN
    # Static H from one coefficients launch (as from _STATIC_H_ONCE_MIN_TOKENS tokens) or
    # computed in each block.
    h_once = data.draw(st.booleans(), label="static_h_once")
    with (
        mhc_gen.forced_variant(name),
        mock.patch.object(gpu, "_gemm_dz_phi", lambda x, n: gemm),
        mock.patch.object(gpu, "_gemm_phi_grad", lambda x: not phi_kernel and x.is_cuda),
        mock.patch.object(gpu, "_STATIC_H_ONCE_MIN_TOKENS", 0 if h_once else 1 << 62),
    ):
        _check(fn, ref, names, v, dtype, seed + 1, name)


@pytest.mark.parametrize("op", ["pre", "post"])
@pytest.mark.parametrize(("n", "c"), [(4, 4096), (3, 77), (32, 64)])
def test_static_h_once_is_bitwise_the_per_block_h(op, n, c):
    """Pre's and post's static backward handed H from one coefficients launch (many tokens)
    give bitwise the gradients of their blocks computing H themselves (few tokens)."""
    g = torch.Generator().manual_seed(1000 * n + c)
    dev = torch.device("cuda")
    x = torch.randn(37, n, c, generator=g).bfloat16().to(dev)
    y = torch.randn(37, c, generator=g).bfloat16().to(dev)
    b = (2 * torch.randn(R.num_logits(n), generator=g)).to(dev)
    if op == "pre":
        du = torch.randn(37, c, generator=g).bfloat16().to(dev)
        call = lambda: gpu.pre_static_backward(du, x, b, 20, 1e-6, 2.0)  # noqa: E731
    else:
        dout = torch.randn(37, n, c, generator=g).bfloat16().to(dev)
        call = lambda: gpu.post_static_backward(dout, x, y, b, 20, 1e-6, 2.0)  # noqa: E731
    outs = []
    for threshold in (0, 1 << 62):
        with mock.patch.object(gpu, "_STATIC_H_ONCE_MIN_TOKENS", threshold):
            with mhc_gen.poisoned_outputs():
                outs.append(call())
    for a, b_ in zip(*outs, strict=True):
        assert not a.isnan().any()
        assert bitwise_equal(a, b_), f"{op}: H from one launch differs bitwise"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dynamic", [True, False])
@settings(max_examples=6, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(
    n=st.sampled_from([1, 3, 4, 5, 8, 32]),
    c=st.sampled_from([1, 7, 64, 100, 1280, 4100]),  # 4100: > 48 KB of shared memory
    t=st.integers(1, 17),
    seed=st.integers(0, 2**31 - 1),
    alpha=st.sampled_from([0.01, 1.0]),
)
@pytest.mark.parametrize("path", ["fused", "fused_2_blocks", "unfused"])
def test_layer_gradients(path, dtype, dynamic, n, c, t, seed, alpha):
    if n == 32 and c > 100:
        c = 100
    if n * c * t > 300_000:  # the float64 reference on the CPU
        t = 300_000 // (n * c)
    if dynamic and n * c < 8:  # see _case: ∂x is O(eps) there
        c = -(-8 // n)
    if c == 1 and dtype != torch.float32:
        # ∂w is then one token-sum of ±dy, which can cancel far below its rounded terms.
        c = 7
    v = _inputs(n, c, t, seed, alpha, dtype)
    if dynamic:
        fn = lambda u: mhc_gen.layer_dynamic(u["x"], u["w"], u["phi"], u["alpha"], u["b"])  # noqa: E731
        ref = lambda u: R.layer_dynamic(u["x"], u["w"], u["phi"], u["alpha"], u["b"])  # noqa: E731
        names = ("x", "w", "phi", "alpha", "b")
    else:
        fn = lambda u: mhc_gen.layer_static(u["x"], u["w"], u["b"])  # noqa: E731
        ref = lambda u: R.layer_static(u["x"], u["w"], u["b"])  # noqa: E731
        names = ("x", "w", "b")
    # unfused: the path for C too large for the fused front kernel's shared memory;
    # fused_2_blocks: two blocks walk every token group (as at large T).
    sm_count = (lambda d: 1) if path == "fused_2_blocks" else gpu._sm_count
    with (
        mock.patch.object(gpu, "_fused_layer_backward", lambda x: path != "unfused"),
        mock.patch.object(gpu, "_sm_count", sm_count),
    ):
        _check(fn, ref, names, v, dtype, seed + 1, f"layer {'dyn' if dynamic else 'static'}")
