#!/usr/bin/env bash
# Long fuzzing runs of everything that decodes bytes from outside, and of the router and the
# reliable link: scripts/fuzz.sh [DURATION]   (default 10m; e.g. 90s, 30m, 2h)
#
# 1. The property tests of the router (against its model) and of the link (under loss,
#    duplication, reordering), many cases (DISTRIBUTOR_PROPTEST_CASES, default 20000).
# 2. For the rest of DURATION, in equal shares: the coverage-guided targets of fuzz/ (cargo-fuzz,
#    libFuzzer) when a nightly toolchain is installed (cargo-fuzz is installed into .tools if
#    missing); else the property tests of tests/fuzz.rs, in rounds, until the time is up.
# Writes logs under .run/fuzz/<time>/ and one summary line per target; exits non-zero if
# anything failed (a crashing input stays in fuzz/artifacts/<target>/).
set -euo pipefail
cd "$(dirname "$0")/.."

duration="${1:-10m}"
case "$duration" in
  *h) total=$(( ${duration%h} * 3600 )) ;;
  *m) total=$(( ${duration%m} * 60 )) ;;
  *s) total=${duration%s} ;;
  *) total=$duration ;;
esac
cases="${DISTRIBUTOR_PROPTEST_CASES:-20000}"
targets=(peer_messages link_frame claim_and_heartbeat sealed token)
out=".run/fuzz/$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
summary="$out/summary.txt"
start=$(date +%s)
failed=0

echo "== property tests of the router and the link: $cases cases each"
if DISTRIBUTOR_PROPTEST_CASES="$cases" cargo test --release --all-features --lib -- \
    the_router_does_what_the_model_says exactly_once_in_order_or_given_back >"$out/properties.log" 2>&1; then
  echo "properties: router model and lossy link, $cases cases each: ok" | tee -a "$summary"
else
  echo "properties: FAILED (see $out/properties.log)" | tee -a "$summary"
  failed=1
fi

left=$(( total - ($(date +%s) - start) ))
share=$(( left / ${#targets[@]} ))
(( share < 10 )) && share=10

if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  export PATH="$PWD/.tools/bin:$PATH"
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz into .tools"
    cargo install --locked --root .tools cargo-fuzz >"$out/install.log" 2>&1
  fi
  echo "== coverage-guided (cargo-fuzz, libFuzzer): ${share}s per target"
  (cd fuzz && cargo +nightly fuzz build -O >"../$out/build.log" 2>&1)
  for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target"
    log="$out/$target.log"
    if (cd fuzz && cargo +nightly fuzz run -O "$target" -- \
          -max_total_time="$share" -print_final_stats=1 -rss_limit_mb=4096 >"../$log" 2>&1); then
      verdict=ok
    else
      verdict="FAILED (input in fuzz/artifacts/$target/)"
      failed=1
    fi
    runs=$(awk '/stat::number_of_executed_units/ { print $NF }' "$log" | tail -1)
    corpus=$(find "fuzz/corpus/$target" -type f | wc -l)
    echo "$target: coverage-guided, ${share}s, ${runs:-?} executions, corpus $corpus inputs: $verdict" | tee -a "$summary"
  done
else
  echo "== no nightly toolchain: property tests of tests/fuzz.rs in rounds of $cases cases for ${left}s"
  round=0
  while (( $(date +%s) - start < total )); do
    round=$(( round + 1 ))
    if ! DISTRIBUTOR_PROPTEST_CASES="$cases" cargo test --release --all-features --test fuzz \
        >"$out/round-$round.log" 2>&1; then
      failed=1
      break
    fi
  done
  verdict=$([[ $failed == 0 ]] && echo ok || echo "FAILED (see $out/round-$round.log)")
  echo "tests/fuzz.rs: $round rounds of $cases cases per entry point: $verdict" | tee -a "$summary"
fi

echo "fuzz: $(( $(date +%s) - start ))s, logs in $out, $([[ $failed == 0 ]] && echo 'nothing found' || echo 'FAILURES')" | tee -a "$summary"
exit "$failed"
