"""Shared fixtures: the real Mosquitto broker (DESIGN §4) and the Twilio peer plugin."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware_sim.broker import Mosquitto

pytest_plugins = ["tests.prism", "tests.pg"]

REPO = Path(__file__).resolve().parent.parent

# The accounts of the broker with the shipped security in force: panicd, the relay
# gateway the shipped ACL names, and the buttons tests.pipeline.make_fleet registers.
SECURE_ACCOUNTS = {
    "panicd": "panicd-secret",
    "gw-balaikota": "gateway-secret",
    **{f"SIM-{index:05d}": f"button-secret-{index}" for index in range(3)},
}


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A private Mosquitto on a free loopback port, with config/mosquitto.conf's settings."""
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def secure_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A private Mosquitto with the shipped security in force: config/mosquitto.acl, the
    listener's client-id binding, no anonymous clients, and SECURE_ACCOUNTS."""
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto-secure"), accounts=SECURE_ACCOUNTS)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
