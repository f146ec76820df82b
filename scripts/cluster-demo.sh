#!/usr/bin/env bash
# A client on one distributor opens a real WebRTC data channel to a worker on another, over the
# local 3-node NATS cluster: first the negotiation message by message (examples/negotiate.rs),
# then `distributor client` against `distributor worker`, echoing over the data channel.
# Starts everything it needs on 127.0.0.1 and stops it again (by PID) on exit.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
run="$root/.run/demo"
mkdir -p "$run"

cargo build --release --quiet --features peers --bin distributor --example negotiate
bash scripts/nats-cluster.sh up

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    bash scripts/nats-cluster.sh down
}
trap cleanup EXIT

# The local cluster's user (nats/auth.conf); without --auth-secret, the instances talk
# unauthenticated over NATS, which is allowed on loopback only.
export DISTRIBUTOR_NATS_USER=distributor DISTRIBUTOR_NATS_PASSWORD=local-only-not-a-secret

start() { # name listen nats-url
    ./target/release/distributor --listen "$2" --nats-url "$3" >"$run/$1.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 100); do
        (exec 3<>"/dev/tcp/${2%:*}/${2##*:}") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "$1 did not start; see $run/$1.log" >&2
    return 1
}
start a 127.0.0.1:50051 nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224
start b 127.0.0.1:50052 nats://127.0.0.1:4223,nats://127.0.0.1:4224,nats://127.0.0.1:4222
echo "distributor a on 127.0.0.1:50051, b on 127.0.0.1:50052 (logs in $run)"

./target/release/examples/negotiate --client-at http://127.0.0.1:50051 --worker-at http://127.0.0.1:50052

echo
echo "== a real data channel: distributor worker on b, distributor client on a"
./target/release/distributor worker --id 4242 --connect http://127.0.0.1:50052 --bind 127.0.0.1 2>"$run/worker.log" &
pids+=($!)
for _ in $(seq 1 100); do grep -q registered "$run/worker.log" 2>/dev/null && break; sleep 0.1; done
./target/release/distributor client --worker 4242 --connect http://127.0.0.1:50051 --bind 127.0.0.1 --messages 200 --size 1024
