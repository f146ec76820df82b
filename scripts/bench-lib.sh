# Shared by bench.sh and ab.sh (sourced, not run): servers on free loopback ports, started in the
# background with their logs in "$run", and stopped by their PIDs.
pids=()
started_pid=""

# The local NATS cluster's user (nats/auth.conf), for the distributors and the NATS ceiling.
export DISTRIBUTOR_NATS_USER=distributor DISTRIBUTOR_NATS_PASSWORD=local-only-not-a-secret
# The benchmarks drive each peer far faster than signaling does: no per-peer rate limit.
export DISTRIBUTOR_PEER_RATE=0

free_port() { python3 "$(dirname "${BASH_SOURCE[0]}")/free-port.py"; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

start() { # log-name command...
    local name="$1"; shift
    "$@" >"$run/$name.log" 2>&1 &
    started_pid=$!
    pids+=("$started_pid")
}

stop_started() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
