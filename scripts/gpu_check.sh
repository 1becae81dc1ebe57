#!/usr/bin/env bash
# On the device machine: build for its GPU, run the GPU tests, log under $OUT.
# Wheels for packages the image lacks travel in .whl/ (see README, "GPU tests").
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# MHC_ARCH="sm_80 sm_90" also builds sm_80: the GPU tests then force every sm_80 variant (and
# tests/gpu/test_arch_override.py the A100 path) on this newer GPU, through their PTX.
arch=${MHC_ARCH:-sm_90}
start=$(date +%s)
# shellcheck disable=SC2086
python3 build.py --arch $arch -j "$(nproc)" 2>&1 | tail -5 | tee "$OUT/build.log" || exit 1
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
PYTHONUNBUFFERED=1 python3 -m pytest -m gpu -q --maxfail=20 -p no:cacheprovider "$@" tests/gpu 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
