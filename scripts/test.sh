#!/usr/bin/env bash
# Passes the tests on a fresh machine: formatting, lints, unit and integration tests.
# Everything runs on loopback; servers start on free ports and are stopped by the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
# A one-off build: incremental caches would only take disk (about 2 GB).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

step() { printf '\n== %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings

step "cargo doc (the SDK's and the contract's public docs; the server's, private items too)"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps -p distributor-sdk -p distributor-proto
RUSTDOCFLAGS="-D warnings --document-private-items" cargo doc --locked --no-deps -p distributor --all-features

step "deployment manifests (scripts/manifests.sh)"
bash scripts/manifests.sh

step "nats-server (for the cluster tests)"
NATS_SERVER="$(bash scripts/nats-server.sh)"
export NATS_SERVER
"$NATS_SERVER" --version

step "cargo test"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --all-targets --all-features --locked --no-fail-fast 2>&1 | tee "$log" || status=$?
# The examples in the docs (`--all-targets` leaves doctests out).
cargo test --workspace --doc --all-features --locked 2>&1 | tee -a "$log" || status=$?

# The container image: built from scratch, a negotiation through it, a clean stop; then the
# cluster in containers, negotiating across instances. Needs the Docker engine; without one it
# is reported as skipped, with the reason.
step "containers (scripts/image.sh --test, scripts/compose.sh test)"
image="not run"
if reason=$(docker info 2>&1 >/dev/null); then
    if bash scripts/image.sh --test && bash scripts/compose.sh test; then
        image="passed (the image, and the compose cluster)"
    else
        image="FAILED"
        status=1
    fi
else
    image="skipped: the Docker engine does not answer ($(echo "$reason" | tail -1))"
    echo "$image"
fi

# One closing line over every test binary (the last binary cargo runs may hold no test).
# A test that cannot run here says so (`test skipped: NAME: REASON`, tests/common): counted as
# skipped, not passed.
grep '^test skipped: ' "$log" || true
awk '/^test result:/ { passed += $4; failed += $6 } /^test skipped: / { skipped += 1 }
     END { printf "\ntests: %d passed, %d failed, %d skipped\n", passed - skipped, failed, skipped }' "$log"
echo "containers: $image"
exit "$status"
