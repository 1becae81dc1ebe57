"""Rendering, the build graph, and kernels.lock, all without compiling."""

import pathlib

import jinja2
import pytest

import build
from generator import ninja_file
from generator.profiles import specs_for
from generator.render import _ENV, render_dispatch, render_variant, write_if_different
from generator.spec import Arch


@pytest.mark.parametrize("arch", list(Arch))
def test_every_spec_renders(arch):
    for spec in specs_for(arch):
        text = render_variant(spec)
        assert spec.symbol in text and spec.name in text


def test_missing_value_fails_at_render_time():
    with pytest.raises(jinja2.UndefinedError):
        _ENV.get_template("variant.cu.j2").render(name="x")


def test_dispatch_lists_every_variant_in_order():
    specs = specs_for(Arch.SM90)
    text = render_dispatch(list(reversed(specs)), "cuda")
    positions = [text.index(f'{{"{s.name}"') for s in specs]
    assert positions == sorted(positions)
    assert f"kCount = {len(specs)}" in text


def test_write_if_different_keeps_mtime(tmp_path: pathlib.Path):
    p = tmp_path / "a" / "f.cu"
    assert write_if_different(p, "one")
    before = p.stat().st_mtime_ns
    assert not write_if_different(p, "one")
    assert p.stat().st_mtime_ns == before
    assert write_if_different(p, "two") and p.read_text() == "two"


def test_ninja_file_has_an_edge_per_variant(tmp_path, monkeypatch):
    monkeypatch.setattr(ninja_file.toolchain, "find", lambda tool: f"/usr/bin/{tool}")
    specs = specs_for(Arch.SM90) + specs_for(Arch.GFX942) + specs_for(Arch.GFX90A)
    plan = ninja_file.plan(tmp_path, specs)
    text = ninja_file.render(plan)
    for s in specs:
        assert f"name = {s.name}\n" in text
    # gfx942 is assembly only; sm_90 and gfx90a link modules.
    assert plan.artifacts[specs_for(Arch.GFX942)[0].name].suffix == ".s"
    assert set(plan.modules) == {"cuda", "hip"}
    assert all(s.arch is Arch.GFX90A for s in plan.linked["hip"])
    # The wgmma variants (the n = 4 projection) compile by a rule of their own.
    wgmma = [s for s in specs if s.wgmma]
    assert wgmma and "rule compile_sm90a\n" in text and "-DMHC_WGMMA=1" in text
    for s in specs_for(Arch.SM90):
        rule = "compile_sm90a" if s.wgmma else "compile_sm90"
        assert f": {rule} " in text.split(f"name = {s.name}\n")[0].rsplit("build ", 1)[1]


def test_kernels_lock_is_current():
    lock = build.LOCK.read_text()
    assert lock == build.lock_text(), "kernels.lock is stale: run python build.py --list"
    names = lock.split()
    assert names == sorted(names) and len(names) == len(set(names))


def test_list_does_not_compile(capsys, tmp_path):
    assert build.main(["--arch", "sm_90", "gfx942", "--list", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.split()
    assert len(out) == len(specs_for(Arch.SM90)) + len(specs_for(Arch.GFX942))
    assert not any(tmp_path.iterdir())
