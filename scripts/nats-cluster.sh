#!/usr/bin/env bash
# The local 3-node NATS cluster of nats/n{1,2,3}.conf, on 127.0.0.1 only.
#   scripts/nats-cluster.sh up       start it (installs nats-server when missing)
#   scripts/nats-cluster.sh down     stop it, by the PIDs it recorded
#   scripts/nats-cluster.sh status   which nodes run, and the client URL
# PID files and logs go to .run/nats (override with NATS_RUN_DIR).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
run="${NATS_RUN_DIR:-$root/.run/nats}"
nodes=(n1 n2 n3)
url="nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224"

running() { [ -f "$run/$1.pid" ] && kill -0 "$(cat "$run/$1.pid")" 2>/dev/null; }

up() {
    local server; server="$("$root/scripts/nats-server.sh")"
    mkdir -p "$run"
    for n in "${nodes[@]}"; do
        if running "$n"; then echo "$n already running (pid $(cat "$run/$n.pid"))"; continue; fi
        "$server" -c "$root/nats/$n.conf" -l "$run/$n.log" &
        echo $! > "$run/$n.pid"
        echo "$n started (pid $!)"
    done
    # Ready when every node's monitoring endpoint answers.
    for n in "${nodes[@]}"; do
        local port; port=$(sed -n 's/^http: 127.0.0.1:\([0-9]*\)/\1/p' "$root/nats/$n.conf")
        for _ in $(seq 1 50); do
            if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
            sleep 0.1
        done
    done
    echo "cluster up: DISTRIBUTOR_NATS_URL=$url DISTRIBUTOR_NATS_USER=distributor DISTRIBUTOR_NATS_PASSWORD=local-only-not-a-secret (nats/auth.conf)"
}

down() {
    for n in "${nodes[@]}"; do
        if running "$n"; then
            local pid; pid=$(cat "$run/$n.pid")
            kill "$pid"
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            echo "$n stopped (pid $pid)"
        fi
        rm -f "$run/$n.pid"
    done
}

status() {
    for n in "${nodes[@]}"; do
        if running "$n"; then echo "$n running (pid $(cat "$run/$n.pid"))"; else echo "$n stopped"; fi
    done
    echo "url: $url"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
