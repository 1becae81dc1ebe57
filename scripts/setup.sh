#!/usr/bin/env bash
# One command from a fresh machine to a built mhc_gen: installs what the build
# and the tests need, then runs build.py (arguments pass through; default
# --arch sm_90 gfx942). Needs nvcc (CUDA 12.x/13.x) on PATH for CUDA targets.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

# HIP toolchain for the AMD targets: Debian's hipcc (ROCm 5.2 headers), clang-19, lld-19.
if ! command -v clang++-19 >/dev/null || [ ! -d /usr/lib/x86_64-linux-gnu/amdgcn/bitcode ]; then
  if command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq clang-19 lld-19 hipcc rocm-device-libs clang-format >/dev/null
  else
    echo "setup.sh: no apt-get; install clang-19, lld-19, hipcc and rocm-device-libs by hand" >&2
  fi
fi

# Python packages. torch is pinned so pip takes the CPU build on this kind of
# machine instead of downloading a multi-GB CUDA build; keep a GPU torch if present.
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q "jinja2>=3.1" "pybind11>=2.12" "ninja>=1.11" "hypothesis>=6.100" \
  "pytest>=8" "ruff>=0.6"
python3 -m pip install -q --no-deps --no-build-isolation -e .

if [ $# -eq 0 ]; then set -- --arch sm_90 gfx942; fi
exec python3 build.py "$@"
