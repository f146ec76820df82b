#!/usr/bin/env bash
# End-to-end A/B of two distributor builds: both servers and the tonic echo run side by side, and
# the same loads go to each in interleaved rounds, so that a change is measured against its
# baseline in one run (these machines are shared and noisy: compare within a run).
#   cp target/release/distributor /tmp/distributor-base    # before the change
#   cargo build --release                                   # after it
#   scripts/ab.sh /tmp/distributor-base target/release/distributor
#   AB_ROUNDS=5 AB_DURATION=3s AB_PAIRS=1000 AB_LOADS="--window 32;--window 1 --rate 20000" scripts/ab.sh A B
#   AB_CROSS=1 scripts/ab.sh A B    # across two instances of each build on the local NATS cluster
#   AB_SCENARIO=handshake AB_LOADS="--resumable --warmup 2s;--warmup 2s" scripts/ab.sh A B   # negotiations
# Prints one line per run, then per load the median msgs/s, server CPU µs/msg and p99 of each.
# Across instances, clients connect to instance A and workers to B; the CPU is A's, and the
# tonic echo is not run (its ceiling is one instance's); nor is it for a scenario other than
# `relay` (AB_SCENARIO: the echo only relays).
# Everything runs on 127.0.0.1 and is stopped by PID on exit.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
[ $# -eq 2 ] || { echo "usage: $0 BASE_BINARY NEW_BINARY" >&2; exit 2; }
base="$(realpath "$1")"; new="$(realpath "$2")"
rounds="${AB_ROUNDS:-3}"
duration="${AB_DURATION:-3s}"
pairs="${AB_PAIRS:-1000}"
IFS=';' read -r -a loads <<< "${AB_LOADS:---window 32;--window 1}"
cd "$root"
cargo build --release --quiet --features load --bin distributor-load
run="$root/.run/ab"
mkdir -p "$run"
results="$run/results.jsonl"
: > "$results"
source "$root/scripts/bench-lib.sh"
cross="${AB_CROSS:-0}"
scenario="${AB_SCENARIO:-relay}"
cleanup() {
    stop_started
    if [ -n "${nats_up:-}" ]; then bash scripts/nats-cluster.sh down >/dev/null; fi
}
trap cleanup EXIT

declare -A port pid wport binary=([base]="$base" [new]="$new")
whos=(echo base new)
if [ "$cross" = 1 ]; then
    whos=(base new)
    bash scripts/nats-cluster.sh up >/dev/null; nats_up=1
    nats_a=nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224
    nats_b=nats://127.0.0.1:4223,nats://127.0.0.1:4224,nats://127.0.0.1:4222
    for who in base new; do
        port[$who]=$(free_port); wport[$who]=$(free_port)
        start "$who-a" "${binary[$who]}" --listen "127.0.0.1:${port[$who]}" --nats-url "$nats_a" --nats-prefix "distributor.ab$who"
        pid[$who]=$started_pid
        start "$who-b" "${binary[$who]}" --listen "127.0.0.1:${wport[$who]}" --nats-url "$nats_b" --nats-prefix "distributor.ab$who"
        wait_port "${port[$who]}"; wait_port "${wport[$who]}"
    done
else
    [ "$scenario" = relay ] || whos=(base new)
    for who in "${whos[@]}"; do
        port[$who]=$(free_port)
        case $who in
            base|new) start "$who" "${binary[$who]}" --listen "127.0.0.1:${port[$who]}" ;;
            echo) start echo target/release/distributor-load echo-server --listen "127.0.0.1:${port[$who]}" ;;
        esac
        pid[$who]=$started_pid
        wait_port "${port[$who]}"
    done
fi

show_last() { # the run just made, one line
    python3 - "$results" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).readlines()[-1])
cpu, p99, errors = r["server_cpu_us_per_message"] or 0, r["latency"]["p99_us"], r["errors"] or "none"
print(f'round {r["round"]} [{r["load"]}] {r["who"]:<5} {r["messages_per_sec"]:>11,.0f} msgs/s {cpu:6.2f} µs/msg  p99 {p99:>8.0f} µs  errors {errors}')
PY
}

first=1
for round in $(seq 1 "$rounds"); do
    for spec in "${loads[@]}"; do
        for who in "${whos[@]}"; do
            first=$((first + 100000))
            extra=(); [ "$who" = echo ] && extra=(--echo)
            [ "$cross" = 1 ] && extra=(--workers-at "http://127.0.0.1:${wport[$who]}")
            # shellcheck disable=SC2086 # a load's flags split on spaces
            target/release/distributor-load "$scenario" "${extra[@]}" --pairs "$pairs" $spec \
                --clients-at "http://127.0.0.1:${port[$who]}" --first-worker "$first" \
                --duration "$duration" --server-pid "${pid[$who]}" --json \
                | python3 -c 'import json,sys; r=json.load(sys.stdin); r["who"], r["load"], r["round"] = sys.argv[1:]; print(json.dumps(r))' \
                    "$who" "$spec" "$round" >> "$results"
            show_last
        done
    done
done

python3 - "$results" <<'PY'
import json, statistics, sys
runs = {}
for r in map(json.loads, open(sys.argv[1])):
    runs.setdefault((r["load"], r["who"]), []).append(r)
med = lambda rs, f: statistics.median(f(r) for r in rs)
print(f'\n{"load":<28}{"":<6}{"msgs/s":>11}{"µs/msg":>9}{"p99 µs":>9}   medians of the rounds; new/base')
for load in dict.fromkeys(l for l, _ in runs):
    for who in ("echo", "base", "new"):
        rs = runs.get((load, who), [])
        if rs:
            print(f'{load:<28}{who:<6}{med(rs, lambda r: r["messages_per_sec"]):>11,.0f}{med(rs, lambda r: r["server_cpu_us_per_message"] or 0):>9.2f}{med(rs, lambda r: r["latency"]["p99_us"]):>9.0f}')
    b, n = runs.get((load, "base"), []), runs.get((load, "new"), [])
    if b and n:
        cpu = [x["server_cpu_us_per_message"] / y["server_cpu_us_per_message"] for x, y in zip(n, b) if x["server_cpu_us_per_message"] and y["server_cpu_us_per_message"]]
        rate = [x["messages_per_sec"] / y["messages_per_sec"] for x, y in zip(n, b)]
        print(f'{"":<28}new/base: msgs/s {statistics.median(rate):.3f} ({min(rate):.3f}-{max(rate):.3f}), server CPU/msg '
              + (f'{statistics.median(cpu):.3f} ({min(cpu):.3f}-{max(cpu):.3f})' if cpu else '-'))
# A load with --resumable next to the same load without: what resumable streams cost on each
# server, round by round (issue 11's budget: 5 % of CPU per message).
for load in dict.fromkeys(l for l, _ in runs):
    plain = " ".join(load.replace("--resumable", "").split())
    if plain == load or not any(l == plain for l, _ in runs):
        continue
    for who in ("base", "new"):
        r, p = runs.get((load, who), []), runs.get((plain, who), [])
        cost = [x["server_cpu_us_per_message"] / y["server_cpu_us_per_message"] for x, y in zip(r, p) if x["server_cpu_us_per_message"] and y["server_cpu_us_per_message"]]
        if cost:
            print(f'{who}: [{load}] / [{plain}] server CPU/msg {statistics.median(cost):.3f} ({min(cost):.3f}-{max(cost):.3f})')
PY
