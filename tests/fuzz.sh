#!/usr/bin/env bash
# Bounded fuzzing of every parser that sees peer bytes (firmware/fuzz, cargo-fuzz + libFuzzer).
#
#   bash tests/fuzz.sh [seconds per target]      (default 20, or $FUZZ_SECONDS)
#
# The whole step keeps within $FUZZ_BUDGET seconds (default 240) including the build: after a slow
# (cold) build, each target gets less time, never under 5 s.
#
# Installs cargo-fuzz if missing, builds all targets, runs each for the given time on its committed seed
# corpus (firmware/fuzz/corpus/<target>, never written to) plus a working corpus kept between runs
# (tests/.work/fuzz/corpus/<target>), and writes the executions per target to
# tests/.work/figures/fuzz.json. Exits non-zero if a target crashes, panics, times out or exceeds its
# memory limit; the input that did it is in tests/.work/fuzz/artifacts/ (replay it with the command
# printed). Turn such an input into a regression test in the owning crate and fix the crate.
#
# Only stable Rust is installed: cargo-fuzz's -Z flags are allowed through RUSTC_BOOTSTRAP=1. No
# sanitizer (-s none): the firmware is safe Rust (unsafe_code = "forbid"), so AddressSanitizer would
# mostly slow the runs down; panics, debug assertions (overflow checks), timeouts and the RSS limit
# are what the targets check.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
secs="${1:-${FUZZ_SECONDS:-20}}"
budget="${FUZZ_BUDGET:-240}"
# A fixed seed makes a CI run reproducible: the same inputs are tried in the same order, so a failure
# found on the CI machine is found again here. Set FUZZ_SEED to explore elsewhere on a workstation.
seed="${FUZZ_SEED:-1}"
fuzz_dir=firmware/fuzz
work=tests/.work/fuzz
figures=tests/.work/figures/fuzz.json
rss_limit_mb=512
export RUSTC_BOOTSTRAP=1

started=$(date +%s)
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "Installing cargo-fuzz (cargo install cargo-fuzz --locked)..."
    cargo install cargo-fuzz --locked
fi
echo "Building the fuzz targets (release, debug assertions, no sanitizer)..."
cargo fuzz build --fuzz-dir "$fuzz_dir" -s none --codegen-units 16
built=$(date +%s)
bin_dir="$fuzz_dir/target/x86_64-unknown-linux-gnu/release"
mapfile -t targets < <(cargo fuzz list --fuzz-dir "$fuzz_dir")
# What is left of the budget (10 s kept for start-up and the figures) is shared by the targets.
fit=$(((budget - (built - started) - 10) / ${#targets[@]}))
if [ "$fit" -lt "$secs" ]; then
    secs=$((fit < 5 ? 5 : fit))
    echo "The build took $((built - started)) s: $secs s per target to keep within ${budget} s."
fi

mkdir -p "$work/artifacts" "$(dirname "$figures")"
declare -A execs
failed=()
for t in "${targets[@]}"; do
    mkdir -p "$work/corpus/$t"
    log="$work/$t.log"
    printf 'Fuzzing %-14s for %s s... ' "$t" "$secs"
    set +e
    "$bin_dir/$t" -seed="$seed" -max_total_time="$secs" -rss_limit_mb="$rss_limit_mb" -timeout=10 -max_len=65536 \
        -print_final_stats=1 -artifact_prefix="$work/artifacts/$t-" \
        "$work/corpus/$t" "$fuzz_dir/corpus/$t" >"$log" 2>&1
    rc=$?
    set -e
    n=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    execs[$t]=${n:-0}
    if [ "$rc" -eq 0 ]; then
        echo "${execs[$t]} executions"
    else
        failed+=("$t")
        echo "FAILED (exit $rc) after ${execs[$t]} executions"
        grep -E "ERROR|panicked|SUMMARY|Test unit written" "$log" | head -20 || true
        echo "  Log: $log. Replay: RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir $fuzz_dir -s none $t <artifact above>"
    fi
done
finished=$(date +%s)

{
    echo "{"
    for t in "${targets[@]}"; do echo "  \"executions.$t\": ${execs[$t]},"; done
    echo "  \"fuzz_targets\": ${#targets[@]},"
    echo "  \"fuzz_targets_failed\": ${#failed[@]},"
    echo "  \"fuzz_seconds_per_target\": $secs,"
    echo "  \"fuzz_build_seconds\": $((built - started)),"
    echo "  \"fuzz_total_seconds\": $((finished - started))"
    echo "}"
} >"$figures"
echo "Fuzzing took $((finished - started)) s (build $((built - started)) s). Figures: $figures"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "Fuzz targets failed: ${failed[*]}" >&2
    exit 1
fi
