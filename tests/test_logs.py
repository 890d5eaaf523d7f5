"""Logging: journal native protocol, priorities, renderers and redaction, against real sockets."""

from __future__ import annotations

import array
import io
import json
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import structlog
from structlog.testing import capture_logs

from gateway.logs import (
    PRIORITY_BY_LEVEL,
    configure_logging,
    encode_journal_fields,
    get_logger,
    journal_field_name,
)

PHONE = "+6281234567890"
MASKED = "+62812****890"


def fail(message: str) -> NoReturn:
    raise RuntimeError(message)


def parse_journal(data: bytes) -> dict[str, str]:
    """Parse a native-protocol datagram the way journald does (both field forms)."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            pos = end + 1
        else:
            name = line
            (size,) = struct.unpack_from("<Q", data, end + 1)
            start = end + 1 + 8
            value = data[start : start + size]
            assert data[start + size : start + size + 1] == b"\n"
            pos = start + size + 1
        fields[name.decode()] = value.decode()
    return fields


@pytest.fixture
def journald(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    """A datagram socket standing in for /run/systemd/journal/socket."""
    path = tmp_path / "journal.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield path, sock
    sock.close()


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler).__name__ == "_StdlibBridge":
            root.removeHandler(handler)
    logging.captureWarnings(capture=False)


def receive(sock: socket.socket) -> dict[str, str]:
    return parse_journal(sock.recv(1 << 20))


def test_journal_event_carries_structured_fields(
    journald: tuple[Path, socket.socket],
) -> None:
    path, sock = journald
    configure_logging(mode="journal", journal_socket=path, stream=io.StringIO())
    get_logger("dispatch.sms").info(
        "sms.sent", incident=42, device="BTN-0007", kelurahan="Manguharjo", level=2, sid="SM1a"
    )
    fields = receive(sock)
    assert fields["PRIORITY"] == "6"
    assert fields["SYSLOG_IDENTIFIER"] == "panicd"
    assert fields["EVENT"] == "sms.sent"
    assert fields["INCIDENT"] == "42"
    assert fields["DEVICE"] == "BTN-0007"
    assert fields["KELURAHAN"] == "Manguharjo"
    assert fields["LEVEL"] == "2"
    assert fields["SID"] == "SM1a"
    assert fields["LOGGER_NAME"] == "dispatch.sms"
    assert fields["MESSAGE"] == (
        "sms.sent incident=42 device=BTN-0007 kelurahan=Manguharjo level=2 sid=SM1a"
    )


def test_journal_multiline_value_uses_binary_length_prefixed_form(
    journald: tuple[Path, socket.socket],
) -> None:
    path, sock = journald
    configure_logging(mode="journal", journal_socket=path, stream=io.StringIO())
    note = "Jl. Pahlawan 12\ndekat Alun-alun"
    get_logger().warning("press.note", note=note)
    raw = sock.recv(1 << 20)
    encoded = note.encode()
    assert b"NOTE\n" + struct.pack("<Q", len(encoded)) + encoded + b"\n" in raw
    assert parse_journal(raw)["NOTE"] == note


def test_journal_exception_is_a_multiline_message(journald: tuple[Path, socket.socket]) -> None:
    path, sock = journald
    configure_logging(mode="journal", journal_socket=path, stream=io.StringIO())
    try:
        fail("broker refused auth_token=abc")
    except RuntimeError:
        get_logger().exception("mqtt.connect_failed", broker="mqtt.madiun")
    fields = receive(sock)
    assert fields["PRIORITY"] == "3"
    first, *rest = fields["MESSAGE"].splitlines()
    assert first == "mqtt.connect_failed broker=mqtt.madiun"
    assert rest[-1] == "RuntimeError: broker refused auth_token=***"


@pytest.mark.parametrize(
    ("method", "priority"),
    [("debug", 7), ("info", 6), ("warning", 4), ("error", 3), ("critical", 2)],
)
def test_levels_map_to_journal_priorities(
    journald: tuple[Path, socket.socket], method: str, priority: int
) -> None:
    path, sock = journald
    configure_logging(mode="journal", level="debug", journal_socket=path, stream=io.StringIO())
    getattr(get_logger(), method)("ops.check")
    assert receive(sock)["PRIORITY"] == str(priority)
    assert PRIORITY_BY_LEVEL[method] == priority


def test_level_filter_drops_lower_severities(journald: tuple[Path, socket.socket]) -> None:
    path, sock = journald
    configure_logging(mode="journal", level="warning", journal_socket=path, stream=io.StringIO())
    log = get_logger()
    log.info("press.accepted")
    log.warning("device.battery_low", device="BTN-1", battery=9)
    assert receive(sock)["EVENT"] == "device.battery_low"


def test_unknown_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        configure_logging(level="loud")


def test_oversized_event_is_passed_as_a_sealed_memfd(
    journald: tuple[Path, socket.socket],
) -> None:
    path, sock = journald
    configure_logging(mode="journal", journal_socket=path, stream=io.StringIO())
    blob = "x" * (4 * 1024 * 1024)  # beyond any AF_UNIX datagram limit
    get_logger().info("bench.blob", blob=blob)
    data, ancdata, _flags, _addr = sock.recvmsg(16, socket.CMSG_SPACE(4))
    assert data == b""
    ((level, kind, payload),) = ancdata
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
    fd = array.array("i", payload[:4])[0]
    try:
        with os.fdopen(os.dup(fd), "rb") as memfd:
            memfd.seek(0)
            fields = parse_journal(memfd.read())
    finally:
        os.close(fd)
    assert fields["EVENT"] == "bench.blob"
    assert fields["BLOB"] == blob


def test_unusable_journal_socket_falls_back_to_prefixed_stderr(tmp_path: Path) -> None:
    stderr = io.StringIO()
    configure_logging(mode="journal", journal_socket=tmp_path / "absent.sock", stream=stderr)
    log = get_logger()
    log.warning("escalation.step_due", incident=7, level=1)
    log.info("press.accepted", device="BTN-2")
    lines = stderr.getvalue().splitlines()
    assert lines[0].startswith("<4>log.journal_unavailable ")
    assert lines[1:] == [
        "<4>escalation.step_due incident=7 level=1",
        "<6>press.accepted device=BTN-2",
    ]


def test_auto_mode_detects_journald_by_journal_stream_inode(
    journald: tuple[Path, socket.socket], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sock = journald
    with (tmp_path / "stderr").open("w") as stderr:
        st = os.fstat(stderr.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        configure_logging(journal_socket=path, stream=stderr)
        get_logger().info("daemon.started")
        assert receive(sock)["EVENT"] == "daemon.started"


def test_auto_mode_ignores_journal_stream_of_another_file(
    journald: tuple[Path, socket.socket], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _sock = journald
    # An inherited JOURNAL_STREAM whose inode is not our stderr means stderr was redirected.
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")
    with (tmp_path / "stderr").open("w+") as stderr:
        configure_logging(journal_socket=path, stream=stderr)
        get_logger().info("daemon.started")
        stderr.seek(0)
        line = stderr.read().strip()
    assert line.startswith("<6>")
    assert line.endswith(" daemon.started")


def test_non_tty_stream_gets_priority_prefixed_key_value_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    stderr = io.StringIO()
    configure_logging(stream=stderr)
    get_logger().error(
        "sms.failed", incident=3, code=21211, reason="invalid number", detail='a "b"\nc'
    )
    (line,) = stderr.getvalue().splitlines()
    head, rest = line.split(" ", 1)
    assert head.startswith("<3>")
    assert head.endswith("Z")  # the UTC timestamp, since no journal stamps this line
    assert rest == (
        'sms.failed incident=3 code=21211 reason="invalid number" detail="a \\"b\\"\\nc"'
    )


def test_json_mode_writes_one_object_per_line() -> None:
    stderr = io.StringIO()
    configure_logging(mode="json", stream=stderr)
    get_logger("gateway.mqtt").info("press.accepted", device="BTN-9", level=1, paths=["mqtt"])
    (line,) = stderr.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "press.accepted"
    assert record["log_level"] == "info"
    assert record["level"] == 1  # the escalation level is not overwritten by the severity
    assert record["paths"] == ["mqtt"]
    assert record["logger_name"] == "gateway.mqtt"
    assert record["timestamp"].endswith("Z")


def test_stdlib_records_are_routed_through_the_pipeline() -> None:
    stderr = io.StringIO()
    configure_logging(mode="json", stream=stderr)
    logging.getLogger("aiomqtt").warning("lost connection to %s", "mqtt://panicd:hunter2@broker")
    record = json.loads(stderr.getvalue())
    assert record["event"] == "lib.log"
    assert record["lib"] == "aiomqtt"
    assert record["log_level"] == "warning"
    assert record["text"] == "lost connection to mqtt://panicd:***@broker"


@pytest.mark.parametrize("mode", ["json", "auto", "console"])
def test_secrets_and_phones_never_reach_the_output(mode: str) -> None:
    stderr = io.StringIO()
    configure_logging(mode=mode, stream=stderr)  # type: ignore[arg-type]
    log = get_logger()
    log.info("sms.sent", to=PHONE, auth_token="0123abcd", body=f"hubungi {PHONE}")
    try:
        fail("token=0123abcd")
    except RuntimeError:
        log.exception("sms.failed", to=PHONE)
    out = stderr.getvalue()
    assert "0123abcd" not in out
    assert PHONE not in out
    assert MASKED in out


def test_journal_field_names_follow_the_journal_rules() -> None:
    assert journal_field_name("kelurahan") == "KELURAHAN"
    assert journal_field_name("provider-sid") == "PROVIDER_SID"
    assert journal_field_name("_pid") == "PID"  # leading _ is reserved for trusted fields
    assert journal_field_name("2fa") == "DATA_2FA"
    assert journal_field_name("message") == "DATA_MESSAGE"
    assert journal_field_name("priority") == "DATA_PRIORITY"
    assert journal_field_name("syslog_identifier") == "DATA_SYSLOG_IDENTIFIER"
    assert journal_field_name("x" * 80) == "X" * 64


def test_encoding_round_trips_both_field_forms() -> None:
    fields = [("MESSAGE", "a=b"), ("NOTE", "line1\nline2"), ("EMPTY", "")]
    assert parse_journal(encode_journal_fields(fields)) == dict(fields)


def test_capture_logs_still_sees_events_after_configuration() -> None:
    configure_logging(mode="json", stream=io.StringIO())
    log = get_logger("panicd.daemon")
    with capture_logs() as logs:
        log.info("daemon.ready", sources=3)
    assert logs == [
        {
            "event": "daemon.ready",
            "sources": 3,
            "logger_name": "panicd.daemon",
            "log_level": "info",
        }
    ]
