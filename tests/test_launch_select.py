"""The launch path's choice of variant (mhc_gen._launch), on CPU with a fake
dispatch module: prebuilt first, compilation on demand on a miss or in
specialize mode, a clear error with it off, and the MHC_GEN_ARCH override."""

import types

import pytest

from generator.profiles import specs_for
from generator.spec import Arch, DType, Op
from mhc_gen import _launch, _loader, jit
from mhc_gen.select import NoKernelError

NAMES = sorted(s.name for s in specs_for(Arch.SM90))


@pytest.fixture
def fake(monkeypatch):
    prebuilt = types.SimpleNamespace(launch="prebuilt")
    compiled = []

    def jit_load(spec):
        compiled.append(spec.name)
        return types.SimpleNamespace(launch="jit")

    monkeypatch.setattr(_loader, "module", lambda backend: prebuilt)
    monkeypatch.setattr(_loader, "table", lambda backend: {n: i for i, n in enumerate(NAMES)})
    monkeypatch.setattr(jit, "load", jit_load)
    _launch._selected.cache_clear()
    yield compiled
    _launch._selected.cache_clear()


def test_prebuilt_first(fake):
    fn, index = _launch._selected(
        Op.PRE_DYN, 4, 4096, DType.BF16, "cuda", Arch.SM90, "missing", "GPU"
    )
    assert fn == "prebuilt" and NAMES[index] == "pre_dyn_n4_h4096_bf16_tm4_sm90"
    fn, index = _launch._selected(
        Op.PRE_DYN, 3, 100, DType.BF16, "cuda", Arch.SM90, "missing", "GPU"
    )
    assert NAMES[index] == "pre_dyn_nany_hany_bf16_tm4_sm90" and not fake


def test_specialize_compiles_compile_time_n(fake):
    fn, index = _launch._selected(
        Op.PRE_DYN, 3, 100, DType.BF16, "cuda", Arch.SM90, "specialize", "GPU"
    )
    assert (fn, index) == ("jit", 0) and fake == ["pre_dyn_n3_hany_bf16_tm4_sm90"]
    # The split has no compile-time-n form (its n counts parts): its prebuilt variant serves.
    fn, index = _launch._selected(
        Op.SPLIT_DYN, 3, 1088, DType.FP32, "cuda", Arch.SM90, "specialize", "GPU"
    )
    assert fn == "prebuilt" and NAMES[index] == "split_dyn_nany_hany_fp32_tm1_sm90"


def test_ops_without_a_hidden_axis_select_once_whatever_their_hidden(fake, monkeypatch):
    """split_dyn's hidden is its column count (T·C for a split along the rows): one cached
    selection serves every value, as its one variant does."""
    monkeypatch.setattr(_launch, "target_arch", lambda index: ("cuda", Arch.SM90))
    monkeypatch.setattr(_launch, "device_name", lambda index: "GPU")
    monkeypatch.delenv("MHC_GEN_JIT", raising=False)
    monkeypatch.delenv("MHC_GEN_DISABLE_JIT", raising=False)
    for cols in (1088, 2176, 32 * 1088 * 7):
        fn, index = _launch._variant(Op.SPLIT_DYN, 2, cols, DType.FP32, 0, tokens=1)
        assert NAMES[index] == "split_dyn_nany_hany_fp32_tm1_sm90"
    assert _launch._selected.cache_info().currsize == 1


def test_other_arch_compiles_on_demand_or_fails_clearly(fake):
    fn, _ = _launch._selected(Op.POST_DYN, 4, 64, DType.FP16, "cuda", Arch.SM80, "missing", "GPU")
    assert fn == "jit" and fake == ["post_dyn_n4_hany_fp16_tm4_sm80"]
    with pytest.raises(NoKernelError, match="sm_80"):
        _launch._selected(Op.POST_DYN, 4, 64, DType.FP16, "cuda", Arch.SM80, "off", "GPU")
    with pytest.raises(NoKernelError, match="n = 33"):
        _launch._selected(Op.POST_DYN, 33, 64, DType.FP16, "cuda", Arch.SM90, "missing", "GPU")


def test_nothing_built_and_jit_off(fake, monkeypatch):
    monkeypatch.setattr(_loader, "module", lambda backend: None)
    monkeypatch.setattr(_loader, "table", lambda backend: {})
    with pytest.raises(RuntimeError, match="python build.py --arch sm_90"):
        _launch._selected(Op.PRE_STATIC, 4, 64, DType.FP32, "cuda", Arch.SM90, "off", "GPU")


def test_arch_override(monkeypatch):
    monkeypatch.setattr(_launch, "device_arch", lambda index: ("cuda", Arch.SM90))
    monkeypatch.delenv("MHC_GEN_ARCH", raising=False)
    assert _launch.target_arch(0) == ("cuda", Arch.SM90)
    monkeypatch.setenv("MHC_GEN_ARCH", "sm_80")
    assert _launch.target_arch(0) == ("cuda", Arch.SM80)
    monkeypatch.setenv("MHC_GEN_ARCH", "gfx942")
    with pytest.raises(ValueError, match="not a cuda arch"):
        _launch.target_arch(0)
    monkeypatch.setenv("MHC_GEN_ARCH", "sm_75")
    with pytest.raises(ValueError, match="expected one of"):
        _launch.target_arch(0)
