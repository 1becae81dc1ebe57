"""Variant selection: a pure function of the request and the compiled names.

Order: exact (n, hidden) -> compile-time n with run-time hidden -> run-time n
and hidden. A miss raises an error naming what was asked and what exists.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from generator.profiles import default_tile
from generator.spec import MAX_N, Arch, DType, KernelSpec, Op, parse

from .tuning import bucket_key, tuning_key


class NoKernelError(LookupError):
    pass


def arch_for_capability(major: int, minor: int) -> Arch:
    """The compile target whose code runs best on a CUDA device of this capability."""
    if major >= 10:
        return Arch.SM100
    if major == 9:
        return Arch.SM90
    if major == 8:
        return Arch.SM80
    raise NoKernelError(
        f"compute capability {major}.{minor} is older than sm_80, the oldest target"
    )


def arch_for_gcn(name: str) -> Arch:
    base = name.split(":")[0]
    for arch in (Arch.GFX90A, Arch.GFX942):
        if arch.value == base:
            return arch
    raise NoKernelError(f"AMD target {name!r} is not built; mhc_gen targets gfx90a and gfx942")


def select(
    op: Op,
    n: int,
    hidden: int,
    dtype: DType,
    arch: Arch,
    available: Iterable[str],
    tuned: Mapping[str, str] | None = None,
    bucket: int | None = None,
) -> KernelSpec:
    """The best compiled variant for the request.

    Shape first: exact (n, hidden), else compile-time n with run-time hidden, else
    run-time n and hidden. Among variants of that shape that differ only in launch
    knobs: the tuning table's winner for the call's token bucket, else its winner
    for any token count (mhc_gen.tuning), else the default tile, else the smallest
    name."""
    if not 1 <= n <= MAX_N:
        raise NoKernelError(f"n = {n} is not supported: mhc_gen supports 1 <= n <= {MAX_N}")
    if hidden < 1:
        raise NoKernelError(f"hidden = {hidden} is not supported: it must be >= 1")
    by_shape: dict[tuple, list[KernelSpec]] = {}
    for name in available:
        s = parse(name)
        if s.op is op and s.dtype is dtype and s.arch is arch:
            by_shape.setdefault((s.n, s.hidden), []).append(s)
    for key in ((n, hidden), (n, None), (None, None)):
        if key in by_shape:
            return _best_knobs(by_shape[key], tuned or {}, bucket)
    have = sorted(s.name for group in by_shape.values() for s in group) or ["none"]
    raise NoKernelError(
        f"no {op.value} kernel for n={n}, hidden={hidden}, {dtype.value}, {arch.value}; "
        f"built for this op, dtype and arch: {', '.join(have)}. "
        f"Rebuild with python build.py --arch {arch.value}"
    )


def _best_knobs(group: list[KernelSpec], tuned: Mapping[str, str], bucket: int | None):
    names = {s.name: s for s in group}
    key = tuning_key(group[0])
    for k in ([bucket_key(key, bucket)] if bucket else []) + [key]:
        if tuned.get(k) in names:
            return names[tuned[k]]
    default = [s for s in group if s.tile == default_tile(s.op, s.n, s.hidden, s.dtype, s.arch)]
    return default[0] if default else min(group, key=lambda s: s.name)
