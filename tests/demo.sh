#!/usr/bin/env bash
# README's first command: set up, build, start a local Orthanc over HTTPS as the regional PACS, start
# passerelled, send a sample CT study and show it arriving. `--keep` keeps everything running until Ctrl-C.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install a Rust toolchain (rustup), 1.85 or newer." >&2; exit 1; }
bash tests/setup.sh
echo "[demo] Building passerelled (cargo build --release)..."
cargo build --release
exec python3 tests/demo.py "$@"
