"""Sources feed the ingest pipeline: MQTT brokers today, serial receivers and HTTP next.

Each source is an object with a ``name``, a ``connected`` flag and an async
``run(stop)`` that returns once ``stop`` is set and its in-flight items are committed
and acknowledged (see :class:`Source`).
"""

from __future__ import annotations

import asyncio
from typing import Protocol


class Source(Protocol):
    """A producer of presses with its own connection lifecycle."""

    name: str

    @property
    def connected(self) -> bool:
        """Whether the source is currently connected to its transport."""
        ...

    async def wait_connected(self) -> None:
        """Return once the source has connected the first time."""
        ...

    async def run(self, stop: asyncio.Event) -> None:
        """Receive until ``stop`` is set, then let in-flight items finish and return."""
        ...
