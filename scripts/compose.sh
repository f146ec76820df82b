#!/usr/bin/env bash
# The local cluster in containers (deploy/compose.yaml): three NATS nodes, three instances.
#   scripts/compose.sh up       build the images from scratch (nothing is pulled), start the
#                               cluster, wait until the three instances are SERVING with NATS
#   scripts/compose.sh down     stop and remove it
#   scripts/compose.sh status   the containers, and each instance's health
#   scripts/compose.sh test     up, 50 handshakes from clients on instance 1 to workers on
#                               instance 3, then partitions under load (instance 1 cut off
#                               from NATS, then NATS node 2 cut off), the drain of an
#                               instance with resumable workers mid-negotiation (they move
#                               with their sessions), a rolling
#                               restart under load, down (scripts/test.sh runs this)
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

load() { target/release/distributor-load "$@"; }

handshakes() { # handshakes N CLIENTS-PORT WORKERS-PORT FIRST-WORKER: N handshakes, no error
    local report
    report=$(load handshake --pairs 10 --max-messages "$1" --warmup 0s --duration 20s --first-worker "$4" \
        --clients-at "http://127.0.0.1:$2" --workers-at "http://127.0.0.1:$3" --json)
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); n=int(sys.argv[2]); assert r["handshakes"] == n and not r["errors"], r' \
        "$report" "$1"
}

seconds_since() { python3 -c "import sys,time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$1"; }

# wait_health PORT SERVICE WANT: until `distributor health` says WANT (SERVING or not), 30 s at
# most; prints how long it took.
wait_health() {
    local from; from=$(date +%s.%N)
    for _ in $(seq 1 150); do
        if health "$1" "$2" >/dev/null; then [ "$3" = SERVING ] && break; else [ "$3" != SERVING ] && break; fi
        sleep 0.2
    done
    seconds_since "$from"
}

# The partitions, under `distributor-load chaos` (an exact tally of every message) across the
# three instances: instance 1 cut off from the NATS network, then NATS node 2 cut off from the
# other two and from the instances. Nothing may be lost or duplicated, and every message must be
# accounted for (delivered + refused + PEER_GONE + cut = sent).
partitions() {
    local tally="$root/.run/compose-chaos.json" targets="" port chaos
    for port in "${ports[@]}"; do targets+="${targets:+,}http://127.0.0.1:$port"; done
    load chaos --pairs 12 --duration 40s --targets "$targets" --json >"$tally" &
    chaos=$!
    sleep 5

    docker network disconnect distributor_nats distributor_distributor-1_1
    local noticed; noticed=$(wait_health "${ports[0]}" distributor.cluster NOT)
    echo "partition: instance 1 cut off from NATS; its cluster health went NOT_SERVING after $noticed s"
    # The bound (`docs/cluster.md`): two NATS pings without a pong, about 6 s.
    python3 -c 'import sys; assert float(sys.argv[1]) <= 8.0, f"noticed after {sys.argv[1]} s"' "$noticed"
    local refused
    refused=$(load handshake --pairs 2 --warmup 0s --duration 3s --first-worker 6900000 \
        --clients-at "http://127.0.0.1:${ports[0]}" --workers-at "http://127.0.0.1:${ports[2]}" --json)
    python3 -c 'import json,sys; e=json.loads(sys.argv[1])["errors"]; assert e.get("CLUSTER_UNAVAILABLE", 0) > 0 and set(e) == {"CLUSTER_UNAVAILABLE"}, e' "$refused"
    echo "partition: offers from instance 1 to instance 3 refused with CLUSTER_UNAVAILABLE"
    handshakes 20 "${ports[0]}" "${ports[0]}" 7000000
    echo "partition: 20 handshakes within instance 1 meanwhile, no error"
    sleep 5
    docker network connect distributor_nats distributor_distributor-1_1
    echo "partition: healed; instance 1 back on NATS after $(wait_health "${ports[0]}" distributor.cluster SERVING) s"
    handshakes 20 "${ports[0]}" "${ports[2]}" 7100000
    echo "partition: 20 handshakes from instance 1 to instance 3 after, no error"

    sleep 3
    docker network disconnect distributor_nats distributor_nats-2_1
    echo "partition: NATS node 2 cut off from the other nodes and the instances for 8 s"
    sleep 8
    docker network connect distributor_nats distributor_nats-2_1

    wait "$chaos"
    python3 - "$tally" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
print("partition: chaos tally", json.dumps({k: t[k] for k in ("sent", "delivered", "refused", "peer_gone", "cut", "lost", "duplicated")}))
assert t["balances"] and t["lost"] == 0 and t["duplicated"] == 0, t
assert t["refused"].get("CLUSTER_UNAVAILABLE", 0) > 0 or t["cut"] > 0, ("the partition showed nowhere", t)
assert t["delivered"] > 0.5 * t["sent"], t
PY
}

# A rolling restart under `distributor-load chaos`: each instance in turn is stopped (SIGTERM:
# the drain, which must end with exit code 0 within the stop grace), started again, and waited
# for until SERVING with NATS. The pairs' streams are plain (a rolling restart with resumable
# peers is issue 25): every session an instance takes down must be reported (PEER_GONE, a
# refusal, a cut stream), none lost or duplicated, and the tally must balance.
rolling_restart() {
    local tally="$root/.run/compose-rolling.json" targets="" port chaos i code
    for port in "${ports[@]}"; do targets+="${targets:+,}http://127.0.0.1:$port"; done
    load chaos --pairs 12 --duration 60s --targets "$targets" --first-worker 8000000 --json >"$tally" &
    chaos=$!
    sleep 5
    for i in 1 2 3; do
        local from; from=$(date +%s.%N)
        compose stop -t 10 "distributor-$i" >/dev/null 2>&1
        code=$(docker inspect -f '{{.State.ExitCode}}' "distributor_distributor-${i}_1")
        echo "rolling restart: instance $i drained and exited $code after $(seconds_since "$from") s"
        [ "$code" = 0 ] || { echo "instance $i exited $code" >&2; return 1; }
        compose start "distributor-$i" >/dev/null 2>&1
        echo "rolling restart: instance $i SERVING with NATS again after $(wait_health "${ports[i - 1]}" distributor.cluster SERVING) s"
        sleep 3
    done
    wait "$chaos"
    python3 - "$tally" <<'PY'
import json, sys
t = json.load(open(sys.argv[1]))
print("rolling restart: chaos tally", json.dumps({k: t[k] for k in ("sent", "delivered", "refused", "peer_gone", "cut", "lost", "duplicated", "stream_ends")}))
assert t["balances"] and t["lost"] == 0 and t["duplicated"] == 0, t
assert t["cut"] + t["peer_gone"] > 0, ("the restarts showed nowhere", t)
assert t["delivered"] > 0.5 * t["sent"], t
PY
}

# The drain of an instance holding resumable workers mid-negotiation: instance 2 is stopped
# (SIGTERM, as a scale-in does) while 100 such workers are registered on it, each with a
# session (its client, on instance 3, offered; it answered); each, told RECONNECT, resumes on
# instance 3 and moves there with its session: the instance exits long before its drain
# timeout, and once it is gone each client accepts the answer, which its worker must get.
drain_idle() {
    local report="$root/.run/compose-drain-idle.json"
    load resume --idle-workers --with-sessions --pairs 100 --first-worker 9000000 --json \
        --workers-at "http://127.0.0.1:${ports[1]}" --resume-at "http://127.0.0.1:${ports[2]}" \
        --drain-cmd "docker-compose -p distributor -f deploy/compose.yaml stop -t 10 distributor-2 >/dev/null 2>&1" \
        >"$report"
    python3 - "$report" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"drain of workers mid-negotiation: {r['resumes']} resumed on instance 3 ({r['not_resumed']} not), {r['lost']} lost with instance 2, "
      f"gaps {r['gaps']}, repeats {r['repeats']}; instance 2 stopped {r['drained_exit_us'] / 1e6:.1f} s after SIGTERM")
assert r["resumes"] == 100 and r["not_resumed"] == 0 and r["lost"] == 0 and r["gaps"] == 0 and r["repeats"] == 0, r
assert r["drained_exit_us"] < 8e6, ("the drain held on to the workers", r)
PY
    compose start distributor-2 >/dev/null 2>&1
    echo "drain of workers: instance 2 SERVING with NATS again after $(wait_health "${ports[1]}" distributor.cluster SERVING) s"
}

case "${1:-}" in
    test)
        trap 'compose down --remove-orphans >/dev/null 2>&1 || true' EXIT
        up
        cargo build --release --locked --quiet --features load --bin distributor-load
        handshakes 50 "${ports[0]}" "${ports[2]}" 1000000
        echo "compose: 50 handshakes from instance 1 to instance 3, no error"
        partitions
        drain_idle
        rolling_restart
        ;;
    up) up ;;
    down) compose down --remove-orphans ;;
    status)
        compose ps
        for port in "${ports[@]}"; do echo "127.0.0.1:$port: $(health "$port" distributor.cluster || true)"; done
        ;;
    *) echo "usage: $0 up|down|status|test" >&2; exit 2 ;;
esac
