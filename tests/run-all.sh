#!/usr/bin/env bash
# README's second command, and what CI runs (.ci/run): set up, lint, unit and integration tests, release
# build, then the system tests against real peers (dcmtk, pynetdicom, Orthanc behind nginx TLS).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install a Rust toolchain (rustup), 1.85 or newer." >&2; exit 1; }

step() { printf '\n==== %s ====\n' "$*"; }

step "setup"
bash tests/setup.sh
step "cargo fmt --all --check"
cargo fmt --all --check
step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
step "cargo test --workspace"
cargo test --workspace
# The system tests use only release builds, and need a few GiB (Orthanc's storage, the spools, the
# appliance image): on a small disk, the debug build gives its room back to them.
if [ "$(df -Pk target | awk 'NR == 2 { print $4 }')" -lt $((8 * 1024 * 1024)) ]; then
    echo "less than 8 GiB free: removing target/debug (the unit tests' build, about 1.5 GiB) before the release builds"
    rm -rf target/debug
fi
# The crash campaign's build first, in the same target dir (only our crates differ, the dependencies
# are shared), kept aside; then the plain release build that everything else uses.
step "cargo build --release -p passerelled --features failpoints (crash campaign build)"
cargo build --release -p passerelled --features failpoints
mkdir -p target/failpoints/release
cp target/release/passerelled target/failpoints/release/passerelled
step "cargo build --release"
cargo build --release
step "system tests"
# Figures come from this run only: stale ones from an earlier run must not reach RELIABILITY.md.
rm -rf tests/.work/figures
export PASSERELLED="${PASSERELLED:-$repo/target/release/passerelled}"
export PASSERELLED_FAILPOINTS="${PASSERELLED_FAILPOINTS:-$repo/target/failpoints/release/passerelled}"
python3 -m pytest -v tests/system
step "fuzzing (tests/fuzz.sh: every parser that sees peer bytes, 20 s each; figures to fuzz.json)"
bash tests/fuzz.sh
step "reliability figures (tests/RELIABILITY.md; fails if any figure reports a lost instance)"
python3 tests/reliability_report.py
