#!/usr/bin/env bash
# The time from a cut to the first replayed message, on one instance and across two, in one run:
#   scripts/resume.sh [RESUMES]     (default 1000)
# 100 resumable clients, each with a worker trickling a 200 B candidate every 20 ms; every
# 500 ms each client drops its stream (no half-close) and opens a new one with the last number
# it got (`distributor-load resume`). One instance: it resumes where it was. Across: the pairs
# start on instance A (on the local 3-node NATS cluster) and every new stream opens on B, which
# finds A holding the client and is tunnelled to it. Each instance is stopped by its PID after.
# Prints one line each; the JSON reports stay in .run/resume/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
resumes="${1:-1000}"
run="$root/.run/resume"
mkdir -p "$run"
source "$root/scripts/bench-lib.sh"
cargo build --release --features load --locked --quiet
load=target/release/distributor-load
scenario=(resume --pairs 100 --resumes "$resumes" --cut-every 500ms --every 20ms --json)

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
