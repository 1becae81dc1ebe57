"""Build profiles: which variants a build compiles, per arch."""

from __future__ import annotations

from .spec import TILES, Arch, DType, KernelSpec, Op, is_supported

# The paper's hot sizes (n = 4): specialised with a compile-time hidden.
HOT_N = 4
HOT_HIDDEN = (1280, 1920, 2560, 4096, 7168)
HOT_DTYPES = (DType.BF16, DType.FP32)
# Compile-time n with run-time hidden; n = None serves every other n ≤ 32.
GENERIC_N = (2, 4, 8, 16, 32, None)
PROFILES = ("check", "minimal", "default", "tune", "full")
# check: minimal's run-time-n variants in bf16 only (fp32 where an op has no x): every kernel
# family's code for an arch, without its dtype copies (CI compiles it for the archs that the
# default build leaves out).
# full: every n from 1 to 32 at compile time, and the hot sizes in every dtype.
FULL_N = (*range(1, 33), None)
# tune: the default build plus alternative tiles at the benchmark's size, for the autotuner
# (full has them at every hot size).
TUNE_HIDDEN = (4096,)


# Shared memory for the dynamic fused layer's stash of its tokens' x: token_kernel.cuh's
# kStashSmemBytes less room for the block's other shared memory.
STASH_BYTES = {"cuda": 64 * 1024, "hip": 56 * 1024}
_ELEMENT_BYTES = {DType.BF16: 2, DType.FP16: 2, DType.FP32: 4}


def default_tile(
    op: Op,
    n: int | None = None,
    hidden: int | None = None,
    dtype: DType = DType.BF16,
    arch: Arch = Arch.SM90,
) -> int:
    """Tokens per block: 4 where they share φ reads or a static H, else fewer. The
    dynamic pre backward's ∂x kernel reads its chunk of φ once per block: as many tokens as
    n allows (on CUDA at n ≤ 8 its tensor-core form always takes 16, the mma's m16). The
    dynamic fused layer keeps its tokens of x in shared memory where they fit (a run-time n
    counts as 32, a run-time hidden as 4096): 4 tokens, else 2, else 4 unstashed."""
    if op is Op.PROJ_DYN:  # m16 tiles of tokens a warp: two where φ's tile is large
        return 1 if n is not None and n <= 4 else 2
    if op in (Op.COEFFS_STATIC, Op.COEFFS_BWD_STATIC, Op.PHI_GRAD_DYN, Op.SPLIT_DYN):
        return 1
    if op in (Op.POST_BWD_DYN, Op.POST_BWD_STATIC, Op.PRE_BWD_STATIC, Op.LAYER_BWD_STATIC):
        return 1
    if op is Op.PRE_BWD_DYN:
        return 2 if n is None or n > 8 else 16 if n <= 4 else 8
    if op is Op.LAYER_DYN:
        token = (n or 32) * (hidden or 4096) * _ELEMENT_BYTES[dtype]
        budget = STASH_BYTES[arch.traits.backend]
        return next((tile for tile in (4, 2) if tile * token <= budget), 4)
    return 4


def _spec(op: Op, n, hidden, dtype: DType, arch: Arch) -> KernelSpec:
    return KernelSpec(op, n, hidden, dtype, arch, default_tile(op, n, hidden, dtype, arch))


def _alternative_tiles(op: Op, n, hidden, dtype: DType, arch: Arch) -> set[KernelSpec]:
    """Every supported tile of one shape, for the autotuner to choose among."""
    specs = (KernelSpec(op, n, hidden, dtype, arch, tile) for tile in TILES)
    return {s for s in specs if is_supported(s)}


def specs_for(arch: Arch, profile: str = "default") -> list[KernelSpec]:
    """Every variant of ``profile`` for ``arch``, sorted by name."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    specs: set[KernelSpec] = set()
    generic_n = {
        "check": (None,),
        "minimal": (None,),
        "default": GENERIC_N,
        "tune": GENERIC_N,
        "full": FULL_N,
    }[profile]
    hot_dtypes = tuple(DType) if profile == "full" else HOT_DTYPES
    tiled_hidden = {"tune": TUNE_HIDDEN, "full": HOT_HIDDEN}.get(profile, ())
    for op in Op:
        dtypes = tuple(DType) if op.needs_x else (DType.FP32,)
        if profile == "check" and op.needs_x:
            dtypes = (DType.BF16,)
        for dtype in dtypes:
            for n in generic_n:
                spec = _spec(op, n, None, dtype, arch)
                if is_supported(spec):  # e.g. the tensor-core projection: bf16 on CUDA only
                    specs.add(spec)
        if profile in ("tune", "full") and op is Op.PROJ_DYN:  # its tile at the hot n
            specs.update(_alternative_tiles(op, HOT_N, None, DType.BF16, arch))
        if profile not in ("check", "minimal") and op.specialises_hidden:
            for dtype in hot_dtypes:
                for hidden in HOT_HIDDEN:
                    specs.add(_spec(op, HOT_N, hidden, dtype, arch))
                    if hidden in tiled_hidden and not op.backward:
                        specs.update(_alternative_tiles(op, HOT_N, hidden, dtype, arch))
    bad = [s.name for s in specs if not is_supported(s)]
    assert not bad, f"profile {profile} lists unsupported variants: {bad}"
    return sorted(specs, key=lambda s: s.name)
