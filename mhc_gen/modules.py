"""nn.Modules over the mhc_gen ops.

- MHCLayer: the seed library's layer (F = RMSNorm·w), same constructor and
  meaning, so switching is a change of import.
- MHCConnection: mHC around any sublayer (attention, MLP): pre -> F -> post.
- expand_streams / reduce_streams: a model's entry (one stream copied n times)
  and exit (the mean of the streams).

A fresh layer starts as a plain pre-norm residual (mhc-math.md): b_post = 0
(H_post = 1), b_res = c·I with c large (H_res ≈ I), b_pre large on stream 0 and
small elsewhere (H_pre ≈ e_0), α = 0.01 and φ small.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops
from . import reference as R

_INIT_RES = 8.0  # b_res = c·I: H_res ≈ I
_INIT_PRE = 8.0  # H_pre ≈ (1, 0, ..., 0): σ(±8) ≈ 1 − 3e-4, 3e-4


def residual_init_bias(n: int) -> torch.Tensor:
    """Logits b [m] whose H is the plain residual: H_pre ≈ e_0, H_post = 1, H_res ≈ I."""
    pre = torch.full((n,), -_INIT_PRE)
    pre[0] = _INIT_PRE
    post = torch.zeros(n)
    res = torch.eye(n) * _INIT_RES
    return torch.cat([pre, post, res.flatten()])


class _Coefficients(nn.Module):
    """The learned H parameters of one layer: b, and for dynamic H φ and α."""

    def __init__(self, hidden_dim: int, n: int, dynamic: bool, *, alpha_init: float = 0.01,
                 phi_std: float = 1e-3, sinkhorn_iters: int = R.SINKHORN_ITERS,
                 eps_rms: float = R.EPS_RMS, eps_sk: float = R.EPS_SK,
                 post_mult: float = R.POST_MULT, impl: str = "kernels"):  # fmt: skip
        super().__init__()
        if impl not in ("kernels", "reference"):
            raise ValueError(f"impl must be 'kernels' or 'reference', got {impl!r}")
        self.impl = impl  # "reference": the float math of mhc_gen.reference, for comparison
        if not 1 <= n <= 32:
            raise ValueError(f"expansion_rate n = {n} is not supported: 1 <= n <= 32")
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {hidden_dim}")
        self.hidden_dim, self.n, self.dynamic = hidden_dim, n, dynamic
        self.config = dict(sinkhorn_iters=sinkhorn_iters, eps_rms=eps_rms, eps_sk=eps_sk,
                           post_mult=post_mult)  # fmt: skip
        self.b = nn.Parameter(residual_init_bias(n))
        if dynamic:
            m = R.num_logits(n)
            self.phi = nn.Parameter(torch.randn(n * hidden_dim, m) * phi_std)
            self.alpha = nn.Parameter(torch.full((3,), float(alpha_init)))
        else:
            self.register_parameter("phi", None)
            self.register_parameter("alpha", None)

    def extra_repr(self) -> str:
        kind = "dynamic" if self.dynamic else "static"
        return f"hidden_dim={self.hidden_dim}, n={self.n}, {kind} H"


def _reference_coefficients(layer: _Coefficients, x: torch.Tensor):
    kw = dict(layer.config)
    if layer.dynamic:
        return R.dynamic_coefficients(x, layer.phi, layer.alpha, layer.b, **kw)
    kw.pop("eps_rms")
    return R.static_coefficients(layer.b, layer.n, **kw)


class MHCLayer(_Coefficients):
    """The seed's mHC layer: x [..., n, C] -> H_res·x + H_postᵀ·RMSNorm(H_pre·x)·w.

    ``MHCLayer(hidden_dim, expansion_rate=4, use_dynamic_h=True)`` as in mHC.cu;
    the output has the input's dtype.
    """

    def __init__(self, hidden_dim: int, expansion_rate: int = 4, use_dynamic_h: bool = True,
                 **kw):  # fmt: skip
        super().__init__(hidden_dim, expansion_rate, use_dynamic_h, **kw)
        self.weight = nn.Parameter(torch.ones(hidden_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "reference":
            h = _reference_coefficients(self, x)
            return R.layer(x, self.weight, *h, eps_rms=self.config["eps_rms"])
        if self.dynamic:
            return ops.layer_dynamic(x, self.weight, self.phi, self.alpha, self.b, **self.config)
        return ops.layer_static(x, self.weight, self.b, **self.config)


class MHCConnection(_Coefficients):
    """mHC around any sublayer F: x [..., n, C] -> H_res·x + H_postᵀ·F(H_pre·x).

    F maps [..., C] to [..., C]; its output is cast to x's dtype (so F may run
    under autocast while the streams stay in their own dtype).
    """

    def __init__(self, sublayer: nn.Module, hidden_dim: int, n: int = 4, dynamic: bool = True,
                 **kw):  # fmt: skip
        super().__init__(hidden_dim, n, dynamic, **kw)
        self.sublayer = sublayer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if self.impl == "reference":
            h_pre, h_post, h_res = _reference_coefficients(self, x)
            y = self.sublayer(R.pre(x, h_pre)).to(x.dtype)
            return R.post(x, y, h_post, h_res)
        if self.dynamic:
            u, _, h_post, h_res = ops.pre_dynamic(x, self.phi, self.alpha, self.b, **cfg)
            y = self.sublayer(u).to(x.dtype)
            return ops.post_dynamic(x, y, h_post, h_res)
        u = ops.pre_static(x, self.b, **cfg)
        y = self.sublayer(u).to(x.dtype)
        return ops.post_static(x, y, self.b, **cfg)


def expand_streams(h: torch.Tensor, n: int) -> torch.Tensor:
    """[..., C] -> [..., n, C]: the model's entry, the embedding in every stream."""
    return h.unsqueeze(-2).expand(*h.shape[:-1], n, h.shape[-1]).contiguous()


def reduce_streams(x: torch.Tensor) -> torch.Tensor:
    """[..., n, C] -> [..., C]: the model's exit, the mean of the streams."""
    return x.mean(dim=-2)
