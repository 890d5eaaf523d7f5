"""``/metrics`` rendered by prometheus_client, the ecosystem's exposition code.

panicd's figures are read fresh from the database at each scrape (incidents, messages,
health conditions) or kept in process (presses, escalation lateness), so a scrape builds
its :class:`Family` list and :func:`render` hands it to prometheus_client as a one-shot
custom collector: the library writes HELP/TYPE, escaping, histogram buckets and ``_sum``
/``_count``, and negotiates the format by ``Accept`` — Prometheus text 0.0.4 by default,
OpenMetrics 1.0 for a scraper that asks for it (issue 18: this was hand-rendered; the
library is what Prometheus' own tooling is tested against, and it brings OpenMetrics).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.core import Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Escalation lateness (step due → fired): a healthy scheduler fires within milliseconds;
# seconds mean a stalled loop or a locked database.
LATENCY_BUCKETS_S: tuple[float, ...] = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                                         60.0)


def format_value(value: float) -> str:
    """A sample value: integers without a decimal point, and +Inf/-Inf/NaN spelled out."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


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


def _metric(family: Family) -> Metric:
    """One family as prometheus_client's metric family."""
    # Imported at the first scrape, not at start: dispatch.engine imports this module and
    # start-up sends overdue steps before loading what it does not need (PERFORMANCE.md).
    from prometheus_client.core import (  # noqa: PLC0415
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    if family.histogram is not None:
        hist = family.histogram
        return HistogramMetricFamily(family.name, family.help, buckets=hist.cumulative(),
                                     sum_value=hist.total)
    names = sorted({key for labels, _ in family.samples for key in labels})
    kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
    metric = kind(family.name, family.help, labels=names)
    for labels, value in family.samples:
        metric.add_metric([labels.get(name, "") for name in names], value)
    return metric


class _Scrape:
    """A collector that yields one scrape's families once (registered per scrape)."""

    def __init__(self, families: Iterable[Family]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        """The families, as prometheus_client reads them."""
        return (_metric(family) for family in self._families)


def render(families: Iterable[Family], accept: str = "") -> tuple[bytes, str]:
    """The families encoded for a scraper's ``Accept`` header: (body, content type)."""
    from prometheus_client import CollectorRegistry  # noqa: PLC0415 -- see _metric
    from prometheus_client.exposition import choose_encoder  # noqa: PLC0415

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Scrape(families))
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
