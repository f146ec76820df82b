# Shared by chaos.sh and soak.sh (sourced, not run): a NATS cluster and distributor instances
# on free loopback ports, each restartable, logs and PIDs under "$run", every process stopped by
# its PID on exit. `harness_setup NAME DURATION` first.

free_port() { python3 "$(dirname "${BASH_SOURCE[0]}")/free-port.py"; }
wait_port() { for _ in $(seq 1 150); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# The local NATS user (nats/auth.conf); no per-peer rate limit (the load drives peers fast).
export DISTRIBUTOR_NATS_USER=distributor DISTRIBUTOR_NATS_PASSWORD=local-only-not-a-secret
export DISTRIBUTOR_PEER_RATE=0
# Plain log lines (no colour codes) in the log files.
export NO_COLOR=1

declare -a nats_port nats_route nats_pid inst_port inst_metrics inst_pid inst_args

# nats_cluster N: writes N node configs (routes to each other) and starts them.
nats_cluster() {
    local n=$1 i j
    cp nats/auth.conf "$run/auth.conf"
    for ((i = 0; i < n; i++)); do nats_port[i]=$(free_port); nats_route[i]=$(free_port); done
    for ((i = 0; i < n; i++)); do
        {
            echo "server_name: n$i"
            echo "host: 127.0.0.1"
            echo "port: ${nats_port[i]}"
            echo "max_payload: 1MB"
            echo 'write_deadline: "5s"'
            echo "include ./auth.conf"
            echo "cluster { name: harness, host: 127.0.0.1, port: ${nats_route[i]}, routes: ["
            for ((j = 0; j < n; j++)); do [ "$j" != "$i" ] && echo "  nats-route://127.0.0.1:${nats_route[j]}"; done
            echo "] }"
        } >"$run/n$i.conf"
        nats_start "$i"
    done
}

nats_start() {
    "$NATS_SERVER" -c "$run/n$1.conf" >>"$run/n$1.log" 2>&1 &
    nats_pid[$1]=$!
    wait_port "${nats_port[$1]}"
}

nats_kill() { kill -9 "${nats_pid[$1]}" 2>/dev/null || true; wait "${nats_pid[$1]}" 2>/dev/null || true; }

# The NATS URL an instance uses, node `first` first.
nats_url() {
    local first=$1 i n=${#nats_port[@]} url=""
    for ((i = 0; i < n; i++)); do url+="${url:+,}nats://127.0.0.1:${nats_port[(first + i) % n]}"; done
    echo "$url"
}

# instance_new I ARGS...: an instance's ports and arguments; instance_start I starts it.
instance_new() {
    local i=$1; shift
    inst_port[i]=$(free_port)
    inst_metrics[i]=$(free_port)
    inst_args[i]="$*"
    instance_start "$i"
}

instance_start() {
    local i=$1
    # shellcheck disable=SC2086
    "$DISTRIBUTOR" --listen "127.0.0.1:${inst_port[i]}" --metrics-listen "127.0.0.1:${inst_metrics[i]}" \
        ${inst_args[i]} >>"$run/instance$i.log" 2>&1 &
    inst_pid[i]=$!
    wait_port "${inst_port[i]}"
}

instance_kill() { kill -9 "${inst_pid[$1]}" 2>/dev/null || true; wait "${inst_pid[$1]}" 2>/dev/null || true; }

# instance_drain I: SIGTERM, and wait for it to exit (20 s at most, then SIGKILL).
instance_drain() {
    local pid=${inst_pid[$1]}
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 200); do alive "$pid" || break; sleep 0.1; done
    alive "$pid" && kill -9 "$pid"
    wait "$pid" 2>/dev/null || true
}

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
metric() { # metric I NAME: an instance's metric, summed over its labels
    curl -s "http://127.0.0.1:${inst_metrics[$1]}/metrics" 2>/dev/null |
        awk -v name="$2" '$1 == name || index($1, name "{") == 1 { sum += $2 } END { print sum + 0 }'
}

stop_all() {
    local pid
    for pid in "${inst_pid[@]}" "${nats_pid[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${inst_pid[@]}" "${nats_pid[@]}"; do wait "$pid" 2>/dev/null || true; done
}

# seconds DURATION: 90s, 5m, 1h, or plain seconds.
seconds() {
    case "$1" in
        *h) echo $(( ${1%h} * 3600 )) ;;
        *m) echo $(( ${1%m} * 60 )) ;;
        *s) echo "${1%s}" ;;
        *) echo "$1" ;;
    esac
}

# harness_setup NAME DURATION: sets $total (seconds, at least 60) and $run (.run/NAME/<time>),
# builds the release binaries ($DISTRIBUTOR, $LOAD), finds nats-server ($NATS_SERVER), and
# stops every process started here on exit.
harness_setup() {
    total=$(seconds "$2")
    (( total >= 60 )) || { echo "$1 needs at least 60s" >&2; exit 2; }
    run=".run/$1/$(date -u +%Y%m%dT%H%M%SZ)"
    mkdir -p "$run"
    cargo build --release --features load --locked --quiet
    DISTRIBUTOR=target/release/distributor
    LOAD=target/release/distributor-load
    NATS_SERVER=$(scripts/nats-server.sh)
    trap stop_all EXIT
}
