"""Hypothesis strategies and the "only DecodeError, with a snake_case reason" check."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from hypothesis import strategies as st

from gateway.errors import DecodeError
from gateway.model import Frame, Ignored

SNAKE_CASE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*")

json_values: st.SearchStrategy[object] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


def json_bytes(values: st.SearchStrategy[object] = json_values) -> st.SearchStrategy[bytes]:
    """Arbitrary JSON documents, serialised (NaN/Infinity included, as Python emits them)."""
    return values.map(lambda v: json.dumps(v).encode())


def assert_total(
    decode: Callable[[str, bytes], Frame | Ignored], topic: str, payload: bytes
) -> None:
    """The decoder returns a Frame/Ignored or raises DecodeError with a snake_case reason."""
    try:
        result = decode(topic, payload)
    except DecodeError as exc:
        assert SNAKE_CASE.fullmatch(exc.reason), exc.reason
    else:
        assert isinstance(result, Frame | Ignored)
        if isinstance(result, Ignored):
            assert result.reason
