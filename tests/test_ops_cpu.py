"""The public ops on CPU tensors (the reference path) and their input checks."""

import pytest
import torch

import mhc_gen
from mhc_gen import reference as R


def _params(n, c, dtype=torch.float32):
    m = R.num_logits(n)
    return (
        torch.randn(n * c, m, dtype=dtype) * 0.1,
        torch.tensor([0.5, 0.5, 0.5], dtype=dtype),
        torch.randn(m, dtype=dtype),
    )


def test_cpu_ops_match_reference():
    x = torch.randn(2, 3, 4, 16, dtype=torch.float64)
    y = torch.randn(2, 3, 16, dtype=torch.float64)
    phi, alpha, b = _params(4, 16, torch.float64)
    u, h_pre, h_post, h_res = mhc_gen.pre_dynamic(x, phi, alpha, b)
    assert u.shape == (2, 3, 16) and h_res.shape == (2, 3, 4, 4)
    torch.testing.assert_close(u, R.pre(x, h_pre))
    out = mhc_gen.post_dynamic(x, y, h_post, h_res)
    torch.testing.assert_close(out, R.post(x, y, h_post, h_res))
    w = torch.rand(16, dtype=torch.float64)
    torch.testing.assert_close(mhc_gen.layer_static(x, w, b), R.layer_static(x, w, b))
    h = mhc_gen.static_coefficients(b, 4)
    torch.testing.assert_close(mhc_gen.post_static(x, y, b), R.post(x, y, h[1], h[2]))
    torch.testing.assert_close(mhc_gen.pre_static(x, b), R.pre(x, h[0]))


def test_cpu_bf16_output_dtype():
    x = torch.randn(5, 4, 8).bfloat16()
    phi, alpha, b = _params(4, 8)
    assert mhc_gen.layer_dynamic(x, torch.ones(8), phi, alpha, b).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(8),), "shape \\[..., n, C\\]"),
        (lambda: (torch.randn(2, 33, 8),), "n = 33"),
        (lambda: (torch.randn(2, 4, 0),), "hidden C = 0"),
        (lambda: (torch.randint(0, 3, (2, 4, 8)),), "floating point"),
        (lambda: ([1.0],), "torch.Tensor"),
    ],
)
def test_bad_x(make, match):
    (x,) = make()
    b = torch.zeros(R.num_logits(4))
    with pytest.raises(ValueError, match=match):
        mhc_gen.pre_static(x, b)


def test_bad_params():
    x = torch.randn(2, 4, 8)
    phi, alpha, b = _params(4, 8)
    with pytest.raises(ValueError, match="phi must have shape"):
        mhc_gen.pre_dynamic(x, phi[:-1], alpha, b)
    with pytest.raises(ValueError, match="alpha must have shape"):
        mhc_gen.pre_dynamic(x, phi, alpha[:2], b)
    with pytest.raises(ValueError, match="b must have shape"):
        mhc_gen.pre_static(x, b[:-1])
    with pytest.raises(ValueError, match="weight must have shape"):
        mhc_gen.layer_static(x, torch.ones(9), b)
    with pytest.raises(ValueError, match="is on meta but x is on cpu"):
        mhc_gen.pre_static(x, b.to("meta"))
    with pytest.raises(ValueError, match="y must have shape"):
        mhc_gen.post_static(x, torch.randn(2, 9), b)
    with pytest.raises(ValueError, match="y must have x's dtype|y must be"):
        mhc_gen.post_static(x, torch.randn(2, 8, dtype=torch.float64), b)
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        mhc_gen.pre_static(x, b, sinkhorn_iters=-1)


def test_kernels_listing_without_gpu():
    assert isinstance(mhc_gen.kernels(), list)
