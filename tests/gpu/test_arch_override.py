"""The sm_80 (A100) code path, run on a newer GPU through MHC_GEN_ARCH=sm_80 (the
variants carry PTX). Needs a build with sm_80: python build.py --arch sm_80 sm_90."""

from __future__ import annotations

import pytest
import torch

import mhc_gen
from mhc_gen import reference as R
from mhc_gen.testing import GRAD_TOLERANCES, assert_close

pytestmark = pytest.mark.gpu


def _have_sm80() -> bool:
    return torch.cuda.is_available() and any(k.endswith("_sm80") for k in mhc_gen.kernels())


@pytest.mark.skipif(not _have_sm80(), reason="no sm_80 variants built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, c", [(4, 1280), (3, 77), (8, 64)])
def test_sm80_variants_on_this_gpu(monkeypatch, dtype, n, c):
    monkeypatch.setenv("MHC_GEN_ARCH", "sm_80")
    monkeypatch.setenv("MHC_GEN_DISABLE_JIT", "1")  # run prebuilt sm_80 code, never compile
    g = torch.Generator().manual_seed(n * 1000 + c)
    m = R.num_logits(n)
    x = torch.randn(17, n, c, generator=g).to(dtype).cuda().requires_grad_()
    w = (1 + 0.1 * torch.randn(c, generator=g)).cuda().requires_grad_()
    phi = (torch.randn(n * c, m, generator=g) / (n * c) ** 0.5).cuda().requires_grad_()
    alpha = torch.tensor([1.0, 0.8, 1.2]).cuda().requires_grad_()
    b = torch.randn(m, generator=g).cuda().requires_grad_()
    params = [x, w, phi, alpha, b]
    with mhc_gen.poisoned_outputs():
        out = mhc_gen.layer_dynamic(x, w, phi, alpha, b)
        up = torch.randn(out.shape, generator=g).to(dtype).cuda()
        grads = torch.autograd.grad(out, params, up)
    ref = [p.detach().cpu().double().requires_grad_() for p in params]
    want = R.layer_dynamic(*ref)
    assert_close(out, want, "x_next")
    want_grads = torch.autograd.grad(want, ref, up.cpu().double())
    for got, exp, name in zip(grads, want_grads, ("x", "w", "phi", "alpha", "b"), strict=True):
        assert_close(got, exp, f"∂{name}", tol=GRAD_TOLERANCES[dtype])
