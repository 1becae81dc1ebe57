"""Compilers and flags per arch; a missing tool is named with how to install it."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sysconfig

from .render import INCLUDE
from .spec import Arch


class ToolchainError(RuntimeError):
    pass


_INSTALL_HINT = {
    "nvcc": "install the CUDA toolkit (12.x or 13.x) and put nvcc on PATH, or set CUDA_HOME",
    "clang++-19": "apt-get install clang-19 lld-19 hipcc rocm-device-libs",
    "ninja": "pip install ninja (or apt-get install ninja-build)",
    "c++": "apt-get install g++",
}

ROCM_BITCODE = "/usr/lib/x86_64-linux-gnu/amdgcn/bitcode"


def find(tool: str) -> str:
    env = {"nvcc": "MHC_GEN_NVCC", "clang++-19": "MHC_GEN_HIP_CLANG", "c++": "CXX"}.get(tool)
    if env and os.environ.get(env):
        return os.environ[env]
    if tool == "nvcc" and os.environ.get("CUDA_HOME"):
        cand = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
        if os.path.exists(cand):
            return cand
    path = shutil.which(tool)
    if not path:
        raise ToolchainError(f"{tool} not found: {_INSTALL_HINT.get(tool, 'install it')}")
    return path


def ninja() -> str:
    try:
        import ninja as ninja_pkg  # the PyPI wheel ships the binary

        return os.path.join(ninja_pkg.BIN_DIR, "ninja")
    except ImportError:
        return find("ninja")


@dataclasses.dataclass(frozen=True)
class Compile:
    """How one arch's variant sources become object (or assembly) files."""

    compiler: str
    flags: tuple[str, ...]
    output_ext: str  # ".o", or ".s" where only device assembly can be made


def compile_rule(arch: Arch, wgmma: bool = False) -> Compile:
    """The rule for arch's variants; wgmma (KernelSpec.wgmma, sm_90 only): SASS for sm_90a
    in place of sm_90's, with MHC_WGMMA set."""
    common = ("-O3", "-std=c++17", f"-I{INCLUDE}")
    if wgmma and arch is not Arch.SM90:
        raise ValueError(f"wgmma is an sm_90a feature, not {arch.value}'s")
    if arch.backend == "cuda":
        num = arch.value.split("_")[1]
        # SASS for the arch plus its PTX, so newer GPUs (and a forced older
        # variant on a newer GPU) can still run it.
        gencode = (f"-gencode=arch=compute_{num},code=[sm_{num},compute_{num}]",)
        if wgmma:  # sm_90a SASS runs on sm_90 alone: newer GPUs JIT the compute_90 PTX
            gencode = ("-gencode=arch=compute_90a,code=sm_90a",
                       "-gencode=arch=compute_90,code=compute_90", "-DMHC_WGMMA=1")  # fmt: skip
        return Compile(find("nvcc"), (*common, *gencode, "-Xcompiler", "-fPIC"), ".o")
    hip = ("-x", "hip", f"--offload-arch={arch.value}", *common)
    if arch.traits.full_build:
        return Compile(
            find("clang++-19"), (*hip, f"--rocm-device-lib-path={ROCM_BITCODE}", "-fPIC"), ".o"
        )
    return Compile(find("clang++-19"), (*hip, "-nogpulib", "--cuda-device-only", "-S"), ".s")


def rule_for(spec) -> Compile:
    """The compile rule of one variant (a KernelSpec)."""
    return compile_rule(spec.arch, spec.wgmma)


def rule_token(arch: Arch, wgmma: bool = False) -> str:
    """The ninja rule's name suffix: sm90, or sm90a for the wgmma variants."""
    return arch.token + "a" * wgmma


def python_includes() -> tuple[str, ...]:
    import pybind11

    return (f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}")


def extension_suffix() -> str:
    return sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def host_cxx() -> str:
    return find("c++")


def dispatch_command() -> tuple[str, ...]:
    """Compiler and flags for a pybind11 dispatch table (host code only, no torch)."""
    return (host_cxx(), "-O2", "-std=c++17", "-fPIC", *python_includes(), f"-I{INCLUDE}")


def link_command(backend: str, archs=()) -> tuple[str, ...]:
    """The link line of a backend's module; HIP links the device code of ``archs``."""
    if backend == "cuda":
        return (find("nvcc"), "-shared", "-Xcompiler", "-fPIC")
    lib = "/usr/lib/x86_64-linux-gnu"
    offload = sorted({f"--offload-arch={a.value}" for a in archs})
    return (
        find("clang++-19"),
        "-shared",
        "-fPIC",
        "--hip-link",
        f"-L{lib}",
        "-lamdhip64",
        *offload,
    )
