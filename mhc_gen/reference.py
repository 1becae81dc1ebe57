"""The mHC math in plain PyTorch: the reference every kernel is compared with.

Runs in any dtype (float64 for tests); the coefficient math runs in at least
fp32, as the kernels do. Backward comes from autograd. Shapes:
x [..., n, C], y and u [..., C], phi [n·C, m], alpha [3], b [m], m = n² + 2n.
See shared docs/mhc-math.md for the equations.
"""

from __future__ import annotations

import torch

SINKHORN_ITERS = 20
EPS_RMS = 1e-6
EPS_SK = 1e-6
POST_MULT = 2.0


def num_logits(n: int) -> int:
    return n * n + 2 * n


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def sinkhorn(
    logits: torch.Tensor, iters: int = SINKHORN_ITERS, eps: float = EPS_SK
) -> torch.Tensor:
    """Sinkhorn-Knopp on [..., n, n] logits: columns first, then rows."""
    shift = logits.amax(dim=(-2, -1), keepdim=True).detach()  # no gradient through the max
    m = torch.exp(logits - shift)
    for _ in range(iters):
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
    return m


def coefficients_from_logits(
    logits: torch.Tensor,
    n: int,
    *,
    sinkhorn_iters: int = SINKHORN_ITERS,
    eps_sk: float = EPS_SK,
    post_mult: float = POST_MULT,
):
    """H_pre [..., n], H_post [..., n], H_res [..., n, n] from h̃ [..., m]."""
    h_pre = torch.sigmoid(logits[..., :n])
    h_post = post_mult * torch.sigmoid(logits[..., n : 2 * n])
    res = logits[..., 2 * n :].unflatten(-1, (n, n))
    return h_pre, h_post, sinkhorn(res, sinkhorn_iters, eps_sk)


def projection(x, phi, *, eps_rms: float = EPS_RMS):
    """z = x̄·φ [..., m] and r = RMS(x̄) [...] per token (Eq. 14-15)."""
    dt = _math_dtype(x.dtype)
    xbar = x.to(dt).flatten(-2)
    r = torch.sqrt(xbar.square().mean(-1) + eps_rms)
    return xbar @ phi.to(dt), r


def logits_from_projection(z, r, alpha, b, n: int):
    """h̃ = α_g·z/r + b (Eq. 16)."""
    a = alpha.to(z.dtype)
    scale = torch.cat([a[0].expand(n), a[1].expand(n), a[2].expand(n * n)])
    return scale * z / r.unsqueeze(-1) + b.to(z.dtype)


def dynamic_logits(x, phi, alpha, b, *, eps_rms: float = EPS_RMS):
    """h̃ = α·(x̄·φ)/r + b per token (Eq. 14-16)."""
    z, r = projection(x, phi, eps_rms=eps_rms)
    return logits_from_projection(z, r, alpha, b, x.shape[-2])


def dynamic_coefficients(
    x,
    phi,
    alpha,
    b,
    *,
    sinkhorn_iters: int = SINKHORN_ITERS,
    eps_rms: float = EPS_RMS,
    eps_sk: float = EPS_SK,
    post_mult: float = POST_MULT,
):
    """Per-token H_pre [..., n], H_post [..., n], H_res [..., n, n] from x [..., n, C]."""
    logits = dynamic_logits(x, phi, alpha, b, eps_rms=eps_rms)
    return coefficients_from_logits(
        logits, x.shape[-2], sinkhorn_iters=sinkhorn_iters, eps_sk=eps_sk, post_mult=post_mult
    )


def static_coefficients(
    b,
    n: int,
    *,
    sinkhorn_iters: int = SINKHORN_ITERS,
    eps_sk: float = EPS_SK,
    post_mult: float = POST_MULT,
):
    """The layer's one H_pre [n], H_post [n], H_res [n, n] from its logits b [m]."""
    return coefficients_from_logits(
        b.to(_math_dtype(b.dtype)),
        n,
        sinkhorn_iters=sinkhorn_iters,
        eps_sk=eps_sk,
        post_mult=post_mult,
    )


def pre(x, h_pre):
    """u = H_pre·x: [..., n, C] × ([..., n] or [n]) -> [..., C] in x's dtype."""
    dt = torch.promote_types(x.dtype, h_pre.dtype)
    u = (h_pre.to(dt).unsqueeze(-1) * x.to(dt)).sum(-2)
    return u.to(x.dtype)


def post(x, y, h_post, h_res):
    """x_next = H_res·x + H_postᵀ·y, with per-token or broadcast H."""
    dt = torch.promote_types(x.dtype, h_res.dtype)
    out = h_res.to(dt) @ x.to(dt) + h_post.to(dt).unsqueeze(-1) * y.to(dt).unsqueeze(-2)
    return out.to(x.dtype)


def rms_norm(u, weight, eps: float = EPS_RMS):
    """The seed layer's sublayer F: u / sqrt(mean(u²) + eps) · w."""
    dt = torch.promote_types(_math_dtype(u.dtype), weight.dtype)
    uf = u.to(dt)
    return uf * torch.rsqrt(uf.square().mean(-1, keepdim=True) + eps) * weight.to(dt)


def layer(x, weight, h_pre, h_post, h_res, *, eps_rms: float = EPS_RMS):
    """The seed's fused layer: pre -> RMSNorm·w -> post, y kept unrounded."""
    dt = torch.promote_types(_math_dtype(x.dtype), h_pre.dtype)
    xf = x.to(dt)
    u = (h_pre.to(dt).unsqueeze(-1) * xf).sum(-2)
    y = rms_norm(u, weight, eps_rms)
    return post(xf, y, h_post, h_res).to(x.dtype)


def layer_dynamic(x, weight, phi, alpha, b, **kw):
    eps_rms = kw.get("eps_rms", EPS_RMS)
    h_pre, h_post, h_res = dynamic_coefficients(x, phi, alpha, b, **kw)
    return layer(x, weight, h_pre, h_post, h_res, eps_rms=eps_rms)


def layer_static(x, weight, b, **kw):
    eps_rms = kw.pop("eps_rms", EPS_RMS)
    h_pre, h_post, h_res = static_coefficients(b, x.shape[-2], **kw)
    return layer(x, weight, h_pre, h_post, h_res, eps_rms=eps_rms)
