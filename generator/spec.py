"""The one description of a kernel variant, its name, and the one validity rule.

A variant's ``name`` is its identity everywhere: C++ symbol, file name,
manifest key, selection result and test id. ``parse(name)`` gives the spec back.
"""

from __future__ import annotations

import dataclasses
import enum
import re

MAX_N = 32  # one warp lane per Sinkhorn row / column
PROJ_MAX_N = 8  # the tensor-core projection's accumulators: m = 80 logits a token
TILES = (1, 2, 4, 8, 16)  # tokens per block


class _Enum(enum.Enum):
    """Hashed by identity (members are singletons): Enum.__hash__ is a Python call, 0.3 µs
    a member in the keys of the launch path's caches."""

    __hash__ = object.__hash__


class Op(_Enum):
    """What a variant computes; the suffix says whether H is per token or per layer."""

    COEFFS_DYN = "coeffs_dyn"
    COEFFS_STATIC = "coeffs_static"
    PRE_DYN = "pre_dyn"
    PRE_STATIC = "pre_static"
    POST_DYN = "post_dyn"
    POST_STATIC = "post_static"
    LAYER_DYN = "layer_dyn"
    LAYER_STATIC = "layer_static"
    # backward
    PRE_BWD_DYN = "pre_bwd_dyn"
    PRE_BWD_STATIC = "pre_bwd_static"
    POST_BWD_DYN = "post_bwd_dyn"
    POST_BWD_STATIC = "post_bwd_static"
    COEFFS_BWD_STATIC = "coeffs_bwd_static"
    PHI_GRAD_DYN = "phi_grad_dyn"
    # the seed layer's backward up to pre's (recompute, RMSNorm, post)
    LAYER_BWD_DYN = "layer_bwd_dyn"
    LAYER_BWD_STATIC = "layer_bwd_static"
    # an fp32 matrix split into bf16 hi + lo parts, for dynamic H's split-precision GEMMs
    SPLIT_DYN = "split_dyn"
    # z = x̄·φ and r in one pass over bf16 x, on tensor cores (CUDA, n ≤ 8)
    PROJ_DYN = "proj_dyn"

    @property
    def dynamic(self) -> bool:
        return self.value.endswith("_dyn")

    @property
    def backward(self) -> bool:
        return "_bwd_" in self.value or self is Op.PHI_GRAD_DYN

    @property
    def needs_x(self) -> bool:
        """False for the static-coefficient ops, which see only the logits b."""
        return self not in (Op.COEFFS_STATIC, Op.COEFFS_BWD_STATIC)

    @property
    def has_hidden_axis(self) -> bool:
        return self.needs_x and self not in (Op.PHI_GRAD_DYN, Op.SPLIT_DYN, Op.PROJ_DYN)

    @property
    def layer_backward(self) -> bool:
        return self in (Op.LAYER_BWD_DYN, Op.LAYER_BWD_STATIC)

    @property
    def specialises_hidden(self) -> bool:
        """Whether builds compile it for the hot hidden sizes (the layer backward loops
        over C at run time anyway)."""
        return self.has_hidden_axis and not self.layer_backward

    @property
    def header(self) -> str:
        if self is Op.SPLIT_DYN:
            return "mhc/split.cuh"
        if self is Op.PROJ_DYN:
            return "mhc/projection.cuh"
        if self.layer_backward:
            return "mhc/layer_backward.cuh"
        return "mhc/token_backward.cuh" if self.backward else "mhc/token_kernel.cuh"

    @property
    def launcher(self) -> str:
        if self is Op.SPLIT_DYN:
            return "mhc::launch_split"
        if self is Op.PROJ_DYN:
            return "mhc::launch_projection"
        if self.layer_backward:
            return "mhc::launch_layer_backward"
        return "mhc::launch_backward" if self.backward else "mhc::launch"

    @property
    def cpp_enum(self) -> str:
        """The C++ enumerator the launcher template takes."""
        base = self.value.rsplit("_", 1)[0]
        if self is Op.SPLIT_DYN:
            return "mhc::SplitOp::Split"
        if self is Op.PROJ_DYN:
            return "mhc::ProjOp::Proj"
        if self.backward:
            name = {
                "pre_bwd": "Pre",
                "post_bwd": "Post",
                "coeffs_bwd": "Coeffs",
                "phi_grad": "PhiGrad",
                "layer_bwd": "Layer",
            }
            return f"mhc::BwdOp::{name[base]}"
        return f"mhc::Op::{base.capitalize()}"


class DType(_Enum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"

    @property
    def ctype(self) -> str:
        return {"bf16": "mhc::bf16", "fp16": "mhc::fp16", "fp32": "float"}[self.value]


@dataclasses.dataclass(frozen=True)
class ArchTraits:
    backend: str  # "cuda" or "hip"
    warp_size: int
    full_build: bool  # False: only device assembly can be produced on this toolchain


class Arch(_Enum):
    SM80 = "sm_80"
    SM90 = "sm_90"
    SM100 = "sm_100"
    GFX90A = "gfx90a"
    GFX942 = "gfx942"

    @property
    def token(self) -> str:
        """The arch as it appears in a variant name: sm90, gfx942."""
        return self.value.replace("_", "")

    @property
    def traits(self) -> ArchTraits:
        if self.value.startswith("sm_"):
            return ArchTraits("cuda", 32, True)
        # Debian's ROCm 5.2 device libraries have no gfx942 bitcode.
        return ArchTraits("hip", 64, self is Arch.GFX90A)

    @property
    def backend(self) -> str:
        return self.traits.backend


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One variant. ``n`` or ``hidden`` of None means chosen at run time."""

    op: Op
    n: int | None
    hidden: int | None
    dtype: DType
    arch: Arch
    tile: int = 4

    @property
    def name(self) -> str:
        n = "any" if self.n is None else str(self.n)
        h = "any" if self.hidden is None else str(self.hidden)
        return f"{self.op.value}_n{n}_h{h}_{self.dtype.value}_tm{self.tile}_{self.arch.token}"

    @property
    def symbol(self) -> str:
        return f"mhc_{self.name}"

    @property
    def wgmma(self) -> bool:
        """Whether the variant is built for sm_90a too (Hopper's warpgroup MMA, code that
        runs on sm_90 only) beside its portable PTX: the projection at n = 4
        (mhc/projection_wgmma.cuh)."""
        return self.op is Op.PROJ_DYN and self.arch is Arch.SM90 and self.n in (None, 4)


_NAME = re.compile(
    r"^(?P<op>[a-z_]+?_(?:dyn|static))_n(?P<n>\d+|any)_h(?P<hidden>\d+|any)"
    r"_(?P<dtype>bf16|fp16|fp32)_tm(?P<tile>\d+)_(?P<arch>sm\d+|gfx\w+)$"
)
_ARCH_BY_TOKEN = {a.token: a for a in Arch}


def parse(name: str) -> KernelSpec:
    """The spec whose ``name`` is ``name``; ValueError for anything else."""
    m = _NAME.match(name)
    if not m or m["arch"] not in _ARCH_BY_TOKEN:
        raise ValueError(f"not a kernel variant name: {name!r}")
    spec = KernelSpec(
        op=Op(m["op"]),
        n=None if m["n"] == "any" else int(m["n"]),
        hidden=None if m["hidden"] == "any" else int(m["hidden"]),
        dtype=DType(m["dtype"]),
        arch=_ARCH_BY_TOKEN[m["arch"]],
        tile=int(m["tile"]),
    )
    if spec.name != name:  # e.g. leading zeros
        raise ValueError(f"not a canonical kernel variant name: {name!r}")
    return spec


def is_supported(spec: KernelSpec) -> bool:
    """The single statement of which variants exist."""
    if spec.n is not None and not 1 <= spec.n <= MAX_N:
        return False
    if spec.hidden is not None and spec.hidden < 1:
        return False
    if spec.tile not in TILES:
        return False
    if not spec.op.needs_x:
        # Static H depends on n alone: no x, so no dtype or hidden axis.
        return spec.hidden is None and spec.dtype is DType.FP32 and spec.tile == 1
    if not spec.op.has_hidden_axis and spec.hidden is not None:
        return False
    if spec.op is Op.PHI_GRAD_DYN and spec.tile != 1:
        return False
    if spec.op is Op.SPLIT_DYN:  # one variant: fp32 in, every shape at run time
        return spec.n is None and spec.dtype is DType.FP32 and spec.tile == 1
    if spec.op is Op.PROJ_DYN:  # mma.sync on bf16 x; a run-time n serves n ≤ PROJ_MAX_N
        return (
            spec.arch.backend == "cuda"
            and spec.dtype is DType.BF16
            and spec.tile in (1, 2)  # m16 tiles of tokens a warp
            and (spec.n is None or spec.n <= PROJ_MAX_N)
        )
    if spec.op is Op.PRE_BWD_DYN:
        # The ∂x kernel's shared ∂z grows with tile × n², its accumulators with the tile.
        return spec.tile <= (2 if spec.n is None or spec.n > 8 else 16 if spec.n <= 4 else 8)
    return spec.tile <= 8
