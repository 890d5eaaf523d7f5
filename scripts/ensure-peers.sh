#!/usr/bin/env bash
# Install the test peers (Stoplight Prism and Twilio's OpenAPI spec) from
# tests/peers/package-lock.json. Idempotent: a no-op when node_modules already matches
# the lockfile and node version. Runs as root on a fresh Debian (installs node/npm via
# apt-get when missing) or as a developer with node on PATH.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
peers="$root/tests/peers"
stamp="$peers/node_modules/.panicd-peers.stamp"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "ensure-peers: node and npm are required (apt-get install nodejs npm)" >&2
        exit 1
    fi
    echo "ensure-peers: installing nodejs and npm with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

want="$(sha256sum "$peers/package-lock.json" | cut -d' ' -f1) node-$(node --version)"
if [ -x "$peers/node_modules/.bin/prism" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

echo "ensure-peers: npm ci in $peers" >&2
(cd "$peers" && npm ci --no-audit --no-fund --loglevel=error)
printf '%s\n' "$want" >"$stamp"
