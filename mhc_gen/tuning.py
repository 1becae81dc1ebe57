"""Tuning tables: the measured best variant per tuning key, as data.

A table is a JSON file in tuning/ (or $MHC_GEN_TUNING_DIR):

    {"stamp": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "cuda": "13.0",
               "mhc_gen": "0.1.0"},
     "winners": {"post_dyn_n4_h4096_bf16_sm90": "post_dyn_n4_h4096_bf16_tm2_sm90", ...}}

The key is a variant name without its tile (`tuning_key`), optionally with a token
bucket (`post_dyn_n4_h4096_bf16_sm90@t16384`: the best tile depends on how many
tokens a call has); the winner is a full variant name. Selection prefers the key of
the call's bucket, then the bucketless key. A table whose stamp differs from the
running GPU and versions in any field is ignored: selection then falls back to its
heuristic.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib

from generator.spec import KernelSpec

from ._version import __version__

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tuning_key(spec: KernelSpec) -> str:
    """The name of spec with its launch knobs left out: what tuning chooses among."""
    n = "any" if spec.n is None else str(spec.n)
    h = "any" if spec.hidden is None else str(spec.hidden)
    return f"{spec.op.value}_n{n}_h{h}_{spec.dtype.value}_{spec.arch.token}"


# Token buckets: the smallest power of 4 at or above the call's token count, clamped.
TOKEN_BUCKETS = (1024, 4096, 16384, 65536)


def token_bucket(tokens: int) -> int:
    """The tuning bucket of a call with this many tokens."""
    for bucket in TOKEN_BUCKETS:
        if tokens <= bucket:
            return bucket
    return TOKEN_BUCKETS[-1]


def bucket_key(key: str, bucket: int) -> str:
    return f"{key}@t{bucket}"


def tuning_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MHC_GEN_TUNING_DIR", ROOT / "tuning"))


def stamp(gpu: str, torch_version: str, cuda_version: str | None) -> dict:
    return {"gpu": gpu, "torch": torch_version, "cuda": cuda_version, "mhc_gen": __version__}


@functools.cache
def winners(gpu: str, torch_version: str, cuda_version: str | None) -> dict[str, str]:
    """Tuning key -> variant name, from every table stamped for exactly this setup."""
    want = stamp(gpu, torch_version, cuda_version)
    out: dict[str, str] = {}
    folder = tuning_dir()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        data = json.loads(path.read_text())
        if data.get("stamp") == want:
            out.update(data.get("winners", {}))
    return out


def write_table(path: pathlib.Path, table_stamp: dict, best: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"stamp": table_stamp, "winners": dict(sorted(best.items()))}
    path.write_text(json.dumps(body, indent=1) + "\n")
