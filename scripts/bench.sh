#!/usr/bin/env bash
# Benchmarks: criterion for the hot path, then the end-to-end scenarios, each beside its ceiling
# in the same run, printed as one table of ratios (the machines are shared and noisy: compare
# ratios, not absolute numbers).
#   scripts/bench.sh                  everything
#   scripts/bench.sh --save NAME      ... and keep the criterion results as baseline NAME
#   scripts/bench.sh --compare NAME   ... and compare criterion results with baseline NAME
#   BENCH_DURATION=5s BENCH_PAIRS=1000 BENCH_ROUNDS=3 scripts/bench.sh --e2e-only
#   BENCH_RATES="10000 30000" scripts/bench.sh --e2e-only   ... and latency at those held rates
# Each end-to-end scenario runs BENCH_ROUNDS times, interleaved with its ceiling; the table shows
# the median ratio of the rounds and their range.
# Everything runs on 127.0.0.1 and is stopped by PID on exit.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
duration="${BENCH_DURATION:-10s}"
pairs="${BENCH_PAIRS:-1000}"
rounds="${BENCH_ROUNDS:-3}"
held_rates="${BENCH_RATES:-}"
criterion_args=()
run_criterion=1
run_e2e=1
while [ $# -gt 0 ]; do
    case "$1" in
        --save) criterion_args=(--save-baseline "$2"); shift 2 ;;
        --compare) criterion_args=(--baseline "$2"); shift 2 ;;
        --e2e-only) run_criterion=0; shift ;;
        --criterion-only) run_e2e=0; shift ;;
        *) echo "usage: $0 [--save NAME | --compare NAME] [--e2e-only | --criterion-only]" >&2; exit 2 ;;
    esac
done

if [ "$run_criterion" = 1 ]; then
    echo "== criterion (benches/core.rs)"
    cargo bench --bench core -- "${criterion_args[@]}" 2>&1 | grep -E "^[a-z_]+/|time:|thrpt:|change:|Performance|No change|regressed|improved" || true
fi
[ "$run_e2e" = 1 ] || exit 0

cargo build --release --quiet --features load --bin distributor --bin distributor-load
bin="$root/target/release"
run="$root/.run/bench"
mkdir -p "$run"
results="$run/results.jsonl"
: > "$results"
source "$root/scripts/bench-lib.sh"
cleanup() {
    stop_started
    if [ -n "${nats_up:-}" ]; then bash scripts/nats-cluster.sh down >/dev/null; fi
}
trap cleanup EXIT

# load NAME PID ARGS...: one run of distributor-load, its JSON report kept under NAME
load() {
    local name="$1" pid="$2"; shift 2
    echo "-- $name" >&2
    "$bin/distributor-load" "$@" --duration "$duration" --server-pid "$pid" --json \
        | python3 -c 'import json,sys; r=json.load(sys.stdin); r["name"]=sys.argv[1]; print(json.dumps(r))' "$name" \
        >> "$results"
}

echo "== end to end: single instance ($pairs pairs, 200 B, $duration each)"
port=$(free_port); start distributor "$bin/distributor" --listen "127.0.0.1:$port"; relay_pid=$started_pid; wait_port "$port"
eport=$(free_port); start echo "$bin/distributor-load" echo-server --listen "127.0.0.1:$eport"; echo_pid=$started_pid; wait_port "$eport"
for round in $(seq 1 "$rounds"); do
    for window in 32 1; do
        load "echo-w$window#$round" "$echo_pid" relay --echo --pairs "$pairs" --window "$window" --clients-at "http://127.0.0.1:$eport"
        load "echoshape-w$window#$round" "$echo_pid" relay --echo --echo-shape relay --pairs "$pairs" --window "$window" --clients-at "http://127.0.0.1:$eport"
        load "relay-w$window#$round" "$relay_pid" relay --pairs "$pairs" --window "$window" --clients-at "http://127.0.0.1:$port" --first-worker $((1000000 * round + 100000 * window))
    done
done
load "handshake" "$relay_pid" handshake --pairs 100 --clients-at "http://127.0.0.1:$port" --first-worker 5000000
# Latency at half of the maximum rate (the median of the window-1 runs), relay and echo alike.
half() { python3 -c 'import json,statistics,sys; print(int(statistics.median(r["messages_per_sec"] for r in map(json.loads, open(sys.argv[1])) if r["name"].startswith(sys.argv[2] + "#")) / 2))' "$results" "$1"; }
rate=$(half relay-w1)
load "lat-echo" "$echo_pid" relay --echo --pairs "$pairs" --window 1 --rate "$rate" --clients-at "http://127.0.0.1:$eport"
load "lat-relay" "$relay_pid" relay --pairs "$pairs" --window 1 --rate "$rate" --clients-at "http://127.0.0.1:$port" --first-worker 6000000
# And at the fixed rates of BENCH_RATES, if any.
held=0
for rate in $held_rates; do
    held=$((held + 1))
    load "lat-echo@$rate" "$echo_pid" relay --echo --pairs "$pairs" --window 1 --rate "$rate" --clients-at "http://127.0.0.1:$eport"
    load "lat-relay@$rate" "$relay_pid" relay --pairs "$pairs" --window 1 --rate "$rate" --clients-at "http://127.0.0.1:$port" --first-worker $((6000000 + 100000 * held))
done

echo "== end to end: two instances on the local 3-node NATS cluster"
bash scripts/nats-cluster.sh up >/dev/null; nats_up=1
pa=$(free_port); pb=$(free_port)
start a "$bin/distributor" --listen "127.0.0.1:$pa" --nats-url nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224 --nats-prefix distributor.bench; a_pid=$started_pid
start b "$bin/distributor" --listen "127.0.0.1:$pb" --nats-url nats://127.0.0.1:4223,nats://127.0.0.1:4224,nats://127.0.0.1:4222 --nats-prefix distributor.bench; b_pid=$started_pid
wait_port "$pa"; wait_port "$pb"
nats_pid=$(cat .run/nats/n1.pid)
for round in $(seq 1 "$rounds"); do
    for window in 32 1; do
        load "nats-w$window#$round" "$nats_pid" nats-ceiling --nats-url nats://127.0.0.1:4222 --nats-url-b nats://127.0.0.1:4223 --pairs "$pairs" --window "$window"
        load "cross-w$window#$round" "$a_pid" relay --pairs "$pairs" --window "$window" --clients-at "http://127.0.0.1:$pa" --workers-at "http://127.0.0.1:$pb" --first-worker $((20000000 + 1000000 * round + 100000 * window))
    done
done
load "cross-handshake" "$a_pid" handshake --pairs 100 --clients-at "http://127.0.0.1:$pa" --workers-at "http://127.0.0.1:$pb" --first-worker 9000000
rate=$(half cross-w1)
load "lat-cross" "$a_pid" relay --pairs "$pairs" --window 1 --rate "$rate" --clients-at "http://127.0.0.1:$pa" --workers-at "http://127.0.0.1:$pb" --first-worker 10000000
held=0
for rate in $held_rates; do
    held=$((held + 1))
    load "lat-cross@$rate" "$a_pid" relay --pairs "$pairs" --window 1 --rate "$rate" --clients-at "http://127.0.0.1:$pa" --workers-at "http://127.0.0.1:$pb" --first-worker $((10000000 + 100000 * held))
done

python3 - "$results" <<'PY'
import json, statistics, sys
runs = {}
for r in map(json.loads, open(sys.argv[1])):
    name, _, _ = r["name"].partition("#")
    runs.setdefault(name, []).append(r)
def median_run(rs, key):
    return sorted(rs, key=lambda r: r[key])[len(rs) // 2]
def lat(r, key="latency"):
    l = r.get(key) or {}
    return f'{l.get("p50_us", 0):.0f}/{l.get("p99_us", 0):.0f}/{l.get("max_us", 0):.0f}'
def cpu(rs):
    # The server's own CPU where the kernel accounts per-process CPU; else the whole machine's.
    vals = [r.get("server_cpu_us_per_message") for r in rs]
    star = ""
    if None in vals:
        vals, star = [r.get("machine_cpu_us_per_message") for r in rs], "*"
    vals = [v for v in vals if v is not None]
    return f"{statistics.median(vals):.2f}{star}" if vals else "-"
print()
print(f'{"scenario":<26}{"msgs/s":>10}{"ceiling/s":>11}{"ratio":>7} {"(range)":>12}  {"p50/p99/max µs":>18}  {"CPU µs/msg":>11} {"ceiling":>8}  errors')
for name, ceiling, label in [("relay-w32", "echo-w32", "single, window 32"), ("relay-w1", "echo-w1", "single, window 1"),
                             ("relay-w32", "echoshape-w32", "  echo in relay's shape"), ("relay-w1", "echoshape-w1", "  echo in relay's shape"),
                             ("cross-w32", "nats-w32", "cross-instance, window 32"), ("cross-w1", "nats-w1", "cross-instance, window 1"),
                             ("cross-w32", "echo-w32", "  vs the tonic echo"), ("cross-w1", "echo-w1", "  vs the tonic echo")]:
    rs, cs = runs.get(name, []), runs.get(ceiling, [])
    if not rs or not cs:
        continue
    ratios = [r["messages_per_sec"] / max(c["messages_per_sec"], 1e-9) for r, c in zip(rs, cs)]
    r, c = median_run(rs, "messages_per_sec"), median_run(cs, "messages_per_sec")
    errors = {}
    for x in rs:
        for k, v in x["errors"].items():
            errors[k] = errors.get(k, 0) + v
    spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
    print(f'{label:<26}{r["messages_per_sec"]:>10.0f}{c["messages_per_sec"]:>11.0f}{statistics.median(ratios):>7.2f} {spread:>12}  {lat(r):>18}  {cpu(rs):>11} {cpu(cs):>8}  {errors or "none"}')
for name, label in [("handshake", "handshake, single"), ("cross-handshake", "handshake, cross-instance")]:
    rs = runs.get(name, [])
    if rs:
        r = rs[0]
        print(f'{label:<26}{r["handshakes_per_sec"]:>10.0f}{"":>11}{"":>7} {"":>12}  {lat(r, "offer_to_answer"):>18}  {cpu(rs):>11} {"":>8}  {r["errors"] or "none"}')
print(f"medians of {len(runs.get('relay-w32', []))} interleaved rounds; CPU µs/msg: the server's own, * = the whole machine's (load generator included)")
print()
print(f'{"latency at held rates":<30}{"msgs/s":>10}  {"p50":>8}{"p90":>8}{"p99":>8}{"p99.9":>8}{"max":>9}  (µs; window 1, {runs.get("lat-relay", [{}])[0].get("pairs", "?")} pairs)')
labels = {"lat-echo": "echo (tonic)", "lat-relay": "single instance", "lat-cross": "cross-instance"}
def held_order(name):  # half the max rate first, then each fixed rate: echo, single, cross
    kind, _, rate = name.partition("@")
    return (int(rate or 0), list(labels).index(kind))
for name in sorted((n for n in runs if n.partition("@")[0] in labels), key=held_order):
    kind, _, rate = name.partition("@")
    label = labels[kind] + (f" at {rate}" if rate else ", half max")
    for r in runs.get(name, []):
        l = r.get("latency") or {}
        print(f'{label:<30}{r["messages_per_sec"]:>10.0f}  {l.get("p50_us", 0):>8.0f}{l.get("p90_us", 0):>8.0f}{l.get("p99_us", 0):>8.0f}{l.get("p999_us", 0):>8.0f}{l.get("max_us", 0):>9.0f}')
PY
