#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, then every test of every crate.
# PostgreSQL tests run when SYNCGATE_TEST_POSTGRES_URL is set (.ci/run sets it) and are
# reported as skipped otherwise.
set -euo pipefail
cd "$(dirname "$0")"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --all-targets --locked
