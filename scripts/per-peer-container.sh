#!/usr/bin/env bash
# What a connected peer costs at a scale this host's open-file limit does not allow (its hard
# limit is 20,000 here; 50,000 peers with a connection each need 50,000 descriptors in the
# server and as many in the load generator). The server and the load generator run in one
# container of the distributor's image (scripts/image.sh) with the limit raised, the whole port
# range for connections and a 65,535 listen backlog, on the container's own loopback
# (`--network none`): nothing leaves it.
#   scripts/per-peer-container.sh [PAIRS...]     (default: 5000 25000, i.e. 10,000 and 50,000 peers)
# For each size, on a fresh container each: idle peers with a connection each, idle peers
# sharing 64 connections per side, and a storm (all of them connecting at once, a connection
# each). Prints one line each; the JSON reports stay in .run/per-peer-container/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(5000 25000)
run="$root/.run/per-peer-container"
mkdir -p "$run"
docker info >/dev/null 2>&1 || { echo "per-peer-container: no Docker engine (docker info fails)" >&2; exit 3; }
bash scripts/image.sh >/dev/null
cargo build --release --features load --locked --quiet --bin distributor-load
load="$root/target/release/distributor-load"
cid=""
trap '[ -z "$cid" ] || docker rm -f "$cid" >/dev/null 2>&1 || true' EXIT

fresh() { # starts a fresh server container; sets $cid
    [ -z "$cid" ] || docker rm -f "$cid" >/dev/null
    cid=$(docker run -d --network none --ulimit nofile=262144:262144 \
        --sysctl net.ipv4.ip_local_port_range="1024 65000" --sysctl net.core.somaxconn=65535 \
        -v "$load:/distributor-load:ro" -e NO_COLOR=1 distributor:latest --listen 127.0.0.1:8080)
    for _ in $(seq 1 200); do
        docker exec "$cid" /distributor health --addr http://127.0.0.1:8080 --timeout 200ms >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "per-peer-container: the server did not serve" >&2; docker logs "$cid" >&2; exit 1
}

for pairs in "${sizes[@]}"; do
    peers=$((2 * pairs))
    for connections in 0 64; do
        fresh
        docker exec "$cid" /distributor-load idle --pairs "$pairs" --connections "$connections" --server-pid 1 \
            --duration 3s --clients-at http://127.0.0.1:8080 --json >"$run/idle-$peers-$connections.json"
        shape=$([ "$connections" = 0 ] && echo "a connection each" || echo "sharing $connections per side")
        python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'idle, {sys.argv[2]}: {r[\"peers\"]} peers, {r[\"server_rss_per_peer_kib\"]:.1f} KiB per peer ({r[\"server_rss_before_mib\"]:.1f} -> {r[\"server_rss_connected_mib\"]:.1f} MiB), idle CPU {r[\"server_cpu_seconds\"]} s')" \
            "$run/idle-$peers-$connections.json" "$shape"
    done
    fresh
    docker exec "$cid" /distributor-load storm --pairs "$pairs" --server-pid 1 \
        --clients-at http://127.0.0.1:8080 --json >"$run/storm-$peers.json"
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'storm: {r[\"connected\"]} of {r[\"peers\"]} peers in {r[\"seconds\"]:.2f} s ({r[\"peers_per_sec\"]:.0f}/s), {r[\"failed\"]} failed; connect to welcome p50 {r[\"connect_to_welcome_p50_ms\"]:.0f} ms, p99 {r[\"connect_to_welcome_p99_ms\"]:.0f} ms')" "$run/storm-$peers.json"
    echo "$(docker logs "$cid" 2>&1 | grep -m1 -o '"message":"[^"]*open[^"]*"' || docker logs "$cid" 2>&1 | grep -m1 -i 'peers')"
done
