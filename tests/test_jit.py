"""Compilation on demand (mhc_gen.jit): policy, cache key, a real build into the
cache, the file lock under two concurrent builders. No GPU needed: the module is
compiled and imported, not launched."""

import multiprocessing
import os
import shutil

import pytest

from generator import toolchain
from generator.spec import Arch, DType, KernelSpec, Op
from mhc_gen import jit

SPEC = KernelSpec(Op.COEFFS_STATIC, 3, None, DType.FP32, Arch.SM90, 1)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MHC_GEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MHC_GEN_DISABLE_JIT", raising=False)
    monkeypatch.delenv("MHC_GEN_JIT", raising=False)
    return tmp_path / "cache"


def _need_nvcc():
    try:
        toolchain.find("nvcc")
    except toolchain.ToolchainError as e:
        if os.environ.get("MHC_GEN_REQUIRE_TOOLCHAINS") == "1":
            raise
        pytest.skip(str(e))


def test_policy(monkeypatch):
    monkeypatch.delenv("MHC_GEN_DISABLE_JIT", raising=False)
    monkeypatch.delenv("MHC_GEN_JIT", raising=False)
    assert jit.policy() == "missing"
    monkeypatch.setenv("MHC_GEN_JIT", "specialize")
    assert jit.policy() == "specialize"
    monkeypatch.setenv("MHC_GEN_DISABLE_JIT", "1")
    assert jit.policy() == "off"
    monkeypatch.delenv("MHC_GEN_DISABLE_JIT")
    monkeypatch.setenv("MHC_GEN_JIT", "sometimes")
    with pytest.raises(ValueError, match="MHC_GEN_JIT"):
        jit.policy()


def test_spec_for_compiles_compile_time_n():
    spec = jit.spec_for(Op.PRE_DYN, 3, DType.BF16, Arch.SM80)
    assert spec.name == "pre_dyn_n3_hany_bf16_tm4_sm80"
    assert jit.spec_for(Op.PRE_DYN, 33, DType.BF16, Arch.SM80) is None


def test_cache_key_covers_templates_and_flags(tmp_path, monkeypatch, cache):
    _need_nvcc()
    key = jit.cache_key(SPEC)
    assert key == jit.cache_key(SPEC)
    assert key != jit.cache_key(KernelSpec(Op.COEFFS_STATIC, 5, None, DType.FP32, Arch.SM90, 1))
    templates = tmp_path / "templates"
    shutil.copytree(jit.TEMPLATES, templates)
    monkeypatch.setattr(jit, "TEMPLATES", templates)
    assert jit.cache_key(SPEC) == key
    header = templates / "include" / "mhc" / "token_math.h"
    header.write_text(header.read_text() + "\n// changed\n")
    assert jit.cache_key(SPEC) != key
    monkeypatch.setattr(jit, "TEMPLATES", jit.TEMPLATES)
    rule = toolchain.compile_rule(Arch.SM90)
    monkeypatch.setattr(
        jit.toolchain,
        "compile_rule",
        lambda arch, wgmma=False: toolchain.Compile(
            rule.compiler, (*rule.flags, "-DX"), rule.output_ext
        ),
    )
    assert jit.cache_key(SPEC) != key


def test_disabled_is_a_clear_error(cache, monkeypatch):
    monkeypatch.setenv("MHC_GEN_DISABLE_JIT", "1")
    with pytest.raises(jit.JitDisabledError, match="python build.py --arch sm_90"):
        jit.build(SPEC)


def _build_in_child(cache_dir, queue):
    os.environ["MHC_GEN_CACHE_DIR"] = cache_dir
    path, built = jit.build(SPEC)
    queue.put((str(path), built))


def test_two_concurrent_builders_build_once(cache):
    _need_nvcc()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(cache), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(built for _, built in results) == [False, True]
    assert results[0][0] == results[1][0]
    # The module loads (no GPU needed to import it) and holds exactly this variant.
    mod = jit.load(SPEC)
    assert mod.names() == [SPEC.name]
    assert jit.build(SPEC) == (jit.module_path(SPEC), False)
