#!/usr/bin/env bash
# The time from a cut to the first replayed message, on one instance and across two, in one run:
#   scripts/resume.sh [RESUMES]     (default 1000)
# 100 resumable clients, each with a worker trickling a 200 B candidate every 20 ms; every
# 500 ms each client drops its stream (no half-close) and opens a new one with the last number
# it got (`distributor-load resume`). One instance: it resumes where it was. Across: the pairs
# start on instance A (on the local 3-node NATS cluster) and every new stream opens on B, which
# finds A holding the client and is tunnelled to it. Each instance is stopped by its PID after.
# Then a drain (see below). Prints one line each; the JSON reports stay in .run/resume/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
resumes="${1:-1000}"
run="$root/.run/resume"
mkdir -p "$run"
source "$root/scripts/bench-lib.sh"
cargo build --release --features load --locked --quiet
load=target/release/distributor-load
scenario=(resume --pairs 100 --resumes "$resumes" --cut-every 500ms --every "${RESUME_EVERY:-20ms}" --json)

bash scripts/nats-cluster.sh up >/dev/null
trap 'stop_started; bash scripts/nats-cluster.sh down >/dev/null' EXIT
nats_url="nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224"
a_port=$(free_port); b_port=$(free_port)
start resume-a target/release/distributor --listen "127.0.0.1:$a_port" --nats-url "$nats_url" --nats-prefix distributor.resume
start resume-b target/release/distributor --listen "127.0.0.1:$b_port" --nats-url "$nats_url" --nats-prefix distributor.resume
wait_port "$a_port"; wait_port "$b_port"
sleep 2 # each instance hears the other's heartbeat

report() {
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'{sys.argv[2]}: {r[\"resumes\"]} resumes, {r[\"not_resumed\"]} not resumed, gaps {r[\"gaps\"]}, repeats {r[\"repeats\"]}; cut to first replayed message p50 {r[\"recovery_p50_us\"]/1000:.1f} ms, p99 {r[\"recovery_p99_us\"]/1000:.1f} ms, max {r[\"recovery_max_us\"]/1000:.1f} ms')" "$1" "$2"
}
"$load" "${scenario[@]}" --clients-at "http://127.0.0.1:$a_port" --first-worker 7000000 >"$run/same.json"
report "$run/same.json" "one instance (A)"
"$load" "${scenario[@]}" --clients-at "http://127.0.0.1:$a_port" --resume-at "http://127.0.0.1:$b_port" \
    --first-worker 8000000 >"$run/across.json"
report "$run/across.json" "across (home A, every new stream on B)"

# A drain: 1,000 resumable clients mid-negotiation on a third instance C (their workers on B,
# trickling); C is sent SIGTERM; each client, told RECONNECT, resumes on B (its home stays C
# until C's drain ends) and reads on for a second.
c_port=$(free_port)
start resume-c target/release/distributor --listen "127.0.0.1:$c_port" --nats-url "$nats_url" --nats-prefix distributor.resume --drain-timeout 8s
c_pid=$started_pid
wait_port "$c_port"
sleep 2
"$load" resume --pairs "${DRAIN_PAIRS:-1000}" --every 100ms --json --clients-at "http://127.0.0.1:$c_port" \
    --workers-at "http://127.0.0.1:$b_port" --resume-at "http://127.0.0.1:$b_port" --drain-pid "$c_pid" \
    --after-drain 1s --first-worker 9000000 >"$run/drain.json"
python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f'drain of C with {r[\"resumes\"]} resumable clients (workers on B): {r[\"resumes\"] - r[\"not_resumed\"]} resumed on B, {r[\"not_resumed\"]} not, gaps {r[\"gaps\"]}, repeats {r[\"repeats\"]}, {r[\"received\"]} messages; SIGTERM to the first message on the new stream p50 {r[\"recovery_p50_us\"]/1000:.0f} ms, p99 {r[\"recovery_p99_us\"]/1000:.0f} ms, max {r[\"recovery_max_us\"]/1000:.0f} ms')" "$run/drain.json"
start_wait=$(date +%s%N)
status=0; wait "$c_pid" || status=$?
echo "C exited with status $status, $(( ($(date +%s%N) - start_wait) / 1000000 )) ms after the clients were done"
