#!/usr/bin/env bash
# Builds the container image `distributor:latest` (Dockerfile) from scratch: nothing is pulled.
#   scripts/image.sh            build, then print the image's size and the time from
#                               `docker run` to SERVING on its health service
#   scripts/image.sh --test     and then: a full negotiation through the container
#                               (distributor-load handshake), and `docker stop` exits 0 within
#                               the drain timeout (scripts/test.sh runs this)
# The staged context (the stripped release binary, the shared libraries it links, glibc's NSS
# modules for host names, CA roots, a passwd entry for the unprivileged user) is under
# .run/image/.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
image="${IMAGE:-distributor:latest}"
test_too=$([ "${1:-}" = --test ] && echo 1 || echo 0)
docker info >/dev/null 2>&1 || { echo "image: no Docker engine (docker info fails)" >&2; exit 3; }
cargo build --release --locked --quiet --bin distributor

stage="$root/.run/image"
rm -rf "$stage"
mkdir -p "$stage/rootfs/etc/ssl/certs" "$stage/rootfs/tmp"
rootfs="$stage/rootfs"
objcopy --strip-debug target/release/distributor "$rootfs/distributor"
# The libraries the binary links, and glibc's NSS modules (loaded at run time, not linked).
libs=$(ldd target/release/distributor | awk '/=>/ { print $3 } /ld-linux/ { print $1 }')
nss=$(ls /lib/x86_64-linux-gnu/libnss_dns.so.2 /lib/x86_64-linux-gnu/libnss_files.so.2 \
    /lib/x86_64-linux-gnu/libresolv.so.2 2>/dev/null || true)
for lib in $libs $nss; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
done
# The loader is looked for at /lib64 too.
if [ -e "$rootfs/lib64/ld-linux-x86-64.so.2" ]; then :; else
    mkdir -p "$rootfs/lib64" && cp -L /lib64/ld-linux-x86-64.so.2 "$rootfs/lib64/"
fi
cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
printf 'root:x:0:0:root:/:/distributor\nnonroot:x:65532:65532:nonroot:/:/distributor\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/etc/group"
printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
cp Dockerfile "$stage/"
chmod 1777 "$rootfs/tmp"

docker build --quiet -t "$image" "$stage" >/dev/null
size=$(docker image inspect "$image" --format '{{.Size}}')
echo "image: $image, $(( size / 1024 / 1024 )) MiB ($size bytes)"

# Time from `docker run` to SERVING, on a free loopback port.
port=$(python3 scripts/free-port.py)
start=$(date +%s%N)
cid=$(docker run -d -e NO_COLOR=1 -p "127.0.0.1:$port:8080" "$image" --allow-open)
trap 'docker rm -f "$cid" >/dev/null 2>&1 || true' EXIT
for _ in $(seq 1 500); do
    if target/release/distributor health --addr "http://127.0.0.1:$port" --timeout 200ms >/dev/null 2>&1; then break; fi
    sleep 0.01
done
ready=$(( ($(date +%s%N) - start) / 1000000 ))
target/release/distributor health --addr "http://127.0.0.1:$port" >/dev/null
# Of which the process itself: from the container's start to its "listening" log line.
own=$(python3 - "$(docker inspect "$cid" --format '{{.State.StartedAt}}')" "$(docker logs "$cid" 2>&1 | grep -m1 listening)" <<'PY'
import re, sys
from datetime import datetime
def t(s):
    m = re.search(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z", s)
    return datetime.fromisoformat(m.group(1)).timestamp() + float("0" + (m.group(2) or ".0")[:7])
print(round((t(sys.argv[2]) - t(sys.argv[1])) * 1000))
PY
)
# Docker's own floor on this host, in the same run: `docker run` of the same image with a
# command that exits at once (`--version`), attached, until it has exited.
floor_start=$(date +%s%N)
floor_cid=$(docker run -d "$image" --version)
docker wait "$floor_cid" >/dev/null
floor=$(( ($(date +%s%N) - floor_start) / 1000000 ))
docker rm "$floor_cid" >/dev/null
echo "image: docker run to SERVING in $ready ms (the process: $own ms from its start to listening; docker's own floor here, a run of the image that exits at once: $floor ms)"
[ "$test_too" = 1 ] || exit 0

# A full negotiation through the container: 4 handshakes (offer, answer, accept, candidates
# each way, the client leaves, the worker hears PEER_GONE).
cargo build --release --locked --quiet --features load --bin distributor-load
report=$(target/release/distributor-load handshake --pairs 2 --max-messages 4 --warmup 0s --duration 10s \
    --clients-at "http://127.0.0.1:$port" --json)
python3 -c 'import json,sys; r=json.loads(sys.argv[1]); assert r["handshakes"] == 4 and not r["errors"], r' "$report"
echo "image: 4 handshakes through the container, no error"

# Stopped (SIGTERM), it drains and exits 0 within the drain timeout (8 s).
start=$(date +%s%N)
docker stop -t 20 "$cid" >/dev/null
took=$(( ($(date +%s%N) - start) / 1000000 ))
code=$(docker inspect "$cid" --format '{{.State.ExitCode}}')
[ "$code" = 0 ] || { echo "image: exit code $code after docker stop" >&2; docker logs "$cid" | tail -5 >&2; exit 1; }
(( took < 8000 )) || { echo "image: docker stop took $took ms, over the drain timeout" >&2; exit 1; }
echo "image: docker stop: exit 0 in $took ms"
