"""Finds and loads the dispatch module that build.py linked for a backend."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def build_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MHC_GEN_BUILD_DIR", ROOT / "generated"))


def manifest() -> dict:
    path = build_dir() / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


@functools.cache
def module(backend: str):
    """The backend's dispatch module, or None if it was not built."""
    info = manifest().get("modules", {}).get(backend)
    if not info:
        return None
    path = build_dir() / info["path"]
    name = f"_mhc_gen_{backend}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or not path.exists():
        return None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@functools.cache
def table(backend: str) -> dict[str, int]:
    """Variant name -> index in the backend's dispatch table."""
    mod = module(backend)
    return {} if mod is None else {name: i for i, name in enumerate(mod.names())}
