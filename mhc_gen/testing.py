"""Comparison with the reference: the one tolerance table, by output dtype; and inputs whose
projection is known exactly."""

from __future__ import annotations

import dataclasses

import torch

from .reference import num_logits


@dataclasses.dataclass(frozen=True)
class Tolerance:
    rel_norm: float  # ‖out − ref‖ / ‖ref‖
    atol: float  # element-wise: |out − ref| <= atol + rtol·|ref|
    rtol: float


# Outputs in bf16/fp16 carry one rounding of the fp32 result (2^-9 and 2^-12
# relative); fp32 outputs differ from float64 by accumulation order alone.
TOLERANCES = {
    torch.float32: Tolerance(rel_norm=2e-5, atol=2e-5, rtol=2e-4),
    torch.float16: Tolerance(rel_norm=1e-3, atol=2e-3, rtol=2e-3),
    torch.bfloat16: Tolerance(rel_norm=8e-3, atol=1.6e-2, rtol=1.6e-2),
}


# Gradients, by the dtype of x: bf16/fp16 backward paths round intermediates
# (∂y, ∂u, y) to x's dtype, and the Sinkhorn backward adds fp32 error.
GRAD_TOLERANCES = {
    torch.float32: Tolerance(rel_norm=1e-4, atol=1e-4, rtol=1e-3),
    torch.float16: Tolerance(rel_norm=4e-3, atol=1e-2, rtol=1e-2),
    torch.bfloat16: Tolerance(rel_norm=2.5e-2, atol=6e-2, rtol=6e-2),
}


# z = x̄·φ of bf16 x on tensor cores: φ to ~17 bits (bf16 hi + lo), fp32 accumulation over
# n·C terms.
Z_TOLERANCE = Tolerance(rel_norm=1e-4, atol=1e-4, rtol=1e-3)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, what: str = "output", tol: Tolerance | None = None
) -> None:
    """Checks ``actual`` (a kernel's output) against a float64 ``expected``; the
    element-wise atol is relative to the largest |expected|."""
    tol = tol or TOLERANCES[actual.dtype]
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a = actual.double().cpu()
    e = expected.double().cpu()
    assert torch.isfinite(a).all(), f"{what}: {int((~torch.isfinite(a)).sum())} non-finite values"
    if a.numel() == 0:
        return
    err = (a - e).abs()
    rel = relative_error(a, e)
    assert rel <= tol.rel_norm, f"{what}: relative norm error {rel:.3g} > {tol.rel_norm}"
    bound = tol.atol * e.abs().max() + tol.rtol * e.abs()
    bad = err > bound
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} elements out of bound, first at flat index {i}: "
            f"{float(a.flatten()[i])} vs {float(e.flatten()[i])}"
        )


def widened(tol: Tolerance, fp32_reference_error: float) -> Tolerance:
    """``tol`` scaled to admit twice the relative norm error of the float32 reference itself.
    Ill-conditioned inputs need it: RMSNorm over C = 1 at u ≈ 0 has the derivative ε/r³, which
    turns u's last-bit rounding into ∂x error that no float32 computation avoids."""
    k = max(1.0, 2 * fp32_reference_error / tol.rel_norm)
    return Tolerance(tol.rel_norm * k, tol.atol * k, tol.rtol * k)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64."""
    e = expected.double().cpu()
    return float((actual.double().cpu() - e).norm() / e.norm().clamp_min(1e-30))


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exact equality of bits (NaN-safe)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def one_hot_projection(t: int, n: int, c: int):
    """(x, φ, z): x with token t one-hot at k = 7·t mod n·C, φ[k, j] = (97·k + j) mod 16384:
    integers of at most 14 bits, exact in bf16 hi + lo, so z[t] = x̄_t·φ is φ's row k bit for
    bit (a misplaced swizzle or fragment shows as a wrong token and logit)."""
    k = n * c
    at = (torch.arange(t) * 7) % k
    x = torch.zeros(t, k)
    x[torch.arange(t), at] = 1.0
    phi = ((torch.arange(k)[:, None] * 97 + torch.arange(num_logits(n))[None, :]) % 16384).float()
    return x.bfloat16().view(t, n, c), phi, phi[at]
