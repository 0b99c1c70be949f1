#!/usr/bin/env bash
# The main job: build examples/monorepo end to end on this machine — an embedded core, one
# local builder instance (stagely-agent) per job, buildah, and a throwaway Distribution
# registry — and print the summary table. Extra arguments go to `stagely run` (e.g. --json).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cargo build --release --bins
exec cargo run --release --quiet --bin stagely -- run examples/monorepo "$@"
