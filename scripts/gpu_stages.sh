#!/usr/bin/env bash
# On the device machine, in one call: build, then any of the stages named on the command
# line, each logged under $OUT/<stage>.log and cut off after its time budget:
#   example   examples/compare.py on one GPU (plain / mhc / mhc-reference) -> $OUT/example/
#   example_bf16  the same with bf16 residual streams                -> $OUT/example_bf16/
#   example2  examples/compare.py on two GPUs (1 GPU vs DDP vs FSDP2, one JIT build) -> $OUT/example2/
#   sanitize  scripts/sanitize.sh (compute-sanitizer, four tools)         -> $OUT/sanitizer/
#   bench     benchmarks/bench.py (BENCH_ARGS, default --quick)           -> $OUT/bench/
#   host      benchmarks/host_overhead.py --profile: host µs per op call (launch-bound sizes)
#   profile   benchmarks/profile_ops.py (PROFILE_ARGS): per-kernel time of a dynamic step
#   profile1  the same with one Sinkhorn iteration (what the 20 iterations cost)
#   profilec  the same with the projection on CUDA cores (the ROCm path) instead of cuBLAS
#   paths     benchmarks/projection_paths.py: session 13's dynamic path against the projection
#             kernel's, alternating in one process
#   ncu       Nsight Compute on the kernels matching NCU_KERNELS in that step
#   tests     the GPU tests (PYTEST_ARGS, default tests/gpu)
#   quick     the GPU tests in QUICK_TESTS, stopping at the first failure, cut off after
#             QUICK_S (120) s: a new kernel's own tests before the whole suite
#   tune      benchmarks/autotune.py (build with MHC_PROFILE=tune): the tuning table, which
#             later stages then use                                        -> $OUT/tuning.json
# Example: bash scripts/gpu_stages.sh example sanitize
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
start=$(date +%s)
# shellcheck disable=SC2086
python3 build.py --arch ${MHC_ARCH:-sm_90} --profile "${MHC_PROFILE:-default}" -j "$(nproc)" 2>&1 | tail -3 | tee "$OUT/build.log"
echo "build: $(($(date +%s) - start)) s" | tee -a "$OUT/build.log"
export PYTHONUNBUFFERED=1
stage() { # name, budget in seconds, command...
  local name=$1 budget=$2 t0
  shift 2
  t0=$(date +%s)
  timeout "$budget" "$@" >"$OUT/$name.log" 2>&1
  echo "$name: rc $? in $(($(date +%s) - t0)) s"
  # The last lines, without progress-bar redraws (the reply keeps only the output's tail).
  tr '\r' '\n' <"$OUT/$name.log" | grep -v 'it/s' | tail -"${TAIL_LINES:-15}"
}
STEPS=${STEPS:-600}
for s in "$@"; do
  case $s in
  example) stage example ${EXAMPLE_S:-330} python3 examples/compare.py --out "$OUT/example" -- --steps "$STEPS" ${EXAMPLE_ARGS:-} ;;
  example_bf16) stage example_bf16 ${EXAMPLE_S:-330} python3 examples/compare.py --out "$OUT/example_bf16" -- --steps "$STEPS" --stream-dtype bf16 ${EXAMPLE_ARGS:-} ;;
  example2)
    # Two ranks, an empty JIT cache, n = 3 and MHC_GEN_JIT=specialize: the n = 3 kernels are
    # compiled once, by one rank, while the other waits on the file lock.
    MHC_GEN_CACHE_DIR=/tmp/mhc_jit_cache MHC_GEN_JIT=specialize stage jit2 200 python3 -m torch.distributed.run \
      --standalone --nproc-per-node 2 examples/train_gpt.py --dist ddp --steps 3 --bf16 --streams 3
    echo "JIT builds over both ranks: $(grep -c "mhc_gen: compiling" "$OUT/jit2.log")," \
      "kernels in the cache: $(find /tmp/mhc_jit_cache -name "*.so" | wc -l)"
    stage example2 330 python3 examples/compare.py --gpus 2 --batch 16 --out "$OUT/example2" -- --steps "$STEPS"
    ;;
  sanitize) stage sanitize ${SANITIZE_S:-300} bash scripts/sanitize.sh ;;
  bench) stage bench ${BENCH_S:-400} python3 benchmarks/bench.py ${BENCH_ARGS:---quick --reps 20} --out "$OUT/bench" ;;
  host) TAIL_LINES=${TAIL_LINES:-8} stage host 120 python3 benchmarks/host_overhead.py --profile ;;
  profile) stage profile 60 python3 benchmarks/profile_ops.py ${PROFILE_ARGS:-} ;;
  profile1) stage profile1 60 python3 benchmarks/profile_ops.py --iters 1 ${PROFILE_ARGS:-} ;;
  profilec) stage profilec 60 python3 benchmarks/profile_ops.py --projection cores ${PROFILE_ARGS:-} ;;
  paths) TAIL_LINES=${TAIL_LINES:-20} stage paths ${PATHS_S:-200} python3 benchmarks/projection_paths.py --rounds 1 ;;
  ncu)
    # One launch of each kernel matching NCU_KERNELS: bandwidth, occupancy, stall reasons.
    # NCU_ARGS in place of the sections, e.g. "--set full --print-details all".
    # shellcheck disable=SC2086
    stage ncu 150 ncu --kernel-name "regex:${NCU_KERNELS:-pre_bwd|projection|token_kernel}" \
      --launch-count "${NCU_COUNT:-4}" ${NCU_ARGS:---section SpeedOfLight --section Occupancy \
      --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis} \
      python3 benchmarks/profile_ops.py --no-profiler ${PROFILE_ARGS:-}
    ;;
  tune)
    stage tune ${TUNE_S:-300} python3 benchmarks/autotune.py
    cp tuning/*.json "$OUT/" 2>/dev/null
    ;;
  quick) stage quick ${QUICK_S:-120} python3 -m pytest -m gpu -q -x -p no:cacheprovider ${QUICK_TESTS:?QUICK_TESTS names the test files} ;;
  tests) stage tests ${TESTS_S:-400} python3 -m pytest -m gpu -q -p no:cacheprovider ${PYTEST_ARGS:-tests/gpu} ;;
  *) echo "unknown stage $s" ;;
  esac
done
# The device tool returns at most eight files: everything but gpu.txt in one archive.
(cd "$OUT" && tar czf /tmp/stages.tgz --exclude gpu.txt . && find . -mindepth 1 ! -name gpu.txt -delete &&
  mv /tmp/stages.tgz stages.tgz)
