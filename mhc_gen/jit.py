"""Compilation on demand.

A variant that no prebuilt table holds is rendered from the same templates and
compiled, on first use, into a per-user cache:

    $MHC_GEN_CACHE_DIR, else ~/.cache/mhc_gen/<version>/<arch>/<name>-<key>/

The key hashes everything that changes the binary: the variant, every template
and header, the compiler and its version, the flags, and the Python ABI. A file
lock makes concurrent processes (DDP ranks) build each variant once.

Policy, from the environment:
    MHC_GEN_JIT=missing     (default) compile only what no prebuilt variant serves
    MHC_GEN_JIT=specialize  also compile a compile-time-n variant for an n that
                            only the run-time-n variant serves (faster kernels)
    MHC_GEN_DISABLE_JIT=1   (or MHC_GEN_JIT=off) a miss is an error
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import filelock

from generator import toolchain
from generator.profiles import default_tile
from generator.render import TEMPLATES, module_name, render_dispatch, render_variant
from generator.spec import Arch, DType, KernelSpec, Op, is_supported

from ._version import __version__ as VERSION

POLICIES = ("missing", "specialize", "off")


class JitDisabledError(RuntimeError):
    pass


def policy() -> str:
    if os.environ.get("MHC_GEN_DISABLE_JIT", "") not in ("", "0"):
        return "off"
    value = os.environ.get("MHC_GEN_JIT", "missing")
    if value not in POLICIES:
        raise ValueError(f"MHC_GEN_JIT={value!r}: expected one of {', '.join(POLICIES)}")
    return value


def cache_root() -> pathlib.Path:
    base = os.environ.get("MHC_GEN_CACHE_DIR")
    if base:
        return pathlib.Path(base)
    return pathlib.Path.home() / ".cache" / "mhc_gen" / VERSION


def spec_for(op: Op, n: int, dtype: DType, arch: Arch) -> KernelSpec | None:
    """The variant to compile for a request: compile-time n, run-time hidden."""
    dtype = dtype if op.needs_x else DType.FP32
    spec = KernelSpec(op, n, None, dtype, arch, default_tile(op, n, None, dtype, arch))
    return spec if is_supported(spec) else None


@functools.cache
def _compiler_version(compiler: str) -> str:
    res = subprocess.run([compiler, "--version"], capture_output=True, text=True)
    return res.stdout + res.stderr


def _commands(spec: KernelSpec, src: pathlib.Path, disp: pathlib.Path, out: pathlib.Path):
    """The compile and link command lines that build spec's module at out."""
    rule = toolchain.rule_for(spec)
    if rule.output_ext != ".o":
        raise toolchain.ToolchainError(
            f"{spec.arch.value}: this toolchain produces device assembly only, no loadable module"
        )
    obj, disp_obj = out.with_suffix(".kernel.o"), out.with_suffix(".dispatch.o")
    link = toolchain.link_command(spec.arch.backend, [spec.arch])
    return [
        [rule.compiler, *rule.flags, "-c", str(src), "-o", str(obj)],
        [*toolchain.dispatch_command(), "-c", str(disp), "-o", str(disp_obj)],
        [*link, str(disp_obj), str(obj), "-o", str(out)],
    ]


def cache_key(spec: KernelSpec) -> str:
    """A hash of everything that changes spec's binary."""
    h = hashlib.sha256()
    h.update(f"{VERSION}\n{spec.name}\n{toolchain.extension_suffix()}\n".encode())
    for path in sorted(TEMPLATES.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(TEMPLATES)).encode() + b"\0" + path.read_bytes())
    rule = toolchain.rule_for(spec)
    link = toolchain.link_command(spec.arch.backend, [spec.arch])
    h.update("\0".join([rule.compiler, *rule.flags, *toolchain.dispatch_command(), *link]).encode())
    h.update(_compiler_version(rule.compiler).encode())
    return h.hexdigest()[:20]


def module_path(spec: KernelSpec) -> pathlib.Path:
    folder = cache_root() / spec.arch.value / f"{spec.name}-{cache_key(spec)}"
    return folder / f"{_jit_module(spec)}{toolchain.extension_suffix()}"


def _jit_module(spec: KernelSpec) -> str:
    return f"{module_name(spec.arch.backend)}_jit_{spec.name}"


def build(spec: KernelSpec, *, log=sys.stderr) -> tuple[pathlib.Path, bool]:
    """spec's module in the cache, building it if needed; (path, whether this call built it)."""
    if policy() == "off":
        raise JitDisabledError(
            f"mhc_gen: {spec.name} is not prebuilt and MHC_GEN_DISABLE_JIT is set; "
            f"add it to the build: python build.py --arch {spec.arch.value}"
        )
    out = module_path(spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(out.parent) + ".lock"):
        if out.exists():
            return out, False
        start = time.monotonic()
        print(f"mhc_gen: compiling {spec.name} (first use) ...", file=log, flush=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp = pathlib.Path(tmp)
            ext = ".cu" if spec.arch.backend == "cuda" else ".hip"
            src, disp = tmp / f"{spec.name}{ext}", tmp / "dispatch.cpp"
            src.write_text(render_variant(spec))
            disp.write_text(render_dispatch([spec], spec.arch.backend, _jit_module(spec)))
            staged = tmp / out.name
            for cmd in _commands(spec, src, disp, staged):
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    raise RuntimeError(
                        f"mhc_gen: compiling {spec.name} failed:\n{' '.join(cmd)}\n"
                        f"{res.stderr[-4000:]}"
                    )
            staged.replace(out)  # atomic: other processes see the whole file or none
        print(f"mhc_gen: compiled {spec.name} in {time.monotonic() - start:.1f} s", file=log)
        return out, True


@functools.cache
def load(spec: KernelSpec):
    """The compiled module of spec (building it on first use)."""
    path, _ = build(spec)
    mod_spec = importlib.util.spec_from_file_location(_jit_module(spec), path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod
