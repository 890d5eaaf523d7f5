"""Pick the decoder for a source's configured format."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.formats import DECODERS, Decoder, native


def decoder_for(format_name: str, options: Mapping[str, object]) -> Decoder:
    """The decode function for a format name (validated when the config was loaded)."""
    if format_name == native.FORMAT:
        return native.decode
    return DECODERS[format_name](options)
