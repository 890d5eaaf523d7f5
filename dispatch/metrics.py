"""Prometheus text exposition format 0.0.4, without a client library.

Format rules followed (prometheus.io/docs/instrumenting/exposition_formats): one
``# HELP`` and one ``# TYPE`` line per family before its samples; label values escape
backslash, double quote and newline; HELP text escapes backslash and newline; histogram
buckets are cumulative, end with ``le="+Inf"`` and come with ``_sum`` and ``_count``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Escalation lateness (step due → fired): a healthy scheduler fires within milliseconds;
# seconds mean a stalled loop or a locked database.
LATENCY_BUCKETS_S: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                                         60.0)


def escape_label(value: str) -> str:
    """A label value escaped for the text format."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """A HELP text escaped for the text format."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers without a decimal point, and +Inf/-Inf/NaN spelled out."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
    return "{" + inner + "}"


@dataclass(slots=True)
class Histogram:
    """A cumulative histogram kept in process (observations in seconds)."""

    buckets: Sequence[float] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        """Record one observation."""
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs, ending with +Inf."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            running += count
            out.append((format_value(bound), running))
        out.append(("+Inf", self.count))
        return out


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family: name, type, help and its samples (labels, value)."""

    name: str
    kind: str  # counter | gauge | histogram
    help: str
    samples: Sequence[tuple[Mapping[str, str], float]] = ()
    histogram: Histogram | None = None


def render(families: Iterable[Family]) -> str:
    """The families in the text exposition format, ending with a newline."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        if family.histogram is not None:
            hist = family.histogram
            for le, count in hist.cumulative():
                lines.append(f'{family.name}_bucket{{le="{le}"}} {count}')
            lines.append(f"{family.name}_sum {format_value(hist.total)}")
            lines.append(f"{family.name}_count {hist.count}")
        for labels, value in family.samples:
            lines.append(f"{family.name}{_labels(labels)} {format_value(value)}")
    return "\n".join(lines) + "\n"
