#!/usr/bin/env bash
# Make sure the RabbitMQ server (with its MQTT plugin) is installed. The tests start their
# own private node in a temp dir on free ports (firmware_sim/rabbitmq.py); this only
# installs the package. Idempotent; as root on a fresh Debian it apt-installs
# `rabbitmq-server` (3.10 on bookworm: MQTT plugin with quorum-queue sessions).
# Nothing here starts, enables or depends on the system's own RabbitMQ service.
set -euo pipefail

if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] && [ -x /usr/lib/rabbitmq/bin/rabbitmqctl ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-rabbitmq: RabbitMQ is required (sudo apt-get install rabbitmq-server)" >&2
    exit 1
fi
echo "ensure-rabbitmq: installing rabbitmq-server with apt-get" >&2
# Debian's maintainer scripts start the new service through invoke-rc.d; a policy-rc.d
# that answers 101 ("action forbidden") keeps it stopped. An existing policy is the
# administrator's and is left alone.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# ensure-rabbitmq.sh: no service start during install\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends rabbitmq-server >/dev/null
if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    echo "ensure-rabbitmq: rabbitmq-server installed but /usr/lib/rabbitmq/bin/rabbitmq-server is missing" >&2
    exit 1
fi
