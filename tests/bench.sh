#!/usr/bin/env bash
# The side-by-side benchmark of issue 4 (not part of the tests or CI). Run as root:
#   sudo bash tests/bench.sh            # full: 5 runs, writes tests/PERFORMANCE.md
#   sudo bash tests/bench.sh --quick    # a couple of minutes: small datasets, 2 runs, tests/.work/PERFORMANCE-quick.md
# Other options (see tests/bench/run.py): --runs N, --only ingest,latency,forward,storage,wan,ready
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install a Rust toolchain (rustup), 1.85 or newer." >&2; exit 1; }

bash tests/setup.sh
# iproute2: network namespace, veth pair and tc netem for the WAN scenario; gcc builds the LD_PRELOAD shims.
extra=(iproute2 gcc libc6-dev)
missing=()
for p in "${extra[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "Installing Debian packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
modprobe sch_netem 2>/dev/null || true

cargo build --release
export PASSERELLED="${PASSERELLED:-$repo/target/release/passerelled}"
cd tests
exec python3 -m bench.run "$@"
