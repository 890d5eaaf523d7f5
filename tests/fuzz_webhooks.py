"""Coverage-guided fuzzing of the webhook and ack-link parsers with atheris (libFuzzer).

    python -m tests.fuzz_webhooks [libFuzzer flags] [CORPUS_DIR ...]

The first input byte picks the parser, the rest is its input:

* ``parse_twilio_form``: a dict of str, or FormError with a reason; and a repeated name
  (after decoding) is never accepted, which is the check that keeps a forged value from
  riding on a genuine signature;
* ``verify_ack_token``: an AckClaim only for a token this harness signed itself, else
  AckTokenError with a reason; a mutated genuine token never verifies as another claim;
* ``cross_origin_refusal``: None or a reason, never an exception.

Anything else is a crash (libFuzzer exits non-zero and writes the input to
``-artifact_prefix``). tests/test_webhook_fuzz.py runs it for a bounded time.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

SECRET = b"fuzz-ack-secret"
GENUINE = ("42", "ani", 2_000_000_000)
SEEDS = (
    b"\x00CallSid=CA0123&Digits=1&From=%2B628120001001",
    b"\x00Digits=1&Digits=2",
    b"\x00Digit%73=1&Digits=2",
    b"\x00MessageStatus=delivered&MessageSid=SM" + b"0" * 32 + b"&ErrorCode=",
    b"\x00%ff%fe=1",
    b"\x02https://panicd.example\x00same-origin",
    b"\x02null\x00cross-site",
)


def _check_form(formats: Any, body: bytes) -> None:
    try:
        form = formats.parse_twilio_form(body)
    except formats.FormError as exc:
        assert exc.reason in ("not_utf8", "too_many_fields", "repeated"), exc.reason
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in form.items())
    names = [name for name, _ in parse_qsl(body.decode("utf-8"), keep_blank_values=True)]
    assert len(names) == len(set(names)) == len(form), "a repeated name was accepted"


def _check_token(formats: Any, data: bytes) -> None:
    genuine = formats.make_ack_token(SECRET, *GENUINE)
    text = data.decode("utf-8", errors="replace")
    # Half the inputs are mutations of a genuine token, the rest arbitrary text.
    token = genuine[: len(text) % (len(genuine) + 1)] + text if data[:1] == b"g" else text
    try:
        claim = formats.verify_ack_token(SECRET, token, 1_700_000_000.0)
    except formats.AckTokenError as exc:
        assert exc.reason in ("malformed", "bad_signature", "expired"), exc.reason
        return
    assert (claim.incident_id, claim.responder_id, claim.expires_at) == GENUINE, claim


def _check_origin(formats: Any, data: bytes) -> None:
    origin, _, site = data.decode("utf-8", errors="replace").partition("\x00")
    reason = formats.cross_origin_refusal("https://panicd.example", origin or None, site or None)
    assert reason in (None, "origin", "sec_fetch_site"), reason


def write_seeds(corpus: Path) -> None:
    """The seed inputs, one file each."""
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in SEEDS:
        (corpus / hashlib.sha256(seed).hexdigest()[:16]).write_bytes(seed)


def main(argv: Sequence[str] | None = None) -> int:
    """Fuzz until libFuzzer's -runs / -max_total_time ends it (or a crash)."""
    args = list(sys.argv if argv is None else argv)
    # No stubs ship with atheris; it is an optional dev dependency (the test skips without).
    atheris: Any = importlib.import_module("atheris")
    with atheris.instrument_imports(include=["dispatch.webhook_auth"]):
        formats: Any = importlib.import_module("dispatch.webhook_auth")
    corpora = [a for a in args[1:] if not a.startswith("-")]
    if corpora:
        write_seeds(Path(corpora[0]))
    checks = (_check_form, _check_token, _check_origin)

    def test_one_input(data: bytes) -> None:
        if data:
            checks[data[0] % len(checks)](formats, data[1:])

    atheris.Setup(args, test_one_input)
    atheris.Fuzz()
    return 0  # not reached: libFuzzer exits the process


if __name__ == "__main__":
    sys.exit(main())
