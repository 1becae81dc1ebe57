"""Properties of the reference (float64): the math every kernel is held to."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mhc_gen import reference as R
from mhc_gen.testing import GRAD_TOLERANCES, relative_error, widened

SHAPES = st.tuples(st.integers(1, 6), st.integers(1, 8), st.integers(1, 24))  # T, n, C


def _inputs(t, n, c, seed, alpha=1.0, phi_scale=0.1):
    g = torch.Generator().manual_seed(seed)
    m = R.num_logits(n)
    x = torch.randn(t, n, c, generator=g, dtype=torch.float64)
    phi = torch.randn(n * c, m, generator=g, dtype=torch.float64) * phi_scale
    alpha = torch.full((3,), alpha, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64) * 0.5
    return x, phi, alpha, b


@settings(max_examples=50, deadline=None)
@given(SHAPES, st.integers(0, 2**31 - 1))
def test_coefficient_ranges_and_doubly_stochastic(shape, seed):
    x, phi, alpha, b = _inputs(*shape, seed)
    h_pre, h_post, h_res = R.dynamic_coefficients(x, phi, alpha, b)
    assert ((h_pre > 0) & (h_pre < 1)).all()
    assert ((h_post > 0) & (h_post < R.POST_MULT)).all()
    assert (h_res >= 0).all()
    ones = torch.ones_like(h_res[..., 0])
    # Rows are normalised last, so they sum to 1 after any number of iterations.
    torch.testing.assert_close(h_res.sum(-1), ones, atol=1e-5, rtol=0)
    # Columns converge with the iterations: 20 (the paper's t_max) leave up to
    # ~1e-3 on spread logits, so converge fully before checking them.
    h_res = R.dynamic_coefficients(x, phi, alpha, b, sinkhorn_iters=300)[2]
    torch.testing.assert_close(h_res.sum(-1), ones, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_res.sum(-2), ones, atol=1e-5, rtol=0)


@settings(max_examples=30, deadline=None)
@given(SHAPES, st.integers(0, 2**31 - 1))
def test_static_equals_dynamic_with_zero_phi(shape, seed):
    x, phi, alpha, b = _inputs(*shape, seed)
    n = x.shape[-2]
    dyn = R.dynamic_coefficients(x, torch.zeros_like(phi), alpha, b)
    sta = R.static_coefficients(b, n)
    for d, s in zip(dyn, sta, strict=True):
        torch.testing.assert_close(d, s.expand_as(d), rtol=0, atol=0)


@settings(max_examples=30, deadline=None)
@given(SHAPES, st.integers(0, 2**31 - 1))
def test_fused_layer_is_pre_rmsnorm_post(shape, seed):
    x, phi, alpha, b = _inputs(*shape, seed)
    w = torch.randn(x.shape[-1], dtype=torch.float64)
    h_pre, h_post, h_res = R.dynamic_coefficients(x, phi, alpha, b)
    composed = R.post(x, R.rms_norm(R.pre(x, h_pre), w), h_post, h_res)
    torch.testing.assert_close(R.layer_dynamic(x, w, phi, alpha, b), composed)


def test_post_row_convention():
    # x_next[i] = Σ_j H_res[i, j] x[j]: a permutation matrix permutes streams.
    x = torch.arange(6, dtype=torch.float64).reshape(1, 3, 2)
    perm = torch.tensor([[0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float64)
    out = R.post(
        x, torch.zeros(1, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), perm
    )
    torch.testing.assert_close(out[0], x[0][[1, 2, 0]])


def test_gradcheck_dynamic_layer():
    x, phi, alpha, b = _inputs(2, 3, 4, seed=0, alpha=0.7, phi_scale=0.3)
    w = torch.randn(4, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (x, w, phi, alpha, b)]
    fn = lambda *a: R.layer_dynamic(*a, sinkhorn_iters=5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_static_pre_post():
    x, _, _, b = _inputs(3, 2, 5, seed=1)
    y = torch.randn(3, 5, dtype=torch.float64)
    args = [t.clone().requires_grad_() for t in (x, y, b)]

    def fn(x, y, b):
        h_pre, h_post, h_res = R.static_coefficients(b, 2, sinkhorn_iters=7)
        return R.pre(x, h_pre), R.post(x, y, h_post, h_res)

    assert torch.autograd.gradcheck(fn, args)


def test_sinkhorn_is_shift_invariant():
    logits = torch.randn(5, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(R.sinkhorn(logits), R.sinkhorn(logits + 100.0))


def test_rmsnorm_of_one_element_is_ill_conditioned_in_float32():
    # Why fp32 gradient checks use `widened`: RMSNorm over C = 1 is u / √(u² + ε), whose
    # derivative ε / r³ is steep near u ≈ √ε. There u = H_pre·x is a sum that cancels
    # (here 3.0013 − 3), so its float32 rounding becomes a large relative ∂u error.
    def grad(a):
        return torch.func.grad(lambda v: ((v - 3) / ((v - 3) ** 2 + R.EPS_RMS).sqrt()).sum())(a)

    a = torch.tensor([3.0013, 4.0], dtype=torch.float64)
    tol = GRAD_TOLERANCES[torch.float32]
    err = relative_error(grad(a.float()), grad(a))
    assert err > tol.rel_norm
    assert widened(tol, err).rel_norm == 2 * err
    assert widened(tol, tol.rel_norm / 4) == tol
