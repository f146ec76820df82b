# Shared by bench.sh and ab.sh (sourced, not run): servers on free loopback ports, started in the
# background with their logs in "$run", and stopped by their PIDs.
pids=()
started_pid=""

# The local NATS cluster's user (nats/auth.conf), for the distributors and the NATS ceiling.
export DISTRIBUTOR_NATS_USER=distributor DISTRIBUTOR_NATS_PASSWORD=local-only-not-a-secret
# The benchmarks drive each peer far faster than signaling does: no per-peer rate limit.
export DISTRIBUTOR_PEER_RATE=0

# A free port below the kernel's ephemeral range: one the kernel hands out for port 0 can be
# handed out again at once as the source port of an outgoing connection.
free_port() {
    python3 - <<'PY'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
for _ in range(1000):
    port = random.randrange(max(1024, low - 12000), low)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port)); print(port); break
    except OSError:
        pass
    finally:
        s.close()
PY
}
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
