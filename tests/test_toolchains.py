"""The CUDA and HIP builds compile: one demanding variant per arch, plus the
default build's manifest when it is present (CI builds it first)."""

import json
import os
import re
import subprocess

import pytest

import build
from generator import toolchain
from generator.profiles import specs_for
from generator.render import render_variant
from generator.spec import Arch, DType, KernelSpec, Op

REQUIRE = os.environ.get("MHC_GEN_REQUIRE_TOOLCHAINS") == "1"


def _compile_or_skip(arch: Arch):
    try:
        return toolchain.compile_rule(arch)
    except toolchain.ToolchainError as e:
        if REQUIRE:
            raise
        pytest.skip(str(e))


@pytest.mark.parametrize("arch", list(Arch), ids=lambda a: a.value)
def test_variant_compiles(arch, tmp_path):
    rule = _compile_or_skip(arch)
    # The run-time-n fused layer touches every phase of the kernel family.
    spec = KernelSpec(Op.LAYER_DYN, None, None, DType.BF16, arch)
    src = tmp_path / ("v.cu" if arch.backend == "cuda" else "v.hip")
    src.write_text(render_variant(spec))
    out = tmp_path / f"v{rule.output_ext}"
    mode = ["-c"] if rule.output_ext == ".o" else []
    res = subprocess.run(
        [rule.compiler, *rule.flags, *mode, str(src), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert out.stat().st_size > 0
    if rule.output_ext == ".s":
        assert "token_kernel" in out.read_text()


def test_default_build_manifest():
    path = build.DEFAULT_OUT / "manifest.json"
    if not path.exists():
        if REQUIRE:
            pytest.fail("generated/manifest.json is missing: run python build.py first")
        pytest.skip("no build in generated/")
    m = json.loads(path.read_text())
    lock = set(build.LOCK.read_text().split())
    for arch in m["archs"]:
        names = {s.name for s in specs_for(Arch(arch), m["profile"])}
        assert names <= set(m["kernels"]), f"{arch}: variants missing from the manifest"
        if m["profile"] == "default":
            assert names <= lock
        for name in names:
            assert (build.DEFAULT_OUT / m["kernels"][name]["artifact"]).stat().st_size > 0


@pytest.mark.parametrize("op", [Op.POST_DYN, Op.LAYER_DYN, Op.POST_BWD_DYN], ids=lambda o: o.value)
def test_compile_time_n_outside_the_default_set_compiles(op, tmp_path):
    """The full profile and compilation on demand use every n from 1 to 32; the
    vector width must stay a valid alignment for n = 5, 6, 7, 10, ..."""
    rule = _compile_or_skip(Arch.SM90)
    for n in (3, 5, 6, 7, 10):
        spec = KernelSpec(op, n, None, DType.BF16, Arch.SM90, 1 if op.backward else 4)
        src = tmp_path / f"{spec.name}.cu"
        src.write_text(render_variant(spec))
        res = subprocess.run(
            [rule.compiler, *rule.flags, "-c", str(src), "-o", str(tmp_path / f"{n}.o")],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, f"{spec.name}: {res.stderr[-2000:]}"


def test_wgmma_variants_build_for_sm90a_beside_portable_ptx(tmp_path):
    """The n = 4 projection (compile-time and run-time n) carries sm_90a SASS with its wgmma
    kernel, and compute_90 PTX without wgmma (newer GPUs JIT it: the mma.sync form)."""
    specs = [KernelSpec(Op.PROJ_DYN, n, None, DType.BF16, arch, 1) for n, arch in
             [(4, Arch.SM90), (None, Arch.SM90), (8, Arch.SM90), (4, Arch.SM80)]]  # fmt: skip
    assert [s.wgmma for s in specs] == [True, True, False, False]
    with pytest.raises(ValueError, match="sm_90a"):
        toolchain.compile_rule(Arch.SM80, wgmma=True)
    _compile_or_skip(Arch.SM90)
    spec = specs[0]
    rule = toolchain.rule_for(spec)
    src = tmp_path / f"{spec.name}.cu"
    src.write_text(render_variant(spec))
    res = subprocess.run(
        [rule.compiler, *rule.flags, "-Xptxas", "-v", "-c", str(src), "-o", str(tmp_path / "v.o")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert re.search(r"projection_wgmma_kernel\S* for 'sm_90a'", res.stderr), res.stderr[-2000:]
    flags = [f for f in rule.flags if not f.startswith("-gencode")]
    ptx = tmp_path / "v.ptx"
    res = subprocess.run(
        [rule.compiler, *flags, "-arch=compute_90", "-ptx", str(src), "-o", str(ptx)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "wgmma." not in ptx.read_text() and "mma.sync" in ptx.read_text()
