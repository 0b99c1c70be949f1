#!/usr/bin/env bash
# The whole test suite: machine setup, formatting, lints, every binary, every test.
# `.ci/run` runs exactly this with CI=true, where a missing peer fails a test instead of
# skipping it. Honours CARGO_TARGET_DIR (and other CARGO_* settings) from the caller.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests start the stagely-agent binary, so build every binary first.
cargo build --workspace --bins --locked
cargo test --workspace --locked
# The end-to-end suite again on PostgreSQL (127.0.0.1:5432, a fresh database per core): every
# behaviour holds on both stores. The store's unit tests already run on both. The same package
# selection as above (`--workspace`), so features unify the same way and nothing recompiles
# (`-p stagely-tests` alone rebuilt aws-sdk-ec2 and more: minutes); the other packages' unit
# tests run again, in seconds.
STAGELY_TEST_DATABASE=postgres cargo test --workspace --locked
