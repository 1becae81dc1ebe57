"""The forward ops on torch tensors.

Every op validates its inputs, then either launches the selected kernel on the
current stream (CUDA/HIP tensors) or runs the reference (CPU tensors). Outputs
are allocated through torch; nothing syncs the host; no state is global.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch

from generator.spec import MAX_N, DType, Op, parse

from . import _loader, reference
from .select import arch_for_capability, arch_for_gcn, select

_DTYPES = {torch.bfloat16: DType.BF16, torch.float16: DType.FP16, torch.float32: DType.FP32}
_POISON = contextvars.ContextVar("mhc_gen_poison_outputs", default=False)
_FORCED = contextvars.ContextVar("mhc_gen_forced_variant", default=None)


@contextlib.contextmanager
def poisoned_outputs():
    """Within this context GPU outputs start as NaN, so an unwritten element shows."""
    token = _POISON.set(True)
    try:
        yield
    finally:
        _POISON.reset(token)


@contextlib.contextmanager
def forced_variant(name: str):
    """Within this context the op that ``name`` implements runs exactly that
    variant instead of the selected one (tests use it to cover every variant)."""
    parse(name)
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def _empty(shape, dtype, device):
    if _POISON.get():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# ---------------------------------------------------------------- validation


def _fail(op: str, msg: str):
    raise ValueError(f"mhc_gen.{op}: {msg}")


def _check_x(op: str, x) -> tuple[int, int, int]:
    """x must be [..., n, C]; returns (T, n, C)."""
    if not isinstance(x, torch.Tensor):
        _fail(op, f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        _fail(op, f"x must have shape [..., n, C], got {tuple(x.shape)}")
    n, c = x.shape[-2], x.shape[-1]
    if not 1 <= n <= MAX_N:
        _fail(op, f"n = {n} (x.shape[-2]) is not supported: 1 <= n <= {MAX_N}")
    if c < 1:
        _fail(op, f"hidden C = {c} (x.shape[-1]) must be >= 1")
    if not x.is_floating_point():
        _fail(op, f"x must be floating point, got {x.dtype}")
    if x.device.type != "cpu":
        if x.dtype not in _DTYPES:
            _fail(op, f"x dtype {x.dtype} is not supported on GPU: bfloat16, float16 or float32")
        if not x.is_contiguous():
            _fail(op, "x must be contiguous")
    return x.numel() // (n * c), n, c


def _check_param(op: str, name: str, t, shape: tuple, x, dtype=torch.float32):
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        _fail(op, f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != x.device:
        _fail(op, f"{name} is on {t.device} but x is on {x.device}")
    if x.device.type != "cpu":
        if t.dtype != dtype:
            _fail(op, f"{name} must be {dtype}, got {t.dtype}")
        if not t.is_contiguous():
            _fail(op, f"{name} must be contiguous")


def _check_like(op: str, name: str, t, shape: tuple, x):
    """A tensor that must match x's dtype and device (y, the sublayer output)."""
    _check_param(op, name, t, shape, x, dtype=x.dtype)
    if t.dtype != x.dtype:
        _fail(op, f"{name} must have x's dtype {x.dtype}, got {t.dtype}")


# ---------------------------------------------------------------- launching


@functools.cache
def _device_arch(device_index: int):
    if torch.version.hip:
        props = torch.cuda.get_device_properties(device_index)
        return "hip", arch_for_gcn(props.gcnArchName)
    return "cuda", arch_for_capability(*torch.cuda.get_device_capability(device_index))


@functools.cache
def _kernel(op: Op, n: int, hidden: int, dtype: DType, device_index: int):
    backend, arch = _device_arch(device_index)
    mod = _loader.module(backend)
    if mod is None:
        raise RuntimeError(
            f"mhc_gen: no {backend} kernels are built; run python build.py --arch {arch.value}"
        )
    spec = select(op, n, hidden, dtype, arch, _loader.table(backend))
    return mod.launch, _loader.table(backend)[spec.name]


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


def _launch(
    op: Op,
    x,
    n,
    c,
    tokens,
    *,
    dtype=None,
    y=None,
    phi=None,
    alpha=None,
    b=None,
    weight=None,
    h_post_in=None,
    h_res_in=None,
    out=None,
    h_pre=None,
    h_post=None,
    h_res=None,
    sinkhorn_iters=20,
    eps_rms=1e-6,
    eps_sk=1e-6,
    post_mult=2.0,
):
    device = x.device
    forced = _FORCED.get()
    if forced is not None and parse(forced).op is op:
        launch, _ = _kernel(op, n, c, dtype or _DTYPES[x.dtype], device.index)
        index = _loader.table(_device_arch(device.index)[0])[forced]
    else:
        launch, index = _kernel(op, n, c, dtype or _DTYPES[x.dtype], device.index)
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device).cuda_stream
        launch(index, _ptr(x), _ptr(y), _ptr(phi), _ptr(alpha), _ptr(b), _ptr(weight), 0,
               _ptr(h_post_in), _ptr(h_res_in), _ptr(out), _ptr(h_pre), _ptr(h_post),
               _ptr(h_res), tokens, c, n, int(sinkhorn_iters), float(eps_rms), float(eps_sk),
               float(post_mult), stream)  # fmt: skip


def _check_sinkhorn(op, sinkhorn_iters):
    if int(sinkhorn_iters) != sinkhorn_iters or sinkhorn_iters < 0:
        _fail(op, f"sinkhorn_iters must be an integer >= 0, got {sinkhorn_iters}")


# ---------------------------------------------------------------- the ops

_DEFAULTS = dict(
    sinkhorn_iters=reference.SINKHORN_ITERS,
    eps_rms=reference.EPS_RMS,
    eps_sk=reference.EPS_SK,
    post_mult=reference.POST_MULT,
)


def _coeff_outputs(lead, n, device):
    return (
        _empty((*lead, n), torch.float32, device),
        _empty((*lead, n), torch.float32, device),
        _empty((*lead, n, n), torch.float32, device),
    )


def _check_dynamic_params(op, x, n, c, phi, alpha, b):
    m = reference.num_logits(n)
    _check_param(op, "phi", phi, (n * c, m), x)
    _check_param(op, "alpha", alpha, (3,), x)
    _check_param(op, "b", b, (m,), x)


def dynamic_coefficients(x, phi, alpha, b, **kw):
    """Per-token H_pre [..., n], H_post [..., n], H_res [..., n, n] (fp32) from x [..., n, C]."""
    kw = {**_DEFAULTS, **kw}
    t, n, c = _check_x("dynamic_coefficients", x)
    _check_dynamic_params("dynamic_coefficients", x, n, c, phi, alpha, b)
    _check_sinkhorn("dynamic_coefficients", kw["sinkhorn_iters"])
    if x.device.type == "cpu":
        return reference.dynamic_coefficients(x, phi, alpha, b, **kw)
    h = _coeff_outputs(x.shape[:-2], n, x.device)
    if t:
        _launch(Op.COEFFS_DYN, x, n, c, t, phi=phi, alpha=alpha, b=b, h_pre=h[0], h_post=h[1],
                h_res=h[2], **kw)  # fmt: skip
    return h


def static_coefficients(b, n: int, *, device=None, **kw):
    """The layer's H_pre [n], H_post [n], H_res [n, n] (fp32) from its logits b [m]."""
    kw = {**_DEFAULTS, **kw}
    kw.pop("eps_rms")
    if not 1 <= n <= MAX_N:
        _fail("static_coefficients", f"n = {n} is not supported: 1 <= n <= {MAX_N}")
    probe = torch.empty(0, device=b.device)
    _check_param("static_coefficients", "b", b, (reference.num_logits(n),), probe)
    _check_sinkhorn("static_coefficients", kw["sinkhorn_iters"])
    if b.device.type == "cpu":
        return reference.static_coefficients(b, n, **kw)
    h = _coeff_outputs((), n, b.device)
    _launch(Op.COEFFS_STATIC, b, n, 1, 1, dtype=DType.FP32, b=b, h_pre=h[0], h_post=h[1],
            h_res=h[2], **kw)  # fmt: skip
    return h


def pre_dynamic(x, phi, alpha, b, **kw):
    """u = H_pre·x with per-token H; returns (u [..., C], H_pre, H_post, H_res)."""
    kw = {**_DEFAULTS, **kw}
    t, n, c = _check_x("pre_dynamic", x)
    _check_dynamic_params("pre_dynamic", x, n, c, phi, alpha, b)
    _check_sinkhorn("pre_dynamic", kw["sinkhorn_iters"])
    if x.device.type == "cpu":
        h = reference.dynamic_coefficients(x, phi, alpha, b, **kw)
        return (reference.pre(x, h[0]), *h)
    u = _empty((*x.shape[:-2], c), x.dtype, x.device)
    h = _coeff_outputs(x.shape[:-2], n, x.device)
    if t:
        _launch(Op.PRE_DYN, x, n, c, t, phi=phi, alpha=alpha, b=b, out=u, h_pre=h[0],
                h_post=h[1], h_res=h[2], **kw)  # fmt: skip
    return (u, *h)


def pre_static(x, b, **kw):
    """u = H_pre·x with the layer's static H from logits b [m]."""
    kw = {**_DEFAULTS, **kw}
    t, n, c = _check_x("pre_static", x)
    _check_param("pre_static", "b", b, (reference.num_logits(n),), x)
    _check_sinkhorn("pre_static", kw["sinkhorn_iters"])
    if x.device.type == "cpu":
        kw.pop("eps_rms")
        return reference.pre(x, reference.static_coefficients(b, n, **kw)[0])
    u = _empty((*x.shape[:-2], c), x.dtype, x.device)
    if t:
        _launch(Op.PRE_STATIC, x, n, c, t, b=b, out=u, **kw)
    return u


def post_dynamic(x, y, h_post, h_res):
    """x_next = H_res·x + H_postᵀ·y with per-token H_post [..., n], H_res [..., n, n]."""
    t, n, c = _check_x("post_dynamic", x)
    lead = tuple(x.shape[:-2])
    _check_like("post_dynamic", "y", y, (*lead, c), x)
    _check_param("post_dynamic", "h_post", h_post, (*lead, n), x)
    _check_param("post_dynamic", "h_res", h_res, (*lead, n, n), x)
    if x.device.type == "cpu":
        return reference.post(x, y, h_post, h_res)
    out = _empty(x.shape, x.dtype, x.device)
    if t:
        _launch(Op.POST_DYN, x, n, c, t, y=y, h_post_in=h_post, h_res_in=h_res, out=out)
    return out


def post_static(x, y, b, **kw):
    """x_next = H_res·x + H_postᵀ·y with the layer's static H from logits b [m]."""
    kw = {**_DEFAULTS, **kw}
    t, n, c = _check_x("post_static", x)
    _check_like("post_static", "y", y, (*x.shape[:-2], c), x)
    _check_param("post_static", "b", b, (reference.num_logits(n),), x)
    _check_sinkhorn("post_static", kw["sinkhorn_iters"])
    if x.device.type == "cpu":
        kw.pop("eps_rms")
        _, h_post, h_res = reference.static_coefficients(b, n, **kw)
        return reference.post(x, y, h_post, h_res)
    out = _empty(x.shape, x.dtype, x.device)
    if t:
        _launch(Op.POST_STATIC, x, n, c, t, y=y, b=b, out=out, **kw)
    return out


def layer_dynamic(x, weight, phi, alpha, b, **kw):
    """The seed's layer with per-token H: pre -> RMSNorm·weight -> post, one kernel."""
    kw = {**_DEFAULTS, **kw}
    t, n, c = _check_x("layer_dynamic", x)
    _check_param("layer_dynamic", "weight", weight, (c,), x)
    _check_dynamic_params("layer_dynamic", x, n, c, phi, alpha, b)
    _check_sinkhorn("layer_dynamic", kw["sinkhorn_iters"])
    if x.device.type == "cpu":
        return reference.layer_dynamic(x, weight, phi, alpha, b, **kw)
    out = _empty(x.shape, x.dtype, x.device)
    if t:
        _launch(Op.LAYER_DYN, x, n, c, t, phi=phi, alpha=alpha, b=b, weight=weight, out=out,
                **kw)  # fmt: skip
    return out


def layer_static(x, weight, b, **kw):
    """The seed's layer with the layer's static H from logits b [m], one kernel."""
    kw = {**_DEFAULTS, **kw}
    t, n, c = _check_x("layer_static", x)
    _check_param("layer_static", "weight", weight, (c,), x)
    _check_param("layer_static", "b", b, (reference.num_logits(n),), x)
    _check_sinkhorn("layer_static", kw["sinkhorn_iters"])
    if x.device.type == "cpu":
        return reference.layer_static(x, weight, b, **kw)
    out = _empty(x.shape, x.dtype, x.device)
    if t:
        _launch(Op.LAYER_STATIC, x, n, c, t, b=b, weight=weight, out=out, **kw)
    return out
