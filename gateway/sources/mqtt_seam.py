"""The private corners of aiomqtt 2.5 that panicd relies on, in one place.

aiomqtt has no public API for three things the MQTT source needs (issue 18):

* manual acknowledgement: paho's ``manual_ack_set(True)`` and ``ack(mid, qos)``, so a
  press is PUBACKed after its commit, never on receipt (DESIGN §2 Durability);
* the CONNACK's "session present" flag, which aiomqtt reads and drops, wrapped around
  aiomqtt's own ``_on_connect`` handler;
* a publish that only queues the packet (paho's ``publish``) from a commit callback,
  where awaiting aiomqtt's ``publish`` is not possible.

All three go through the paho client aiomqtt keeps in ``Client._client`` and through
``Client._on_connect``. :func:`paho_of` checks that they are what this module expects
and raises :class:`MqttSeamError` otherwise — at the first connection, with one line that
names the aiomqtt version — instead of an AttributeError deep in the ingest path, or,
worse, a client that acknowledges on receipt. ``tests/test_mqtt_seam.py`` runs these
checks against the installed aiomqtt and a real broker, so an upgrade that changes them
fails the test command. docs/OPERATIONS.md ("The MQTT client seam") says what moving to
aiomqtt's own acknowledgement (empicano/aiomqtt pull request #346, open) or to paho's own
asyncio support would take; until then aiomqtt is pinned ``>=2.5,<2.6``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import aiomqtt
import paho.mqtt.client as mqtt

ConnectHandler = Callable[..., None]


class MqttSeamError(RuntimeError):
    """The installed aiomqtt no longer has what panicd reaches into."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"aiomqtt {version('aiomqtt')} changed what panicd relies on ({what}); panicd is"
            " tested with aiomqtt 2.5 (gateway/sources/mqtt_seam.py)"
        )


def paho_of(client: aiomqtt.Client) -> mqtt.Client:
    """The paho client inside ``client``, checked to offer what panicd calls on it."""
    paho = getattr(client, "_client", None)
    if not isinstance(paho, mqtt.Client):
        raise MqttSeamError("Client._client is not a paho.mqtt.client.Client")
    for name in ("manual_ack_set", "ack", "publish"):
        if not callable(getattr(paho, name, None)):
            raise MqttSeamError(f"paho Client.{name} is missing")
    if not callable(getattr(client, "_on_connect", None)):
        raise MqttSeamError("Client._on_connect is missing")
    return paho


@dataclass(frozen=True, slots=True)
class Seam:
    """What panicd calls on one aiomqtt client's paho client, checked once at creation."""

    paho: mqtt.Client

    def ack(self, mid: int, qos: int) -> None:
        """Send the PUBACK for message ``mid`` (manual acknowledgement is on)."""
        self.paho.ack(mid, qos)

    def queue_publish(self, topic: str, payload: str | bytes, *, qos: int) -> None:
        """Queue a publish without awaiting it (aiomqtt's loop writes it)."""
        self.paho.publish(topic, payload, qos=qos)


def open_seam(client: aiomqtt.Client,
              on_session_present: Callable[[bool], None] | None = None) -> Seam:
    """Switch ``client`` to manual acknowledgement (PUBACK after commit) and, if given,
    call ``on_session_present(flag)`` on every CONNACK before aiomqtt's own handler."""
    paho = paho_of(client)
    paho.manual_ack_set(True)
    if on_session_present is not None:
        on_connect: ConnectHandler = client._on_connect
        record = on_session_present

        def recording(paho_client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                      reason_code: Any, properties: Any = None) -> None:
            record(bool(flags.session_present))
            on_connect(paho_client, userdata, flags, reason_code, properties)

        paho.on_connect = recording
    return Seam(paho)
