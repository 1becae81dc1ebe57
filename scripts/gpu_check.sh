#!/usr/bin/env bash
# On the device machine: build for its GPU, run the GPU tests, log under $OUT.
# Wheels for packages the image lacks travel in .whl/ (see README, "GPU tests").
set -uo pipefail
OUT=${OUT:-/tmp/mhc_gen_out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  missing=()
  for w in .whl/*.whl; do
    mod=$(basename "$w" | cut -d- -f1 | tr 'A-Z' 'a-z')
    python3 -c "import $mod" 2>/dev/null || missing+=("$w")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "${missing[@]}"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    export PATH=/tmp/site/bin:$PATH
  fi
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# MHC_ARCH="sm_80 sm_90" also builds sm_80: the GPU tests then force every sm_80 variant (and
# tests/gpu/test_arch_override.py the A100 path) on this newer GPU, through their PTX.
arch=${MHC_ARCH:-sm_90}
start=$(date +%s)
# shellcheck disable=SC2086
python3 build.py --arch $arch -j "$(nproc)" 2>&1 | tail -5 | tee "$OUT/build.log" || exit 1
echo "build: $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
PYTHONUNBUFFERED=1 python3 -m pytest -m gpu -q --maxfail=20 -p no:cacheprovider "$@" tests/gpu 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
