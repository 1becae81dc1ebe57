"""mhc_gen.gpu's Python side on CPU, with the launcher replaced by a recorder:
output shapes and dtypes, and that every kernel argument names an mhc::Ptr and
is a contiguous tensor."""

import math
import re

import pytest
import torch

from generator.render import INCLUDE
from generator.spec import Op
from mhc_gen import gpu
from mhc_gen import reference as R
from mhc_gen._launch import DTYPES, POINTERS

T, N, C = 5, 3, 8


@pytest.fixture
def launches(monkeypatch):
    calls = []

    def record(op, device, dtype, **kw):
        for name, value in kw.items():
            if isinstance(value, torch.Tensor):
                assert name in POINTERS, f"{op}: {name} is not an mhc::Ptr"
                assert value.is_contiguous(), f"{op}: {name} is not contiguous"
        calls.append(op)

    monkeypatch.setattr(gpu, "launch", record)
    monkeypatch.setattr(gpu, "_phi_splits", lambda t, k, device: 2)
    return calls


def _inputs(dtype=torch.bfloat16):
    m = R.num_logits(N)
    return dict(
        x=torch.randn(T, N, C).to(dtype),
        y=torch.randn(T, C).to(dtype),
        phi=torch.randn(N * C, m),
        alpha=torch.ones(3),
        b=torch.randn(m),
        w=torch.ones(C),
    )


def test_forward_wrappers(launches):
    v = _inputs()
    m = R.num_logits(N)
    u, hp, hq, hr, z, r = gpu.pre_dynamic(v["x"], v["phi"], v["alpha"], v["b"], 20, 1e-6, 1e-6, 2)
    assert u.shape == (T, C) and u.dtype == torch.bfloat16
    assert hr.shape == (T, N, N) and z.shape == (T, m) and r.shape == (T,)
    assert launches == [Op.PRE_DYN]
    out, z, r = gpu.layer_dynamic(v["x"], v["w"], v["phi"], v["alpha"], v["b"], 20, 1e-6, 1e-6, 2)
    assert out.shape == v["x"].shape and out.dtype == v["x"].dtype
    assert gpu.post_dynamic(v["x"], v["y"], hq, hr).shape == v["x"].shape
    assert gpu.post_static(v["x"], v["y"], v["b"], 20, 1e-6, 2).shape == v["x"].shape
    assert gpu.pre_static(v["x"], v["b"], 20, 1e-6, 2).shape == (T, C)
    assert [h.shape for h in gpu.static_coefficients(v["b"], N, 20, 1e-6, 2)] == [
        (N,),
        (N,),
        (N, N),
    ]


def test_projection_is_a_gemm_for_bf16_on_cuda_only(launches):
    v = _inputs()
    assert gpu.projection(v["x"], v["phi"]) is None  # CPU tensors: the kernels project
    assert gpu.projection(_inputs(torch.float32)["x"], v["phi"]) is None


def test_backward_wrappers(launches):
    v = _inputs()
    m = R.num_logits(N)
    g = torch.randn(T, N, C).to(torch.bfloat16)
    hq, hr = torch.rand(T, N), torch.rand(T, N, N)
    dx, dy, dhq, dhr = gpu.post_dynamic_backward(g, v["x"], v["y"], hq, hr)
    assert dx.shape == g.shape and dy.shape == (T, C) and dhr.shape == (T, N, N)
    dx, dy, db = gpu.post_static_backward(g, v["x"], v["y"], v["b"], 20, 1e-6, 2)
    assert db.shape == (m,)
    dx, db = gpu.pre_static_backward(v["y"], v["x"], v["b"], 20, 1e-6, 2)
    assert dx.shape == g.shape and db.shape == (m,)
    z, r = torch.randn(T, m), torch.rand(T) + 1
    dx, dphi, dalpha, db = gpu.pre_dynamic_backward(
        v["y"], None, hq, hr, v["x"], z, r, v["phi"], v["alpha"], v["b"], 20, 1e-6, 1e-6, 2
    )
    assert dphi.shape == v["phi"].shape and dalpha.shape == (3,) and db.shape == (m,)
    assert Op.PHI_GRAD_DYN in launches and Op.PRE_BWD_DYN in launches
    w = torch.ones(C)
    grads = gpu.layer_dynamic_backward(
        g, v["x"], w, v["phi"], v["alpha"], v["b"], z, r, 20, 1e-6, 1e-6, 2
    )
    assert [t.shape for t in grads] == [g.shape, w.shape, v["phi"].shape, (3,), (m,)]


def test_pointer_names_cover_every_enumerator():
    """Python passes pointers by position: one name per mhc::Ptr enumerator, in order."""
    text = (INCLUDE / "mhc" / "args.h").read_text()
    body = text[text.index("enum Ptr : int {") : text.index("kNumPtrs")]
    enumerators = re.findall(r"^\s+(k\w+)", body, re.M)
    assert len(POINTERS) == len(enumerators)
    for name, enumerator in zip(POINTERS, enumerators, strict=True):
        assert name.replace("_", "") == enumerator[1:].lower()


def _layer_backward_calls(monkeypatch, fused, dtype):
    calls = []
    monkeypatch.setattr(gpu, "launch", lambda op, device, dt, **kw: calls.append((op, dt, kw)))
    monkeypatch.setattr(gpu, "_phi_splits", lambda t, k, device: 1)
    monkeypatch.setattr(gpu, "_sm_count", lambda device: 2)
    monkeypatch.setattr(gpu, "_fused_layer_backward", lambda x: fused)
    v = _inputs(dtype)
    z, r = torch.randn(T, R.num_logits(N)), torch.rand(T) + 1
    g = torch.randn(T, N, C).to(dtype)
    w = torch.ones(C)
    dx, *_ = gpu.layer_dynamic_backward(g, v["x"], w, v["phi"], v["alpha"], v["b"], z, r, 20,
                                        1e-6, 1e-6, 2)  # fmt: skip
    dx_static, *_ = gpu.layer_static_backward(g, v["x"], w, v["b"], 20, 1e-6, 1e-6, 2)
    assert dx.dtype == dx_static.dtype == dtype
    return calls


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_layer_backward_keeps_du_in_fp32(monkeypatch, fused, dtype):
    """∂u never goes through x's dtype (in fp16 it can underflow; in bf16 ∂H_pre = ⟨∂u, x⟩
    lost all accuracy at n = 1): pre's backward (dynamic H only) runs in x's dtype on the
    path through z alone, without ∂u; static H needs no pre backward."""
    calls = _layer_backward_calls(monkeypatch, fused, dtype)
    ops = [op for op, _, _ in calls]
    assert Op.PRE_BWD_STATIC not in ops
    (pre,) = [c for c in calls if c[0] is Op.PRE_BWD_DYN]
    assert pre[1] is DTYPES[dtype] and pre[2]["grad_out"] is None
    assert pre[2]["grad_h_pre_in"].dtype == torch.float32
    if fused:
        # (∂φ by the kernel: these are CPU tensors, and cuBLAS serves only CUDA ones)
        assert ops == [Op.LAYER_BWD_DYN, Op.PRE_BWD_DYN, Op.PHI_GRAD_DYN, Op.LAYER_BWD_STATIC,
                       Op.COEFFS_BWD_STATIC]  # fmt: skip
        assert pre[2]["grad_x_in"] is calls[0][2]["grad_x"]
        for _, _, kw in (calls[0], calls[3]):  # ∂w: one row a block
            assert kw["grad_norm_weight"].shape == (kw["splits"], C)
    else:
        assert Op.POST_BWD_DYN in ops and Op.POST_BWD_STATIC in ops


def test_gemm_projection_leaves_r_to_the_kernel(monkeypatch):
    seen = []
    monkeypatch.setattr(gpu, "launch", lambda op, device, dtype, **kw: seen.append((op, kw)))
    monkeypatch.setattr(gpu, "_gemm_projection", lambda x: True)
    # CPU torch has no mm with out_dtype: an fp32 product stands in for cuBLAS.
    monkeypatch.setattr(gpu.torch, "mm", lambda a, b, out_dtype: a.float() @ b.float())
    v = _inputs()
    u, hp, hq, hr, z, r = gpu.pre_dynamic(v["x"], v["phi"], v["alpha"], v["b"], 20, 1e-6, 1e-6, 2)
    ((op, kw),) = seen
    assert op is Op.PRE_DYN and "r_in" not in kw and kw["r_out"] is r and "z_out" not in kw
    x2 = v["x"].float().view(T, -1)
    assert torch.allclose(kw["z_in"], x2 @ v["phi"], rtol=1e-4, atol=1e-4)


def test_wgmma_projection_takes_phi_split_t(monkeypatch):
    """At n = 4, where the wgmma form runs, φ's split goes K-major ([2·mp, n·C]: φ_hi's
    columns as rows, then φ_lo's), under its own pointer; elsewhere side by side."""
    seen = []
    monkeypatch.setattr(gpu, "launch", lambda op, device, dtype, **kw: seen.append(kw))
    monkeypatch.setattr(gpu, "_sm_count", lambda device: 7)
    n, c, m, mp = 4, 16, 24, 24
    x = torch.randn(T, n, c).to(torch.bfloat16)
    phi = torch.randn(n * c, m)
    assert not gpu._wgmma_projection(x)  # a CPU tensor
    monkeypatch.setattr(gpu, "_wgmma_projection", lambda x: True)
    gpu.projection_partials(x, phi)
    (kw,) = seen
    split = kw["phi_split_t"]
    assert "phi_split" not in kw and split.shape == (2 * mp, n * c)
    hi, lo = split[:mp].float(), split[mp:].float()
    assert torch.equal(hi, phi.t().bfloat16().float())
    assert torch.equal(lo, (phi.t() - hi).bfloat16().float())
    seen.clear()
    x3 = torch.randn(T, 3, c).to(torch.bfloat16)  # n = 3: the mma.sync form
    gpu.projection_partials(x3, torch.randn(3 * c, R.num_logits(3)))
    assert "phi_split_t" not in seen[0] and seen[0]["phi_split"].shape == (3 * c, 32)


def test_projection_kernel_gives_z_and_r_to_the_kernels_after_it(monkeypatch):
    """With the tensor-core projection, pre sums its partial z and Σx̄² and writes z and r;
    the layer takes H from one coefficients launch that does, then mixes with H given; the
    layer backward takes H from one launch on the saved z and r."""
    seen = []
    monkeypatch.setattr(gpu, "launch", lambda op, device, dtype, **kw: seen.append((op, kw)))
    monkeypatch.setattr(gpu, "_projection_kernel", lambda x, phi: True)
    monkeypatch.setattr(gpu, "_sm_count", lambda device: 7)
    monkeypatch.setattr(gpu, "_LAYER_BWD_H_ONCE_MIN_TOKENS", 0)
    monkeypatch.setattr(gpu, "_fused_layer_backward", lambda x: True)
    v, m = _inputs(), R.num_logits(N)
    u, hp, hq, hr, z, r = gpu.pre_dynamic(v["x"], v["phi"], v["alpha"], v["b"], 20, 1e-6, 1e-6, 2)
    (op1, proj), (op2, pre) = seen
    assert op1 is Op.PROJ_DYN and proj["splits"] == 1
    mp = -(-m // 8) * 8  # m = 15: φ padded to 16 columns, then split side by side
    split = proj["phi_split"]
    assert split.shape == (N * C, 2 * mp) and split.dtype == torch.bfloat16
    assert not split[:, m:mp].any() and not split[:, mp + m :].any()
    assert torch.equal(split[:, :m], v["phi"].bfloat16())
    assert proj["z_out"].shape == (1, T, m) and proj["r_out"].shape == (1, T)
    assert z.data_ptr() == proj["z_out"].data_ptr()  # one split: split 0 is z
    assert op2 is Op.PRE_DYN and pre["z_in"] is proj["z_out"] and pre["sq_in"] is proj["r_out"]
    assert pre["z_out"] is None and pre["r_out"] is r and pre["splits"] == 1
    seen.clear()
    monkeypatch.setattr(gpu, "_projection_splits", lambda t, n, k, device: 3)
    out, z, r = gpu.layer_dynamic(v["x"], v["w"], v["phi"], v["alpha"], v["b"], 20, 1e-6, 1e-6, 2)
    assert [op for op, _ in seen] == [Op.PROJ_DYN, Op.COEFFS_DYN, Op.LAYER_DYN]
    proj, coeffs, layer = (kw for _, kw in seen)
    assert coeffs["z_in"] is proj["z_out"] and coeffs["splits"] == 3 and coeffs["hidden"] == C
    assert coeffs["z_out"] is z and coeffs["r_out"] is r and coeffs.get("x") is None
    assert layer["h_res_in"] is coeffs["h_res"] and layer["h_pre_in"] is coeffs["h_pre"]
    assert layer.get("z_in") is None and layer.get("phi") is None and layer["out"] is out
    seen.clear()
    grad = torch.randn(T, N, C).to(torch.bfloat16)
    gpu._layer_front(grad, v["x"], v["w"], v["b"], 20, 1e-6, 1e-6, 2, z=z, r=r, phi=v["phi"],
                     alpha=v["alpha"])  # fmt: skip
    assert [op for op, _ in seen] == [Op.COEFFS_DYN, Op.LAYER_BWD_DYN]
    assert seen[0][1]["z_in"] is z and seen[0][1]["r_in"] is r
    assert seen[1][1]["h_post_in"] is seen[0][1]["h_post"]


def test_projection_splits_fill_the_gpu(monkeypatch):
    monkeypatch.setattr(gpu, "_sm_count", lambda device: 132)
    assert gpu._projection_splits(16384, 4, 16384, None) == 2  # 128 blocks of 128 tokens
    assert gpu._projection_splits(8192, 8, 32768, None) == 4  # 32 blocks of 256
    assert gpu._projection_splits(65536, 4, 16384, None) == 1
    assert gpu._projection_splits(64, 4, 4096, None) == 4  # each split ≥ 16 chunks of 64
    assert gpu._projection_splits(64, 2, 128, None) == 1


def test_pre_backward_with_the_dz_phi_gemm_skips_the_kernels_phase_3(monkeypatch):
    seen = []

    def record(op, device, dtype, **kw):
        seen.append((op, kw))
        if kw.get("grad_z") is not None:
            kw["grad_z"].normal_(), kw["grad_alpha_tok"].normal_(), kw["grad_logits"].zero_()

    monkeypatch.setattr(gpu, "launch", record)
    monkeypatch.setattr(gpu, "_gemm_dz_phi", lambda x, n: True)
    monkeypatch.setattr(gpu, "_phi_splits", lambda t, k, device: 2)
    strides = []

    def mm(a, b, out_dtype):
        strides.append(b.stride())
        return a.float() @ b.float()

    monkeypatch.setattr(gpu.torch, "mm", mm)
    v, m = _inputs(), R.num_logits(N)
    z, r = torch.randn(T, m), torch.rand(T) + 1
    dx_in = torch.randn(T, N, C).to(torch.bfloat16)
    dx, dphi, dalpha, db = gpu.pre_dynamic_backward(
        v["y"], None, None, None, v["x"], z, r, v["phi"], v["alpha"], v["b"], 20, 1e-6, 1e-6, 2,
        grad_x_in=dx_in,
    )  # fmt: skip
    # Phases 1-2 (∂z, ∂α, H_pre and ∂r in scratch), then the GEMM, then the ∂x epilogue.
    (op1, first), (op2, second) = seen[:2]
    assert op1 is op2 is Op.PRE_BWD_DYN
    assert first["grad_x"] is None and first["phi_t"] is None
    assert second["grad_x"] is dx and second["scratch"] is first["scratch"]
    assert second["grad_x_in"] is dx_in and second["grad_out"] is v["y"]
    assert second["sinkhorn_iters"] == 20 and second["x"] is v["x"]
    g = second["grad_x_gemm"]
    assert g.dtype == torch.float32 and g.shape == (T, N * C)
    assert torch.allclose(g, first["grad_z"] @ v["phi"].t(), rtol=1e-2, atol=1e-2)
    assert dx.dtype == torch.bfloat16 and dx.shape == (T, N, C)
    # φ's parts split along its rows as stored, given to the GEMM as a transposed view.
    assert strides[0] == (1, 3 * m)


class _CudaLike:
    """Stands in for a CUDA tensor where only the shape matters to a path choice."""

    is_cuda = True

    def __init__(self, *shape):
        self.shape = shape

    def numel(self):
        return math.prod(self.shape)


def test_projection_and_dz_phi_gemms_where_the_work_pays(monkeypatch):
    monkeypatch.setattr(gpu.torch.version, "hip", None)
    assert not gpu._gemm_projection(_CudaLike(320, 4, 1280))  # seed config: fused kernel
    assert gpu._gemm_projection(_CudaLike(16384, 4, 4096))
    assert gpu._gemm_projection(_CudaLike(32, 32, 1280))  # n = 32: m = 1088 logits a token
    assert gpu._gemm_projection(_CudaLike(128, 8, 1280))  # a token's n·C·m past the bound
    assert not gpu._gemm_projection(_CudaLike(512, 4, 1920))  # seed config: fused kernel
    assert not gpu._gemm_dz_phi(_CudaLike(16384, 8, 4096), 8)
    assert gpu._gemm_dz_phi(_CudaLike(1024, 16, 4096), 16)
    monkeypatch.setattr(gpu.torch.version, "hip", "6.2")
    assert not gpu._gemm_projection(_CudaLike(16384, 4, 4096))  # ROCm: no out_dtype mm
    assert not gpu._gemm_dz_phi(_CudaLike(1024, 32, 4096), 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("order, dim", [("hl", 1), ("hl", 0), ("hhl", 1), ("hlh", 0)])
def test_split_bf16_cat_is_split_then_cat(dtype, order, dim):
    """The GEMMs' hi + lo operands, written in place, are bitwise the old split-then-cat:
    hi = v rounded to bf16, lo = (v − hi in fp32) rounded; also from a transposed view."""
    g = torch.Generator().manual_seed(len(order) + dim)
    for scale in (1e-3, 1.0, 1e4):
        v = (torch.randn(37, 29, generator=g) * scale).to(dtype)
        v[0, :3] = torch.tensor([0.0, -0.0, torch.finfo(dtype).max])
        for src in (v, v.t()):
            hi = src.to(torch.bfloat16)
            lo = (src.float() - hi).to(torch.bfloat16)
            want = torch.cat([hi if p == "h" else lo for p in order], dim)
            got = gpu._split_bf16_cat(src, order, dim)
            assert got.dtype == torch.bfloat16 and got.shape == want.shape
            assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("t", [3, 2 * R.num_logits(N) + 1])  # stacked / output halves
def test_phi_grad_by_gemm_either_side_of_the_stacking_limit(monkeypatch, dtype, t):
    """∂φ = x̄ᵀ·∂z from the split operands: stacked along the reduction for few tokens,
    as output halves otherwise; both within the split's ~16 bits of float64."""
    products = []

    def mm(a, b, out_dtype):
        products.append(tuple(b.shape))
        return a.float() @ b.float()

    monkeypatch.setattr(gpu, "_gemm_phi_grad", lambda x: True)
    monkeypatch.setattr(gpu.torch, "mm", mm)
    g = torch.Generator().manual_seed(t)
    m = R.num_logits(N)
    x = torch.randn(t, N, C, generator=g).to(dtype)
    dz = torch.randn(t, m, generator=g)
    got = gpu._phi_grad(x, dz, None)
    want = x.double().view(t, -1).t() @ dz.double()
    assert got.dtype == torch.float32 and got.shape == want.shape
    stacked = t < 2 * m
    parts = 2 if dtype == torch.bfloat16 else 3
    assert products[0] == ((parts * t, m) if stacked else (t, 2 * m))
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def _split_as_the_kernel_does(op, device, dtype, *, n, hidden, tokens, splits, phi, out, **kw):
    """split.cuh's semantics from its launch arguments: [tokens, hidden] fp32 in, each
    row's n parts side by side, part p the lo half where bit p of splits is set."""
    assert op is Op.SPLIT_DYN and phi.dtype == torch.float32 and out.is_contiguous()
    v = phi.reshape(tokens, hidden)
    hi = v.to(torch.bfloat16)
    lo = (v - hi.float()).to(torch.bfloat16)
    rows = out.view(tokens, n, hidden)
    for p in range(n):
        rows[:, p] = lo if splits >> p & 1 else hi


@pytest.mark.parametrize("order", ["hl", "hhl", "hlh"])
@pytest.mark.parametrize("dim", [0, 1])
def test_split_kernel_arguments_give_torchs_split(monkeypatch, order, dim):
    """fp32 splits go to the one-pass kernel: its (rows, columns, parts, lo mask) give
    bitwise torch's split, along either dim (dim 0 as a single row of R·C columns)."""
    v = torch.randn(7, 24) * torch.logspace(-30, 30, 24)
    want = gpu._split_bf16_cat(v, order, dim)  # CPU: torch's passes
    monkeypatch.setattr(gpu, "_split_by_kernel", lambda v: True)
    monkeypatch.setattr(gpu, "launch", _split_as_the_kernel_does)
    got = gpu._split_bf16_cat(v, order, dim)
    assert got.shape == want.shape and torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_static_ops_take_h_from_one_launch_with_many_tokens(monkeypatch):
    """From _STATIC_H_ONCE_MIN_TOKENS tokens the static ops (forward; pre's and post's
    backward) launch the static coefficients once and hand their H to the kernel; below it
    they hand none."""
    calls = []
    monkeypatch.setattr(gpu, "launch", lambda op, device, dtype, **kw: calls.append((op, kw)))
    v = _inputs()
    g = torch.randn(T, N, C).to(torch.bfloat16)
    ops = (
        lambda: gpu.pre_static(v["x"], v["b"], 20, 1e-6, 2),
        lambda: gpu.post_static(v["x"], v["y"], v["b"], 20, 1e-6, 2),
        lambda: gpu.layer_static(v["x"], v["w"], v["b"], 20, 1e-6, 1e-6, 2),
        lambda: gpu._pre_static_grads(g[:, 0], v["x"], v["b"], 20, 1e-6, 2, None),
        lambda: gpu._post_static_grads(g, v["x"], v["y"], v["b"], 20, 1e-6, 2, None),
    )
    for threshold, once in ((T, True), (T + 1, False)):
        monkeypatch.setattr(gpu, "_STATIC_H_ONCE_MIN_TOKENS", threshold)
        for call in ops:
            calls.clear()
            call()
            kw = calls[1 if once else 0][1]
            given = [kw.get(k) for k in ("h_pre_in", "h_post_in", "h_res_in")]
            if once:
                assert calls[0][0] is Op.COEFFS_STATIC
                h = [calls[0][1][k] for k in ("h_pre", "h_post", "h_res")]
                assert all(a is b for a, b in zip(given, h, strict=True))
            else:
                assert len(calls) == 1 and given == [None, None, None]
    # fp32 pre backward keeps the per-block H (measured faster).
    calls.clear()
    gpu._pre_static_grads(g[:, 0].float(), v["x"].float(), v["b"], 20, 1e-6, 2, None)
    assert len(calls) == 1 and calls[0][1].get("h_pre_in") is None


def test_two_pass_layer_backward_hands_each_pass_what_the_last_wrote(monkeypatch):
    """H from the saved z and r; the sums pass writes ∂H and s, k; pre's token kernel takes
    ∂H (no ∂u, no ∂x) to ∂z and its scratch rows; the ∂x pass reads those and writes ∂x
    and the ∂w rows, which are summed."""
    seen = []
    monkeypatch.setattr(gpu, "launch", lambda op, device, dtype, **kw: seen.append((op, kw)))
    monkeypatch.setattr(gpu, "_two_pass_backward", lambda grad, x, w: True)
    monkeypatch.setattr(gpu, "_gemm_phi_grad", lambda x: False)
    monkeypatch.setattr(gpu, "_phi_splits", lambda t, k, device: 1)
    monkeypatch.setattr(gpu, "_sm_count", lambda device: 132)
    v, m = _inputs(), R.num_logits(N)
    z, r = torch.randn(T, m), torch.rand(T) + 0.5
    grad = torch.randn(T, N, C).to(torch.bfloat16)
    dx, dw, dphi, dalpha, db = gpu.layer_dynamic_backward(
        grad, v["x"], v["w"], v["phi"], v["alpha"], v["b"], z, r, 20, 1e-6, 1e-6, 2
    )
    ops = [op for op, _ in seen]
    assert ops == [
        Op.COEFFS_DYN,
        Op.LAYER_BWD_DYN,
        Op.PRE_BWD_DYN,
        Op.LAYER_BWD_DYN,
        Op.PHI_GRAD_DYN,
    ]
    coeffs, sums, token, dx_pass, _ = (kw for _, kw in seen)
    assert coeffs["z_in"] is z and coeffs["r_in"] is r
    assert sums.get("grad_x") is None and sums.get("grad_z") is None
    assert sums["h_pre_in"] is coeffs["h_pre"] and sums["layer_scale"].shape == (T, 2)
    assert token.get("grad_out") is None and token.get("grad_x") is None
    assert (
        token["grad_h_pre_in"] is sums["grad_h_pre"]
        and token["grad_h_res_in"] is sums["grad_h_res"]
    )
    assert dx_pass["grad_z"] is token["grad_z"] and dx_pass["scratch"] is token["scratch"]
    assert dx_pass["layer_scale"] is sums["layer_scale"] and dx_pass["grad_x"] is dx
    assert dx_pass["grad_norm_weight"].shape == (dx_pass["splits"], C)
    assert dx_pass["phi"] is v["phi"]
    assert dx_pass["phi_fragments"].shape == (N * C, 16 * -(-m // 16))  # 16 words a k-step
    assert dx.shape == v["x"].shape and dw.shape == (C,) and dphi.shape == v["phi"].shape
    assert dalpha.shape == (3,) and db.shape == (m,)


def test_two_pass_dx_grid_is_one_wave(monkeypatch):
    monkeypatch.setattr(gpu, "_sm_count", lambda device: 132)
    assert gpu._layer_dx_splits(16384, 4096, None) == 16  # 16 column blocks: 256 of 264
    assert gpu._layer_dx_splits(16384, 7168, None) == 9
    assert gpu._layer_dx_splits(20, 64, None) == 2  # no more than the token tiles
