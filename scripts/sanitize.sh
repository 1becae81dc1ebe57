#!/usr/bin/env bash
# On a GPU machine, after python build.py: run scripts/sanitize_workload.py (every kernel
# family of mhc_gen, forward and backward) under compute-sanitizer's four tools, in parallel, and print
# each tool's error count. Exit status 1 if any tool reports an error. Logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/mhc_gen_out}
mkdir -p "$OUT/sanitizer"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export MHC_GEN_DISABLE_JIT=1  # run the prebuilt kernels only; a JIT build would dominate the run
# Only mhc_gen's kernels (namespace mhc) are instrumented: cuBLAS's (the projection and ∂φ
# GEMMs) and torch's are not ours, and instrumenting them made the run several times slower.
for tool in memcheck racecheck initcheck synccheck; do
  compute-sanitizer --tool "$tool" --print-limit 50 --kernel-name kns=mhc \
    python3 scripts/sanitize_workload.py >"$OUT/sanitizer/$tool.log" 2>&1 &
done
wait
status=0
for tool in memcheck racecheck initcheck synccheck; do
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer/$tool.log" | tail -1)
  echo "$tool: ${summary:-no summary (see $OUT/sanitizer/$tool.log)}"
  echo "$summary" | grep -qE ": 0 (errors|hazards)" || status=1
done
exit $status
