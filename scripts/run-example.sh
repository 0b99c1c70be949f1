#!/usr/bin/env bash
# The main job: build examples/monorepo end to end on this machine — an embedded core, one
# local builder instance (stagely-agent) per job, buildah, and a throwaway Distribution
# registry — and print the summary table. Extra arguments go to `stagely run` (e.g. --json).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
# The example runs on local instances: the production binary without the EC2 provider (its
# SDK is most of a cold release build). `cargo build --release` builds it with EC2.
cargo build --release --no-default-features -p stagely-core -p stagely-agent
# The binary itself, not `cargo run`: `-p stagely-core` alone unifies dependency features
# differently from the build above and would compile some of them again.
exec "${CARGO_TARGET_DIR:-target}/release/stagely" run examples/monorepo "$@"
