#!/usr/bin/env bash
# On the device machine, in one call: the working tree's kernels against each patch named
# (e.g. notes/patches/*.patch), each patch applied alone to the working tree. For each form:
# the build (incremental after the first: only what a patch touches is rebuilt), the GPU
# tests named by AB_TESTS, profile_ops.py's kernel table and projection_paths.py, logged
# under $OUT/<form>/; the lines that compare them at the end. Timings compare only within
# this one call on this one card; the working tree runs again last (AB_KEPT_AGAIN=0: not),
# since a call's later runs have measured 3-12% slower on unchanged kernels (scripts/ab.sh).
# AB_EXTRA: a command run in each form after those (its log's tail is printed). AB_TESTS is
# evaluated, so it may quote: AB_TESTS='tests/gpu/test_forward.py -k "a or b"'.
# (scripts/ab.sh compares against a commit instead.)
#   bash scripts/ab_patches.sh notes/patches/a.patch notes/patches/b.patch
#   bash scripts/ab_patches.sh notes/patches/a.patch+notes/patches/b.patch   # both in one form
set -uo pipefail
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
export PYTHONUNBUFFERED=1
TESTS=${AB_TESTS:-tests/gpu/test_layer_two_pass.py}

run_form() { # name
  local dir="$OUT/$1" t0
  mkdir -p "$dir"
  t0=$(date +%s)
  # The whole log: a failed compile's error is far above its last lines.
  if ! python3 build.py --arch sm_90 -j "$(nproc)" >"$dir/build.log" 2>&1; then
    echo "$1: build failed after $(($(date +%s) - t0)) s; the form is skipped"
    grep -m 3 -B 2 -A 6 "error" "$dir/build.log" | cut -c1-300 | sed 's/^/  /'
    return
  fi
  echo "$1: build $(($(date +%s) - t0)) s"
  # eval: AB_TESTS may quote, e.g. -k "projection or _dyn_"
  eval "timeout 300 python3 -m pytest -m gpu -q -x -p no:cacheprovider $TESTS" >"$dir/tests.log" 2>&1
  echo "$1: tests rc $? ($(tail -1 "$dir/tests.log"))"
  timeout 90 python3 benchmarks/profile_ops.py >"$dir/profile.log" 2>&1
  timeout 90 python3 benchmarks/projection_paths.py --rounds 1 >"$dir/paths.log" 2>&1
  # The kernels of the dynamic backward, and the fwd+bwd rows.
  grep -E "layer_bwd|pre_bwd|coeffs_thread" "$dir/profile.log" | awk '{print "  " $1, $2, $(NF-1)}'
  grep "fwd+bwd" "$dir/paths.log" | sed 's/^/  /'
  if [ -n "${AB_EXTRA:-}" ]; then # a command of the caller's, e.g. a probe, in each form
    timeout 120 bash -c "$AB_EXTRA" >"$dir/extra.log" 2>&1
    echo "$1: extra rc $?"
    tail -"${AB_EXTRA_TAIL:-20}" "$dir/extra.log" | sed 's/^/  /'
  fi
}

# A form is one patch, or several joined by '+' (a.patch+b.patch), applied in order: one
# build measures patches whose kernels are independent (each one's new files included,
# which a hand-made `git diff` of them applied together leaves out).
apply_all() { # patches..., in order; on a failure undoes those applied
  local applied=() p
  for p in "$@"; do
    # patch(1) where git apply refuses; tried dry first, so a stale patch leaves no hunks
    if git apply "$p" 2>/dev/null ||
      { patch -p1 --forward -s --dry-run <"$p" >/dev/null && patch -p1 --forward -s <"$p"; }; then
      applied+=("$p")
    else
      [ ${#applied[@]} -gt 0 ] && revert_all "${applied[@]}"
      return 1
    fi
  done
}
revert_all() { # patches..., as apply_all took them: undone last first
  local i p
  for ((i = $#; i >= 1; i--)); do
    p=${!i}
    git apply -R "$p" 2>/dev/null || patch -p1 -R -s <"$p"
  done
}

run_form kept
for form in "$@"; do
  IFS=+ read -r -a patches <<<"$form"
  name=$(for p in "${patches[@]}"; do basename "$p" .patch; done | paste -sd+)
  if apply_all "${patches[@]}"; then
    run_form "$name"
    revert_all "${patches[@]}"
  else
    echo "$name: does not apply"
  fi
done
[ "${AB_KEPT_AGAIN:-1}" = 1 ] && [ $# -gt 0 ] && run_form kept_again
# The device tool returns at most eight files: all but gpu.txt and earlier archives (a
# gpu_stages.sh call before this one in the same command) in one archive.
(cd "$OUT" && tar czf /tmp/ab.tgz --exclude gpu.txt --exclude '*.tgz' . &&
  find . -mindepth 1 ! -name gpu.txt ! -name '*.tgz' -delete && mv /tmp/ab.tgz ab.tgz)
