#!/usr/bin/env bash
# The local cluster in containers (deploy/compose.yaml): three NATS nodes, three instances.
#   scripts/compose.sh up       build the images from scratch (nothing is pulled), start the
#                               cluster, wait until the three instances are SERVING with NATS
#   scripts/compose.sh down     stop and remove it
#   scripts/compose.sh status   the containers, and each instance's health
#   scripts/compose.sh test     up, 50 handshakes from clients on instance 1 to workers on
#                               instance 3, down (scripts/test.sh runs this)
# Instances answer on 127.0.0.1:50061, 50062 and 50063.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
compose() { docker-compose -p distributor -f deploy/compose.yaml "$@"; }
ports=(50061 50062 50063)

nats_image() { # distributor-nats:latest: the static nats-server and its configuration
    local stage="$root/.run/nats-image"
    rm -rf "$stage"
    mkdir -p "$stage/rootfs/etc/nats" "$stage/rootfs/tmp"
    cp -L "$(bash scripts/nats-server.sh)" "$stage/rootfs/nats-server"
    cp deploy/nats/nats.conf nats/auth.conf "$stage/rootfs/etc/nats/"
    chmod 1777 "$stage/rootfs/tmp"
    printf 'FROM scratch\nCOPY rootfs/ /\nUSER 65532:65532\nEXPOSE 4222 6222 8222\nENTRYPOINT ["/nats-server"]\n' \
        >"$stage/Dockerfile"
    docker build --quiet -t distributor-nats:latest "$stage" >/dev/null
}

health() { # health PORT [SERVICE]
    target/release/distributor health --addr "http://127.0.0.1:$1" --service "${2:-}" --timeout 1s 2>&1
}

up() {
    bash scripts/image.sh >/dev/null
    nats_image
    compose up -d
    for port in "${ports[@]}"; do
        for _ in $(seq 1 100); do
            health "$port" distributor.cluster >/dev/null && break
            sleep 0.2
        done
        echo "127.0.0.1:$port: $(health "$port" distributor.cluster)"
    done
}

case "${1:-}" in
    test)
        trap 'compose down --remove-orphans >/dev/null 2>&1 || true' EXIT
        up
        cargo build --release --locked --quiet --features load --bin distributor-load
        report=$(target/release/distributor-load handshake --pairs 10 --max-messages 50 --warmup 0s --duration 20s \
            --clients-at "http://127.0.0.1:${ports[0]}" --workers-at "http://127.0.0.1:${ports[2]}" --json)
        python3 -c 'import json,sys; r=json.loads(sys.argv[1]); assert r["handshakes"] == 50 and not r["errors"], r' "$report"
        echo "compose: 50 handshakes from instance 1 to instance 3, no error"
        ;;
    up) up ;;
    down) compose down --remove-orphans ;;
    status)
        compose ps
        for port in "${ports[@]}"; do echo "127.0.0.1:$port: $(health "$port" distributor.cluster || true)"; done
        ;;
    *) echo "usage: $0 up|down|status|test" >&2; exit 2 ;;
esac
