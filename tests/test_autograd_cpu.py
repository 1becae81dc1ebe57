"""Autograd through the torch.ops.mhc_gen custom ops on CPU (float64): the
backward wiring, and the seed layer's composed backward, against the reference."""

import pytest
import torch

import mhc_gen
from mhc_gen import reference as R

T, N, C = 5, 3, 7


def _leaves(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = R.num_logits(N)
    d = dict(dtype=torch.float64)
    return dict(
        x=torch.randn(T, N, C, generator=g, **d),
        y=torch.randn(T, C, generator=g, **d),
        phi=torch.randn(N * C, m, generator=g, **d) * 0.3,
        alpha=torch.tensor([0.9, 1.1, 1.3], **d),
        b=torch.randn(m, generator=g, **d),
        w=1 + 0.1 * torch.randn(C, generator=g, **d),
    )


CASES = {
    "pre_dynamic": (
        lambda v: mhc_gen.pre_dynamic(v["x"], v["phi"], v["alpha"], v["b"], sinkhorn_iters=6),
        lambda v: (lambda h: (R.pre(v["x"], h[0]), *h))(
            R.dynamic_coefficients(v["x"], v["phi"], v["alpha"], v["b"], sinkhorn_iters=6)
        ),
        ("x", "phi", "alpha", "b"),
    ),
    "dynamic_coefficients": (
        lambda v: mhc_gen.dynamic_coefficients(v["x"], v["phi"], v["alpha"], v["b"]),
        lambda v: R.dynamic_coefficients(v["x"], v["phi"], v["alpha"], v["b"]),
        ("x", "phi", "alpha", "b"),
    ),
    "static_coefficients": (
        lambda v: mhc_gen.static_coefficients(v["b"], N),
        lambda v: R.static_coefficients(v["b"], N),
        ("b",),
    ),
    "pre_static": (
        lambda v: mhc_gen.pre_static(v["x"], v["b"]),
        lambda v: R.pre(v["x"], R.static_coefficients(v["b"], N)[0]),
        ("x", "b"),
    ),
    "post_dynamic": (
        lambda v: mhc_gen.post_dynamic(v["x"], v["y"], *_h(v)),
        lambda v: R.post(v["x"], v["y"], *_h(v)),
        ("x", "y", "phi", "alpha", "b"),
    ),
    "post_static": (
        lambda v: mhc_gen.post_static(v["x"], v["y"], v["b"]),
        lambda v: R.post(v["x"], v["y"], *R.static_coefficients(v["b"], N)[1:]),
        ("x", "y", "b"),
    ),
    "layer_dynamic": (
        lambda v: mhc_gen.layer_dynamic(v["x"], v["w"], v["phi"], v["alpha"], v["b"]),
        lambda v: R.layer_dynamic(v["x"], v["w"], v["phi"], v["alpha"], v["b"]),
        ("x", "w", "phi", "alpha", "b"),
    ),
    "layer_static": (
        lambda v: mhc_gen.layer_static(v["x"], v["w"], v["b"]),
        lambda v: R.layer_static(v["x"], v["w"], v["b"]),
        ("x", "w", "b"),
    ),
}


def _h(v):
    _, h_post, h_res = R.dynamic_coefficients(v["x"], v["phi"], v["alpha"], v["b"])
    return h_post, h_res


def _grads(fn, v, names, seed):
    leaves = {k: t.clone().requires_grad_(k in names) for k, t in v.items()}
    outs = fn(leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    return torch.autograd.grad(loss, [leaves[k] for k in names])


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_match_reference(case):
    ours, ref, names = CASES[case]
    v = _leaves()
    for got, want, name in zip(_grads(ours, v, names, 1), _grads(ref, v, names, 1), names,
                               strict=True):  # fmt: skip
        torch.testing.assert_close(got, want, msg=lambda m, n=name: f"∂{n}: {m}")
