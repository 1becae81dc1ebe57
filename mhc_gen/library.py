"""mhc_gen's torch.library custom ops (``torch.ops.mhc_gen.*``).

Each op has a fake (meta) implementation for torch.compile, a GPU
implementation (mhc_gen.gpu) and a CPU implementation (mhc_gen.reference;
backward ops differentiate the reference with autograd). Forward ops register
their autograd here; their backward formulas are themselves custom ops and
torch ops, so AOTAutograd traces them and CUDA graphs capture them.

All ops take x as [T, n, C]; mhc_gen.ops validates and flattens.

Eager calls skip the dispatcher (see _Op): its Python custom-op machinery was
about a third of the ops' host time (benchmarks/host_overhead.py --mock).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import gpu
from . import reference as R

_LIB = "mhc_gen"


def _on_cpu(t: Tensor) -> bool:
    return t.device.type == "cpu"


def _ref_grads(fn, inputs, outputs_grads):
    """Gradients of fn(*inputs) w.r.t. inputs through the reference (CPU ops).
    torch.func.vjp, because autograd does not record inside an op's kernel."""
    outs, vjp = torch.func.vjp(lambda *a: fn(*a), *inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    cot = tuple(torch.zeros_like(o) if g is None else g.to(o.dtype)
                for o, g in zip(outs, outputs_grads, strict=True))  # fmt: skip
    grads = vjp(cot if len(cot) > 1 else cot[0])
    return list(grads)


def _c(t: Tensor | None) -> Tensor | None:
    """Kernels read dense memory: upstream grads may be expanded or strided."""
    return None if t is None else t.contiguous()


def _kw(iters, eps_sk, post_mult):
    return dict(sinkhorn_iters=iters, eps_sk=eps_sk, post_mult=post_mult)


def _eager(args) -> bool:
    """Whether a call may skip the dispatcher: not traced by torch.compile or
    torch.jit.trace, no dispatch or torch-function mode (FakeTensor, export, FLOP
    counters, `with torch.device(...)`), no torch.func transform and plain tensors
    (no subclass such as DTensor): all of these must see the op."""
    return (
        not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and not torch._C._len_torch_dispatch_stack()
        and not torch._C._is_torch_function_mode_enabled()
        and not torch._C._are_functorch_transforms_active()
        and all(type(a) is Tensor for a in args if isinstance(a, Tensor))
    )


class _Op:
    """A torch.ops.mhc_gen custom op with an eager shortcut to the same functions.

    Eager calls run the op's implementation directly, under an autograd.Function
    built from the op's own setup_context and backward when a gradient is wanted;
    traced calls go through torch.ops. Both run the same code, so results are
    identical; the shortcut only drops the dispatcher's per-call Python cost."""

    def __init__(self, name: str, impl):
        self.op = torch.library.custom_op(f"{_LIB}::{name}", mutates_args=())(impl)
        self.name, self.impl = name, impl
        self.register_fake = self.op.register_fake
        self._function = None

    def register_autograd(self, backward, *, setup_context):
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self.impl

        def forward(ctx, *inputs):
            output = impl(*inputs)
            setup_context(ctx, inputs, output)
            return output

        self._function = type(f"{self.name}_autograd", (torch.autograd.Function,),
                              {"forward": staticmethod(forward),
                               "backward": staticmethod(backward)})  # fmt: skip

    def __call__(self, *args):
        if _eager(args):
            if not (torch.is_grad_enabled() and _any_grad(args)):
                return self.impl(*args)
            if self._function is not None:
                return self._function.apply(*args)
        # Traced, or a gradient wanted of an op without autograd (a backward op under
        # create_graph): torch's own handling, exactly as without the shortcut.
        return self.op(*args)


def _any_grad(args) -> bool:
    return any(isinstance(a, Tensor) and a.requires_grad for a in args)


def _custom_op(name: str):
    """@torch.library.custom_op(mhc_gen::name) with the eager shortcut (_Op)."""
    return lambda impl: _Op(name, impl)


# ================================================================ coefficients


@_custom_op("dynamic_coefficients")
def dynamic_coefficients(
    x: Tensor, phi: Tensor, alpha: Tensor, b: Tensor, iters: int, eps_rms: float, eps_sk: float,
    post_mult: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(H_pre, H_post, H_res, z, r) per token."""
    if _on_cpu(x):
        z, r = R.projection(x, phi, eps_rms=eps_rms)
        n = x.shape[1]
        logits = R.logits_from_projection(z, r, alpha, b, n)
        h = R.coefficients_from_logits(logits, n, **_kw(iters, eps_sk, post_mult))
        return (*h, z, r)
    return gpu.dynamic_coefficients(x, phi, alpha, b, iters, eps_rms, eps_sk, post_mult)


def _coeff_fakes(x: Tensor):
    t, n, _ = x.shape
    f = dict(dtype=R._math_dtype(x.dtype), device=x.device)
    m = R.num_logits(n)
    h = (x.new_empty((t, n), **f), x.new_empty((t, n), **f), x.new_empty((t, n, n), **f))
    return (*h, x.new_empty((t, m), **f), x.new_empty((t,), **f))


@dynamic_coefficients.register_fake
def _(x, phi, alpha, b, iters, eps_rms, eps_sk, post_mult):
    return _coeff_fakes(x)


@_custom_op("static_coefficients")
def static_coefficients(
    b: Tensor, n: int, iters: int, eps_sk: float, post_mult: float
) -> tuple[Tensor, Tensor, Tensor]:
    if _on_cpu(b):
        return R.static_coefficients(b, n, **_kw(iters, eps_sk, post_mult))
    return gpu.static_coefficients(b, n, iters, eps_sk, post_mult)


@static_coefficients.register_fake
def _(b, n, iters, eps_sk, post_mult):
    dt = R._math_dtype(b.dtype)
    return b.new_empty((n,), dtype=dt), b.new_empty((n,), dtype=dt), b.new_empty((n, n), dtype=dt)


@_custom_op("static_coefficients_backward")
def static_coefficients_backward(
    grad_h_pre: Tensor | None, grad_h_post: Tensor | None, grad_h_res: Tensor | None,
    b: Tensor, n: int, iters: int, eps_sk: float, post_mult: float,
) -> Tensor:  # fmt: skip
    if _on_cpu(b):
        fn = lambda b_: R.static_coefficients(b_, n, **_kw(iters, eps_sk, post_mult))  # noqa: E731
        return _ref_grads(fn, [b], [grad_h_pre, grad_h_post, grad_h_res])[0]
    return gpu.static_coefficients_backward(
        grad_h_pre, grad_h_post, grad_h_res, b, n, iters, eps_sk, post_mult
    )


@static_coefficients_backward.register_fake
def _(grad_h_pre, grad_h_post, grad_h_res, b, n, iters, eps_sk, post_mult):
    return torch.empty_like(b)


def _static_coefficients_setup(ctx, inputs, output):
    b, n, iters, eps_sk, post_mult = inputs
    ctx.save_for_backward(b)
    ctx.cfg = (n, iters, eps_sk, post_mult)


def _static_coefficients_bwd(ctx, g_pre, g_post, g_res):
    (b,) = ctx.saved_tensors
    db = static_coefficients_backward(_c(g_pre), _c(g_post), _c(g_res), b, *ctx.cfg)
    return db, None, None, None, None


static_coefficients.register_autograd(
    _static_coefficients_bwd, setup_context=_static_coefficients_setup
)


# ================================================================ pre


@_custom_op("pre_dynamic")
def pre_dynamic(
    x: Tensor, phi: Tensor, alpha: Tensor, b: Tensor, iters: int, eps_rms: float, eps_sk: float,
    post_mult: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(u, H_pre, H_post, H_res, z, r)."""
    if _on_cpu(x):
        h_pre, h_post, h_res, z, r = dynamic_coefficients(
            x, phi, alpha, b, iters, eps_rms, eps_sk, post_mult
        )
        return R.pre(x, h_pre), h_pre, h_post, h_res, z, r
    return gpu.pre_dynamic(x, phi, alpha, b, iters, eps_rms, eps_sk, post_mult)


@pre_dynamic.register_fake
def _(x, phi, alpha, b, iters, eps_rms, eps_sk, post_mult):
    return (x.new_empty((x.shape[0], x.shape[2])), *_coeff_fakes(x))


@_custom_op("pre_dynamic_backward")
def pre_dynamic_backward(
    grad_u: Tensor | None, grad_h_pre: Tensor | None, grad_h_post: Tensor | None,
    grad_h_res: Tensor | None, x: Tensor, z: Tensor, r: Tensor, phi: Tensor, alpha: Tensor,
    b: Tensor, iters: int, eps_rms: float, eps_sk: float, post_mult: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(∂x, ∂φ, ∂α, ∂b); grad_u None: the backward of the coefficients alone."""
    if _on_cpu(x):

        def fn(x_, phi_, alpha_, b_):
            h = R.dynamic_coefficients(x_, phi_, alpha_, b_, eps_rms=eps_rms,
                                       **_kw(iters, eps_sk, post_mult))  # fmt: skip
            return (R.pre(x_, h[0]), *h)

        return tuple(
            _ref_grads(fn, [x, phi, alpha, b], [grad_u, grad_h_pre, grad_h_post, grad_h_res])
        )
    return gpu.pre_dynamic_backward(grad_u, grad_h_pre, grad_h_post, grad_h_res, x, z, r, phi,
                                    alpha, b, iters, eps_rms, eps_sk, post_mult)  # fmt: skip


@pre_dynamic_backward.register_fake
def _(grad_u, grad_h_pre, grad_h_post, grad_h_res, x, z, r, phi, alpha, b, *cfg):
    return (torch.empty_like(x), torch.empty_like(phi), torch.empty_like(alpha),
            torch.empty_like(b))  # fmt: skip


def _dynamic_setup(ctx, inputs, output):
    # An unused output's gradient stays None (the kernels take a null ∂H as zero): the
    # saved z and r never receive one, and materialising theirs cost two allocations and
    # two fill launches a backward.
    ctx.set_materialize_grads(False)
    x, phi, alpha, b, iters, eps_rms, eps_sk, post_mult = inputs
    z, r = output[-2:]
    ctx.save_for_backward(x, z, r, phi, alpha, b)
    ctx.cfg = (iters, eps_rms, eps_sk, post_mult)


def _pre_dynamic_bwd(ctx, g_u, g_pre, g_post, g_res, _gz, _gr):
    x, z, r, phi, alpha, b = ctx.saved_tensors
    dx, dphi, dalpha, db = pre_dynamic_backward(
        _c(g_u), _c(g_pre), _c(g_post), _c(g_res), x, z, r, phi, alpha, b, *ctx.cfg
    )
    return dx, dphi, dalpha, db, None, None, None, None


def _dynamic_coefficients_bwd(ctx, g_pre, g_post, g_res, _gz, _gr):
    x, z, r, phi, alpha, b = ctx.saved_tensors
    dx, dphi, dalpha, db = pre_dynamic_backward(
        None, _c(g_pre), _c(g_post), _c(g_res), x, z, r, phi, alpha, b, *ctx.cfg
    )
    return dx, dphi, dalpha, db, None, None, None, None


pre_dynamic.register_autograd(_pre_dynamic_bwd, setup_context=_dynamic_setup)
dynamic_coefficients.register_autograd(_dynamic_coefficients_bwd, setup_context=_dynamic_setup)


@_custom_op("pre_static")
def pre_static(x: Tensor, b: Tensor, iters: int, eps_sk: float, post_mult: float) -> Tensor:
    if _on_cpu(x):
        return R.pre(x, R.static_coefficients(b, x.shape[1], **_kw(iters, eps_sk, post_mult))[0])
    return gpu.pre_static(x, b, iters, eps_sk, post_mult)


@pre_static.register_fake
def _(x, b, iters, eps_sk, post_mult):
    return x.new_empty((x.shape[0], x.shape[2]))


@_custom_op("pre_static_backward")
def pre_static_backward(
    grad_u: Tensor, x: Tensor, b: Tensor, iters: int, eps_sk: float, post_mult: float
) -> tuple[Tensor, Tensor]:
    if _on_cpu(x):
        kw = _kw(iters, eps_sk, post_mult)
        fn = lambda x_, b_: R.pre(x_, R.static_coefficients(b_, x.shape[1], **kw)[0])  # noqa: E731
        return tuple(_ref_grads(fn, [x, b], [grad_u]))
    return gpu.pre_static_backward(grad_u, x, b, iters, eps_sk, post_mult)


@pre_static_backward.register_fake
def _(grad_u, x, b, iters, eps_sk, post_mult):
    return torch.empty_like(x), torch.empty_like(b)


def _static_setup(ctx, inputs, output):
    ctx.save_for_backward(*[t for t in inputs if isinstance(t, Tensor)])
    ctx.cfg = tuple(v for v in inputs if not isinstance(v, Tensor))


def _pre_static_bwd(ctx, g_u):
    x, b = ctx.saved_tensors
    dx, db = pre_static_backward(_c(g_u), x, b, *ctx.cfg)
    return dx, db, None, None, None


pre_static.register_autograd(_pre_static_bwd, setup_context=_static_setup)


# ================================================================ post


@_custom_op("post_dynamic")
def post_dynamic(x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor) -> Tensor:
    if _on_cpu(x):
        return R.post(x, y, h_post, h_res)
    return gpu.post_dynamic(x, y, h_post, h_res)


@post_dynamic.register_fake
def _(x, y, h_post, h_res):
    return torch.empty_like(x)


@_custom_op("post_dynamic_backward")
def post_dynamic_backward(
    grad: Tensor, x: Tensor, y: Tensor, h_post: Tensor, h_res: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if _on_cpu(x):
        return tuple(_ref_grads(R.post, [x, y, h_post, h_res], [grad]))
    return gpu.post_dynamic_backward(grad, x, y, h_post, h_res)


@post_dynamic_backward.register_fake
def _(grad, x, y, h_post, h_res):
    return (torch.empty_like(x), torch.empty_like(y), torch.empty_like(h_post),
            torch.empty_like(h_res))  # fmt: skip


def _post_dynamic_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _post_dynamic_bwd(ctx, g):
    return post_dynamic_backward(_c(g), *ctx.saved_tensors)


post_dynamic.register_autograd(_post_dynamic_bwd, setup_context=_post_dynamic_setup)


@_custom_op("post_static")
def post_static(
    x: Tensor, y: Tensor, b: Tensor, iters: int, eps_sk: float, post_mult: float
) -> Tensor:
    if _on_cpu(x):
        _, h_post, h_res = R.static_coefficients(b, x.shape[1], **_kw(iters, eps_sk, post_mult))
        return R.post(x, y, h_post, h_res)
    return gpu.post_static(x, y, b, iters, eps_sk, post_mult)


@post_static.register_fake
def _(x, y, b, iters, eps_sk, post_mult):
    return torch.empty_like(x)


@_custom_op("post_static_backward")
def post_static_backward(
    grad: Tensor, x: Tensor, y: Tensor, b: Tensor, iters: int, eps_sk: float, post_mult: float
) -> tuple[Tensor, Tensor, Tensor]:
    if _on_cpu(x):
        kw = _kw(iters, eps_sk, post_mult)

        def fn(x_, y_, b_):
            _, h_post, h_res = R.static_coefficients(b_, x.shape[1], **kw)
            return R.post(x_, y_, h_post, h_res)

        return tuple(_ref_grads(fn, [x, y, b], [grad]))
    return gpu.post_static_backward(grad, x, y, b, iters, eps_sk, post_mult)


@post_static_backward.register_fake
def _(grad, x, y, b, iters, eps_sk, post_mult):
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(b)


def _post_static_bwd(ctx, g):
    x, y, b = ctx.saved_tensors
    dx, dy, db = post_static_backward(_c(g), x, y, b, *ctx.cfg)
    return dx, dy, db, None, None, None


post_static.register_autograd(_post_static_bwd, setup_context=_static_setup)


# ================================================================ the seed's layer
# Forward: one fused kernel. Backward: one op (gpu.layer_*_backward) that recomputes H
# and u, then runs post's backward, RMSNorm's backward (fp32) and pre's backward.


@_custom_op("layer_dynamic")
def layer_dynamic(
    x: Tensor, weight: Tensor, phi: Tensor, alpha: Tensor, b: Tensor, iters: int, eps_rms: float,
    eps_sk: float, post_mult: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(x_next, z, r)."""
    if _on_cpu(x):
        z, r = R.projection(x, phi, eps_rms=eps_rms)
        n = x.shape[1]
        h = R.coefficients_from_logits(
            R.logits_from_projection(z, r, alpha, b, n), n, **_kw(iters, eps_sk, post_mult)
        )
        return R.layer(x, weight, *h, eps_rms=eps_rms), z, r
    return gpu.layer_dynamic(x, weight, phi, alpha, b, iters, eps_rms, eps_sk, post_mult)


@layer_dynamic.register_fake
def _(x, weight, phi, alpha, b, iters, eps_rms, eps_sk, post_mult):
    return torch.empty_like(x), *_coeff_fakes(x)[3:]


def _layer_dynamic_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # as _dynamic_setup: no zeros for z's and r's gradients
    x, weight, phi, alpha, b, iters, eps_rms, eps_sk, post_mult = inputs
    ctx.save_for_backward(x, weight, phi, alpha, b, output[1], output[2])
    ctx.cfg = (iters, eps_rms, eps_sk, post_mult)


@_custom_op("layer_dynamic_backward")
def layer_dynamic_backward(
    grad: Tensor, x: Tensor, weight: Tensor, phi: Tensor, alpha: Tensor, b: Tensor, z: Tensor,
    r: Tensor, iters: int, eps_rms: float, eps_sk: float, post_mult: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(∂x, ∂w, ∂φ, ∂α, ∂b) of the seed's layer, from the saved z and r."""
    if _on_cpu(x):
        n = x.shape[1]

        def fn(x_, w_, phi_, alpha_, b_):
            z_, r_ = R.projection(x_, phi_, eps_rms=eps_rms)
            logits = R.logits_from_projection(z_, r_, alpha_, b_, n)
            h = R.coefficients_from_logits(logits, n, **_kw(iters, eps_sk, post_mult))
            return R.layer(x_, w_, *h, eps_rms=eps_rms)

        return tuple(_ref_grads(fn, [x, weight, phi, alpha, b], [grad]))
    return gpu.layer_dynamic_backward(grad, x, weight, phi, alpha, b, z, r, iters, eps_rms,
                                      eps_sk, post_mult)  # fmt: skip


@layer_dynamic_backward.register_fake
def _(grad, x, weight, phi, alpha, b, z, r, *cfg):
    return tuple(torch.empty_like(t) for t in (x, weight, phi, alpha, b))


def _layer_dynamic_bwd(ctx, g, _gz, _gr):
    if g is None:  # x_next unused: every gradient is zero
        return (None,) * 9
    x, weight, phi, alpha, b, z, r = ctx.saved_tensors
    grads = layer_dynamic_backward(_c(g), x, weight, phi, alpha, b, z, r, *ctx.cfg)
    return *grads, None, None, None, None


layer_dynamic.register_autograd(_layer_dynamic_bwd, setup_context=_layer_dynamic_setup)


@_custom_op("layer_static")
def layer_static(
    x: Tensor, weight: Tensor, b: Tensor, iters: int, eps_rms: float, eps_sk: float,
    post_mult: float,
) -> Tensor:  # fmt: skip
    if _on_cpu(x):
        h = R.static_coefficients(b, x.shape[1], **_kw(iters, eps_sk, post_mult))
        return R.layer(x, weight, *h, eps_rms=eps_rms)
    return gpu.layer_static(x, weight, b, iters, eps_rms, eps_sk, post_mult)


@layer_static.register_fake
def _(x, weight, b, iters, eps_rms, eps_sk, post_mult):
    return torch.empty_like(x)


@_custom_op("layer_static_backward")
def layer_static_backward(
    grad: Tensor, x: Tensor, weight: Tensor, b: Tensor, iters: int, eps_rms: float, eps_sk: float,
    post_mult: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(∂x, ∂w, ∂b) of the seed's layer with static H."""
    if _on_cpu(x):

        def fn(x_, w_, b_):
            h = R.static_coefficients(b_, x_.shape[1], **_kw(iters, eps_sk, post_mult))
            return R.layer(x_, w_, *h, eps_rms=eps_rms)

        return tuple(_ref_grads(fn, [x, weight, b], [grad]))
    return gpu.layer_static_backward(grad, x, weight, b, iters, eps_rms, eps_sk, post_mult)


@layer_static_backward.register_fake
def _(grad, x, weight, b, *cfg):
    return tuple(torch.empty_like(t) for t in (x, weight, b))


def _layer_static_bwd(ctx, g):
    x, weight, b = ctx.saved_tensors
    grads = layer_static_backward(_c(g), x, weight, b, *ctx.cfg)
    return *grads, None, None, None, None


layer_static.register_autograd(_layer_static_bwd, setup_context=_static_setup)
