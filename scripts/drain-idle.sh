#!/usr/bin/env bash
# The drain of an instance holding idle resumable workers (no session), for one or more builds:
#   scripts/drain-idle.sh [WORKERS] [BINARY...]    (default 1000, target/release/distributor)
#   DRAIN_SESSIONS=1 scripts/drain-idle.sh ...        each worker mid-negotiation when D drains
# For each build, in turn: two instances on the local 3-node NATS cluster, B and D (drained,
# --drain-timeout 8s); WORKERS resumable workers register on D, each on its own connection;
# D is sent SIGTERM; each worker, told RECONNECT, opens its next stream on B; once D has
# exited, a client on B offers each worker (`distributor-load resume --idle-workers`). With
# DRAIN_SESSIONS=1, each worker holds a session when D drains (its client on B offered, it
# answered), and the client accepts the answer once D has exited (`--with-sessions`).
# Prints one line per build: resumed, lost with D, SIGTERM to the new stream's acknowledgement,
# and D's exit. The JSON reports stay in .run/drain-idle/. Everything is stopped by PID.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
workers="${1:-1000}"
shift || true
binaries=("$@")
[ ${#binaries[@]} -gt 0 ] || { cargo build --release --locked --quiet; binaries=(target/release/distributor); }
run="$root/.run/drain-idle"
mkdir -p "$run"
source "$root/scripts/bench-lib.sh"
cargo build --release --features load --locked --quiet --bin distributor-load
load=target/release/distributor-load
bash scripts/nats-cluster.sh up >/dev/null
trap 'stop_started; bash scripts/nats-cluster.sh down >/dev/null' EXIT
nats_url="nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224"
shape=idle
[ -z "${DRAIN_SESSIONS:-}" ] || shape="each with a session"
n=0
for binary in "${binaries[@]}"; do
    n=$((n + 1))
    prefix="distributor.drainidle$n"
    b_port=$(free_port); d_port=$(free_port)
    start "b$n" "$binary" --listen "127.0.0.1:$b_port" --nats-url "$nats_url" --nats-prefix "$prefix"
    b_pid=$started_pid
    start "d$n" "$binary" --listen "127.0.0.1:$d_port" --nats-url "$nats_url" --nats-prefix "$prefix" --drain-timeout 8s
    d_pid=$started_pid
    wait_port "$b_port"; wait_port "$d_port"
    sleep 2 # each instance hears the other's heartbeat
    "$load" resume --idle-workers ${DRAIN_SESSIONS:+--with-sessions} --pairs "$workers" --json --first-worker $((5000000 + n * 100000)) \
        --workers-at "http://127.0.0.1:$d_port" --resume-at "http://127.0.0.1:$b_port" --drain-pid "$d_pid" \
        >"$run/$n.json"
    wait "$d_pid" 2>/dev/null || true
    kill "$b_pid" 2>/dev/null || true; wait "$b_pid" 2>/dev/null || true
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'{sys.argv[2]}: {r[\"resumes\"]} workers ({sys.argv[3]}), {r[\"resumes\"] - r[\"not_resumed\"]} resumed on B, {r[\"lost\"]} lost with D, gaps {r[\"gaps\"]}, repeats {r[\"repeats\"]}; SIGTERM to the acknowledgement on B p50 {r[\"recovery_p50_us\"]/1000:.0f} ms, p99 {r[\"recovery_p99_us\"]/1000:.0f} ms; D exited {r[\"drained_exit_us\"]/1000:.0f} ms after SIGTERM')" "$run/$n.json" "$binary" "$shape"
done
