#!/usr/bin/env bash
# A/B of two builds in one device call (timings compare only within one run on one card):
# this tree against a base commit archived here with
#     mkdir -p .ab && git archive -o .ab/base.tar REF      (then run with carry [".ab", ".whl"])
# Both trees are built for sm_90, then AB_CMD runs in each, base first, logged to
# $OUT/ab_base.log and $OUT/ab_new.log. For example
#     AB_CMD='python3 benchmarks/bench.py --config 16384,4096,4 --no-baselines --reps 10'
# AB_ROUNDS=2 runs base, new, base, new (logs ab_base2.log, ab_new2.log for the second
# round): a run's later half has measured 3-12% slower on unchanged kernels, which a single
# base-then-new order charges to the new tree.
# AB_PYTHON_ONLY=1: the change touches no kernel (templates, generator), so only this tree is
# built and the base runs its own Python on this tree's kernels (MHC_GEN_BUILD_DIR): one
# build (90-110 s) of device time fewer.
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
new=$(pwd)
base=/tmp/ab_base
rm -rf "$base" && mkdir -p "$base" && tar -xf .ab/base.tar -C "$base"
trees=("$base" "$new")
if [ "${AB_PYTHON_ONLY:-0}" = 1 ]; then
  trees=("$new")
  export MHC_GEN_BUILD_DIR=$new/generated
fi
for tree in "${trees[@]}"; do
  t0=$(date +%s)
  (cd "$tree" && python3 build.py --arch sm_90 -j "$(nproc)" 2>&1 | tail -1)
  echo "build $tree: $(($(date +%s) - t0)) s"
done
for round in $(seq 1 "${AB_ROUNDS:-1}"); do
  suffix=$([ "$round" = 1 ] || echo "$round")
  for side in base new; do
    tree=$base
    [ "$side" = new ] && tree=$new
    (cd "$tree" && eval "$AB_CMD") >"$OUT/ab_$side$suffix.log" 2>&1
    echo "== $side$suffix: rc $?"
    tail -"${AB_TAIL:-25}" "$OUT/ab_$side$suffix.log"
  done
done
