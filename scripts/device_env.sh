# Source on the device machine: installs the wheels in .whl/ that its image lacks into
# /tmp/site and puts them on PYTHONPATH and PATH (the machine has no network).
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
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/site/bin:$PATH
fi
