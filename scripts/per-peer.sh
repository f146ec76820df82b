#!/usr/bin/env bash
# What a connected peer costs, in both shapes, and how fast a storm of peers is taken:
#   scripts/per-peer.sh [PAIRS]     (default 2500: 2,500 workers and 2,500 clients)
# Each measurement gets a fresh server on a free loopback port (stopped by its PID after):
#   1. idle peers sharing 64 connections per side (as behind a multiplexing proxy);
#   2. idle peers with a connection each (as separate processes and devices connect), over gRPC
#      and over the WebSocket front;
#   3. the floor: the same idle streams against a bare tonic echo server and the h2 crate
#      alone, in both shapes;
#   4. all of them connecting at once, each on its own connection (a storm);
#   5. the same storm across a 2-instance cluster on the local NATS cluster: workers on one
#      instance (each registration subscribed and claimed through NATS before its
#      acknowledgement), clients on the other.
# Prints one line each; the JSON reports stay in .run/per-peer/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
pairs="${1:-2500}"
run="$root/.run/per-peer"
mkdir -p "$run"
source "$root/scripts/bench-lib.sh"
trap stop_started EXIT
cargo build --release --features load --locked --quiet
load=target/release/distributor-load

server() { # starts a fresh distributor; sets $port and $started_pid
    port=$(free_port)
    start "server-$1" target/release/distributor --listen "127.0.0.1:$port"
    wait_port "$port"
}

for connections in 64 0; do
    server "idle-$connections"
    "$load" idle --pairs "$pairs" --connections "$connections" --server-pid "$started_pid" --duration 3s \
        --clients-at "http://127.0.0.1:$port" --json >"$run/idle-$connections.json"
    stop_started; pids=()
    shape=$([ "$connections" = 0 ] && echo "a connection each" || echo "sharing $connections per side")
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'idle, {sys.argv[2]}: {r[\"peers\"]} peers, {r[\"server_rss_per_peer_kib\"]:.1f} KiB per peer ({r[\"server_rss_before_mib\"]:.1f} -> {r[\"server_rss_connected_mib\"]:.1f} MiB), idle CPU {r[\"server_cpu_seconds\"]} s')" \
        "$run/idle-$connections.json" "$shape"
done

# The same idle peers over the WebSocket front, a connection each (as browsers open them).
server idle-ws
"$load" idle --transport ws --pairs "$pairs" --server-pid "$started_pid" --duration 3s \
    --clients-at "http://127.0.0.1:$port" --json >"$run/idle-ws.json"
stop_started; pids=()
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'idle, WebSocket, a connection each: {r[\"peers\"]} peers, {r[\"server_rss_per_peer_kib\"]:.1f} KiB per peer ({r[\"server_rss_before_mib\"]:.1f} -> {r[\"server_rss_connected_mib\"]:.1f} MiB), idle CPU {r[\"server_cpu_seconds\"]} s')" \
    "$run/idle-ws.json"

# The floor under those figures: the same idle streams (as many as the distributor's peers)
# against a bare tonic echo server on the same proto (a task and a channel per stream) and
# against the h2 crate alone (no hyper, no tonic), in both shapes.
for stack in tonic h2; do
    for connections in 64 0; do
        port=$(free_port)
        start "echo-$stack-$connections" "$load" echo-server --stack "$stack" --listen "127.0.0.1:$port"
        wait_port "$port"
        "$load" idle --echo --echo-shape relay --pairs "$pairs" --connections "$connections" \
            --server-pid "$started_pid" --duration 2s --clients-at "http://127.0.0.1:$port" --json \
            >"$run/idle-$stack-$connections.json"
        stop_started; pids=()
        shape=$([ "$connections" = 0 ] && echo "a connection each" || echo "sharing $connections per side")
        python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'idle, bare {sys.argv[3]} server, {sys.argv[2]}: {r[\"peers\"]} streams, {r[\"server_rss_per_peer_kib\"]:.1f} KiB per stream ({r[\"server_rss_before_mib\"]:.1f} -> {r[\"server_rss_connected_mib\"]:.1f} MiB)')" \
            "$run/idle-$stack-$connections.json" "$shape" "$stack"
    done
done

server storm
"$load" storm --pairs "$pairs" --server-pid "$started_pid" --clients-at "http://127.0.0.1:$port" --json >"$run/storm.json"
stop_started; pids=()
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'storm: {r[\"connected\"]} of {r[\"peers\"]} peers in {r[\"seconds\"]:.2f} s ({r[\"peers_per_sec\"]:.0f}/s), {r[\"failed\"]} failed; connect to welcome p50 {r[\"connect_to_welcome_p50_ms\"]:.0f} ms, p99 {r[\"connect_to_welcome_p99_ms\"]:.0f} ms')" "$run/storm.json"

bash scripts/nats-cluster.sh up >/dev/null
trap 'stop_started; bash scripts/nats-cluster.sh down >/dev/null' EXIT
nats_url="nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224"
a_port=$(free_port); b_port=$(free_port)
start storm-a target/release/distributor --listen "127.0.0.1:$a_port" --nats-url "$nats_url" --nats-prefix distributor.storm
start storm-b target/release/distributor --listen "127.0.0.1:$b_port" --nats-url "$nats_url" --nats-prefix distributor.storm
wait_port "$a_port"; wait_port "$b_port"
"$load" storm --pairs "$pairs" --server-pid "$started_pid" --clients-at "http://127.0.0.1:$a_port" \
    --workers-at "http://127.0.0.1:$b_port" --json >"$run/storm-cluster.json"
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'storm across instances (workers on B, clients on A): {r[\"connected\"]} of {r[\"peers\"]} peers in {r[\"seconds\"]:.2f} s ({r[\"peers_per_sec\"]:.0f}/s), {r[\"failed\"]} failed; connect to welcome p50 {r[\"connect_to_welcome_p50_ms\"]:.0f} ms, p99 {r[\"connect_to_welcome_p99_ms\"]:.0f} ms')" "$run/storm-cluster.json"
