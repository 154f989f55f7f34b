# Step bookkeeping for benchmarks/gpu_check.sh, sourced (and by tests/test_gpu_check.py, with fake steps).
#   step "<name>" <command...>   runs the command, shows its output, and files it under exactly one of:
#     FAILED   non-zero exit (other than pytest's 5)
#     SKIPPED  pytest exit 5 (no test collected or all deselected); or exit 0 with a pytest summary
#              line that counts skipped tests but none passed; or exit 0 with a last line that is a
#              JSON object with a "skipped" key (the benchmarks' way of saying they had nothing to run)
#     passed   anything else that exits 0
#   summary                      prints the three lists; returns 1 if any step failed, 3 if none failed
#                                but some skipped (a GPU check that skipped verified nothing), else 0.
failed=()
skipped=()
passed=()

# $1: a file holding a step's output. Prints why it counts as skipped, or nothing.
skip_reason() {
    local summary last
    # pytest's last line: "== 2 skipped, 5 deselected in 1.2s ==" (or without the = signs under -q)
    summary=$(grep -E '^(=+ )?(no tests ran|[0-9]+ (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)).* in [0-9.]+s' "$1" | tail -n 1)
    if [ -n "$summary" ] && [[ "$summary" == *skipped* || "$summary" == *deselected* || "$summary" == *"no tests ran"* ]] \
        && [[ "$summary" != *passed* ]]; then
        echo "pytest: $(echo "$summary" | sed -E 's/^=+ //; s/ =+$//')"
        return
    fi
    last=$(grep -v '^[[:space:]]*$' "$1" | tail -n 1)
    if [[ "$last" == "{"*'"skipped"'* ]]; then
        echo "$last" | sed -E 's/.*"skipped": *"([^"]*)".*/\1/'
    fi
}

step() {
    local name="$1"; shift
    echo
    echo "=== [$name] $*"
    local t0=$SECONDS log rc why
    log=$(mktemp)
    "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 5 ]; then
        why=$(skip_reason "$log"); why=${why:-pytest exit 5: no tests ran}
        echo "=== [$name] SKIPPED ($why)"
        skipped+=("$name ($why)")
    elif [ "$rc" -ne 0 ]; then
        echo "=== [$name] FAILED (exit $rc)"
        failed+=("$name (exit $rc)")
    else
        why=$(skip_reason "$log")
        if [ -n "$why" ]; then
            echo "=== [$name] SKIPPED ($why)"
            skipped+=("$name ($why)")
        else
            passed+=("$name ($((SECONDS - t0)) s)")
        fi
    fi
    rm -f "$log"
}

summary() {
    echo
    echo "=== gpu_check summary: ${#passed[@]} passed, ${#skipped[@]} skipped, ${#failed[@]} failed"
    local s
    for s in "${passed[@]}"; do echo "  ok      $s"; done
    for s in "${skipped[@]}"; do echo "  SKIPPED $s"; done
    for s in "${failed[@]}"; do echo "  FAILED  $s"; done
    if [ "${#failed[@]}" -gt 0 ]; then return 1; fi
    if [ "${#skipped[@]}" -gt 0 ]; then return 3; fi
    return 0
}
