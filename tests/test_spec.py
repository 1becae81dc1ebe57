"""Specs: names round-trip, validity is one rule, profiles list only valid specs."""

import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from generator.profiles import HOT_HIDDEN, PROFILES, default_tile, specs_for
from generator.spec import MAX_N, Arch, DType, KernelSpec, Op, is_supported, parse

SPECS = st.builds(
    KernelSpec,
    op=st.sampled_from(Op),
    n=st.one_of(st.none(), st.integers(-2, 40)),
    hidden=st.one_of(st.none(), st.integers(-1, 100_000)),
    dtype=st.sampled_from(DType),
    arch=st.sampled_from(Arch),
    tile=st.integers(0, 10),
)


@given(SPECS)
def test_name_round_trips(spec):
    if spec.n is not None and spec.n < 0 or spec.hidden is not None and spec.hidden < 0:
        return  # negative numbers have no name; is_supported rejects them anyway
    assert parse(spec.name) == spec


@pytest.mark.parametrize("arch", list(Arch))
@pytest.mark.parametrize("profile", PROFILES)
def test_profile_specs_are_valid_and_named_uniquely(arch, profile):
    specs = specs_for(arch, profile)
    assert all(is_supported(s) for s in specs)
    assert len({s.name for s in specs}) == len(specs)
    assert [s.name for s in specs] == sorted(s.name for s in specs)


def test_default_profile_covers_the_issue_matrix():
    names = {s.name for s in specs_for(Arch.SM90)}
    for op in Op:
        for n in (2, 4, 8, 16, 32, None):
            for d in list(DType) if op.needs_x else [DType.FP32]:
                spec = KernelSpec(op, n, None, d, Arch.SM90, default_tile(op, n, None, d))
                assert spec.name in names or not is_supported(spec)
        if op.specialises_hidden:
            for h in HOT_HIDDEN:
                for d in (DType.BF16, DType.FP32):
                    spec = KernelSpec(op, 4, h, d, Arch.SM90, default_tile(op, 4, h, d))
                    assert spec.name in names


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "post_dyn",
        "post_dyn_n4_h4096_bf16_tm4_sm91",
        "post_dyn_n04_h4096_bf16_tm4_sm90",
        "post_dyn_n4_h4096_int8_tm4_sm90",
        "foo_dyn_n4_h4096_bf16_tm4_sm90",
    ],
)
def test_parse_rejects(bad):
    with pytest.raises(ValueError):
        parse(bad)


def test_validity():
    ok = KernelSpec(Op.PRE_DYN, 4, 4096, DType.BF16, Arch.SM90)
    assert is_supported(ok)
    assert not is_supported(KernelSpec(Op.PRE_DYN, MAX_N + 1, None, DType.BF16, Arch.SM90))
    assert not is_supported(KernelSpec(Op.PRE_DYN, 0, None, DType.BF16, Arch.SM90))
    assert not is_supported(KernelSpec(Op.PRE_DYN, 4, 0, DType.BF16, Arch.SM90))
    assert not is_supported(KernelSpec(Op.PRE_DYN, 4, None, DType.BF16, Arch.SM90, tile=3))
    assert not is_supported(KernelSpec(Op.COEFFS_STATIC, 4, 4096, DType.FP32, Arch.SM90, 1))
    assert not is_supported(KernelSpec(Op.COEFFS_STATIC, 4, None, DType.BF16, Arch.SM90, 1))


def test_dynamic_layer_tile_is_the_most_tokens_its_stash_holds():
    """4 tokens of x where they fit the stash, else 2, else 4 read from global memory."""
    tile = default_tile
    assert tile(Op.LAYER_DYN, 4, 1280, DType.BF16) == 4  # 4 × 10 KB
    assert tile(Op.LAYER_DYN, 4, 4096, DType.BF16) == 2  # 2 × 32 KB
    assert tile(Op.LAYER_DYN, 4, 4096, DType.FP32) == 4  # 64 KB a token: no stash
    assert tile(Op.LAYER_DYN, 4, 7168, DType.BF16) == 4
    assert tile(Op.LAYER_DYN, 4, None, DType.BF16) == 2  # a run-time hidden counts as 4096
    assert tile(Op.LAYER_DYN, None, 64, DType.BF16) == 4  # a run-time n counts as 32
    assert tile(Op.LAYER_DYN, 4, 4096, DType.BF16, Arch.GFX942) == 4  # 56 KB on ROCm


def test_readme_states_each_profiles_variant_count():
    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    for profile in PROFILES:
        cuda, hip = (len(specs_for(arch, profile)) for arch in (Arch.SM90, Arch.GFX942))
        assert f"| `{profile}` | {cuda} / {hip}:" in readme, f"README's {profile} row is stale"
