"""The fused layer's split of rows and columns over blocks at n ≥ 16 and few tokens
(templates/include/mhc/layer_split.h), compiled for the host: every row and column of a token
is owned by exactly one block, no block is left without work, and n < 16 never splits."""

import ctypes

import pytest
from hypothesis import given
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def split(host_shim):
    fn = host_shim("layer_split").shim_layer_split

    def call(nb, token_blocks, n, c, vec):
        g, k, r, w = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_longlong()
        outs = map(ctypes.byref, (g, k, r, w))
        fn(nb, ctypes.c_longlong(token_blocks), n, ctypes.c_longlong(c), vec, *outs)
        return g.value, k.value, r.value, w.value

    return call


@given(
    nb=st.sampled_from([2, 4, 8, 16, 32]),
    n=st.integers(1, 32),
    token_blocks=st.one_of(st.integers(1, 300), st.just(10**6)),
    c=st.one_of(st.integers(1, 9000), st.sampled_from([1280, 4096, 7168])),
    vec=st.sampled_from([1, 2, 4, 8]),
)
def test_blocks_cover_each_row_and_column_once(split, nb, n, token_blocks, c, vec):
    n = min(n, nb)
    groups, chunks, rows, cols = split(nb, token_blocks, n, c, vec)
    if nb < 16:
        assert (groups, chunks) == (1, 1)
        return
    assert rows % 4 == 0 and groups * rows >= n and (groups - 1) * rows < n
    assert cols % vec == 0 and chunks * cols >= c and (chunks - 1) * cols < c
    assert groups * chunks == 1 or token_blocks < 256
    assert token_blocks * groups * chunks <= max(token_blocks, 2 * 256)
