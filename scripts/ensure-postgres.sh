#!/usr/bin/env bash
# Make sure the PostgreSQL server binaries are installed (the tests and benchmarks make
# their own private cluster with initdb + pg_ctl on a free port: firmware_sim/pgserver.py;
# this only installs the package). Idempotent; as root on a fresh Debian it apt-installs
# `postgresql`, whose binaries land in /usr/lib/postgresql/<major>/bin, off PATH.
# Nothing here starts, enables or depends on the system's own PostgreSQL service.
set -euo pipefail

if compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-postgres: the PostgreSQL server is required (sudo apt-get install postgresql)" >&2
    exit 1
fi
echo "ensure-postgres: installing postgresql with apt-get" >&2
# Debian's maintainer scripts start the new cluster through invoke-rc.d; a policy-rc.d
# that answers 101 ("action forbidden") keeps the service stopped. An existing policy is
# the administrator's and is left alone.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# ensure-postgres.sh: no service start during install\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends postgresql >/dev/null
if ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
    echo "ensure-postgres: postgresql installed but no initdb under /usr/lib/postgresql/*/bin" >&2
    exit 1
fi
