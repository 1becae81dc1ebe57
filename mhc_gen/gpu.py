"""The GPU implementations: allocate outputs through torch, launch kernels.

Inputs are already validated (mhc_gen.ops) and contiguous; x is [T, n, C].
Token reductions of per-token partials use torch.sum, which has a fixed
order: gradients are bitwise reproducible.
"""

from __future__ import annotations

import functools

import torch

from generator.spec import PROJ_MAX_N, Arch, DType, Op

from . import reference
from ._launch import DTYPES, device_arch, empty, launch, target_arch


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


# Below this many multiply-adds (T·n·C·m) the fused kernel's own projection on CUDA cores
# costs less than the GEMM path's seven host-side torch calls (φ split, cuBLAS, the sum),
# unless one token's share is past the second bound: a block's projection runs its tokens'
# n·C·m multiply-adds serially (H200, 128 × 1280 × 8, bf16: the layer kernel took 283 µs
# where the GEMM path's whole layer took 30 at 256 tokens).
_GEMM_PROJECTION_MIN_FMA = 1 << 27
_GEMM_PROJECTION_MIN_TOKEN_FMA = 1 << 19


def _gemm_projection(x) -> bool:
    """Whether z = x̄·φ runs as a cuBLAS GEMM (CUDA only: torch.mm with out_dtype): where
    the GEMM's work outweighs its host cost."""
    if not x.is_cuda or torch.version.hip is not None:
        return False
    n = x.shape[-2]
    m = reference.num_logits(n)
    token_fma = n * x.shape[-1] * m
    return token_fma >= _GEMM_PROJECTION_MIN_TOKEN_FMA or x.numel() * m >= _GEMM_PROJECTION_MIN_FMA


# Up to this many tokens, at n ≥ 16, the GEMMs with φ run in fp32 (cuBLAS SGEMM reading φ
# once) instead of on φ split into bf16 parts each call: at n = 32, C = 1280 the split reads
# 178 MB and writes 178 (88 µs a split). H200, session 24, graph replay of the dynamic layer:
# T = 32 fwd 200 → 160 µs, fwd+bwd 1010 → 882; T = 64 fwd 214 → 224 (the SGEMM 141 µs), so
# the limit is 32 (n = 16 is not measured: its φ is a quarter of the bytes and so is the
# SGEMM's read). Only where fp32 matmuls are exact ("highest" precision, torch's default):
# with TF32 allowed, the split keeps its ~17 bits.
_FP32_GEMM_MAX_TOKENS = 32
_FP32_GEMM_MIN_N = 16


def _fp32_gemm(t: int, n: int) -> bool:
    return (t <= _FP32_GEMM_MAX_TOKENS and n >= _FP32_GEMM_MIN_N
            and torch.get_float32_matmul_precision() == "highest")  # fmt: skip


def projection(x, phi):
    """z = x̄·φ on tensor cores for bf16 x on CUDA: one cuBLAS bf16 GEMM on φ split into
    bf16 hi + lo (x exact, φ to ~17 bits, fp32 accumulation; deterministic), or None
    (other dtypes, ROCm, below _GEMM_PROJECTION_MIN_FMA): the fused kernels then project
    on CUDA cores in exact fp32.
    r is left to the kernel that takes z, which computes it in its pass over x."""
    t, n, c = _dims(x)
    if x.dtype != torch.bfloat16 or t == 0 or not _gemm_projection(x):
        return None
    if _fp32_gemm(t, n):
        return torch.mm(x.view(t, n * c).float(), phi)
    m = reference.num_logits(n)
    both = torch.mm(x.view(t, n * c), _split_bf16_cat(phi, "hl", 1), out_dtype=torch.float32)
    return both[:, :m] + both[:, m:]


# From this many tokens z and r of bf16 x on CUDA come from mhc_gen's tensor-core projection
# (mhc/projection.cuh: one pass over x, the cuBLAS path's precision): with r known before
# the mixing kernels, the coefficients run in a launch of their own and those kernels read
# x once, instead of reading it for r and running each token's Sinkhorn between that read
# and the mixing. Its blocks of 128 or 256 tokens need many tokens to fill a GPU. Up to
# n = _PROJECTION_KERNEL_MAX_N: at n = 8 (256-token blocks, 255 registers, one block an
# SM) it measured slower than cuBLAS's z and the fused kernels (H200, session 14: the
# layer's forward 0.882 → 0.993 ms graph at T = 8192, C = 4096; at n = 4 0.621 → 0.556).
_PROJECTION_KERNEL_MIN_TOKENS = 4096
_PROJECTION_KERNEL_MAX_N = 4


def _projection_kernel(x, phi) -> bool:
    """Whether z and r come from mhc_gen's projection kernel (CUDA, bf16, n ≤
    _PROJECTION_KERNEL_MAX_N (the kernel serves n ≤ 8), n·C a multiple of its 64-wide k
    step, x 16-byte aligned, enough tokens)."""
    t, n, c = _dims(x)
    return (
        x.is_cuda
        and torch.version.hip is None
        and x.dtype == torch.bfloat16
        and n <= min(_PROJECTION_KERNEL_MAX_N, PROJ_MAX_N)
        and (n * c) % 64 == 0
        and x.data_ptr() % 16 == 0
        and t >= _PROJECTION_KERNEL_MIN_TOKENS
    )


def _projection_splits(t: int, n: int, k: int, device) -> int:
    """Splits of K for the projection kernel: as many as keep its blocks in one wave (2 an
    SM at n ≤ 4, 1 above: projection.cuh's shared memory), each split ≥ 16 chunks of 64."""
    tokens, per_sm = (128, 2) if n <= 4 else (256, 1)
    want = per_sm * _sm_count(device) // -(-t // tokens)
    return max(1, min(want, k // (16 * 64), 16))


def _wgmma_projection(x) -> bool:
    """Whether the n = 4 projection runs in its wgmma form (mhc/projection_wgmma.cuh), which
    takes φ's split K-major: where the sm_90 variants run on an sm_90 device (their n = 4
    projection carries sm_90a SASS there; elsewhere, or forced to another arch, the PTX's
    mma.sync form runs)."""
    if not x.is_cuda or torch.version.hip is not None:
        return False
    index = x.device.index
    return target_arch(index) == device_arch(index) == ("cuda", Arch.SM90)


def projection_partials(x, phi) -> dict:
    """One pass of the tensor-core projection (_projection_kernel), split along n·C where
    its token blocks alone would not fill the GPU: the per-split partial z [S, T, m] and
    Σx̄² [S, T] as the launch arguments of a coefficient kernel, which sums them in split
    order (z_in, sq_in, splits)."""
    t, n, c = _dims(x)
    m = reference.num_logits(n)
    splits = _projection_splits(t, n, n * c, x.device)
    z = empty((splits, t, m), torch.float32, x.device)
    sq = empty((splits, t), torch.float32, x.device)
    padded = phi if m % 8 == 0 else torch.nn.functional.pad(phi, (0, -m % 8))  # mp columns
    if n == 4 and _wgmma_projection(x):
        split = dict(phi_split_t=_split_bf16_cat(padded.t(), "hl", 0))  # [2·mp, n·C]
    else:
        split = dict(phi_split=_split_bf16_cat(padded, "hl", 1))  # [n·C, 2·mp]
    launch(Op.PROJ_DYN, x.device, DType.BF16, n=n, hidden=c, tokens=t, splits=splits, x=x,
           z_out=z, r_out=sq, **split)  # fmt: skip
    return dict(z_in=z, sq_in=sq, splits=splits)


def _projected(x, phi) -> tuple:
    """(z, r, args): the z and r buffers the backward keeps, and the launch arguments that
    fill them in the kernel that takes them. From the projection kernel: its partials in,
    z and r out (z is split 0 where there is one); from the GEMM: its z in, r out; else
    both out of that kernel's own projection."""
    t, n, _ = _dims(x)
    m = reference.num_logits(n)
    r = empty((t,), torch.float32, x.device)
    if _projection_kernel(x, phi):
        args = projection_partials(x, phi)
        whole = args["splits"] == 1
        z = args["z_in"][0] if whole else empty((t, m), torch.float32, x.device)
        return z, r, dict(args, z_out=None if whole else z, r_out=r)
    z = projection(x, phi)
    if z is not None:
        return z, r, dict(z_in=z, r_out=r)
    z = empty((t, m), torch.float32, x.device)
    return z, r, dict(z_out=z, r_out=r)


def dynamic_coefficients(x, phi, alpha, b, iters, eps_rms, eps_sk, post_mult):
    """(H_pre, H_post, H_res, z, r)."""
    t, n, c = _dims(x)
    h_pre, h_post, h_res = _coeff_outputs((t,), n, x.device)
    z, r, args = _projected(x, phi)
    if t:
        launch(Op.COEFFS_DYN, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               sinkhorn_iters=iters, eps_rms=eps_rms, eps_sk=eps_sk, post_mult=post_mult,
               x=x, phi=phi, alpha=alpha, bias=b, h_pre=h_pre, h_post=h_post,
               h_res=h_res, **args)  # fmt: skip
    return h_pre, h_post, h_res, z, r


def _coefficients_given(t, n, c, alpha, b, iters, eps_rms, eps_sk, post_mult, device,
                        **logits) -> dict:  # fmt: skip
    """Per-token H in one launch (every token's Sinkhorn side by side) from given logits:
    z_in and r_in, or the projection's partials (z_in, sq_in, splits: c is then the hidden
    size that r divides by, and z_out, r_out receive z and r). As launch arguments
    (h_pre_in, h_post_in, h_res_in) for the kernels that take H."""
    h_pre, h_post, h_res = _coeff_outputs((t,), n, device)
    launch(Op.COEFFS_DYN, device, DType.FP32, n=n, hidden=c, tokens=t, sinkhorn_iters=iters,
           eps_rms=eps_rms, eps_sk=eps_sk, post_mult=post_mult, alpha=alpha, bias=b,
           h_pre=h_pre, h_post=h_post, h_res=h_res, **logits)  # fmt: skip
    return dict(h_pre_in=h_pre, h_post_in=h_post, h_res_in=h_res)


def _coefficients_from(z, r, alpha, b, n, iters, eps_sk, post_mult) -> dict:
    """_coefficients_given from the saved z and r."""
    return _coefficients_given(z.shape[0], n, 1, alpha, b, iters, 1e-6, eps_sk, post_mult,
                               z.device, z_in=z, r_in=r)  # fmt: skip


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
    z, r, args = _projected(x, phi)
    if t:
        launch(Op.PRE_DYN, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               sinkhorn_iters=iters, eps_rms=eps_rms, eps_sk=eps_sk, post_mult=post_mult,
               x=x, phi=phi, alpha=alpha, bias=b, out=u, h_pre=h_pre, h_post=h_post,
               h_res=h_res, **args)  # fmt: skip
    return u, h_pre, h_post, h_res, z, r


# From this many tokens the static ops (forward, and pre's and post's backward) take H from
# one single-block launch of the static coefficients, read by every block, instead of each
# block's first warp running the Sinkhorn while its other warps wait (bitwise the same H).
# Below it the blocks are few and their Sinkhorns run side by side, cheaper than a second
# launch.
_STATIC_H_ONCE_MIN_TOKENS = 4096


def _static_h(x, b, iters, eps_sk, post_mult) -> dict:
    """The static H as launch arguments (h_pre_in, h_post_in, h_res_in), or none."""
    if x.shape[0] < _STATIC_H_ONCE_MIN_TOKENS:
        return {}
    h_pre, h_post, h_res = static_coefficients(b, x.shape[1], iters, eps_sk, post_mult)
    return dict(h_pre_in=h_pre, h_post_in=h_post, h_res_in=h_res)


def pre_static(x, b, iters, eps_sk, post_mult, u_fp32=False):
    """u = H_pre·x in x's dtype, or in fp32 (the seed layer's backward recomputes it)."""
    t, n, c = _dims(x)
    u = empty((t, c), torch.float32 if u_fp32 else x.dtype, x.device)
    if t:
        launch(Op.PRE_STATIC, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               sinkhorn_iters=iters, eps_sk=eps_sk, post_mult=post_mult, x=x, bias=b,
               out=None if u_fp32 else u, u_f32=u if u_fp32 else None,
               **_static_h(x, b, iters, eps_sk, post_mult))  # fmt: skip
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
               out=out, **_static_h(x, b, iters, eps_sk, post_mult))  # fmt: skip
    return out


def layer_dynamic(x, weight, phi, alpha, b, iters, eps_rms, eps_sk, post_mult):
    """(x_next, z, r)."""
    t, n, c = _dims(x)
    out = empty(x.shape, x.dtype, x.device)
    z, r, args = _projected(x, phi)
    if t and "sq_in" in args:  # H in one launch (z and r out), then the layer reading x once
        h = _coefficients_given(t, n, c, alpha, b, iters, eps_rms, eps_sk, post_mult,
                                x.device, **args)  # fmt: skip
        launch(Op.LAYER_DYN, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               eps_rms=eps_rms, x=x, norm_weight=weight, out=out, **h)  # fmt: skip
    elif t:
        launch(Op.LAYER_DYN, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               sinkhorn_iters=iters, eps_rms=eps_rms, eps_sk=eps_sk, post_mult=post_mult,
               x=x, phi=phi, alpha=alpha, bias=b, norm_weight=weight, out=out,
               **args)  # fmt: skip
    return out, z, r


def layer_static(x, weight, b, iters, eps_rms, eps_sk, post_mult):
    t, n, c = _dims(x)
    out = empty(x.shape, x.dtype, x.device)
    if t:
        launch(Op.LAYER_STATIC, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               sinkhorn_iters=iters, eps_rms=eps_rms, eps_sk=eps_sk, post_mult=post_mult,
               x=x, bias=b, norm_weight=weight, out=out,
               **_static_h(x, b, iters, eps_sk, post_mult))  # fmt: skip
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


def post_dynamic_backward(grad, x, y, h_post, h_res, y_f32=None):
    """(∂x, ∂y, ∂H_post, ∂H_res) of post with per-token H; y_f32, an fp32 y, replaces y."""
    t, n, c = _dims(x)
    dx, dy, dh_post, dh_res = _post_grad_buffers(x)
    if t:
        launch(Op.POST_BWD_DYN, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t, x=x,
               y=y if y_f32 is None else None, y_f32=y_f32, grad_out=grad, h_post_in=h_post,
               h_res_in=h_res, grad_x=dx, grad_y=dy, grad_h_post=dh_post,
               grad_h_res=dh_res)  # fmt: skip
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


def _post_static_grads(grad, x, y, b, iters, eps_sk, post_mult, y_f32):
    """(∂x, ∂y, Σ_t ∂H_post, Σ_t ∂H_res) of post with the static H of logits b."""
    t, n, c = _dims(x)
    dx, dy, dh_post, dh_res = _post_grad_buffers(x)
    if t:
        launch(Op.POST_BWD_STATIC, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               sinkhorn_iters=iters, eps_sk=eps_sk, post_mult=post_mult, x=x,
               y=y if y_f32 is None else None, y_f32=y_f32, bias=b, grad_out=grad, grad_x=dx,
               grad_y=dy, grad_h_post=dh_post, grad_h_res=dh_res,
               **_static_h(x, b, iters, eps_sk, post_mult))  # fmt: skip
    return dx, dy, dh_post.sum(0), dh_res.sum(0)


def post_static_backward(grad, x, y, b, iters, eps_sk, post_mult, y_f32=None):
    """(∂x, ∂y, ∂b) of post with the static H of logits b; y_f32, an fp32 y, replaces y."""
    dx, dy, dh_post, dh_res = _post_static_grads(grad, x, y, b, iters, eps_sk, post_mult, y_f32)
    n = x.shape[1]
    db = static_coefficients_backward(None, dh_post, dh_res, b, n, iters, eps_sk, post_mult)
    return dx, dy, db


def _pre_static_grads(grad_u, x, b, iters, eps_sk, post_mult, grad_x_in):
    """(∂x, Σ_t ∂H_pre) of u = H_pre·x with the static H of logits b. fp32 keeps the
    per-block H: H computed once measured 0.728 → 0.820 ms there (H200, T = 16384, C = 4096,
    n = 4; bf16 0.568 → 0.491)."""
    t, n, c = _dims(x)
    dx = empty(x.shape, x.dtype, x.device)
    dh_pre = empty((t, n), torch.float32, x.device)
    h = {} if x.dtype == torch.float32 else _static_h(x, b, iters, eps_sk, post_mult)
    if t:
        launch(Op.PRE_BWD_STATIC, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               sinkhorn_iters=iters, eps_sk=eps_sk, post_mult=post_mult, x=x, bias=b,
               grad_out=grad_u, grad_x_in=grad_x_in, grad_x=dx, grad_h_pre=dh_pre,
               **h)  # fmt: skip
    return dx, dh_pre.sum(0)


def pre_static_backward(grad_u, x, b, iters, eps_sk, post_mult, grad_x_in=None):
    """(∂x, ∂b) of u = H_pre·x with the static H of logits b; grad_x_in is added to ∂x."""
    dx, dh_pre = _pre_static_grads(grad_u, x, b, iters, eps_sk, post_mult, grad_x_in)
    n = x.shape[1]
    db = static_coefficients_backward(dh_pre, None, None, b, n, iters, eps_sk, post_mult)
    return dx, db


def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _phi_splits(t: int, k: int, device) -> int:
    """Token chunks for ∂φ: enough blocks to fill the GPU, each ≥ 64 tokens."""
    sms = _sm_count(device)
    row_blocks = -(-k // 256)
    want = -(-2 * sms // row_blocks)
    return max(1, min(want, -(-t // 64), 64))


def _split_by_kernel(v) -> bool:
    """Whether the split runs as mhc_gen's one-pass kernel (fp32 on a GPU) rather than
    torch's passes (other dtypes: fp16 x for ∂φ)."""
    return v.is_cuda and v.dtype == torch.float32


def _split_bf16_cat(v, order: str, dim: int):
    """v ≈ hi + lo, both bf16 (hi = v rounded; lo = v − hi, computed in fp32, rounded),
    concatenated along dim of the 2-D v in the given order of parts ("hl", "hhl", "hlh").
    fp32 v: one kernel pass (reads v once, writes each part once: 8–10 bytes an element
    against torch's 14–18; φ is 570 MB at n = 32, C = 4096). Else in place by torch: one
    pass over v for hi, one for lo, no fp32 temporaries."""
    shape = list(v.shape)
    shape[dim] *= len(order)
    out = empty(shape, torch.bfloat16, v.device)
    if _split_by_kernel(v):
        # Parts along the rows ([parts·R, C]) are one row of R·C columns split side by side.
        rows, cols = (1, v.numel()) if dim == 0 else v.shape
        lo_mask = sum(1 << p for p, part in enumerate(order) if part == "l")
        if v.numel():
            launch(Op.SPLIT_DYN, v.device, DType.FP32, n=len(order), hidden=cols, tokens=rows,
                   splits=lo_mask, phi=v.contiguous(), out=out)  # fmt: skip
        return out
    blocks = out.split(v.shape[dim], dim)
    hi, lo = blocks[order.index("h")], blocks[order.index("l")]
    hi.copy_(v)
    torch.sub(v, hi, out=lo)  # in the promoted dtype (fp32), rounded on the store
    for part, block in zip(order, blocks, strict=True):
        if part == "h" and block is not hi:
            block.copy_(hi)
    return out


def _gemm_phi_grad(x) -> bool:
    """Whether ∂φ runs as cuBLAS GEMMs (CUDA: torch.mm with out_dtype) rather than the
    fixed-order kernel (ROCm, and the tests of that kernel)."""
    return x.is_cuda and torch.version.hip is None


def _phi_grad(x, dz, splits_for):
    """∂φ = x̄ᵀ·∂z [n·C, m], fp32, in a fixed order (no atomics)."""
    t, n, c = _dims(x)
    k, m = n * c, dz.shape[1]
    if t and _gemm_phi_grad(x):
        # bf16 tensor-core GEMMs (cuBLAS, fp32 accumulate and output) on operands split
        # into bf16 hi + lo: x̄ᵀ·∂z ≈ x_hiᵀ·(∂z_hi + ∂z_lo) + x_loᵀ·∂z_hi. bf16 and fp16 x are
        # exact in hi (+ lo); ∂z and fp32 x keep ~16 bits (relative error ~1e-5, inside the
        # fp32 gradient tolerance). ROCm keeps the kernel below (mm with out_dtype is CUDA-only).
        x2 = x.view(t, k)
        if t < 2 * m:
            # Few tokens for a wide φ (n = 32: m = 1088): the parts stacked along the
            # reduction, one GEMM straight into [n·C, m], instead of a [n·C, 2m] output and
            # a sum of its halves (16·n·C·m bytes more: 0.7 GB at n = 32, C = 1280).
            if x.dtype == torch.bfloat16:
                xs, dzs = torch.cat([x2, x2]), _split_bf16_cat(dz, "hl", 0)
            else:
                xs, dzs = _split_bf16_cat(x2, "hhl", 0), _split_bf16_cat(dz, "hlh", 0)
            return torch.mm(xs.t(), dzs, out_dtype=torch.float32)
        dz_hl = _split_bf16_cat(dz, "hl", 1)
        if x.dtype == torch.bfloat16:
            both = torch.mm(x2.t(), dz_hl, out_dtype=torch.float32)
            return both[:, :m] + both[:, m:]
        x_hi, x_lo = _split_bf16_cat(x2, "hl", 0).split(t)
        both = torch.mm(x_hi.t(), dz_hl, out_dtype=torch.float32)
        return both[:, :m] + both[:, m:] + torch.mm(x_lo.t(), dz_hl[:, :m], out_dtype=torch.float32)
    splits = splits_for(t, k, x.device) if t else 1
    parts = empty((splits, k, m), torch.float32, x.device)
    if t:
        launch(Op.PHI_GRAD_DYN, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               splits=splits, x=x, grad_logits_in=dz, grad_phi=parts)  # fmt: skip
    else:
        parts.zero_()
    return parts.sum(0)


def _gemm_dz_phi(x, n: int) -> bool:
    """Whether ∂z·φᵀ runs as a cuBLAS GEMM rather than inside pre's backward kernel: for
    n ≥ 16 (m ≥ 288 logits a token) the kernel's m FMAs per element of x on CUDA cores
    outweigh the GEMM's extra fp32 [T, n·C] pass."""
    return n >= 16 and x.is_cuda and torch.version.hip is None


def _dx_by_gemm(x, grad_u, dz, phi, scratch, iters, grad_x_in):
    """pre's ∂x from the kernel's per-token outputs: ∂z·φᵀ as one bf16 GEMM on split
    operands (∂z·φᵀ ≈ ∂z_hi·φ_hiᵀ + ∂z_hi·φ_loᵀ + ∂z_lo·φ_hiᵀ, stacked along the reduction),
    then the kernel's ∂x epilogue adds H_pre·∂u + ∂r·x̄ (+ grad_x_in) in one pass, with H_pre
    and ∂r from the scratch rows its token kernel left."""
    t, n, c = _dims(x)
    if _fp32_gemm(t, n):
        g = torch.mm(dz, phi.t())
    else:
        # φ split along its rows as stored (coalesced; the GEMM takes the transposed view),
        # not φᵀ copied by a strided read.
        g = torch.mm(_split_bf16_cat(dz, "hhl", 1), _split_bf16_cat(phi, "hlh", 1).t(),
                     out_dtype=torch.float32)  # fmt: skip
    dx = empty(x.shape, x.dtype, x.device)
    launch(Op.PRE_BWD_DYN, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
           sinkhorn_iters=iters, x=x, grad_out=grad_u, grad_x_gemm=g, grad_x_in=grad_x_in,
           grad_x=dx, scratch=scratch)  # fmt: skip
    return dx


# pre's ∂x kernel takes ∂z·φᵀ on tensor cores up to this n (mhc/token_backward.cuh).
_MMA_MAX_N = 8


def _phi_fragments(x) -> torch.Tensor | None:
    """The buffer the ∂x kernels' launchers split φ into before their tensor-core products
    (kPhiFragments: a row of φ, 16 words a k-step of 16 logits), where they run: not on
    ROCm, n ≤ 8."""
    t, n, c = _dims(x)
    if torch.version.hip is not None or n > _MMA_MAX_N:
        return None
    steps = -(-reference.num_logits(n) // 16)
    return empty((n * c, 16 * steps), torch.int32, x.device)


def _dx_mma_aligned(x, *others) -> bool:
    """Whether pre's tensor-core ∂x kernel takes these tensors (its launcher's test: C a
    multiple of one 16-byte vector, 16-byte aligned data); where it does, the CUDA-core
    kernel's φᵀ is not made."""
    if x.shape[-1] % (16 // x.element_size()):
        return False
    return all(v is None or v.data_ptr() % 16 == 0 for v in (x, *others))


def _pre_token_grad_buffers(t: int, n: int, iters: int, device) -> tuple:
    """The per-token outputs of pre's token kernel (fp32): ∂h̃ and ∂z [T, m], ∂α [T, 3],
    and the scratch rows (the Sinkhorn divisors, then H_pre and ∂r for the ∂x kernels)."""
    m = reference.num_logits(n)
    f32 = torch.float32
    return (
        empty((t, m), f32, device),
        empty((t, m), f32, device),
        empty((t, 3), f32, device),
        empty((t, 2 * max(iters, 1) * n), f32, device),
    )


def pre_dynamic_backward(grad_u, grad_h_pre, grad_h_post, grad_h_res, x, z, r, phi, alpha, b,
                         iters, eps_rms, eps_sk, post_mult, grad_x_in=None):  # fmt: skip
    """(∂x, ∂φ, ∂α, ∂b) of the dynamic pre (or, with grad_u None, of the coefficients);
    grad_x_in, a ∂x from another path, is added to ∂x in the same pass."""
    t, n, c = _dims(x)
    gemm = _gemm_dz_phi(x, n)
    dx = None if gemm else empty(x.shape, x.dtype, x.device)
    dlogits, dz, dalpha_tok, scratch = _pre_token_grad_buffers(t, n, iters, x.device)
    frags = None if gemm else _phi_fragments(x)
    mma = frags is not None and _dx_mma_aligned(x, grad_u, grad_x_in)
    if t:
        launch(Op.PRE_BWD_DYN, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
               sinkhorn_iters=iters, eps_rms=eps_rms, eps_sk=eps_sk, post_mult=post_mult,
               x=x, phi=phi, alpha=alpha, bias=b, grad_out=grad_u, grad_h_pre_in=grad_h_pre,
               grad_h_post_in=grad_h_post, grad_h_res_in=grad_h_res, z_in=z, r_in=r,
               phi_t=None if gemm or mma else phi.t().contiguous(), phi_fragments=frags,
               grad_x_in=grad_x_in, grad_x=dx,
               grad_logits=dlogits, grad_z=dz, grad_alpha_tok=dalpha_tok,
               scratch=scratch)  # fmt: skip
    if gemm:
        dx = (_dx_by_gemm(x, grad_u, dz, phi, scratch, iters, grad_x_in) if t
              else empty(x.shape, x.dtype, x.device))  # fmt: skip
    # Token sums in torch's fixed order (the kernel wrote per-token values; no atomics).
    return dx, _phi_grad(x, dz, _phi_splits), dalpha_tok.sum(0), dlogits.sum(0)


@functools.cache
def _fused_rms_norm() -> bool:
    """Whether this torch has its fused RMSNorm (one kernel a direction) for GPU tensors."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return has("aten::_fused_rms_norm", "CUDA") and has("aten::_fused_rms_norm_backward", "CUDA")


def _rms_norm(u32, weight, eps_rms):
    """(s, y) of y = u·s·w, s = 1/sqrt(mean(u²) + eps), in fp32 on [T, C]: torch's fused
    kernel where it has one (one pass), else elementwise ops."""
    if u32.is_cuda and u32.numel() and _fused_rms_norm():
        y, s = torch.ops.aten._fused_rms_norm(u32, [u32.shape[-1]], weight.float(), eps_rms)
        return s, y
    s = torch.rsqrt(u32.square().mean(-1, keepdim=True) + eps_rms)
    return s, u32 * s * weight


def _rms_norm_backward(dy, u32, s, weight):
    """(∂u, ∂w) of y = u·s·w (torch's fused backward: a fixed-order ∂w reduction)."""
    if u32.is_cuda and u32.numel() and _fused_rms_norm():
        return torch.ops.aten._fused_rms_norm_backward(
            dy.float(), u32, [u32.shape[-1]], s, weight.float(), [True, True]
        )
    g = dy.float() * weight
    du = s * g - u32 * s.pow(3) * (g * u32).mean(-1, keepdim=True)
    return du, (dy.float() * u32 * s).sum(0)


def _layer_bwd_blocks_per_sm(n: int, dynamic: bool) -> int:
    """Blocks an SM for the fused layer backward's grid: 3 where layer_backward.cuh's launch
    bounds compile it for 3 (dynamic H at compile-time n ≤ 4: the default build's n = 2 and
    4), else 2 (a grid-stride loop over token groups, so any grid is correct; this one was
    measured)."""
    return 3 if dynamic and n in (2, 4) else 2


def _fused_layer_backward(x) -> bool:
    """Whether the seed layer's backward up to pre's runs as one kernel: where its u, g and
    ∂w rows (3·C fp32) fit in a block's shared memory, else in steps (torch's RMSNorm
    between mhc_gen's kernels)."""
    if not x.is_cuda:
        return False
    props = torch.cuda.get_device_properties(x.device)
    limit = getattr(props, "shared_memory_per_block_optin", 48 * 1024)
    c4 = -(-x.shape[-1] // 4) * 4
    return 12 * c4 + 16 * 1024 <= limit  # 16 KB: the kernel's static shared memory, at most


# From this many tokens the dynamic layer's backward takes per-token H from one launch of
# the coefficients on the saved z and r (bitwise the same H: the same coefficients()),
# instead of each block's warps waiting on its tokens' Sinkhorns between token groups.
_LAYER_BWD_H_ONCE_MIN_TOKENS = 4096


def _layer_front(grad, x, weight, b, iters, eps_rms, eps_sk, post_mult, z=None, r=None,
                 phi=None, alpha=None):  # fmt: skip
    """(∂x, ∂H_pre, ∂H_post, ∂H_res, ∂w) of the seed layer from its output gradient G, all
    but the path through z: ∂x = H_resᵀ·G + H_preᵀ·∂u. ∂H per token for dynamic H (z and r
    given: H from them), summed over tokens for static H. ∂u is never rounded to x's dtype:
    ∂H_pre = ⟨∂u, x⟩ nearly cancels (RMSNorm is scale-invariant, so ∂u ⟂ u up to eps), and
    from a bf16 ∂u it lost all accuracy at n = 1."""
    t, n, c = _dims(x)
    dynamic = z is not None
    if t and _fused_layer_backward(x):  # one kernel: mhc/layer_backward.cuh
        dev = x.device
        dx = empty(x.shape, x.dtype, dev)
        dh_pre = empty((t, n), torch.float32, dev)
        dh_post = empty((t, n), torch.float32, dev)
        dh_res = empty((t, n, n), torch.float32, dev)
        splits = max(1, min(t, _layer_bwd_blocks_per_sm(n, dynamic) * _sm_count(dev)))
        dw_rows = empty((splits, c), torch.float32, dev)
        op = Op.LAYER_BWD_DYN if dynamic else Op.LAYER_BWD_STATIC
        h = {}
        if dynamic and t >= _LAYER_BWD_H_ONCE_MIN_TOKENS:
            h = _coefficients_from(z, r, alpha, b, n, iters, eps_sk, post_mult)
        launch(op, dev, DTYPES[x.dtype], n=n, hidden=c, tokens=t, sinkhorn_iters=iters,
               eps_rms=eps_rms, eps_sk=eps_sk, post_mult=post_mult, splits=splits, x=x,
               grad_out=grad, norm_weight=weight, bias=b, z_in=z, r_in=r, alpha=alpha,
               grad_x=dx, grad_h_pre=dh_pre, grad_h_post=dh_post, grad_h_res=dh_res,
               grad_norm_weight=dw_rows, **h)  # fmt: skip
        if not dynamic:
            dh_pre, dh_post, dh_res = dh_pre.sum(0), dh_post.sum(0), dh_res.sum(0)
        return dx, dh_pre, dh_post, dh_res, dw_rows.sum(0)
    # In steps (C too large for the kernel's shared memory): u in fp32 as the fused forward
    # has it, torch's RMSNorm, post's backward on y in fp32, then ∂u's two uses in fp32.
    if dynamic:
        u32 = empty((t, c), torch.float32, x.device)
        h_pre, h_post, h_res = _coeff_outputs((t,), n, x.device)
        if t:
            launch(Op.PRE_DYN, x.device, DTYPES[x.dtype], n=n, hidden=c, tokens=t,
                   sinkhorn_iters=iters, eps_rms=eps_rms, eps_sk=eps_sk, post_mult=post_mult,
                   x=x, phi=phi, alpha=alpha, bias=b, u_f32=u32, h_pre=h_pre, h_post=h_post,
                   h_res=h_res, z_in=z, r_in=r)  # fmt: skip
        s, y32 = _rms_norm(u32, weight, eps_rms)
        dx_post, dy, dh_post, dh_res = post_dynamic_backward(grad, x, None, h_post, h_res, y32)
    else:
        h_pre = static_coefficients(b, n, iters, eps_sk, post_mult)[0].expand(t, n)
        u32 = pre_static(x, b, iters, eps_sk, post_mult, u_fp32=True)
        s, y32 = _rms_norm(u32, weight, eps_rms)
        dx_post, dy, dh_post, dh_res = _post_static_grads(grad, x, None, b, iters, eps_sk,
                                                          post_mult, y32)  # fmt: skip
    du, dweight = _rms_norm_backward(dy, u32, s, weight)
    xf = x.float()
    dh_pre = (du[:, None, :] * xf).sum(-1)
    dx = (dx_post.float() + h_pre[:, :, None] * du[:, None, :]).to(x.dtype)
    return dx, dh_pre if dynamic else dh_pre.sum(0), dh_post, dh_res, dweight


# From this many tokens the dynamic layer's backward of 16-bit x at n ≤ 4 (CUDA) runs in
# two passes over x and G (mhc/layer_backward_two_pass.cuh): the per-token sums, then ∂x
# whole with ∂z·φᵀ on tensor cores, instead of the front kernel's ∂x_front written and
# read back by pre's ∂x kernel.
_TWO_PASS_MIN_TOKENS = 4096
_TWO_PASS_MAX_N = 4


def _two_pass_backward(grad, x, weight) -> bool:
    """Whether the dynamic layer's backward runs as _layer_backward_two_pass (fp32
    weight): CUDA, 16-bit x, n ≤ 4, C a multiple of 8, 16-byte aligned x, G and w, enough
    tokens."""
    t, n, c = _dims(x)
    return (
        x.is_cuda
        and torch.version.hip is None
        and x.dtype in (torch.bfloat16, torch.float16)
        and n <= _TWO_PASS_MAX_N
        and c % 8 == 0
        and all(v.data_ptr() % 16 == 0 for v in (x, grad, weight))
        and t >= max(1, _TWO_PASS_MIN_TOKENS)  # no tokens: the ∂w rows would stay unwritten
    )


def _layer_dx_splits(t: int, c: int, device) -> int:
    """Token-tile strides of the two-pass ∂x kernel's grid (its ∂w partial rows): one wave
    of its 256-column blocks at 2 an SM (128 registers, 81 KB of shared memory at n = 4)."""
    chunks = -(-c // 256)
    return max(1, min(-(-t // 16), 2 * _sm_count(device) // chunks))


def _layer_backward_two_pass(grad, x, weight, phi, alpha, b, z, r, iters, eps_rms, eps_sk,
                             post_mult):  # fmt: skip
    """(∂x, ∂w, ∂φ, ∂α, ∂b) of the seed's layer in two passes over x and G: H from the
    saved z and r; the sums (∂H and the RMSNorm's s, k per token); pre's token kernel (∂z,
    ∂r, ∂α, ∂h̃); ∂x and the ∂w partials; ∂φ."""
    t, n, c = _dims(x)
    dev, f32 = x.device, torch.float32
    h = _coefficients_from(z, r, alpha, b, n, iters, eps_sk, post_mult)
    dh_pre, dh_post, dh_res = (empty((t, n), f32, dev), empty((t, n), f32, dev),
                               empty((t, n, n), f32, dev))  # fmt: skip
    scale = empty((t, 2), f32, dev)
    common = dict(n=n, hidden=c, tokens=t, sinkhorn_iters=iters, eps_rms=eps_rms,
                  eps_sk=eps_sk, post_mult=post_mult)  # fmt: skip
    launch(Op.LAYER_BWD_DYN, dev, DTYPES[x.dtype], **common, x=x, grad_out=grad,
           norm_weight=weight, grad_h_pre=dh_pre, grad_h_post=dh_post, grad_h_res=dh_res,
           layer_scale=scale, **h)  # fmt: skip
    dlogits, dz, dalpha_tok, scratch = _pre_token_grad_buffers(t, n, iters, dev)
    launch(Op.PRE_BWD_DYN, dev, DTYPES[x.dtype], **common, x=x, phi=phi, alpha=alpha,
           bias=b, grad_h_pre_in=dh_pre, grad_h_post_in=dh_post, grad_h_res_in=dh_res,
           z_in=z, r_in=r, grad_logits=dlogits, grad_z=dz, grad_alpha_tok=dalpha_tok,
           scratch=scratch)  # fmt: skip
    dx = empty(x.shape, x.dtype, dev)
    splits = _layer_dx_splits(t, c, dev)
    dw_rows = empty((splits, c), f32, dev)
    launch(Op.LAYER_BWD_DYN, dev, DTYPES[x.dtype], **common, splits=splits, x=x,
           grad_out=grad, norm_weight=weight, phi=phi, phi_fragments=_phi_fragments(x), grad_z=dz,
           scratch=scratch, layer_scale=scale, grad_x=dx, grad_norm_weight=dw_rows,
           **h)  # fmt: skip
    return dx, dw_rows.sum(0), _phi_grad(x, dz, _phi_splits), dalpha_tok.sum(0), dlogits.sum(0)


def layer_dynamic_backward(grad, x, weight, phi, alpha, b, z, r, iters, eps_rms, eps_sk,
                           post_mult):  # fmt: skip
    """(∂x, ∂w, ∂φ, ∂α, ∂b) of the seed's layer: in two passes where
    _two_pass_backward says, else its front (H from the saved z and r, no second
    projection), then pre's backward for the path through z, which adds the front's ∂x in
    its pass."""
    weight = weight.float()
    if _two_pass_backward(grad, x, weight):
        return _layer_backward_two_pass(grad, x, weight, phi, alpha, b, z, r, iters, eps_rms,
                                        eps_sk, post_mult)  # fmt: skip
    dx_front, dh_pre, dh_post, dh_res, dweight = _layer_front(
        grad, x, weight, b, iters, eps_rms, eps_sk, post_mult, z=z, r=r, phi=phi,
        alpha=alpha)  # fmt: skip
    dx, dphi, dalpha, db = pre_dynamic_backward(None, dh_pre, dh_post, dh_res, x, z, r, phi,
                                                alpha, b, iters, eps_rms, eps_sk, post_mult,
                                                grad_x_in=dx_front)  # fmt: skip
    return dx, dweight, dphi, dalpha, db


def layer_static_backward(grad, x, weight, b, iters, eps_rms, eps_sk, post_mult):
    """(∂x, ∂w, ∂b) of the seed's layer with static H: the front gives ∂x whole (no path
    through z); one coefficient backward takes pre's and post's ∂H together."""
    dx, dh_pre, dh_post, dh_res, dweight = _layer_front(grad, x, weight.float(), b, iters,
                                                        eps_rms, eps_sk, post_mult)  # fmt: skip
    db = static_coefficients_backward(dh_pre, dh_post, dh_res, b, x.shape[1], iters, eps_sk,
                                      post_mult)  # fmt: skip
    return dx, dweight, db
