"""Bad input, edge numerics, concurrency and 64-bit indexing on the GPU.

Every bad input raises a ValueError that says what is wrong and writes nothing
to any input; NaN/Inf in one token stays in that token; two streams or two
threads give the serial results; tensors over 2³¹ elements index correctly.
"""

from __future__ import annotations

import threading

import pytest
import torch

import mhc_gen
from mhc_gen import reference as R
from mhc_gen.testing import bitwise_equal

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("no GPU", allow_module_level=True)

N, C, T = 4, 64, 6


def _inputs(dtype=torch.bfloat16, device="cuda"):
    g = torch.Generator().manual_seed(0)
    m = R.num_logits(N)
    return dict(
        x=torch.randn(T, N, C, generator=g).to(dtype).to(device),
        y=torch.randn(T, C, generator=g).to(dtype).to(device),
        phi=(torch.randn(N * C, m, generator=g) * 0.1).to(device),
        alpha=torch.ones(3).to(device),
        b=torch.randn(m, generator=g).to(device),
        w=torch.ones(C).to(device),
    )


def _strided(x):
    """x's values and shape in a non-contiguous layout."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _cases(v):
    """(what, call, expected message) for each bad input."""
    x, y, phi, alpha, b, w = v["x"], v["y"], v["phi"], v["alpha"], v["b"], v["w"]
    return [
        ("rank", lambda: mhc_gen.pre_static(x[0, 0], b), "shape"),
        ("n > 32", lambda: mhc_gen.pre_static(x.new_zeros(2, 33, C), b), "n = 33"),
        ("n mismatch", lambda: mhc_gen.pre_dynamic(x[:, :3].contiguous(), phi, alpha, b), "phi"),
        ("C mismatch", lambda: mhc_gen.post_static(x, y[:, :-1].contiguous(), b), "y must"),
        ("mixed dtypes", lambda: mhc_gen.post_static(x, y.float(), b), "dtype"),
        ("param dtype", lambda: mhc_gen.pre_dynamic(x, phi.double(), alpha, b), "float32"),
        ("CPU/GPU mix", lambda: mhc_gen.pre_dynamic(x, phi.cpu(), alpha, b), "is on cpu"),
        ("non-contiguous", lambda: mhc_gen.post_static(_strided(x), y, b), "contiguous"),
        ("overlapping", lambda: mhc_gen.pre_static(x[:1].expand(T, N, C), b), "contiguous"),
        ("weight shape", lambda: mhc_gen.layer_static(x, w[:-1], b), "weight"),
    ]


def test_bad_input_raises_and_writes_nothing():
    v = _inputs()
    before = {k: t.clone() for k, t in v.items()}
    for what, call, msg in _cases(v):
        with pytest.raises(ValueError, match=msg):
            call()
        for k, t in v.items():
            assert bitwise_equal(t, before[k]), f"{what}: input {k} was written"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_two_gpus():
    v = _inputs()
    with pytest.raises(ValueError, match="cuda:1"):
        mhc_gen.pre_dynamic(v["x"], v["phi"].to("cuda:1"), v["alpha"], v["b"])


def test_zero_tokens():
    v = _inputs()
    x0, y0 = v["x"][:0], v["y"][:0]
    assert mhc_gen.post_static(x0, y0, v["b"]).shape == (0, N, C)
    u, *_ = mhc_gen.pre_dynamic(x0, v["phi"], v["alpha"], v["b"])
    assert u.shape == (0, C)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dynamic", [True, False])
def test_non_finite_stays_in_its_token(bad, dynamic):
    v = _inputs()
    dirty = v["x"].clone()
    dirty[2, 1, 5] = bad

    def run(x):
        if dynamic:
            return mhc_gen.layer_dynamic(x, v["w"], v["phi"], v["alpha"], v["b"])
        return mhc_gen.layer_static(x, v["w"], v["b"])

    clean, out = run(v["x"]), run(dirty)
    others = [t for t in range(T) if t != 2]
    assert bitwise_equal(out[others], clean[others])
    assert not torch.isfinite(out[2]).all()


def test_fp16_overflow_is_inf_in_its_token_only():
    """fp16: the math is fp32; only a stored value beyond ±65504 rounds to ±inf (as in
    torch's own fp16 ops). No NaN from finite input, and other tokens are untouched."""
    v = _inputs(torch.float16)
    x, y = v["x"].clone(), v["y"].clone()
    x[2], y[2] = 60000.0, 60000.0
    clean = mhc_gen.post_static(v["x"], v["y"], v["b"])
    out = mhc_gen.post_static(x, y, v["b"])
    others = [t for t in range(T) if t != 2]
    assert bitwise_equal(out[others], clean[others])
    assert torch.isinf(out[2]).any() and not torch.isnan(out[2]).any()
    u, h_pre, h_post, h_res = mhc_gen.pre_dynamic(x, v["phi"], v["alpha"], v["b"])
    assert torch.isfinite(h_pre).all() and torch.isfinite(h_res).all()
    assert not torch.isnan(u).any()


def test_two_streams_and_two_threads_match_serial():
    v = _inputs()

    def work():
        u, _, h_post, h_res = mhc_gen.pre_dynamic(v["x"], v["phi"], v["alpha"], v["b"])
        return mhc_gen.post_dynamic(v["x"], v["y"], h_post, h_res)

    serial = work()
    streams = [torch.cuda.Stream() for _ in range(2)]
    results = [None, None]

    def on_stream(i):
        streams[i].wait_stream(torch.cuda.default_stream())
        with torch.cuda.stream(streams[i]):
            results[i] = work()
        streams[i].synchronize()

    threads = [threading.Thread(target=on_stream, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for r in results:
        assert bitwise_equal(r, serial)


def test_over_two_to_the_31_elements():
    """x of 2³¹ + 2¹⁴ elements: the last tokens index past 32 bits."""
    n, c = 4, 4096
    t = (2**31) // (n * c) + 1
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs ~20 GB of GPU memory")
    x = torch.empty(t, n, c, dtype=torch.bfloat16, device="cuda")
    x.view(-1)[: 2**20].normal_()
    x[-2:].normal_()
    y = torch.randn(t, c, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(R.num_logits(n), device="cuda")
    out = mhc_gen.post_static(x, y, b)
    _, h_post, h_res = R.static_coefficients(b.double().cpu(), n)
    want = R.post(x[-2:].double().cpu(), y[-2:].double().cpu(), h_post, h_res)
    torch.testing.assert_close(out[-2:].double().cpu(), want, rtol=1.6e-2, atol=1.6e-2)
