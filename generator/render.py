"""Rendering: spec -> C++ source text. Values become C++ literals here, so the
templates only substitute; StrictUndefined turns a missing value into an error."""

from __future__ import annotations

import pathlib

import jinja2

from .spec import KernelSpec

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
INCLUDE = TEMPLATES / "include"

_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(TEMPLATES)),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)


def variant_values(spec: KernelSpec) -> dict[str, str]:
    """The template's values, each already a C++ literal or identifier."""
    return {
        "name": spec.name,
        "target_sm": spec.arch.token[2:] if spec.arch.backend == "cuda" else "0",
        "symbol": spec.symbol,
        "ctype": spec.dtype.ctype,
        "n": str(spec.n or 0),
        "hidden": str(spec.hidden or 0),
        "tile": str(spec.tile),
        "op_enum": spec.op.cpp_enum,
        "dynamic": "true" if spec.op.dynamic else "false",
        "header": spec.op.header,
        "launcher": spec.op.launcher,
    }


def render_variant(spec: KernelSpec) -> str:
    return _ENV.get_template("variant.cu.j2").render(**variant_values(spec))


def module_name(backend: str) -> str:
    return f"_mhc_gen_{backend}"


def render_dispatch(specs: list[KernelSpec], backend: str, module: str | None = None) -> str:
    """The dispatch table of specs as the pybind11 module ``module`` (default: the backend's)."""
    kernels = [{"name": s.name, "symbol": s.symbol} for s in sorted(specs, key=lambda s: s.name)]
    return _ENV.get_template("dispatch.cpp.j2").render(
        kernels=kernels, backend=backend, module=module or module_name(backend)
    )


def write_if_different(path: pathlib.Path, text: str) -> bool:
    """Writes ``text`` unless the file already holds it, so ninja sees no change."""
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True
