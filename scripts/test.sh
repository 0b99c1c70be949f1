#!/usr/bin/env bash
# The whole test suite: machine setup, formatting, lints, every binary, every test.
# `.ci/run` runs exactly this with CI=true, where a missing peer fails a test instead of
# skipping it. Honours CARGO_TARGET_DIR (and other CARGO_* settings) from the caller.
#
# One compile serves the lints, the binaries and the tests: clippy runs as the compiler of the
# workspace's own crates (RUSTC_WORKSPACE_WRAPPER, exactly what `cargo clippy` sets), so the
# dependencies (aws-sdk-ec2 above all) are compiled once, not once to check and once to build.
# cargo-nextest then runs every test in its own process, all binaries side by side
# (.config/nextest.toml).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
if ! command -v cargo-nextest >/dev/null; then
    echo "test.sh: installing cargo-nextest" >&2
    cargo install --locked cargo-nextest
fi
cargo fmt --all -- --check

export RUSTC_WORKSPACE_WRAPPER="$(command -v clippy-driver)"
# `cargo clippy -- -D warnings`, as cargo-clippy hands it to the driver.
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"

# Lints and compiles every target (benches and examples too); then the binaries the
# end-to-end tests start (stagely-agent, stagely).
cargo test --workspace --all-targets --locked --no-run
cargo build --workspace --bins --locked

# Documentation examples (nextest does not run them), then every test, on SQLite (the store's own tests run on both stores here).
cargo test --workspace --doc --locked
cargo nextest run --workspace --locked

# The end-to-end tests whose behaviour rests on the store, again on PostgreSQL
# (127.0.0.1:5432, a fresh database per core): restarts, replicas, leases, the log's
# exactly-once path, the reaper, the engine's guarded writes, the API's reads. Left out, as
# they test the builder, the sandbox and the front door, not the store: e2e_build,
# e2e_cache_and_secrets, e2e_sandbox, e2e_tls, e2e_flood, and the EC2 fleet tests other than
# the core restart one.
STAGELY_TEST_DATABASE=postgres cargo nextest run --workspace --locked -E '
    binary(~e2e_)
    - binary(e2e_build) - binary(e2e_cache_and_secrets) - binary(e2e_sandbox)
    - binary(e2e_tls) - binary(e2e_flood)
    - (binary(e2e_ec2) - test(sigkilled))'
