# Sourced by gpu_check.sh and gpu_feed_check.sh: `limited NAME LIMIT COMMAND...` runs COMMAND with a
# time limit cut to what is left before $deadline (seconds since the script started), appends its output
# to $log_file and a status line (exit code, seconds) to $status_file; a part with under $min_limit
# seconds left is not started and says so. `software_versions` prints the torch, Triton and numpy
# versions for the scripts' tables.
limited() {
    local name=$1 limit=$2 left=$((deadline - SECONDS)) started=$SECONDS
    shift 2
    ((left < limit)) && limit=$left
    if ((limit < ${min_limit:-20})); then
        echo "$name: not reached (${left} s left)" >>"$status_file"
        return
    fi
    echo "== $name: $*" >>"$log_file"
    timeout "$limit" "$@" >>"$log_file" 2>&1
    echo "$name: exit $? after $((SECONDS - started)) s (limit $limit s)" >>"$status_file"
}

software_versions() {
    python -c 'import numpy, torch, triton; print(f"torch {torch.__version__}, Triton {triton.__version__}, numpy {numpy.__version__}")' 2>&1 | tail -1
}
