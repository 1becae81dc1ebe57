#!/usr/bin/env bash
# On a GPU machine, after python build.py: run scripts/sanitize_workload.py (every kernel
# family of mhc_gen, forward and backward) under compute-sanitizer's four tools, in parallel, and print
# each tool's error count. Exit status 1 if any tool reports an error. Logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/mhc_gen_out}
mkdir -p "$OUT/sanitizer"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export MHC_GEN_DISABLE_JIT=1  # run the prebuilt kernels only; a JIT build would dominate the run
# memcheck, initcheck and synccheck instrument only mhc_gen's kernels (namespace mhc):
# cuBLAS's (the projection and ∂φ GEMMs) and torch's are not ours, and instrumenting them
# made the run several times slower. racecheck runs unfiltered (with the filter it stopped on
# an internal sanitizer error in the first backward, H200, CUDA 13.0) and counts only the
# hazards reported in mhc kernels (cuBLAS's nvjet kernels report some of their own).
for tool in memcheck racecheck initcheck synccheck; do
  filter=(--print-limit 50 --kernel-name kns=mhc)
  [ "$tool" = racecheck ] && filter=(--print-limit 10000)
  compute-sanitizer --tool "$tool" "${filter[@]}" \
    python3 scripts/sanitize_workload.py >"$OUT/sanitizer/$tool.log" 2>&1 &
done
wait
status=0
for tool in memcheck racecheck initcheck synccheck; do
  log="$OUT/sanitizer/$tool.log"
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1)
  echo "$tool: ${summary:-no summary (see $log)}"
  if [ "$tool" = racecheck ]; then
    ours=$(grep -E "Race reported" "$log" | grep -c mhc)
    echo "racecheck: $ours hazard reports in mhc kernels"
    [ -n "$summary" ] && [ "$ours" = 0 ] || status=1
  else
    echo "$summary" | grep -qE ": 0 errors" || status=1
  fi
done
exit $status
