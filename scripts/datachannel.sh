#!/usr/bin/env bash
# Real WebRTC data channels through the distributor, with the peer SDK (BENCHMARKS.md):
#   scripts/datachannel.sh [OPENS] [CONCURRENT]     (default 200 and 1000)
# 1. OPENS sequential opens through one instance, then as many between the same SDK peers
#    signaling directly in-process (the baseline, same run);
# 2. the same with the client on one instance and the worker on another, over a 3-node NATS
#    cluster;
# 3. CONCURRENT clients opening at once, each with its own signaling connection, to 10 workers;
# 4. one channel's throughput (64 MiB in 16 KiB messages) through the SDK and through bare str0m.
# Everything on 127.0.0.1, free ports, each process stopped by its PID; JSON in .run/datachannel/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/harness-lib.sh
opens=${1:-200}
concurrent=${2:-1000}

harness_setup datachannel 60s
nats_cluster 3
instance_new 0                                           # alone
instance_new 1 --nats-url "$(nats_url 0)" --nats-prefix distributor.dc
instance_new 2 --nats-url "$(nats_url 1)" --nats-prefix distributor.dc
sleep 2
url() { echo "http://127.0.0.1:${inst_port[$1]}"; }

run_load() { # name args...
    local name=$1; shift
    "$LOAD" datachannel "$@" --json >"$run/$name.json"
    echo "$name: $(cat "$run/$name.json")"
}
run_load one-instance --opens "$opens" --clients-at "$(url 0)"
run_load across-instances --opens "$opens" --clients-at "$(url 1)" --workers-at "$(url 2)" --first-worker 3000000
run_load concurrent --opens 0 --concurrent "$concurrent" --workers 10 --clients-at "$(url 0)" --first-worker 4000000
run_load throughput --opens 0 --throughput-mib 64 --clients-at "$(url 0)"
