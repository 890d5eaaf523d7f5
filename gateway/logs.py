"""structlog configuration: one line per event, journald-native fields, secrets and phones redacted.

Every event is a stable dotted name with its details as key=value
(``log.info("sms.sent", incident=42, to="+6281234567890", sid="SM…")``). Where the
output goes is chosen once, at start-up, by :func:`configure_logging`:

* under journald (``$JOURNAL_STREAM`` names our stderr, see systemd.exec(5)) or
  ``mode="journal"``: the native journal protocol, one datagram per event with
  ``MESSAGE``, ``PRIORITY``, ``SYSLOG_IDENTIFIER``, ``EVENT`` and one field per key, so
  ``journalctl -p warning`` and ``journalctl INCIDENT=42`` work;
* on a terminal: structlog's console renderer;
* ``mode="json"``: one JSON object per line;
* anything else (a pipe, a file): ``<N>``-prefixed key=value lines as sd-daemon(3)
  describes, so a syslog-style reader still sees the priority.

The severity is stored under ``log_level`` (as ``structlog.testing`` does) because
``level`` belongs to the domain: the escalation level of an incident.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final, Literal, TextIO, cast

import structlog
from structlog.dev import Column, ConsoleRenderer
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

from gateway.redact import memoised_for_short, scrub_event

Mode = Literal["auto", "console", "json", "journal"]

JOURNAL_SOCKET: Final = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER: Final = "panicd"

#: syslog(3) priorities as the journal stores them in ``PRIORITY``.
PRIORITY_BY_LEVEL: Final[Mapping[str, int]] = {
    "debug": 7,
    "info": 6,
    "notice": 5,
    "warning": 4,
    "error": 3,
    "critical": 2,
}

_LEVEL_NUMBERS: Final[Mapping[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# structlog method names that are aliases of a level.
_METHOD_ALIASES: Final[Mapping[str, str]] = {
    "warn": "warning",
    "exception": "error",
    "fatal": "critical",
    "msg": "info",
}

# Keys never rendered into the one-line text: they are its frame (priority prefix,
# timestamp) or context already carried elsewhere (the journal's LOGGER_NAME field).
_LINE_SKIP: Final = frozenset({"event", "log_level", "timestamp", "logger_name", "exception"})
# Keys that are not a journal field of their own (EVENT, PRIORITY and MESSAGE carry them).
_JOURNAL_SKIP: Final = frozenset({"event", "log_level", "timestamp", "exception"})


def add_log_level(_logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Record the severity under ``log_level``, leaving ``level`` to the escalation level."""
    event_dict["log_level"] = _METHOD_ALIASES.get(method_name, method_name)
    return event_dict


# --- rendering ---------------------------------------------------------------------------


def _value_text(value: object) -> str:
    if type(value) is str:
        return value
    match value:
        case str():
            return value
        case bool():
            return "true" if value else "false"
        case None:
            return "null"
        case int() | float():
            return str(value)
        case Mapping() | list() | tuple():
            return json.dumps(value, default=str, ensure_ascii=False)
        case _:
            return str(value)


@memoised_for_short
def _quoted(text: str) -> str:
    # Quote (JSON-style, so "\n" stays on the line) only what a reader could misparse.
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return json.dumps(text, ensure_ascii=False)


def render_line(event_dict: Mapping[str, Any]) -> str:
    """Render ``event key=value …`` on one line, keys in the order they were given."""
    texts = [(key, _value_text(value)) for key, value in event_dict.items()
             if key not in _LINE_SKIP]
    return _line_of(event_dict, texts)


def _line_of(event_dict: Mapping[str, Any], texts: Iterable[tuple[str, str]]) -> str:
    parts = [_quoted(str(event_dict.get("event", "")))]
    parts.extend(f"{key}={_quoted(text)}" for key, text in texts)
    if "exception" in event_dict:
        parts.append(f"exception={_quoted(str(event_dict['exception']))}")
    return " ".join(parts)


def priority_of(event_dict: Mapping[str, Any]) -> int:
    """Map the event's severity to a syslog priority (info 6 when unknown)."""
    return PRIORITY_BY_LEVEL.get(str(event_dict.get("log_level", "info")), 6)


def render_syslog_line(_logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> str:
    """Render ``<N>`` (sd-daemon(3) priority prefix), the timestamp if any, then the line."""
    stamp = event_dict.get("timestamp")
    prefix = f"<{priority_of(event_dict)}>" + (f"{stamp} " if stamp else "")
    return prefix + render_line(event_dict)


_FIELD_INVALID = re.compile(r"[^A-Z0-9_]")
# Fields this module writes itself, plus ones journald gives meaning to.
_RESERVED_FIELDS: Final = frozenset(
    {
        "MESSAGE",
        "MESSAGE_ID",
        "PRIORITY",
        "EVENT",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_FUNC",
        "ERRNO",
        "INVOCATION_ID",
        "USER_INVOCATION_ID",
        "DOCUMENTATION",
        "TID",
    }
)


@functools.lru_cache(maxsize=1024)
def journal_field_name(key: str) -> str:
    """Turn an event key into a valid journal field name (uppercase ``[A-Z0-9_]``, ≤ 64 chars).

    Leading underscores are dropped (those fields are journald's trusted ones) and keys
    that would clash with a field journald interprets get a ``DATA_`` prefix.
    """
    name = _FIELD_INVALID.sub("_", key.upper()).lstrip("_")
    if not name:
        return "DATA"
    if name[0].isdigit() or name in _RESERVED_FIELDS or name.startswith("SYSLOG_"):
        name = "DATA_" + name
    return name[:64]


def encode_journal_fields(fields: Iterable[tuple[str, str]]) -> bytes:
    """Serialise fields in the journal native protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL)."""
    chunks: list[bytes] = []
    lines: list[str] = []
    for name, value in fields:
        if "\n" in value:
            # A value with a newline cannot use NAME=value; it is sent as NAME, newline,
            # its length as a 64-bit little-endian integer, the bytes, and a newline.
            if lines:
                chunks.append("".join(lines).encode("utf-8", "surrogateescape"))
                lines = []
            data = value.encode("utf-8", "surrogateescape")
            chunks.append(name.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n")
        else:
            lines.append(f"{name}={value}\n")
    if lines:
        chunks.append("".join(lines).encode("utf-8", "surrogateescape"))
    return b"".join(chunks)


class JournalRenderer:
    """Render an event as a native-protocol datagram plus the ``<N>`` line used as fallback."""

    def __init__(self, identifier: str = SYSLOG_IDENTIFIER) -> None:
        self._identifier = identifier

    def __call__(
        self, _logger: WrappedLogger, _method_name: str, event_dict: EventDict
    ) -> tuple[tuple[bytes, str], dict[str, Any]]:
        priority = priority_of(event_dict)
        # Each value is rendered once, for both the line and its own journal field.
        texts = [(key, _value_text(value)) for key, value in event_dict.items()
                 if key not in _JOURNAL_SKIP]
        line = _line_of(event_dict, [(k, t) for k, t in texts if k not in _LINE_SKIP])
        message = line
        if "exception" in event_dict:
            # journalctl shows multi-line messages as such; a traceback reads better that way.
            message = render_line({k: v for k, v in event_dict.items() if k != "exception"})
            message += "\n" + str(event_dict["exception"]).rstrip("\n")
        fields: list[tuple[str, str]] = [
            ("MESSAGE", message),
            ("PRIORITY", str(priority)),
            ("SYSLOG_IDENTIFIER", self._identifier),
            ("EVENT", str(event_dict.get("event", ""))),
        ]
        fields.extend((journal_field_name(key), text) for key, text in texts)
        # structlog passes a final (args, kwargs) pair to the writer's method as is.
        return (encode_journal_fields(fields), f"<{priority}>{line}"), {}


# --- writers (the "loggers" structlog hands the rendered event to) -----------------------


class StreamWriter:
    """Write each rendered event as one line to a text stream."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def msg(self, line: str) -> None:
        """Write one line and flush, so journald/pipes see it now rather than at exit."""
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()

    log = debug = info = warning = warn = error = critical = fatal = exception = msg


class JournalWriter:
    """Send native-protocol datagrams to journald, falling back to ``<N>`` lines on a stream."""

    def __init__(self, path: str | os.PathLike[str], fallback: TextIO) -> None:
        self._path = os.fspath(path)
        self._fallback = StreamWriter(fallback)
        self._sock: socket.socket | None = None
        self._failing = False

    def msg(self, datagram: bytes, fallback_line: str) -> None:
        """Deliver one event; on any socket error write it to the fallback stream instead."""
        try:
            self._send(datagram)
        except OSError as exc:
            if not self._failing:
                self._failing = True
                self._fallback.msg(
                    "<4>"
                    + render_line(
                        {
                            "event": "log.journal_unavailable",
                            "socket": self._path,
                            "error": exc.strerror or str(exc),
                        }
                    )
                )
            self._fallback.msg(fallback_line)
        else:
            self._failing = False

    log = debug = info = warning = warn = error = critical = fatal = exception = msg

    def _send(self, datagram: bytes) -> None:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            with contextlib.suppress(OSError):
                # As sd_journal_send does: a larger buffer keeps bursts from blocking.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * 1024 * 1024)
            self._sock = sock
        try:
            self._sock.sendto(datagram, self._path)
        except OSError as exc:
            if exc.errno not in {errno.EMSGSIZE, errno.ENOBUFS}:
                raise
            self._send_memfd(self._sock, datagram)

    def _send_memfd(self, sock: socket.socket, datagram: bytes) -> None:
        # Too big for one datagram: the protocol passes a sealed memfd holding the same
        # bytes as SCM_RIGHTS; journald refuses unsealed descriptors from non-root senders.
        fd = os.memfd_create("panicd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(datagram)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(
                fd,
                fcntl.F_ADD_SEALS,
                fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL,
            )
            rights = array.array("i", [fd]).tobytes()
            sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)], 0, self._path)
        finally:
            os.close(fd)


# --- stdlib logging (aiomqtt, aiohttp, twilio …) -----------------------------------------


class _StdlibBridge(logging.Handler):
    """Forward standard-library log records into the structlog pipeline as ``lib.log``."""

    def emit(self, record: logging.LogRecord) -> None:
        levelno = max(
            (n for n in _LEVEL_NUMBERS.values() if n <= record.levelno), default=logging.DEBUG
        )
        kw: dict[str, Any] = {"lib": record.name, "text": record.getMessage()}
        if record.exc_info:
            kw["exc_info"] = record.exc_info
        get_logger().log(levelno, "lib.log", **kw)


# --- configuration -----------------------------------------------------------------------


def journald_owns(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journald stream systemd connected us to (``$JOURNAL_STREAM``)."""
    env = os.environ if environ is None else environ
    device, _, inode = env.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):  # io.UnsupportedOperation (StringIO) is both
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


def configure_logging(
    *,
    mode: Mode = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    journal_socket: str | os.PathLike[str] = JOURNAL_SOCKET,
) -> None:
    """Configure structlog (and route stdlib logging through it) for this process.

    ``stream`` defaults to ``sys.stderr``; ``journal_socket`` exists so tests can stand in
    for journald. Raises ValueError for an unknown ``level``.
    """
    try:
        min_level = _LEVEL_NUMBERS[level.lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}; expected one of {', '.join(_LEVEL_NUMBERS)}"
        ) from None
    out = sys.stderr if stream is None else stream
    if mode == "auto":
        if journald_owns(out):
            mode = "journal"
        elif _is_tty(out):
            mode = "console"

    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        add_log_level,
        # Tracebacks become a plain string before redaction, so secrets inside exception
        # messages are scrubbed like any other value.
        structlog.processors.format_exc_info,
        scrub_event,
    ]
    writer: StreamWriter | JournalWriter
    if mode == "journal":
        # No timestamp: journald stamps each entry on receipt.
        processors.append(JournalRenderer())
        writer = JournalWriter(Path(journal_socket), out)
    else:
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
        if mode == "json":
            processors.append(structlog.processors.JSONRenderer(ensure_ascii=False))
        elif mode == "console":
            processors.append(_console_renderer(colors=_is_tty(out)))
        else:
            processors.append(render_syslog_line)
        writer = StreamWriter(out)

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        context_class=dict,
        logger_factory=lambda *_args: writer,
        # Module-level loggers stay reconfigurable, and structlog.testing.capture_logs
        # keeps working in tests; binding per call costs microseconds.
        cache_logger_on_first_use=False,
    )
    _route_stdlib_logging(min_level)


def _console_renderer(*, colors: bool) -> ConsoleRenderer:
    renderer = ConsoleRenderer(colors=colors, sort_keys=False)
    # The level column reads `log_level`; the escalation `level` stays an ordinary field.
    renderer.columns = [
        Column("log_level", col.formatter) if col.key == "level" else col
        for col in renderer.columns
    ]
    return renderer


def _route_stdlib_logging(min_level: int) -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StdlibBridge)]:
        root.removeHandler(handler)
    root.addHandler(_StdlibBridge())
    root.setLevel(min_level)
    # twilio logs every request at INFO; the one canonical sms.sent line says what matters.
    logging.getLogger("twilio.http_client").setLevel(max(min_level, logging.WARNING))
    logging.captureWarnings(capture=True)


def get_logger(name: str | None = None) -> FilteringBoundLogger:
    """Return a structlog logger, with ``logger_name=name`` bound when a name is given."""
    # Not `logger=`: structlog.get_logger reserves that keyword for the wrapped logger.
    initial = {} if name is None else {"logger_name": name}
    return cast(FilteringBoundLogger, structlog.get_logger(**initial))


__all__ = [
    "JOURNAL_SOCKET",
    "PRIORITY_BY_LEVEL",
    "JournalRenderer",
    "JournalWriter",
    "Mode",
    "StreamWriter",
    "add_log_level",
    "configure_logging",
    "encode_journal_fields",
    "get_logger",
    "journal_field_name",
    "journald_owns",
    "render_line",
    "render_syslog_line",
]
