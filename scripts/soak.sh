#!/usr/bin/env bash
# Soak run: scripts/soak.sh [DURATION]   (default 10m)
#
# Two deployments at once, on free loopback ports: one instance alone, and a 2-instance cluster
# over a NATS server. Each carries, for DURATION, steady churn (clients that connect, negotiate,
# trickle candidates and leave: `distributor-load handshake --rate`) and relay load (`relay
# --rate`, window 1; across the cluster, clients on one instance and workers on the other).
# Every 10 s each instance's RSS, open file descriptors and runtime tasks are sampled into
# samples.csv. The summary compares the mean of the middle third of the run with the mean of
# the last third: flat when none grew by more than 10 % (the first third is warm-up). It fails
# if something grew or a load run failed. Logs stay in .run/soak/<time>/.
# SOAK_HANDSHAKES (per second, default 20) and SOAK_RELAY (messages/s, default 2000) set the load.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/harness-lib.sh

harness_setup soak "${1:-10m}"
handshakes=${SOAK_HANDSHAKES:-20}
relay=${SOAK_RELAY:-2000}

nats_cluster 1
instance_new 0 --shards 2                                        # alone
instance_new 1 --nats-url "$(nats_url 0)" --shards 2             # cluster, clients
instance_new 2 --nats-url "$(nats_url 0)" --shards 0             # cluster, workers
sleep 2
url() { echo "http://127.0.0.1:${inst_port[$1]}"; }
echo "soak: ${total}s, $handshakes handshakes/s and $relay relayed/s per deployment, logs in $run"

load() { # name args...: a load run for the whole soak, in the background
    local name=$1; shift
    "$LOAD" "$@" --duration "${total}s" --warmup 0s --json >"$run/$name.json" 2>"$run/$name.log" &
    load_pids+=($!)
}
load_pids=()
load churn-single handshake --pairs 10 --rate "$handshakes" --clients-at "$(url 0)" --first-worker 1000000
load relay-single relay --pairs 100 --window 1 --rate "$relay" --clients-at "$(url 0)" --first-worker 2000000
load churn-cluster handshake --pairs 10 --rate "$handshakes" --clients-at "$(url 1)" --workers-at "$(url 2)" \
    --first-worker 3000000
load relay-cluster relay --pairs 100 --window 1 --rate "$relay" --clients-at "$(url 1)" --workers-at "$(url 2)" \
    --first-worker 4000000

echo "seconds,instance,rss_kib,fds,tasks" >"$run/samples.csv"
start=$(date +%s)
while (( $(date +%s) - start < total - 10 )); do
    sleep 10
    t=$(( $(date +%s) - start ))
    for i in 0 1 2; do
        echo "$t,$i,$(rss_kib "${inst_pid[i]}"),$(fds "${inst_pid[i]}"),$(metric "$i" distributor_tasks)" >>"$run/samples.csv"
    done
done
failed=0
for pid in "${load_pids[@]}"; do wait "$pid" || failed=1; done
panics=$(cat "$run"/instance*.log | grep -c "panicked" || true)
stop_all
trap - EXIT

python3 - "$run" "$total" "$panics" "$failed" >"$run/summary.txt" <<'PY' || failed=1
import csv, json, sys
run, total, panics, load_failed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rows = list(csv.DictReader(open(f"{run}/samples.csv")))
names = {"0": "single", "1": "cluster-clients", "2": "cluster-workers"}
grew, parts = False, []
for i, name in names.items():
    mine = [r for r in rows if r["instance"] == i]
    third = max(1, len(mine) // 3)
    middle, last = mine[third:2 * third] or mine, mine[-third:]
    out = []
    for key, unit in (("rss_kib", "MiB"), ("fds", ""), ("tasks", "")):
        a = sum(float(r[key]) for r in middle) / len(middle)
        b = sum(float(r[key]) for r in last) / len(last)
        growth = (b - a) / a * 100 if a else 0.0
        grew |= growth > 10
        scale = 1024 if unit == "MiB" else 1
        out.append(f"{key.split('_')[0]} {a / scale:.1f}->{b / scale:.1f}{unit} ({growth:+.1f}%)")
    parts.append(f"{name}: " + ", ".join(out))
loads = []
for name in ("churn-single", "relay-single", "churn-cluster", "relay-cluster"):
    try:
        r = json.load(open(f"{run}/{name}.json"))
        count = r.get("handshakes") or r.get("messages") or r.get("delivered")
        errors = sum(r.get("errors", {}).values()) if isinstance(r.get("errors"), dict) else r.get("errors")
        loads.append(f"{name} {count} (errors {errors})")
    except Exception as e:
        loads.append(f"{name} FAILED ({e})")
        load_failed = 1
verdict = "flat" if not grew else "GROWING"
print(f"soak {total}s: {verdict} | " + " | ".join(parts) + " | load: " + ", ".join(loads) + f" | panics {panics}")
sys.exit(int(grew or load_failed or panics > 0))
PY
cat "$run/summary.txt"
exit "$failed"
