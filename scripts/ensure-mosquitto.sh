#!/usr/bin/env bash
# Make sure the Mosquitto broker binary is installed (tests and the demo start their own
# private instance with config/mosquitto.conf; this only installs the package).
# Idempotent; as root on a fresh Debian it apt-installs `mosquitto`.
set -euo pipefail

if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure-mosquitto: mosquitto is required (sudo apt-get install mosquitto)" >&2
    exit 1
fi
echo "ensure-mosquitto: installing mosquitto with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends mosquitto >/dev/null
