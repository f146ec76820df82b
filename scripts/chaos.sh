#!/usr/bin/env bash
# Chaos run: scripts/chaos.sh [DURATION]   (default 5m)
#
# A 3-node NATS cluster and 3 distributor instances on free loopback ports, and
# `distributor-load chaos` relaying across the instances (each pair's worker and client on
# different ones) while, every 3-10 s at random, one of these happens:
#   - a NATS node is SIGKILLed, and restarted 2-6 s later;
#   - an instance is SIGKILLed, and restarted at once on the same port;
#   - an instance is drained (SIGTERM), and restarted once it has exited.
# The faults stop 20 s before the load does. Then one summary line: the load's tally (sent,
# delivered, refused by code, ended by PEER_GONE, cut with a stream, lost, duplicated), the
# faults, panics in the logs, the instances' peak RSS. It fails if anything was lost or
# duplicated, if the tally does not balance, or if anything panicked. Logs stay in
# .run/chaos/<time>/. CHAOS_PAIRS (default 60) and CHAOS_SEED (default: random) change the run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/harness-lib.sh

harness_setup chaos "${1:-5m}"
pairs=${CHAOS_PAIRS:-60}
seed=${CHAOS_SEED:-$RANDOM}
RANDOM=$seed

nats_cluster 3
for i in 0 1 2; do
    # Instance 0 routes inline, the others on two shard threads.
    instance_new "$i" --nats-url "$(nats_url "$i")" --shards $(( i == 0 ? 0 : 2 )) --drain-timeout 5s
done
targets="http://127.0.0.1:${inst_port[0]},http://127.0.0.1:${inst_port[1]},http://127.0.0.1:${inst_port[2]}"
sleep 2 # NATS spreads the instances' subscriptions

load_for=$(( total - 10 ))
"$LOAD" chaos --pairs "$pairs" --targets "$targets" --duration "${load_for}s" --json \
    >"$run/tally.json" 2>"$run/load.log" &
load_pid=$!
echo "chaos: ${total}s, $pairs pairs, seed $seed, logs in $run"

start=$(date +%s)
faults_until=$(( start + load_for - 20 ))
peak_kib=0
nats_kills=0 instance_kills=0 drains=0
sample() {
    local pid kib
    for pid in "${inst_pid[@]}"; do
        kib=$(rss_kib "$pid")
        (( kib > peak_kib )) && peak_kib=$kib
    done
    return 0
}
wait_sampling() { # seconds to wait, sampling RSS each second
    local k
    for ((k = 0; k < $1; k++)); do sample; sleep 1; done
}

while (( $(date +%s) < faults_until )); do
    wait_sampling $(( 3 + RANDOM % 8 ))
    (( $(date +%s) < faults_until )) || break
    target=$(( RANDOM % 3 ))
    case $(( RANDOM % 3 )) in
        0)
            echo "$(date -u +%T) SIGKILL NATS node $target" | tee -a "$run/faults.log"
            nats_kill "$target"
            nats_kills=$(( nats_kills + 1 ))
            wait_sampling $(( 2 + RANDOM % 5 ))
            nats_start "$target"
            ;;
        1)
            echo "$(date -u +%T) SIGKILL instance $target" | tee -a "$run/faults.log"
            sample
            instance_kill "$target"
            instance_kills=$(( instance_kills + 1 ))
            instance_start "$target"
            ;;
        2)
            echo "$(date -u +%T) SIGTERM (drain) instance $target" | tee -a "$run/faults.log"
            sample
            instance_drain "$target"
            drains=$(( drains + 1 ))
            instance_start "$target"
            ;;
    esac
done
while alive "$load_pid"; do wait_sampling 1; done
wait "$load_pid" || { echo "the load generator failed:"; tail -20 "$run/load.log"; exit 1; }
stop_all
trap - EXIT

panics=$(cat "$run"/instance*.log | grep -c "panicked" || true)
failed=0
python3 - "$run/tally.json" "$total" "$pairs" "$nats_kills" "$instance_kills" "$drains" "$panics" "$peak_kib" \
    >"$run/summary.txt" <<'PY' || failed=1
import json, sys
t = json.load(open(sys.argv[1]))
total, pairs, nk, ik, dr, panics, peak = sys.argv[2:]
refused = sum(t["refused"].values())
codes = " ".join(f"{k}={v}" for k, v in sorted(t["refused"].items())) or "none"
print(f"chaos {total}s {pairs} pairs: sent {t['sent']} delivered {t['delivered']} "
      f"refused {refused} ({codes}) peer_gone {t['peer_gone']} cut {t['cut']} lost {t['lost']} "
      f"duplicated {t['duplicated']} balances {t['balances']} | negotiations {t['negotiations']} "
      f"| faults: {nk} NATS kills, {ik} instance kills, {dr} drains | panics {panics} "
      f"| peak RSS {int(peak) / 1024:.1f} MiB")
sys.exit(int(t["lost"] > 0 or t["duplicated"] > 0 or not t["balances"] or int(panics) > 0 or t["sent"] == 0))
PY
cat "$run/summary.txt"
exit "$failed"
