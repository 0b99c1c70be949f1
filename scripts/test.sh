#!/usr/bin/env bash
# Full check: machine setup, build every binary, run every test.
# Honours CARGO_TARGET_DIR (and other CARGO_* settings) from the caller.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cargo build --workspace --bins
cargo test --workspace
