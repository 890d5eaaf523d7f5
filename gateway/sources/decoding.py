"""Pick the decoder for a source's configured format."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from gateway.errors import ConfigError
from gateway.formats import native
from gateway.model import Frame, Ignored

Decoder = Callable[[str, bytes], Frame | Ignored]

FORMATS: dict[str, Callable[[Mapping[str, str]], Decoder]] = {
    "native": lambda _options: native.decode,
}


def decoder_for(format_name: str, options: Mapping[str, str]) -> Decoder:
    """The decode function for a format name (see docs/FRAMES.md)."""
    try:
        factory = FORMATS[format_name]
    except KeyError:
        raise ConfigError("-", "format", f"unknown format {format_name!r}") from None
    return factory(options)
