#!/usr/bin/env bash
# Passes the tests on a fresh machine: formatting, lints, unit and integration tests.
# Everything runs on loopback; servers start on free ports and are stopped by the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

step "nats-server (for the cluster tests)"
NATS_SERVER="$(bash scripts/nats-server.sh)"
export NATS_SERVER
"$NATS_SERVER" --version

step "cargo test"
cargo test --all-targets --locked
