"""Every built forward variant against the float64 reference, on the GPU.

Each variant is forced (not only the one the selector picks) on Hypothesis-drawn
shapes and parameters; outputs start as NaN so unwritten elements fail; a second
run must give bitwise the same result.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mhc_gen
from generator.spec import Op, parse
from mhc_gen import gpu, reference
from mhc_gen._launch import TORCH_DTYPES, forced_variant, poisoned_outputs
from mhc_gen.testing import GRAD_TOLERANCES, TOLERANCES, assert_close, bitwise_equal

pytestmark = pytest.mark.gpu


def _variants() -> list[str]:
    if not torch.cuda.is_available():
        return []
    # The projection's own test: tests/gpu/test_projection.py.
    return [k for k in mhc_gen.kernels() if not parse(k).op.backward and "proj_dyn" not in k]


VARIANTS = _variants()


def test_variants_are_built():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    assert VARIANTS, "no kernels built for this GPU: run python build.py"


# Shapes: odd token counts, T = 1, C not a multiple of 8, n = 3 and 5 for run-time n.
TOKENS = st.one_of(st.just(1), st.integers(1, 37), st.sampled_from([64, 129]))
SMALL_C = st.one_of(st.integers(1, 40), st.integers(41, 700), st.sampled_from([8, 64, 1000]))
ANY_N = st.one_of(st.sampled_from([1, 3, 5, 32]), st.integers(1, 32))


def _shape(spec, data):
    n = spec.n if spec.n is not None else data.draw(ANY_N, label="n")
    if spec.hidden is not None:
        c = spec.hidden
    else:
        c = data.draw(SMALL_C if n <= 8 else st.integers(1, 160), label="C")
    t = data.draw(TOKENS if c * n <= 50_000 else st.integers(1, 9), label="T")
    lead = data.draw(st.sampled_from([(t,), (1, t)] + ([(t // 2, 2)] if t % 2 == 0 else [])))
    return lead, n, c


def _params(n, c, data, device):
    m = reference.num_logits(n)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    alpha = data.draw(st.sampled_from([0.01, 1.0]), label="alpha")
    phi_scale = data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="phi_scale")
    phi = torch.randn(n * c, m, generator=g) * phi_scale / (n * c) ** 0.5
    b = torch.randn(m, generator=g) * data.draw(st.sampled_from([0.5, 2.0]), label="b_scale")
    return dict(
        phi=phi.to(device),
        alpha=torch.tensor([alpha, alpha * 0.7, alpha * 1.3]).to(device),
        b=b.to(device),
        weight=(1 + 0.2 * torch.randn(c, generator=g)).to(device),
        gen=g,
    )


def _run_twice(fn):
    """Runs fn twice with poisoned outputs; asserts bitwise-identical results."""
    with poisoned_outputs():
        first = fn()
        second = fn()
    first = first if isinstance(first, tuple) else (first,)
    second = second if isinstance(second, tuple) else (second,)
    for a, b in zip(first, second, strict=True):
        assert bitwise_equal(a, b), "second run differs bitwise"
    return first


def _d(t):
    return t.double().cpu()


@pytest.mark.parametrize("name", VARIANTS)
@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
@given(data=st.data())
def test_forward_variant(name, data):
    spec = parse(name)
    if spec.op is Op.SPLIT_DYN:
        _check_split(name, data)
        return
    dev = torch.device("cuda")
    dtype = TORCH_DTYPES[spec.dtype]
    lead, n, c = _shape(spec, data)
    # bf16 x on CUDA: the projection as a cuBLAS GEMM, or (as on ROCm) in the fused kernel.
    gemm = data.draw(st.booleans(), label="gemm") if spec.op.dynamic else True
    p = _params(n, c, data, dev)
    x = torch.randn(*lead, n, c, generator=p["gen"]).to(dtype).to(dev)
    y = torch.randn(*lead, c, generator=p["gen"]).to(dtype).to(dev)
    phi, alpha, b, w = p["phi"], p["alpha"], p["b"], p["weight"]
    kw = dict(sinkhorn_iters=data.draw(st.sampled_from([20, 20, 5, 0]), label="iters"))
    # Static H from one coefficients launch (as from _STATIC_H_ONCE_MIN_TOKENS tokens) or
    # computed in each block.
    static_fwd = spec.op in (Op.PRE_STATIC, Op.POST_STATIC, Op.LAYER_STATIC)
    h_once = data.draw(st.booleans(), label="static_h_once") if static_fwd else False
    ref_dyn = reference.dynamic_coefficients(_d(x), _d(phi), _d(alpha), _d(b), **kw)
    ref_static = reference.static_coefficients(_d(b), n, **kw)

    with (
        forced_variant(name),
        mock.patch.object(gpu, "_gemm_projection", lambda x: gemm),
        mock.patch.object(gpu, "_STATIC_H_ONCE_MIN_TOKENS", 0 if h_once else 1 << 62),
    ):
        if spec.op is Op.COEFFS_DYN:
            got = _run_twice(lambda: mhc_gen.dynamic_coefficients(x, phi, alpha, b, **kw))
            for g_, r_, w_ in zip(got, ref_dyn, ("H_pre", "H_post", "H_res"), strict=True):
                assert_close(g_, r_, w_)
        elif spec.op is Op.COEFFS_STATIC:
            got = _run_twice(lambda: mhc_gen.static_coefficients(b, n, **kw))
            for g_, r_, w_ in zip(got, ref_static, ("H_pre", "H_post", "H_res"), strict=True):
                assert_close(g_, r_, w_)
        elif spec.op is Op.PRE_DYN:
            got = _run_twice(lambda: mhc_gen.pre_dynamic(x, phi, alpha, b, **kw))
            assert_close(got[0], reference.pre(_d(x), ref_dyn[0]), "u")
            for g_, r_, w_ in zip(got[1:], ref_dyn, ("H_pre", "H_post", "H_res"), strict=True):
                assert_close(g_, r_, w_)
        elif spec.op is Op.PRE_STATIC:
            (u,) = _run_twice(lambda: mhc_gen.pre_static(x, b, **kw))
            assert_close(u, reference.pre(_d(x), ref_static[0]), "u")
        elif spec.op is Op.POST_DYN:
            h_post, h_res = (h.float().to(dev) for h in ref_dyn[1:])
            (out,) = _run_twice(lambda: mhc_gen.post_dynamic(x, y, h_post, h_res))
            assert_close(out, reference.post(_d(x), _d(y), _d(h_post), _d(h_res)), "x_next")
        elif spec.op is Op.POST_STATIC:
            (out,) = _run_twice(lambda: mhc_gen.post_static(x, y, b, **kw))
            assert_close(out, reference.post(_d(x), _d(y), *ref_static[1:]), "x_next")
        elif spec.op is Op.LAYER_DYN:
            (out,) = _run_twice(lambda: mhc_gen.layer_dynamic(x, w, phi, alpha, b, **kw))
            assert_close(out, reference.layer(_d(x), _d(w), *ref_dyn), "x_next")
        elif spec.op is Op.LAYER_STATIC:
            (out,) = _run_twice(lambda: mhc_gen.layer_static(x, w, b, **kw))
            assert_close(out, reference.layer(_d(x), _d(w), *ref_static), "x_next")
        else:
            raise AssertionError(f"untested op {spec.op}")


def _check_split(name, data):
    """The one-pass bf16 split: bitwise torch's (hi = v rounded, lo = v − hi rounded) for
    every order and dim, odd widths, a misaligned v (the scalar path) and values from
    subnormal to near overflow."""
    rows = data.draw(st.one_of(st.integers(1, 9), st.integers(10, 300)), label="rows")
    cols = data.draw(st.one_of(st.integers(1, 40), st.sampled_from([24, 1088, 4099])), label="C")
    order = data.draw(st.sampled_from(["hl", "hhl", "hlh"]), label="order")
    dim = data.draw(st.sampled_from([0, 1]), label="dim")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    v = torch.randn(rows * cols + 1, generator=g) * 10.0 ** torch.randint(
        -40, 38, (1,), generator=g
    )
    v[0] = 3.0e38
    offset = data.draw(st.sampled_from([0, 1]), label="offset")  # 1: 4-byte aligned only
    v = v[offset : offset + rows * cols].view(rows, cols)
    want = gpu._split_bf16_cat(v, order, dim)  # CPU: torch's passes
    dev_v = (
        v.cuda()
        if not offset
        else torch.empty(rows * cols + 1, device="cuda")[1:].view(rows, cols).copy_(v)
    )
    with forced_variant(name):
        (got,) = _run_twice(lambda: gpu._split_bf16_cat(dev_v, order, dim))
    assert bitwise_equal(got.cpu(), want), f"split {order} along {dim} differs from torch's"


@pytest.mark.parametrize("op", ["pre_static", "post_static", "layer_static"])
@pytest.mark.parametrize(("n", "c"), [(4, 4096), (3, 77), (32, 64)])
def test_static_h_once_is_bitwise_the_per_block_h(op, n, c):
    """A static forward op handed H from one coefficients launch (many tokens) gives bitwise
    the result of its blocks computing H themselves (few tokens): the same coefficients()."""
    g = torch.Generator().manual_seed(1000 * n + c)
    dev = torch.device("cuda")
    x = torch.randn(37, n, c, generator=g).bfloat16().to(dev)
    y = torch.randn(37, c, generator=g).bfloat16().to(dev)
    b = (2 * torch.randn(reference.num_logits(n), generator=g)).to(dev)
    w = (1 + 0.2 * torch.randn(c, generator=g)).to(dev)
    call = {
        "pre_static": lambda: mhc_gen.pre_static(x, b),
        "post_static": lambda: mhc_gen.post_static(x, y, b),
        "layer_static": lambda: mhc_gen.layer_static(x, w, b),
    }[op]
    outs = []
    for threshold in (0, 1 << 62):
        with mock.patch.object(gpu, "_STATIC_H_ONCE_MIN_TOKENS", threshold), poisoned_outputs():
            outs.append(call())
    assert not outs[0].isnan().any()
    assert bitwise_equal(outs[0], outs[1]), f"{op}: H from one launch differs bitwise"


@pytest.mark.parametrize(("n", "c"), [(32, 1280), (16, 2560), (20, 1400)])
def test_layer_row_groups_are_bitwise_the_whole_rows(n, c):
    """At n ≥ 16 over few tokens the layer's blocks split x_next's rows and columns (37 tokens:
    10 token blocks, so several row groups and column chunks, the last one ragged at C =
    1400); at 1100 tokens each block writes whole tokens. The first 37 tokens of the long call
    are bitwise the short call (static H: no projection to differ). Two tokens of these sizes
    pass the staged kernel's 100 KB: token_kernel serves both."""
    g = torch.Generator().manual_seed(n * c)
    dev = torch.device("cuda")
    x = torch.randn(1100, n, c, generator=g).bfloat16().to(dev)
    b = (2 * torch.randn(reference.num_logits(n), generator=g)).to(dev)
    w = (1 + 0.2 * torch.randn(c, generator=g)).to(dev)
    with poisoned_outputs():
        short = mhc_gen.layer_static(x[:37].contiguous(), w, b)
        whole = mhc_gen.layer_static(x, w, b)
    assert not short.isnan().any()
    assert bitwise_equal(short, whole[:37]), "row groups differ from whole rows bitwise"


@pytest.mark.parametrize(
    "n, c, dtype",
    [
        (4, 64, torch.bfloat16),
        (4, 6144, torch.bfloat16),
        (8, 4352, torch.bfloat16),
        (4, 4352, torch.float32),
        (4, 1280, torch.bfloat16),
        (4, 1280, torch.float32),
        (4, 4096, torch.bfloat16),
    ],
    ids=["staged", "at-the-limit", "past-it-bf16", "past-it-fp32", "h1280", "h1280-fp32", "h4096"],
)
def test_fused_layer_either_side_of_the_staging_limit(n, c, dtype):
    """The static-H fused layer stages x in shared memory, two tokens a block, while they and
    the block's other shared memory fit in 100 KB (64 KB on ROCm: n = 4, C = 6144 bf16 is
    just inside on CUDA), and re-reads it from global memory past that; 5 tokens make a
    block of four (double-buffered) and a block of one. The dynamic layer keeps its tile's
    tokens of x in shared memory while they fit in 72 KB: C = 64 (tile 2, run-time hidden),
    C = 1280 (compile-time hidden: tile 4 in bf16, 2 in fp32) and C = 4096 bf16 (tile 2, two
    32 KB tokens). Both paths of each, and the dynamic pre, against float64."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    t, m = 5, reference.num_logits(n)
    g = torch.Generator().manual_seed(n * c)
    x = torch.randn(t, n, c, generator=g).to(dtype)
    phi = torch.randn(n * c, m, generator=g) / (n * c) ** 0.5
    alpha, b = torch.tensor([1.0, 0.8, 1.2]), torch.randn(m, generator=g)
    w = 1 + 0.2 * torch.randn(c, generator=g)
    d = [v.double() for v in (x, w, phi, alpha, b)]
    want = {
        "layer_dynamic": reference.layer_dynamic(*d),
        "layer_static": reference.layer_static(d[0], d[1], d[4]),
        "pre_dynamic": reference.pre(d[0], reference.dynamic_coefficients(d[0], *d[2:])[0]),
    }
    xg, wg, pg, ag, bg = (v.cuda() for v in (x, w, phi, alpha, b))
    got = {
        "layer_dynamic": _run_twice(lambda: mhc_gen.layer_dynamic(xg, wg, pg, ag, bg)),
        "layer_static": _run_twice(lambda: mhc_gen.layer_static(xg, wg, bg)),
        "pre_dynamic": _run_twice(lambda: mhc_gen.pre_dynamic(xg, pg, ag, bg)[0]),
    }
    for name, e in want.items():
        assert_close(got[name][0], e, name, tol=TOLERANCES[dtype])


def test_tolerance_table_covers_every_gpu_dtype():
    assert set(TORCH_DTYPES.values()) <= set(TOLERANCES)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_empty_tokens(dtype):
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    n, c = 4, 64
    x = torch.randn(0, n, c, device="cuda", dtype=dtype)
    y = torch.randn(0, c, device="cuda", dtype=dtype)
    m = reference.num_logits(n)
    phi = torch.zeros(n * c, m, device="cuda")
    alpha = torch.ones(3, device="cuda")
    b = torch.zeros(m, device="cuda")
    u, hp, hq, hr = mhc_gen.pre_dynamic(x, phi, alpha, b)
    assert u.shape == (0, c) and hr.shape == (0, n, n)
    assert mhc_gen.post_static(x, y, b).shape == (0, n, c)
    assert mhc_gen.layer_dynamic(x, torch.ones(c, device="cuda"), phi, alpha, b).shape == x.shape


def test_selected_variant_runs_on_other_stream():
    """The op runs on the caller's current stream."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    x = torch.randn(33, 4, 1280, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(24, device="cuda")
    w = torch.ones(1280, device="cuda")
    expected = mhc_gen.layer_static(x, w, b)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = mhc_gen.layer_static(x, w, b)
    torch.cuda.current_stream().wait_stream(s)
    assert bitwise_equal(got, expected)


def test_bad_input_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    n, c = 4, 64
    m = reference.num_logits(n)
    x = torch.randn(3, n, c, device="cuda", dtype=torch.bfloat16)
    phi, alpha, b = (
        torch.zeros(n * c, m, device="cuda"),
        torch.ones(3, device="cuda"),
        torch.zeros(m, device="cuda"),
    )
    with pytest.raises(ValueError, match="is on cpu but x is on cuda"):
        mhc_gen.pre_dynamic(x, phi.cpu(), alpha, b)
    with pytest.raises(ValueError, match="phi must have dtype torch.float32"):
        mhc_gen.pre_dynamic(x, phi.bfloat16(), alpha, b)
    with pytest.raises(ValueError, match="x must be contiguous"):
        mhc_gen.pre_static(x.transpose(0, 1), b)
    with pytest.raises(ValueError, match="not supported on GPU"):
        mhc_gen.pre_static(x.double(), b)
    with pytest.raises(ValueError, match="y must have dtype"):
        mhc_gen.post_static(x, torch.randn(3, c, device="cuda"), b)
    with pytest.raises(ValueError, match="n = 33"):
        mhc_gen.pre_static(
            torch.randn(2, 33, 8, device="cuda"), torch.zeros(33 * 35, device="cuda")
        )


def test_jit_compiles_a_shape_outside_the_prebuilt_set(tmp_path, monkeypatch):
    """n = 3 is served by the run-time-n variant; MHC_GEN_JIT=specialize compiles
    pre_dyn_n3 on first use into the cache, and its result matches the reference."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    monkeypatch.setenv("MHC_GEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MHC_GEN_JIT", "specialize")
    n, c, t = 3, 203, 9
    m = reference.num_logits(n)
    x = torch.randn(t, n, c, device="cuda")
    phi = torch.randn(n * c, m, device="cuda") / (n * c) ** 0.5
    alpha = torch.tensor([1.0, 0.8, 1.2], device="cuda")
    b = torch.randn(m, device="cuda")
    with poisoned_outputs():
        u, h_pre, h_post, h_res = mhc_gen.pre_dynamic(x, phi, alpha, b)
    built = [p.name for p in tmp_path.rglob("*.so")]
    assert any(name.startswith("_mhc_gen_cuda_jit_pre_dyn_n3_hany_fp32") for name in built), built
    want = reference.dynamic_coefficients(_d(x), _d(phi), _d(alpha), _d(b))
    assert_close(u, reference.pre(_d(x), want[0]), "u")
    assert_close(h_res, want[2], "H_res")


@pytest.mark.parametrize("n", [3, 7])
def test_jit_compile_time_odd_n_post(tmp_path, monkeypatch, n):
    """Compile-time n whose padded H_res rows are whole quads (n = 3, 7; the full build's
    11 and 15 too) once read a fourth stream past xs in post's forward: x_next was NaN.
    MHC_GEN_JIT=specialize compiles post_dyn_n{n} and its backward; both against float64."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    monkeypatch.setenv("MHC_GEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MHC_GEN_JIT", "specialize")
    t, c = 5, 96
    g = torch.Generator().manual_seed(n)
    x = torch.randn(t, n, c, generator=g).cuda().requires_grad_()
    y = torch.randn(t, c, generator=g).cuda().requires_grad_()
    h_post = (2 * torch.rand(t, n, generator=g)).cuda().requires_grad_()
    h_res = torch.softmax(torch.randn(t, n, n, generator=g), -1).cuda().requires_grad_()
    up = torch.randn(t, n, c, generator=g).cuda()
    with poisoned_outputs():
        out = mhc_gen.post_dynamic(x, y, h_post, h_res)
        grads = torch.autograd.grad(out, [x, y, h_post, h_res], up)
    built = [p.name for p in tmp_path.rglob("*.so")]
    for op in ("post_dyn", "post_bwd_dyn"):
        assert any(f"_jit_{op}_n{n}_hany_fp32" in name for name in built), built
    leaves = [_d(v).detach().requires_grad_() for v in (x, y, h_post, h_res)]
    want = reference.post(*leaves)
    assert_close(out, want, "x_next")
    want_grads = torch.autograd.grad(want, leaves, _d(up))
    for got, ref, name in zip(grads, want_grads, ("∂x", "∂y", "∂H_post", "∂H_res"), strict=True):
        assert_close(got, ref, name, GRAD_TOLERANCES[torch.float32])
