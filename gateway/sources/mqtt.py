"""MQTT source over aiomqtt 2.5: persistent session, QoS 1, PUBACK only after commit.

aiomqtt does not expose manual acknowledgement, so we switch its paho client to
``manual_ack_set(True)`` and call ``ack(mid, qos)`` from the ingest pipeline's commit
callback, through the one checked seam of gateway/sources/mqtt_seam.py (MQTT 3.1.1
§4.3.2: the receiver owns the message once it sends PUBACK). A message that was never
acknowledged is redelivered by the broker when we reconnect with the same client id and
``clean_session=False``.

That session is only as safe as the client id: whoever connects with it disconnects us
(MQTT 3.1.1 §3.1.4), and with a clean session wipes what was queued for us. The shipped
broker binds client ids to accounts (config/mosquitto.conf); :class:`SessionGuard` is
the second line, alerting operations when the session is nevertheless lost or fought over.

A source may name several brokers (``brokers``, the first preferred): a failed connect
or a lost connection sends the next attempt to the next broker, round robin, and the
reconnect backoff is waited once per full round, so a dead broker does not delay
reaching the next one (docs/OPERATIONS.md, "Broker failover").
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import aiomqtt
import structlog

from gateway.backoff import Attempts, Backoff, Jitter
from gateway.config import BrokerAddress, MqttSourceConfig
from gateway.errors import DecodeError
from gateway.formats import native, payload_bytes
from gateway.ingest import Inbound, Ingestor, Outcome, Repeated, Stored
from gateway.model import Frame, Ignored, Reception
from gateway.sources.decoding import decoder_for
from gateway.sources.mqtt_seam import Seam, open_seam

log = structlog.get_logger("panicd.mqtt")


SESSION_LOST = "session_lost"
TAKEN_OVER = "taken_over"


@dataclass(frozen=True, slots=True)
class SessionAlarm:
    """Evidence that the persistent session was wiped or another client uses our id."""

    reason: str  # SESSION_LOST or TAKEN_OVER
    at: float


class SessionGuard:
    """Reads a persistent session's connection history for signs of trouble (pure).

    * A reconnect whose CONNACK says session present = 0 (MQTT 3.1.1 §3.2.2.2) although
      this process already had a session on that broker: the broker forgot it (a
      clean-session connect with our client id, a broker restart without persistence,
      expiry), and whatever was queued in it is gone. Sessions are per broker: the first
      connect to another broker of the list finds none, which is expected, not an alarm.
    * In MQTT 3.1.1 being taken over (§3.1.4) is only a socket the broker closes. Two
      clients with one id keep kicking each other off, so the signature is a connection
      dropped while the very next connect, to the same broker, succeeds (a bounce),
      ``bounces`` times within ``window_s``. A broker restart or an outage fails the next
      connect, and a failover connects to another broker: neither is a bounce.
    """

    def __init__(self, *, bounces: int = 3, window_s: float = 60.0) -> None:
        self._had_session: set[str] = set()
        self._dropped = False
        self._last_broker: str | None = None
        self._bounces: deque[float] = deque(maxlen=bounces)
        self._window_s = window_s

    def dropped(self) -> None:
        """The broker closed a connection that was up."""
        self._dropped = True

    def connect_failed(self) -> None:
        """A connect attempt failed: the drop before it was an outage, not a bounce."""
        self._dropped = False

    def connected(self, session_present: bool, now: float, broker: str = "") -> list[SessionAlarm]:
        """A connect to ``broker`` succeeded (and subscribed); the alarms it reveals."""
        alarms = []
        if broker in self._had_session and not session_present:
            alarms.append(SessionAlarm(SESSION_LOST, now))
        self._had_session.add(broker)
        if self._dropped and broker == self._last_broker:
            self._bounces.append(now)
            if (len(self._bounces) == self._bounces.maxlen
                    and now - self._bounces[0] <= self._window_s):
                alarms.append(SessionAlarm(TAKEN_OVER, now))
                self._bounces.clear()  # one alarm per run of bounces, not one per bounce
        self._dropped = False
        self._last_broker = broker
        return alarms


class BrokerRotation:
    """Which broker to try next, and whether a full round has failed (pure).

    A failed connect or a lost connection moves on to the next broker; only when every
    broker of the list has failed since the last success (or since the round began) is
    the caller told to back off, so one dead broker costs no delay before the next.
    """

    def __init__(self, brokers: tuple[BrokerAddress, ...]) -> None:
        if not brokers:
            raise ValueError("a source needs at least one broker")
        self._brokers = brokers
        self._index = 0
        self._failures = 0

    @property
    def current(self) -> BrokerAddress:
        """The broker to connect to now."""
        return self._brokers[self._index]

    def succeeded(self) -> None:
        """Connected to :attr:`current`: a new round starts from it."""
        self._failures = 0

    def failed(self) -> bool:
        """:attr:`current` failed or was lost; move on. True when a full round has failed."""
        self._index = (self._index + 1) % len(self._brokers)
        self._failures += 1
        if self._failures >= len(self._brokers):
            self._failures = 0
            return True
        return False


class MqttSource:
    """One broker connection (to one of the source's brokers) feeding the ingest pipeline."""

    def __init__(
        self,
        config: MqttSourceConfig,
        ingestor: Ingestor,
        *,
        drain_timeout_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        on_availability: Callable[[str, str, bool, float], None] | None = None,
    ) -> None:
        self.name = config.name
        self._config = config
        self._ingestor = ingestor
        self._drain_timeout_s = drain_timeout_s
        self._clock = clock
        self._decode = decoder_for(config.format, config.format_options)
        # Third-party decoders that understand LWT/availability messages expose this.
        self._availability = getattr(self._decode, "availability", None)
        self._on_availability = on_availability
        self._client: aiomqtt.Client | None = None
        # The seam of each live client, by id(client) (gateway/sources/mqtt_seam.py).
        self._seams: dict[int, Seam] = {}
        self._generation = 0
        self._connected = False
        self._first_connect = asyncio.Event()
        self._connections = 0
        self._connection_made = asyncio.Condition()
        self._guard = SessionGuard()
        self._rotation = BrokerRotation(config.brokers)
        # The broker of the live connection (or of the last one), for logs and status.
        self.broker: BrokerAddress | None = None
        self._session_present = False
        # The latest session alarm, for the health monitor (an operations alert).
        self.alarm: SessionAlarm | None = None
        self.received = 0
        self.acked = 0

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up."""
        return self._connected

    async def wait_connected(self) -> None:
        """Return once the source has connected the first time."""
        await self._first_connect.wait()

    async def wait_connections(self, count: int) -> None:
        """Return once the source has connected (and subscribed) ``count`` times."""
        async with self._connection_made:
            await self._connection_made.wait_for(lambda: self._connections >= count)

    @property
    def client(self) -> aiomqtt.Client | None:
        """The live client, for publishing presser feedback on the same connection."""
        return self._client if self._connected else None

    def _make_client(self, broker: BrokerAddress) -> aiomqtt.Client:
        cfg = self._config
        tls_context = None
        if cfg.tls:
            tls_context = ssl.create_default_context(
                cafile=str(cfg.ca_file) if cfg.ca_file else None
            )
        client = aiomqtt.Client(
            broker.host,
            broker.port,
            identifier=cfg.client_id,
            clean_session=False,
            keepalive=cfg.keepalive_s,
            username=cfg.username,
            password=cfg.password,
            tls_context=tls_context,
            timeout=10,
            # PUBACKs and feedback are tiny: send them now, not after a delayed ACK.
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )
        # What aiomqtt 2.5 lacks (gateway/sources/mqtt_seam.py): acknowledge after our
        # commit, not on receipt, and read "session present" from the CONNACK.
        self._seams[id(client)] = open_seam(client, self._record_session)
        return client

    def _record_session(self, present: bool) -> None:
        self._session_present = present

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, receive and reconnect until ``stop``; then drain and disconnect."""
        cfg = self._config
        backoff = Attempts(Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s, Jitter.ABOVE_BASE))
        rotation = self._rotation
        while not stop.is_set():
            broker = rotation.current
            client = self._make_client(broker)
            try:
                async with client:
                    self._generation += 1
                    self._client = client
                    for topic in cfg.topics:
                        await client.subscribe(topic, qos=1)
                    self._connected = True
                    self.broker = broker
                    self._first_connect.set()
                    backoff.reset()
                    rotation.succeeded()
                    log.info(
                        "mqtt.connected",
                        source=self.name,
                        broker=str(broker),
                        host=broker.host,
                        port=broker.port,
                        client_id=cfg.client_id,
                        topics=list(cfg.topics),
                        session_present=self._session_present,
                    )
                    alarms = self._guard.connected(self._session_present, self._clock(),
                                                   str(broker))
                    for alarm in alarms:
                        self._raise_alarm(alarm)
                    async with self._connection_made:
                        self._connections += 1
                        self._connection_made.notify_all()
                    await self._receive_until(client, stop)
                    # Keep the connection open while the pipeline commits what we handed
                    # it, so those PUBACKs still go out on this session.
                    drained = await self._ingestor.drain(self._drain_timeout_s)
                    log.info("mqtt.draining_done", source=self.name, drained=drained)
            except aiomqtt.MqttError as exc:
                was_connected = self._connected
                self._connected = False
                if was_connected:
                    self._guard.dropped()
                else:
                    self._guard.connect_failed()
                # The next broker at once; the backoff only once every broker has failed.
                delay = backoff.next_delay() if rotation.failed() else 0.0
                log.warning(
                    "mqtt.disconnected" if was_connected else "mqtt.connect_failed",
                    source=self.name,
                    broker=str(broker),
                    host=broker.host,
                    port=broker.port,
                    error=str(exc),
                    next_broker=str(rotation.current),
                    retry_in_s=round(delay, 2),
                )
                if delay > 0:
                    try:
                        async with asyncio.timeout(delay):
                            await stop.wait()
                    except TimeoutError:
                        pass
            finally:
                self._connected = False
                self._client = None
                self._seams.pop(id(client), None)
        log.info("mqtt.stopped", source=self.name)

    def _raise_alarm(self, alarm: SessionAlarm) -> None:
        """Log the alarm at error level and hold it for the health monitor."""
        self.alarm = alarm
        cfg = self._config
        broker = self.broker or cfg.brokers[0]
        where = {"source": self.name, "broker": str(broker), "host": broker.host,
                 "port": broker.port, "client_id": cfg.client_id}
        if alarm.reason == SESSION_LOST:
            log.error("mqtt.session_lost", **where,
                      hint="presses queued for panicd may be lost; check who used its client id")
        else:
            log.error("mqtt.taken_over", **where,
                      hint="another client connects with panicd's client id; bind ids to accounts")

    async def _receive_until(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        """Pump messages into the pipeline until ``stop`` (or a disconnect raises)."""
        generation = self._generation
        try:
            async with asyncio.TaskGroup() as group:
                pump = group.create_task(
                    self._pump(client, generation), name=f"mqtt.{self.name}.pump"
                )
                stopper = group.create_task(stop.wait(), name=f"mqtt.{self.name}.stop")
                await asyncio.wait({pump, stopper}, return_when=asyncio.FIRST_COMPLETED)
                pump.cancel()
                stopper.cancel()
        except* aiomqtt.MqttError as errors:
            # The TaskGroup wraps the pump's MqttError in an ExceptionGroup, which run()'s
            # `except aiomqtt.MqttError` would not catch: a broker restart would kill the
            # source (and panicd) instead of reconnecting. Hand run() the bare error.
            first = errors.exceptions[0]
            raise first from first.__cause__

    async def _pump(self, client: aiomqtt.Client, generation: int) -> None:
        async for message in client.messages:
            self.received += 1
            topic = message.topic.value
            payload = payload_bytes(message.payload)
            reception = Reception(
                path=f"mqtt:{self.name}:{topic}", received_at=self._clock(), source=self.name
            )
            try:
                decoded: Frame | Ignored | DecodeError = self._decode(topic, payload)
            except DecodeError as exc:
                decoded = exc
            done = partial(self._acknowledge, client, generation, message.mid, message.qos)
            if self._availability is not None and self._on_availability is not None:
                health = self._availability(topic, payload)
                if health is not None:
                    self._on_availability(self._config.format, health.device_ref,
                                          health.online, reception.received_at)
            if message.retain and self._config.format != "native":
                # A retained Zigbee2MQTT/Tasmota state would replay its last action (a
                # panic!) on every reconnect; retained messages are state, never presses.
                decoded = Ignored("retained")
            if isinstance(decoded, Ignored):
                log.debug("message.ignored", source=self.name, topic=topic, reason=decoded.reason)
                done(None)
                continue
            await self._ingestor.submit(
                Inbound(
                    decoded=decoded,
                    payload=payload,
                    reception=reception,
                    format=self._config.format,
                    trust=self._config.trust,
                    on_done=done,
                    # Every instance subscribes: a transmission is answered once.
                    answers_shared=self._config.format == "native",
                )
            )

    def _acknowledge(
        self,
        client: aiomqtt.Client,
        generation: int,
        mid: int,
        qos: int,
        outcome: Outcome | None,
    ) -> None:
        """Send the PUBACK, but only on the connection the message arrived on.

        After a reconnect the old packet id may name another message, so a stale ack is
        dropped: the broker redelivers that message and it is recognised as a duplicate.
        """
        if generation != self._generation or client is not self._client:
            return
        if qos > 0:
            self._seams[id(client)].ack(mid, qos)
            self.acked += 1
        if self._config.format == "native" and (
                isinstance(outcome, Stored) or (isinstance(outcome, Repeated) and outcome.answer)):
            self._feedback(client, outcome)

    def _feedback(self, client: aiomqtt.Client, outcome: Stored | Repeated) -> None:
        """Tell the button its press is stored, so its LED can show "received"."""
        body: dict[str, object] = {
            "ctr": outcome.counter, "state": "received", "press": outcome.press_id,
        }
        if isinstance(outcome, Stored) and outcome.incident_id is not None:
            body["incident"] = outcome.incident_id
        self._publish_command(client, outcome.device_id, body)

    def send_feedback(self, device_id: str, body: dict[str, object]) -> bool:
        """Publish a command to a native button (e.g. "help_coming"); False if offline."""
        client = self.client
        if client is None or self._config.format != "native":
            return False
        return self._publish_command(client, device_id, body)

    def _publish_command(
        self, client: aiomqtt.Client, device_id: str, body: dict[str, object]
    ) -> bool:
        """Sign ``body`` with the button's key and publish it; False for a keyless device.

        The "received" feedback ends the button's duty to retransmit (docs/FRAMES.md), so
        it is signed like a LoRa ACK: a broker account that could write the command topic
        must still not be able to silence a button.
        """
        key = self._ingestor.device_key(device_id)
        if key is None:
            return False
        signed = native.signed_ack(key, {"dev": device_id, **body})
        # paho's publish only queues the packet; aiomqtt's loop writes it. QoS 1 so a
        # button that reconnects still gets it (DESIGN §2 Presser feedback).
        seam = self._seams.get(id(client))
        if seam is None:
            return False  # that connection is gone; the button retransmits
        seam.queue_publish(
            native.command_topic(device_id), json.dumps(signed, separators=(",", ":")), qos=1
        )
        return True
