# Sourced by the device scripts (gpu_check.sh, gpu_overhead.sh): stage NAME TIMEOUT_S OUTFILE CMD... runs CMD under a
# time limit (killed at it), writes its output to $OUT/OUTFILE and prints it (the last $TAIL lines when TAIL is set),
# and appends "NAME rc=… …s" to the RESULTS array, so a script goes on after a failed stage and sums up at the end.
# Also sets PYTHONPATH to the repository (run from its root), PY (python3 or $PYTHON) and T0 (the start time).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
T0=$(date +%s)
declare -a RESULTS=()

stage() {
    local name=$1 limit=$2 out=$3; shift 3
    local t=$(date +%s)
    echo "=== [$name] (limit ${limit}s) $*"
    if [ -n "${TAIL:-}" ]; then
        timeout --signal=KILL "$limit" "$@" > "$OUT/$out" 2>&1
        local rc=$?
        tail -n "$TAIL" "$OUT/$out"
    else
        timeout --signal=KILL "$limit" "$@" 2>&1 | tee "$OUT/$out"
        local rc=${PIPESTATUS[0]}
    fi
    RESULTS+=("$name rc=$rc $(( $(date +%s) - t ))s")
    echo "=== [$name] rc=$rc in $(( $(date +%s) - t ))s"
}
