#!/usr/bin/env bash
# On a GPU machine, after python build.py: single cases of scripts/sanitize_workload.py under
# compute-sanitizer's initcheck, side by side, each case's report count, the reports its
# record buffer skipped, and its reports by kernel. For tracing where reports come from when
# the whole workload's run overflows the tool's buffer (scripts/sanitize.sh). Each argument
# is one run: the workload's arguments, e.g.
#   bash scripts/initcheck_cases.sh '--only "bfloat16 n=32 C=1100"' \
#     '--only "bfloat16 n=32 C=1100" --set _FP32_GEMM_MAX_TOKENS=0'
# Logs go to $OUT/initcheck/<k>.log; INITCHECK_S bounds each run (seconds, default 200).
set -uo pipefail
OUT=${OUT:-/tmp/mhc_gen_out}
mkdir -p "$OUT/initcheck"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export MHC_GEN_DISABLE_JIT=1
one() { # k, the workload's arguments
  local log="$OUT/initcheck/$1.log"
  eval "set -- $2"
  timeout "${INITCHECK_S:-200}" compute-sanitizer --tool initcheck --print-limit 5000 \
    --show-backtrace no python3 scripts/sanitize_workload.py "$@" >"$log" 2>&1
  echo "rc $?" >>"$log"
}
k=0
for case in "$@"; do
  one $k "$case" &
  k=$((k + 1))
done
wait
k=0
for case in "$@"; do
  log="$OUT/initcheck/$k.log"
  echo "== $case: $(grep -E 'ERROR SUMMARY' "$log"); $(grep -oE '[0-9]+ errors were skipped' "$log" || echo 'none skipped'); $(grep -c '^ok ' "$log") cases ran; $(tail -1 "$log")"
  grep -E "^=========     at " "$log" | sed -E 's/^=========     at (void )?//; s/[<(].*//' |
    sort | uniq -c | sort -rn | head -5
  k=$((k + 1))
done
