"""Device and source health, the pure core: which conditions hold now, which were raised
or cleared since the last check, and the short operations texts (DESIGN §2 Press kinds,
issue 5 item 5).

No I/O and no clock: the caller passes the registry, the stored device states, the
sources' states and ``now``. :mod:`dispatch.health_monitor` is the shell that reads and
writes the rows and queues the SMS to the operations roster (never a responder page).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta

from dispatch.messages import SMS_LIMIT, WIB, shorten, to_gsm7
from gateway.config import HealthConfig

# A battery that hovers at the threshold (cold mornings, load) must not alert and recover
# every day: once raised, it clears only this many points above the threshold.
BATTERY_CLEAR_MARGIN = 5
_PREFIX = "OPS panicd: "
_RECOVERED = "OPS panicd PULIH: "


class Condition(enum.StrEnum):
    """An unhealthy condition of a device or a source."""

    OFFLINE = "offline"
    LOW_BATTERY = "low_battery"
    SOURCE_DOWN = "source_down"
    # The SMS/voice provider answered nothing for a while (issue 12 item 2). Raised and
    # cleared by the outbox, which sees every send; the monitor only tells operations.
    PROVIDER_DOWN = "provider_down"
    # An MQTT source's persistent session was wiped or is fought over (issue 11 case 5).
    SESSION_ALARM = "session_alarm"


# Conditions another component raises and clears; evaluate() never holds them.
EXTERNAL_CONDITIONS = frozenset({Condition.PROVIDER_DOWN})


# A session alarm is an event, not a state: it holds this long after the latest one, so
# operations get one alert per episode (and a recovery once it has been quiet).
SESSION_ALARM_HOLD_S = 900.0


Key = tuple[str, Condition]


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """Thresholds and the daily summary time, from the ``[health]`` table."""

    low_battery_percent: int = 20
    offline_grace_factor: float = 1.5
    source_down_alert_s: float = 60.0
    daily_summary_at: time = time(7, 0)
    check_every_s: float = 30.0

    @classmethod
    def from_config(cls, config: HealthConfig) -> HealthSettings:
        """Settings from a validated ``[health]`` table."""
        hour, minute = (int(part) for part in config.daily_summary_at.split(":"))
        return cls(
            low_battery_percent=config.low_battery_percent,
            offline_grace_factor=config.offline_grace_factor,
            source_down_alert_s=config.source_down_alert_s,
            daily_summary_at=time(hour, minute),
            check_every_s=config.check_every_s,
        )


@dataclass(frozen=True, slots=True)
class DeviceView:
    """A registered device with what the store last heard from it."""

    id: str
    heartbeat_interval_s: float
    last_seen_at: float | None
    battery: int | None
    label: str = ""
    # Since when the device's own network says it is offline (Tasmota LWT, Zigbee2MQTT
    # or Shelly availability), or None while it reports online / reports nothing.
    reported_offline_since: float | None = None


@dataclass(frozen=True, slots=True)
class SourceState:
    """A source (MQTT broker, serial receiver) and since when it has been up or down."""

    name: str
    kind: str
    connected: bool
    since: float
    # The latest session alarm ("session_lost", "taken_over") and when it was raised.
    alarm: str | None = None
    alarm_at: float | None = None


@dataclass(frozen=True, slots=True)
class Finding:
    """A condition that holds now, with what the alert text needs."""

    subject: str
    condition: Condition
    since: float | None
    detail: Mapping[str, object] = field(default_factory=dict)

    @property
    def key(self) -> Key:
        """The (subject, condition) pair that is raised at most once at a time."""
        return (self.subject, self.condition)


def device_subject(device_id: str) -> str:
    """The subject string of a device."""
    return f"device:{device_id}"


def source_subject(name: str) -> str:
    """The subject string of a source."""
    return f"source:{name}"


def device_findings(
    device: DeviceView,
    settings: HealthSettings,
    now: float,
    *,
    baseline: float | None,
    raised: Set[Key] = frozenset(),
) -> list[Finding]:
    """Offline and low-battery findings for one device.

    ``baseline`` is when watching began (the daemon's start): a device is not called
    offline for silence while panicd itself was down, until it has had a full grace
    period to be heard. An offline condition already raised clears only on a real press.
    """
    subject = device_subject(device.id)
    out: list[Finding] = []
    limit = device.heartbeat_interval_s * settings.offline_grace_factor
    heard = device.last_seen_at
    reference = heard
    if (subject, Condition.OFFLINE) not in raised and baseline is not None:
        reference = baseline if heard is None else max(heard, baseline)
    reported = device.reported_offline_since
    # The network saying "offline" is news at once; the threshold only absorbs flapping.
    reported_down = reported is not None and now - reported >= settings.source_down_alert_s
    if (reference is not None and now - reference > limit) or reported_down:
        out.append(Finding(subject, Condition.OFFLINE, heard, {
            "device": device.id, "label": device.label, "last_seen_at": heard,
            "interval_s": device.heartbeat_interval_s, "reported_offline": reported_down,
        }))
    if device.battery is not None:
        threshold = settings.low_battery_percent
        if (subject, Condition.LOW_BATTERY) in raised:
            threshold += BATTERY_CLEAR_MARGIN
        if device.battery <= threshold:
            out.append(Finding(subject, Condition.LOW_BATTERY, heard, {
                "device": device.id, "label": device.label, "battery": device.battery,
            }))
    return out


def source_findings(source: SourceState, settings: HealthSettings, now: float) -> list[Finding]:
    """A down finding once a source has been disconnected past the threshold, and a
    session alarm while its latest one is recent."""
    out = []
    if not source.connected and now - source.since >= settings.source_down_alert_s:
        out.append(Finding(source_subject(source.name), Condition.SOURCE_DOWN, source.since,
                           {"source": source.name, "kind": source.kind}))
    at = source.alarm_at
    if source.alarm is not None and at is not None and now - at < SESSION_ALARM_HOLD_S:
        out.append(Finding(source_subject(source.name), Condition.SESSION_ALARM, at,
                           {"source": source.name, "alarm": source.alarm, "at": at}))
    return out


def sources_settle_at(
    sources: Iterable[SourceState], settings: HealthSettings, *, baseline: float
) -> float:
    """From when a count of the sources means something: at once if every source is up,
    else once they have had the start-up grace to connect.

    The grace is ``source_down_alert_s``, the same time after which a down source is
    news (by default longer than a source's connect timeout): before it, "0/1 aktif" in
    the summary would tell operations of an outage the alert itself would not yet call one.
    """
    if all(s.connected for s in sources):
        return baseline
    return baseline + settings.source_down_alert_s


def evaluate(
    devices: Iterable[DeviceView],
    sources: Iterable[SourceState],
    settings: HealthSettings,
    now: float,
    *,
    baseline: float | None,
    raised: Set[Key] = frozenset(),
) -> dict[Key, Finding]:
    """Every condition that holds now, by key."""
    found: list[Finding] = []
    for device in devices:
        found += device_findings(device, settings, now, baseline=baseline, raised=raised)
    for source in sources:
        found += source_findings(source, settings, now)
    return {f.key: f for f in found}


@dataclass(frozen=True, slots=True)
class Transitions:
    """What changed: findings to raise (alert once) and raised keys to clear (recovery)."""

    raise_: tuple[Finding, ...]
    clear: tuple[Key, ...]


def transitions(raised: Set[Key], current: Mapping[Key, Finding]) -> Transitions:
    """Compare the raised conditions with the ones that hold now."""
    return Transitions(
        raise_=tuple(f for k, f in sorted(current.items()) if k not in raised),
        clear=tuple(sorted(k for k in raised if k not in current)),
    )


# -- texts ---------------------------------------------------------------------------


def _local(at: float) -> datetime:
    return datetime.fromtimestamp(at, UTC).astimezone(WIB)


def _fit(template: str, label: str) -> str:
    """Fill ``{label}`` as " (label)", shortened so the text is one GSM-7 SMS."""
    label = re.sub(r"\s+", " ", to_gsm7(label)).strip()
    room = SMS_LIMIT - len(to_gsm7(template.format(label=""))) - len(" ()")
    label = shorten(label, max(0, room))  # at a word boundary, as responders' SMS
    return to_gsm7(template.format(label=f" ({label})" if label else ""))


def _where(detail: Mapping[str, object]) -> str:
    return str(detail.get("label") or "")


def alert_text(finding: Finding) -> str:
    """The operations SMS when a condition is raised (one GSM-7 segment)."""
    d = finding.detail
    match finding.condition:
        case Condition.OFFLINE:
            seen = d.get("last_seen_at")
            minutes = round(float(str(d.get("interval_s", 0))) / 60)
            when = (
                "belum pernah terdengar" if not isinstance(seen, int | float)
                else f"tidak terdengar sejak {_local(seen):%d/%m %H:%M} WIB"
            )
            return _fit(f"{_PREFIX}tombol {d['device']}{{label}} {when} "
                        f"(interval {minutes} mnt). Periksa perangkat.",
                        _where(d))
        case Condition.LOW_BATTERY:
            return _fit(f"{_PREFIX}baterai tombol {d['device']}{{label}} lemah "
                        f"{d['battery']}%. Mohon ganti baterai.", _where(d))
        case Condition.SOURCE_DOWN:
            what = "broker MQTT" if d.get("kind") == "mqtt" else "penerima LoRa"
            since = finding.since if finding.since is not None else 0.0
            return _fit(f"{_PREFIX}{what} {d['source']} terputus sejak "
                        f"{_local(since):%H:%M} WIB. Tombol lewat jalur ini tidak terdengar."
                        "{label}", "")
        case Condition.PROVIDER_DOWN:
            began = d.get("since")
            start = float(began) if isinstance(began, int | float) else finding.since or 0.0
            return _fit(f"{_PREFIX}SMS/telepon (Twilio) gagal terkirim sejak "
                        f"{_local(start):%H:%M} WIB. Pesan antre dan dicoba terus; "
                        "periksa jaringan/akun.{label}", "")
        case Condition.SESSION_ALARM:
            at = _local(float(str(d.get("at", 0))))
            what = ("direbut klien lain" if d.get("alarm") == "taken_over"
                    else "hilang, tekanan tombol bisa hilang")
            return _fit(f"{_PREFIX}sesi MQTT {d['source']} {what} ({at:%H:%M} WIB). "
                        "Periksa akun & client id broker.{label}", "")


def recovery_text(key: Key, now: float, *, raised_at: float, battery: int | None = None) -> str:
    """The operations SMS when a raised condition clears (one GSM-7 segment)."""
    subject, condition = key
    name = subject.split(":", 1)[1]
    at = f"{_local(now):%H:%M} WIB"
    minutes = max(0, round((now - raised_at) / 60))
    match condition:
        case Condition.OFFLINE:
            text = f"{_RECOVERED}tombol {name} terdengar lagi {at}{{label}}."
        case Condition.LOW_BATTERY:
            level = "" if battery is None else f" {battery}%"
            text = f"{_RECOVERED}baterai tombol {name} sudah normal{level}{{label}}."
        case Condition.SOURCE_DOWN:
            text = f"{_RECOVERED}{name} tersambung lagi {at} (alarm {minutes} mnt){{label}}."
        case Condition.PROVIDER_DOWN:
            text = f"{_RECOVERED}SMS/telepon ({name}) terkirim lagi {at} (alarm {minutes} mnt)."
            text += "{label}"
        case Condition.SESSION_ALARM:
            text = f"{_RECOVERED}sesi MQTT {name} tenang lagi sejak {at}{{label}}."
    return _fit(text, "")


@dataclass(frozen=True, slots=True)
class Summary:
    """The numbers of the daily health summary."""

    day: date
    devices: int
    offline: int
    low_battery: int
    sources_up: int
    sources: int
    open_incidents: int
    incidents_24h: int


def summary_text(summary: Summary) -> str:
    """The daily operations summary SMS (one GSM-7 segment)."""
    return _fit(
        f"OPS panicd {summary.day:%d/%m}: {summary.devices} tombol, {summary.offline} offline,"
        f" {summary.low_battery} baterai lemah; sumber {summary.sources_up}/{summary.sources}"
        f" aktif; {summary.open_incidents} kejadian terbuka, {summary.incidents_24h} kejadian"
        " 24 jam.{label}", "")


def summary_due(now: float, at: time, last_sent: date | None) -> date | None:
    """The local (WIB) day whose summary is due now, or None."""
    local = _local(now)
    if local.time() < at or last_sent == local.date():
        return None
    return local.date()


def next_summary_at(now: float, at: time) -> float:
    """The Unix time of the next scheduled summary after ``now``."""
    local = _local(now)
    due = datetime.combine(local.date(), at, tzinfo=WIB)
    if due.timestamp() <= now:
        due = datetime.combine(local.date() + timedelta(days=1), at, tzinfo=WIB)
    return due.timestamp()


class SourceWatch:
    """Remembers since when each source has been up or down (from sampled flags)."""

    def __init__(self) -> None:
        self._states: dict[str, SourceState] = {}

    def observe(self, name: str, kind: str, connected: bool, now: float) -> SourceState:
        """Record the source's flag at ``now``; returns its state with the change time."""
        state = self._states.get(name)
        if state is None or state.connected != connected:
            state = SourceState(name, kind, connected, now)
            self._states[name] = state
        return state
