"""The GPU implementations: allocate outputs through torch, launch kernels.

Inputs are already validated (mhc_gen.ops) and contiguous; x is [T, n, C].
Token reductions of per-token partials use torch.sum, which has a fixed
order: gradients are bitwise reproducible.
"""

from __future__ import annotations

import torch

from generator.spec import DType, Op

from . import reference
from ._launch import DTYPES, empty, has_variant, launch


def _dims(x):
    t, n, c = x.shape
    return t, n, c


def _coeff_outputs(lead, n, device):
    f32 = torch.float32
    return (
        empty((*lead, n), f32, device),
        empty((*lead, n), f32, device),
        empty((*lead, n, n), f32, device),
    )


# ---------------------------------------------------------------- forward


def projection(x, phi, eps_rms):
    """(z, r) from the tensor-core projection (projection.cuh), or None where no
    variant serves: n·C odd, or no CUDA build (HIP). The fused kernels then project
    on CUDA cores themselves."""
    t, n, c = _dims(x)
    k = n * c
    if k % 2 or x.data_ptr() % 4 or t == 0:
        return None
    if not has_variant(Op.PROJ_DYN, n, c, DTYPES[x.dtype], x.device.index):
        return None
    z = empty((t, reference.num_logits(n)), torch.float32, x.device)
    r = empty((t,), torch.float32, x.device)
    launch(Op.PROJ_DYN, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t, eps_rms=eps_rms,
           x=x, phi=phi, z_out=z, r_out=r)  # fmt: skip
    return z, r


def _projected(x, phi, eps_rms):
    """(z, r, z_in, r_in): buffers the fused kernel fills, or the projection's results."""
    t, n, _ = _dims(x)
    pr = projection(x, phi, eps_rms)
    if pr is not None:
        return pr[0], pr[1], pr[0], pr[1]
    z = empty((t, reference.num_logits(n)), torch.float32, x.device)
    r = empty((t,), torch.float32, x.device)
    return z, r, None, None


def dynamic_coefficients(x, phi, alpha, b, iters, eps_rms, eps_sk, post_mult):
    """(H_pre, H_post, H_res, z, r)."""
    t, n, c = _dims(x)
    h_pre, h_post, h_res = _coeff_outputs((t,), n, x.device)
    z, r, z_in, r_in = _projected(x, phi, eps_rms)
    if t:
        launch(Op.COEFFS_DYN, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               sinkhorn_iters=iters, eps_rms=eps_rms, eps_sk=eps_sk, post_mult=post_mult,
               x=x, phi=phi, alpha=alpha, bias=b, h_pre=h_pre, h_post=h_post,
               h_res=h_res, z_in=z_in, r_in=r_in, z_out=None if z_in is not None else z,
               r_out=None if r_in is not None else r)  # fmt: skip
    return h_pre, h_post, h_res, z, r


def static_coefficients(b, n, iters, eps_sk, post_mult):
    h_pre, h_post, h_res = _coeff_outputs((), n, b.device)
    launch(Op.COEFFS_STATIC, b.device, DType.FP32, n=n, hidden=1, tokens=1,
           sinkhorn_iters=iters, eps_sk=eps_sk, post_mult=post_mult, bias=b, h_pre=h_pre,
           h_post=h_post, h_res=h_res)  # fmt: skip
    return h_pre, h_post, h_res


def pre_dynamic(x, phi, alpha, b, iters, eps_rms, eps_sk, post_mult):
    """(u, H_pre, H_post, H_res, z, r): z and r are what the backward needs."""
    t, n, c = _dims(x)
    u = empty((t, c), x.dtype, x.device)
    h_pre, h_post, h_res = _coeff_outputs((t,), n, x.device)
    z, r, z_in, r_in = _projected(x, phi, eps_rms)
    if t:
        launch(Op.PRE_DYN, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               sinkhorn_iters=iters, eps_rms=eps_rms, eps_sk=eps_sk, post_mult=post_mult,
               x=x, phi=phi, alpha=alpha, bias=b, out=u, h_pre=h_pre, h_post=h_post,
               h_res=h_res, z_in=z_in, r_in=r_in, z_out=None if z_in is not None else z,
               r_out=None if r_in is not None else r)  # fmt: skip
    return u, h_pre, h_post, h_res, z, r


def pre_static(x, b, iters, eps_sk, post_mult):
    t, n, c = _dims(x)
    u = empty((t, c), x.dtype, x.device)
    if t:
        launch(Op.PRE_STATIC, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               sinkhorn_iters=iters, eps_sk=eps_sk, post_mult=post_mult, x=x, bias=b,
               out=u)  # fmt: skip
    return u


def post_dynamic(x, y, h_post, h_res):
    t, n, c = _dims(x)
    out = empty(x.shape, x.dtype, x.device)
    if t:
        launch(Op.POST_DYN, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t, x=x, y=y,
               h_post_in=h_post, h_res_in=h_res, out=out)  # fmt: skip
    return out


def post_static(x, y, b, iters, eps_sk, post_mult):
    t, n, c = _dims(x)
    out = empty(x.shape, x.dtype, x.device)
    if t:
        launch(Op.POST_STATIC, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               sinkhorn_iters=iters, eps_sk=eps_sk, post_mult=post_mult, x=x, y=y, bias=b,
               out=out)  # fmt: skip
    return out


def layer_dynamic(x, weight, phi, alpha, b, iters, eps_rms, eps_sk, post_mult):
    """(x_next, z, r)."""
    t, n, c = _dims(x)
    out = empty(x.shape, x.dtype, x.device)
    z, r, z_in, r_in = _projected(x, phi, eps_rms)
    if t:
        launch(Op.LAYER_DYN, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               sinkhorn_iters=iters, eps_rms=eps_rms, eps_sk=eps_sk, post_mult=post_mult,
               x=x, phi=phi, alpha=alpha, bias=b, norm_weight=weight, out=out, z_in=z_in,
               r_in=r_in, z_out=None if z_in is not None else z,
               r_out=None if r_in is not None else r)  # fmt: skip
    return out, z, r


def layer_static(x, weight, b, iters, eps_rms, eps_sk, post_mult):
    t, n, c = _dims(x)
    out = empty(x.shape, x.dtype, x.device)
    if t:
        launch(Op.LAYER_STATIC, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               sinkhorn_iters=iters, eps_rms=eps_rms, eps_sk=eps_sk, post_mult=post_mult,
               x=x, bias=b, norm_weight=weight, out=out)  # fmt: skip
    return out


# ---------------------------------------------------------------- backward


def _post_grad_buffers(x):
    """∂x, ∂y (x's dtype) and the per-token ∂H_post, ∂H_res (fp32) of post."""
    t, n, c = _dims(x)
    return (
        empty(x.shape, x.dtype, x.device),
        empty((t, c), x.dtype, x.device),
        empty((t, n), torch.float32, x.device),
        empty((t, n, n), torch.float32, x.device),
    )


def post_dynamic_backward(grad, x, y, h_post, h_res):
    """(∂x, ∂y, ∂H_post, ∂H_res) of post with per-token H."""
    t, n, c = _dims(x)
    dx, dy, dh_post, dh_res = _post_grad_buffers(x)
    if t:
        launch(Op.POST_BWD_DYN, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t, x=x, y=y,
               grad_out=grad, h_post_in=h_post, h_res_in=h_res, grad_x=dx, grad_y=dy,
               grad_h_post=dh_post, grad_h_res=dh_res)  # fmt: skip
    else:
        dh_post.zero_(), dh_res.zero_()
    return dx, dy, dh_post, dh_res


def static_coefficients_backward(grad_h_pre, grad_h_post, grad_h_res, b, n, iters, eps_sk,
                                 post_mult):  # fmt: skip
    """∂b of the static H from token-summed ∂H_pre [n], ∂H_post [n], ∂H_res [n, n]."""
    db = empty(b.shape, torch.float32, b.device)
    scratch = empty((2 * max(iters, 1) * n,), torch.float32, b.device)
    launch(Op.COEFFS_BWD_STATIC, b.device, DType.FP32, n=n, hidden=1, tokens=1,
           sinkhorn_iters=iters, eps_sk=eps_sk, post_mult=post_mult, bias=b,
           grad_h_pre_in=grad_h_pre, grad_h_post_in=grad_h_post, grad_h_res_in=grad_h_res,
           grad_logits=db, scratch=scratch)  # fmt: skip
    return db


def post_static_backward(grad, x, y, b, iters, eps_sk, post_mult):
    """(∂x, ∂y, ∂b) of post with the static H of logits b."""
    t, n, c = _dims(x)
    dx, dy, dh_post, dh_res = _post_grad_buffers(x)
    if t:
        launch(Op.POST_BWD_STATIC, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               sinkhorn_iters=iters, eps_sk=eps_sk, post_mult=post_mult, x=x, y=y, bias=b,
               grad_out=grad, grad_x=dx, grad_y=dy, grad_h_post=dh_post,
               grad_h_res=dh_res)  # fmt: skip
    db = static_coefficients_backward(None, dh_post.sum(0), dh_res.sum(0), b, n, iters, eps_sk,
                                      post_mult)  # fmt: skip
    return dx, dy, db


def pre_static_backward(grad_u, x, b, iters, eps_sk, post_mult):
    """(∂x, ∂b) of u = H_pre·x with the static H of logits b."""
    t, n, c = _dims(x)
    dx = empty(x.shape, x.dtype, x.device)
    dh_pre = empty((t, n), torch.float32, x.device)
    if t:
        launch(Op.PRE_BWD_STATIC, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               sinkhorn_iters=iters, eps_sk=eps_sk, post_mult=post_mult, x=x, bias=b,
               grad_out=grad_u, grad_x=dx, grad_h_pre=dh_pre)  # fmt: skip
    db = static_coefficients_backward(dh_pre.sum(0), None, None, b, n, iters, eps_sk, post_mult)
    return dx, db


def _phi_splits(t: int, k: int, device) -> int:
    """Token chunks for ∂φ: enough blocks to fill the GPU, each ≥ 64 tokens."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_blocks = -(-k // 256)
    want = -(-2 * sms // row_blocks)
    return max(1, min(want, -(-t // 64), 64))


def _split_bf16(v):
    """v ≈ hi + lo, both bf16 (hi = v rounded; lo = the rounding error, rounded)."""
    hi = v.to(torch.bfloat16)
    return hi, (v.float() - hi).to(torch.bfloat16)  # promotes hi to fp32 in the kernel


def _phi_grad(x, dz, splits_for):
    """∂φ = x̄ᵀ·∂z [n·C, m], fp32, in a fixed order (no atomics)."""
    t, n, c = _dims(x)
    k, m = n * c, dz.shape[1]
    if x.is_cuda and torch.version.hip is None and t:
        # bf16 tensor-core GEMMs (cuBLAS, fp32 accumulate and output), operands split
        # into bf16 hi + lo halves (~16 bits each): x̄ᵀ·∂z ≈ x_hiᵀ·(∂z_hi + ∂z_lo) + x_loᵀ·∂z_hi.
        # bf16 x is exact (no x_lo). mm with out_dtype is CUDA-only: ROCm keeps the kernel.
        x2 = x.view(t, k)
        dz_hi, dz_lo = _split_bf16(dz)
        if x.dtype == torch.bfloat16:
            both = torch.mm(x2.t(), torch.cat([dz_hi, dz_lo], 1), out_dtype=torch.float32)
            return both[:, :m] + both[:, m:]
        x_hi, x_lo = _split_bf16(x2)
        both = torch.mm(x_hi.t(), torch.cat([dz_hi, dz_lo], 1), out_dtype=torch.float32)
        return both[:, :m] + both[:, m:] + torch.mm(x_lo.t(), dz_hi, out_dtype=torch.float32)
    splits = splits_for(t, k, x.device) if t else 1
    parts = empty((splits, k, m), torch.float32, x.device)
    if t:
        launch(Op.PHI_GRAD_DYN, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               splits=splits, x=x, grad_logits_in=dz, grad_phi=parts)  # fmt: skip
    else:
        parts.zero_()
    return parts.sum(0)


def pre_dynamic_backward(grad_u, grad_h_pre, grad_h_post, grad_h_res, x, z, r, phi, alpha, b,
                         iters, eps_rms, eps_sk, post_mult, grad_x_in=None):  # fmt: skip
    """(∂x, ∂φ, ∂α, ∂b) of the dynamic pre (or, with grad_u None, of the coefficients);
    grad_x_in, a ∂x from another path, is added to ∂x in the same pass."""
    t, n, c = _dims(x)
    m = reference.num_logits(n)
    dx = empty(x.shape, x.dtype, x.device)
    dlogits = empty((t, m), torch.float32, x.device)
    scratch = empty((t, 2 * max(iters, 1) * n), torch.float32, x.device)
    if t:
        launch(Op.PRE_BWD_DYN, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               sinkhorn_iters=iters, eps_rms=eps_rms, eps_sk=eps_sk, post_mult=post_mult,
               x=x, phi=phi, alpha=alpha, bias=b, grad_out=grad_u, grad_h_pre_in=grad_h_pre,
               grad_h_post_in=grad_h_post, grad_h_res_in=grad_h_res, z_in=z, r_in=r,
               grad_x_in=grad_x_in, grad_x=dx, grad_logits=dlogits,
               scratch=scratch)  # fmt: skip
    # Per-group sums (no index_add_: its CUDA kernel uses atomics).
    scaled = dlogits * z / r.unsqueeze(-1)  # ∂h̃·z/r
    dalpha = torch.stack(
        [scaled[:, :n].sum(), scaled[:, n : 2 * n].sum(), scaled[:, 2 * n :].sum()]
    )
    db = dlogits.sum(0)
    scale = torch.cat([alpha[0].expand(n), alpha[1].expand(n), alpha[2].expand(n * n)])
    dz = (dlogits * scale / r.unsqueeze(-1)).contiguous()
    return dx, _phi_grad(x, dz, _phi_splits), dalpha, db


def layer_dynamic_backward(grad, x, weight, phi, alpha, b, z, r, iters, eps_rms, eps_sk,
                           post_mult):  # fmt: skip
    """(∂x, ∂w, ∂φ, ∂α, ∂b) of the seed's layer. H and u come back in one pass over x
    from the saved z and r (no second projection); RMSNorm's backward runs on [T, C]
    in fp32; post's ∂x is added inside pre's backward kernel (no [T, n, C] sum)."""
    t, n, c = _dims(x)
    u = empty((t, c), x.dtype, x.device)
    h_pre, h_post, h_res = _coeff_outputs((t,), n, x.device)
    if t:
        launch(Op.PRE_DYN, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               sinkhorn_iters=iters, eps_rms=eps_rms, eps_sk=eps_sk, post_mult=post_mult,
               x=x, phi=phi, alpha=alpha, bias=b, out=u, h_pre=h_pre, h_post=h_post,
               h_res=h_res, z_in=z, r_in=r)  # fmt: skip
    uf = u.float()
    s = torch.rsqrt(uf.square().mean(-1, keepdim=True) + eps_rms)
    y = (uf * s * weight).to(x.dtype)
    dx_post, dy, dh_post, dh_res = post_dynamic_backward(grad, x, y, h_post, h_res)
    g = dy.float() * weight
    du = s * g - uf * s.pow(3) * (g * uf).mean(-1, keepdim=True)
    dweight = (dy.float() * uf * s).sum(0)
    dx, dphi, dalpha, db = pre_dynamic_backward(
        du.to(x.dtype),
        None,
        dh_post,
        dh_res,
        x,
        z,
        r,
        phi,
        alpha,
        b,
        iters,
        eps_rms,
        eps_sk,
        post_mult,
        grad_x_in=dx_post,
    )
    return dx, dweight, dphi, dalpha, db
