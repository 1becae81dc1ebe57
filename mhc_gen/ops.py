"""The public functional API: validate, flatten the leading dims, call the op.

Every op validates its inputs and raises ValueError naming what is wrong,
then calls its torch.ops.mhc_gen custom op (mhc_gen.library), which runs the
kernels on CUDA/HIP tensors and the reference on CPU tensors, and is
differentiable, torch.compile-able and CUDA-graph capturable.
"""

from __future__ import annotations

import torch

from generator.spec import MAX_N

from . import library as L
from . import reference
from ._launch import DTYPES

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
        if x.dtype not in DTYPES:
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
            _fail(op, f"{name} must have dtype {dtype}, got {t.dtype}")
        if not t.is_contiguous():
            _fail(op, f"{name} must be contiguous")


def _check_like(op: str, name: str, t, shape: tuple, x):
    """A tensor that must match x's dtype and device (y, the sublayer output)."""
    _check_param(op, name, t, shape, x, dtype=x.dtype)
    if t.dtype != x.dtype:
        _fail(op, f"{name} must have x's dtype {x.dtype}, got {t.dtype}")


def _check_config(op: str, kw: dict) -> dict:
    unknown = set(kw) - set(_DEFAULTS)
    if unknown:
        _fail(op, f"unknown keyword(s) {sorted(unknown)}; expected {sorted(_DEFAULTS)}")
    kw = {**_DEFAULTS, **kw}
    iters = kw["sinkhorn_iters"]
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        _fail(op, f"sinkhorn_iters must be an integer >= 0, got {iters!r}")
    for name in ("eps_rms", "eps_sk", "post_mult"):
        if not kw[name] > 0:
            _fail(op, f"{name} must be > 0, got {kw[name]!r}")
    return kw


_DEFAULTS = dict(
    sinkhorn_iters=reference.SINKHORN_ITERS,
    eps_rms=reference.EPS_RMS,
    eps_sk=reference.EPS_SK,
    post_mult=reference.POST_MULT,
)


def _check_dynamic_params(op, x, n, c, phi, alpha, b):
    m = reference.num_logits(n)
    _check_param(op, "phi", phi, (n * c, m), x)
    _check_param(op, "alpha", alpha, (3,), x)
    _check_param(op, "b", b, (m,), x)


def _flat(x, n, c):
    return x.reshape(-1, n, c)


def _shaped(out, shape):
    """The op's fresh output in the caller's shape, not a view of it: a module
    that returns a view trips FSDP2's pre-backward hook (and its warning)."""
    return out if out.shape == shape else torch.ops.aten._unsafe_view(out, shape)


def dynamic_coefficients(x, phi, alpha, b, **kw):
    """Per-token H_pre [..., n], H_post [..., n], H_res [..., n, n] (fp32) from x [..., n, C]."""
    kw = _check_config("dynamic_coefficients", kw)
    _, n, c = _check_x("dynamic_coefficients", x)
    _check_dynamic_params("dynamic_coefficients", x, n, c, phi, alpha, b)
    lead = x.shape[:-2]
    h_pre, h_post, h_res, _, _ = L.dynamic_coefficients(
        _flat(x, n, c), phi, alpha, b, kw["sinkhorn_iters"], kw["eps_rms"], kw["eps_sk"],
        kw["post_mult"],
    )  # fmt: skip
    return h_pre.reshape(*lead, n), h_post.reshape(*lead, n), h_res.reshape(*lead, n, n)


def static_coefficients(b, n: int, **kw):
    """The layer's H_pre [n], H_post [n], H_res [n, n] (fp32) from its logits b [m]."""
    kw = _check_config("static_coefficients", kw)
    if not isinstance(n, int) or not 1 <= n <= MAX_N:
        _fail("static_coefficients", f"n = {n} is not supported: 1 <= n <= {MAX_N}")
    _check_param("static_coefficients", "b", b, (reference.num_logits(n),), b)
    return L.static_coefficients(b, n, kw["sinkhorn_iters"], kw["eps_sk"], kw["post_mult"])


def pre_dynamic(x, phi, alpha, b, **kw):
    """u = H_pre·x with per-token H; returns (u [..., C], H_pre, H_post, H_res)."""
    kw = _check_config("pre_dynamic", kw)
    _, n, c = _check_x("pre_dynamic", x)
    _check_dynamic_params("pre_dynamic", x, n, c, phi, alpha, b)
    lead = x.shape[:-2]
    u, h_pre, h_post, h_res, _, _ = L.pre_dynamic(
        _flat(x, n, c), phi, alpha, b, kw["sinkhorn_iters"], kw["eps_rms"], kw["eps_sk"],
        kw["post_mult"],
    )  # fmt: skip
    return (u.reshape(*lead, c), h_pre.reshape(*lead, n), h_post.reshape(*lead, n),
            h_res.reshape(*lead, n, n))  # fmt: skip


def pre_static(x, b, **kw):
    """u = H_pre·x with the layer's static H from logits b [m]."""
    kw = _check_config("pre_static", kw)
    _, n, c = _check_x("pre_static", x)
    _check_param("pre_static", "b", b, (reference.num_logits(n),), x)
    u = L.pre_static(_flat(x, n, c), b, kw["sinkhorn_iters"], kw["eps_sk"], kw["post_mult"])
    return u.reshape(*x.shape[:-2], c)


def post_dynamic(x, y, h_post, h_res):
    """x_next = H_res·x + H_postᵀ·y with per-token H_post [..., n], H_res [..., n, n]."""
    _, n, c = _check_x("post_dynamic", x)
    lead = tuple(x.shape[:-2])
    _check_like("post_dynamic", "y", y, (*lead, c), x)
    _check_param("post_dynamic", "h_post", h_post, (*lead, n), x)
    _check_param("post_dynamic", "h_res", h_res, (*lead, n, n), x)
    out = L.post_dynamic(
        _flat(x, n, c), y.reshape(-1, c), h_post.reshape(-1, n), h_res.reshape(-1, n, n)
    )
    return _shaped(out, x.shape)


def post_static(x, y, b, **kw):
    """x_next = H_res·x + H_postᵀ·y with the layer's static H from logits b [m]."""
    kw = _check_config("post_static", kw)
    _, n, c = _check_x("post_static", x)
    _check_like("post_static", "y", y, (*x.shape[:-2], c), x)
    _check_param("post_static", "b", b, (reference.num_logits(n),), x)
    out = L.post_static(_flat(x, n, c), y.reshape(-1, c), b, kw["sinkhorn_iters"], kw["eps_sk"],
                        kw["post_mult"])  # fmt: skip
    return _shaped(out, x.shape)


def layer_dynamic(x, weight, phi, alpha, b, **kw):
    """The seed's layer with per-token H: pre -> RMSNorm·weight -> post, one kernel."""
    kw = _check_config("layer_dynamic", kw)
    _, n, c = _check_x("layer_dynamic", x)
    _check_param("layer_dynamic", "weight", weight, (c,), x)
    _check_dynamic_params("layer_dynamic", x, n, c, phi, alpha, b)
    out, _, _ = L.layer_dynamic(
        _flat(x, n, c), weight, phi, alpha, b, kw["sinkhorn_iters"], kw["eps_rms"], kw["eps_sk"],
        kw["post_mult"],
    )  # fmt: skip
    return _shaped(out, x.shape)


def layer_static(x, weight, b, **kw):
    """The seed's layer with the layer's static H from logits b [m], one kernel."""
    kw = _check_config("layer_static", kw)
    _, n, c = _check_x("layer_static", x)
    _check_param("layer_static", "weight", weight, (c,), x)
    _check_param("layer_static", "b", b, (reference.num_logits(n),), x)
    out = L.layer_static(_flat(x, n, c), weight, b, kw["sinkhorn_iters"], kw["eps_rms"],
                         kw["eps_sk"], kw["post_mult"])  # fmt: skip
    return _shaped(out, x.shape)
