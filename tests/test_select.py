"""Selection is a pure function: exact -> compile-time n -> run-time n, else a clear error."""

import pytest

from generator.profiles import specs_for
from generator.spec import Arch, DType, Op
from mhc_gen.select import NoKernelError, arch_for_capability, arch_for_gcn, select

AVAILABLE = [s.name for s in specs_for(Arch.SM90)]


def test_exact_hot_size():
    s = select(Op.POST_DYN, 4, 4096, DType.BF16, Arch.SM90, AVAILABLE)
    assert s.name == "post_dyn_n4_h4096_bf16_tm4_sm90"


def test_generic_hidden_for_compiled_n():
    s = select(Op.POST_DYN, 4, 1000, DType.BF16, Arch.SM90, AVAILABLE)
    assert s.name == "post_dyn_n4_hany_bf16_tm4_sm90"
    # fp16 has no hot sizes: the generic hidden serves 4096 too.
    s = select(Op.PRE_DYN, 4, 4096, DType.FP16, Arch.SM90, AVAILABLE)
    assert s.name == "pre_dyn_n4_hany_fp16_tm4_sm90"


@pytest.mark.parametrize("n", [1, 3, 5, 7, 31])
def test_runtime_n_serves_other_n(n):
    s = select(Op.LAYER_STATIC, n, 77, DType.FP32, Arch.SM90, AVAILABLE)
    assert s.n is None and s.hidden is None


@pytest.mark.parametrize("n", [0, 33, 64])
def test_unsupported_n_raises(n):
    with pytest.raises(NoKernelError, match=f"n = {n}"):
        select(Op.PRE_DYN, n, 128, DType.BF16, Arch.SM90, AVAILABLE)


def test_missing_arch_names_what_exists():
    with pytest.raises(NoKernelError, match="sm_80") as e:
        select(Op.PRE_DYN, 4, 128, DType.BF16, Arch.SM80, AVAILABLE)
    assert "none" in str(e.value)


def test_miss_lists_built_variants():
    only = ["pre_dyn_n4_h4096_bf16_tm4_sm90"]
    with pytest.raises(NoKernelError, match="pre_dyn_n4_h4096_bf16_tm4_sm90"):
        select(Op.PRE_DYN, 4, 128, DType.BF16, Arch.SM90, only)


def test_capability_to_arch():
    assert arch_for_capability(9, 0) is Arch.SM90
    assert arch_for_capability(8, 6) is Arch.SM80
    assert arch_for_capability(10, 0) is Arch.SM100
    with pytest.raises(NoKernelError):
        arch_for_capability(7, 5)
    assert arch_for_gcn("gfx942:sramecc+:xnack-") is Arch.GFX942
    with pytest.raises(NoKernelError):
        arch_for_gcn("gfx1100")


def test_tuned_winner_among_tiles_else_default_tile():
    names = [
        "post_dyn_n4_h4096_bf16_tm1_sm90",
        "post_dyn_n4_h4096_bf16_tm2_sm90",
        "post_dyn_n4_h4096_bf16_tm4_sm90",
    ]
    pick = select(Op.POST_DYN, 4, 4096, DType.BF16, Arch.SM90, names)
    assert pick.tile == 4  # the heuristic: the profile's default tile
    tuned = {"post_dyn_n4_h4096_bf16_sm90": "post_dyn_n4_h4096_bf16_tm2_sm90"}
    assert select(Op.POST_DYN, 4, 4096, DType.BF16, Arch.SM90, names, tuned).tile == 2
    # A winner that is not built is ignored.
    tuned = {"post_dyn_n4_h4096_bf16_sm90": "post_dyn_n4_h4096_bf16_tm8_sm90"}
    assert select(Op.POST_DYN, 4, 4096, DType.BF16, Arch.SM90, names, tuned).tile == 4


def test_token_bucket_winner_first_then_any_token_count():
    from mhc_gen.tuning import TOKEN_BUCKETS, token_bucket

    assert [token_bucket(t) for t in (0, 1, 1024, 1025, 16384, 20000, 10**7)] == [
        1024, 1024, 1024, 4096, 16384, 65536, 65536,
    ]  # fmt: skip
    assert token_bucket(TOKEN_BUCKETS[-1] + 1) == TOKEN_BUCKETS[-1]
    names = [f"post_dyn_n4_h4096_bf16_tm{t}_sm90" for t in (1, 2, 4)]
    key = "post_dyn_n4_h4096_bf16_sm90"
    tuned = {f"{key}@t16384": names[0], key: names[1]}
    pick = lambda bucket: select(Op.POST_DYN, 4, 4096, DType.BF16, Arch.SM90, names, tuned, bucket)  # noqa: E731
    assert pick(16384).tile == 1  # this bucket's winner
    assert pick(1024).tile == 2  # no winner for this bucket: the bucketless one
    assert pick(None).tile == 2
    only_bucket = {f"{key}@t16384": names[0]}
    assert select(Op.POST_DYN, 4, 4096, DType.BF16, Arch.SM90, names, only_bucket, 4096).tile == 4


def test_tuning_tables_are_ignored_on_stamp_mismatch(tmp_path, monkeypatch):
    from mhc_gen import tuning

    monkeypatch.setenv("MHC_GEN_TUNING_DIR", str(tmp_path))
    tuning.winners.cache_clear()
    good = tuning.stamp("GPU A", "2.11", "13.0")
    tuning.write_table(tmp_path / "a.json", good, {"k": "v"})
    tuning.write_table(tmp_path / "b.json", {**good, "mhc_gen": "0.0.1"}, {"k2": "v2"})
    assert tuning.winners("GPU A", "2.11", "13.0") == {"k": "v"}
    assert tuning.winners("GPU B", "2.11", "13.0") == {}
    tuning.winners.cache_clear()
