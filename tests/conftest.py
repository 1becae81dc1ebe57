"""Fixtures shared by the CPU tests."""

import ctypes
import pathlib
import subprocess

import pytest

from generator.render import INCLUDE

HOST = pathlib.Path(__file__).parent / "host"


@pytest.fixture(scope="session")
def host_shim(tmp_path_factory):
    """host_shim(name): tests/host/<name>_shim.cpp, which includes the kernels' headers,
    compiled for the host and loaded as a ctypes library."""

    def build(name: str) -> ctypes.CDLL:
        so = tmp_path_factory.mktemp("shim") / f"{name}.so"
        src = HOST / f"{name}_shim.cpp"
        flags = ["-O2", "-std=c++17", "-shared", "-fPIC", f"-I{INCLUDE}"]
        subprocess.run(["c++", *flags, str(src), "-o", str(so)], check=True)
        return ctypes.CDLL(str(so))

    return build
