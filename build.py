#!/usr/bin/env python3
"""Render, compile and link mhc_gen's kernels.

    python build.py --arch sm_90 gfx942        # the default build
    python build.py --arch sm_90 --list        # the variants, without compiling

Writes generated/ (sources written only when their content changes, one ninja
file, a manifest and one dispatch module per backend) and keeps kernels.lock,
the sorted names of every default-profile variant over every arch, in step.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

from generator import ninja_file, toolchain
from generator.profiles import PROFILES, specs_for
from generator.render import render_dispatch, render_variant, write_if_different
from generator.spec import Arch

ROOT = pathlib.Path(__file__).resolve().parent
LOCK = ROOT / "kernels.lock"
DEFAULT_OUT = ROOT / "generated"


def lock_text() -> str:
    names = sorted(s.name for arch in Arch for s in specs_for(arch, "default"))
    return "\n".join(names) + "\n"


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--arch",
        nargs="+",
        default=["sm_90", "gfx942"],
        choices=[a.value for a in Arch],
        help="targets to build (default: sm_90 gfx942)",
    )
    ap.add_argument("--profile", default="default", choices=PROFILES)
    ap.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    ap.add_argument("--check-lock", action="store_true", help="fail if kernels.lock is stale")
    ap.add_argument(
        "-j", "--jobs", type=int, default=0, help="parallel compiles (default: ninja's)"
    )
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    archs = [Arch(a) for a in dict.fromkeys(args.arch)]
    specs = [s for arch in archs for s in specs_for(arch, args.profile)]

    if args.check_lock:
        if LOCK.exists() and LOCK.read_text() == lock_text():
            print("kernels.lock is current")
            return 0
        print("kernels.lock is stale: run python build.py --list to refresh it", file=sys.stderr)
        return 1
    if write_if_different(LOCK, lock_text()):
        print(f"updated {LOCK.name}")
    if args.list:
        for s in specs:
            print(s.name)
        print(f"{len(specs)} variants", file=sys.stderr)
        return 0

    start = time.monotonic()
    out = args.out.resolve()
    try:
        plan = ninja_file.plan(out, specs)
        ninja_text = ninja_file.render(plan)
        ninja = toolchain.ninja()
    except (toolchain.ToolchainError, ImportError) as e:
        print(f"build.py: {e}", file=sys.stderr)
        return 2

    changed = sum(write_if_different(plan.source(s), render_variant(s)) for s in specs)
    for backend, linked in plan.linked.items():
        changed += write_if_different(
            plan.dispatch_source(backend), render_dispatch(linked, backend)
        )
    write_if_different(out / "build.ninja", ninja_text)
    for arch in archs:
        print(f"{arch.value}: {sum(s.arch is arch for s in specs)} variants", flush=True)
    print(f"rendered {len(specs)} variants into {out} ({changed} files changed)", flush=True)

    cmd = [ninja, "-C", str(out)] + (["-j", str(args.jobs)] if args.jobs else [])
    if subprocess.run(cmd).returncode != 0:
        print("build.py: compilation failed (see above)", file=sys.stderr)
        return 1

    manifest = {
        "archs": [a.value for a in archs],
        "profile": args.profile,
        "kernels": {
            s.name: {"arch": s.arch.value, "artifact": str(plan.artifacts[s.name].relative_to(out))}
            for s in specs
        },
        "modules": {
            b: {
                "path": str(plan.modules[b].relative_to(out)),
                "kernels": [s.name for s in linked],
            }
            for b, linked in plan.linked.items()
        },
        "compile_only": sorted({a.value for a in archs if not a.traits.full_build}),
    }
    write_if_different(out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    elapsed = time.monotonic() - start
    only = manifest["compile_only"]
    note = f"; device assembly only for {', '.join(only)}" if only else ""
    print(f"built {len(specs)} variants in {elapsed:.0f} s{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
