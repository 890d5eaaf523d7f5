"""Write a copy of Twilio's API 2010-04-01 OpenAPI spec patched for Stoplight Prism.

Twilio's spec is served unchanged except for three gaps that would otherwise make the
peer unusable for panicd's tests (DESIGN §4):

* Prism 5 only accepts a repeated form field (``StatusCallbackEvent=initiated&
  StatusCallbackEvent=ringing``, which is how twilio-python and Twilio's API send
  arrays) when the request body declares ``encoding: {FIELD: {style: form, explode:
  true}}`` (stoplightio/prism issue #2473); every array property of every form body
  gets that encoding.
* The spec documents only ``201`` for Message and Call creation. Twilio's real API also
  answers ``429`` (error 20429, with ``Retry-After``) and ``5xx``; those are added so a
  test can ask for one per request with ``Prefer: code=429`` / ``Prefer: code=503``.
* Twilio rejects undeliverable destinations with ``400`` and a Twilio error code; a
  ``400`` with one named example per permanent error is added so a test can ask for,
  say, a landline with ``Prefer: code=400, example=e21614``. Because Prism answers an
  invalid request with the spec's 400 when there is one (masking the violation as a
  Twilio error), an explicit ``422`` is added too: Prism prefers it for invalid requests
  whatever ``Prefer`` asks, and the ``sl-violations`` header says what was wrong.

* The Messages and Calls list answers declare their page URIs (``uri``,
  ``first_page_uri``, ``next_page_uri``, ``previous_page_uri``) as ``format: uri``, yet
  Twilio's API, and the spec's own examples, give paths relative to the API host
  (``/2010-04-01/Accounts/…/Messages.json?PageSize=50&Page=0``), so Prism refused its own
  example as an invalid response; the format is dropped there. The lists get the same
  ``429`` and ``503`` as creation, so a test can throttle panicd's lookups too.

Run as ``python tests/peers/prepare_twilio_spec.py OUT.json``; tests call
:func:`write_patched_spec`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PEERS_DIR = Path(__file__).resolve().parent
SPEC_PATH = (
    PEERS_DIR / "node_modules/@twilio/cli-core/src/services/twilio-api/twilio_api_v2010.json"
)
PRISM_BIN = PEERS_DIR / "node_modules/.bin/prism"

MESSAGES_CREATE = "/2010-04-01/Accounts/{AccountSid}/Messages.json"
CALLS_CREATE = "/2010-04-01/Accounts/{AccountSid}/Calls.json"
FORM = "application/x-www-form-urlencoded"

# Seconds in the Retry-After the mocked 429 carries; tests assert the channel honours it.
RETRY_AFTER_S = 7

# Twilio's legacy error body (https://www.twilio.com/docs/usage/twilios-response#response-formats-exceptions).
_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["code", "message", "status"],
    "properties": {
        "code": {"type": "integer"},
        "message": {"type": "string"},
        "more_info": {"type": "string"},
        "status": {"type": "integer"},
    },
}

# Permanent destination errors answered at create time, by Twilio error code.
PERMANENT_EXAMPLES: dict[int, str] = {
    21211: "The 'To' number +6281 is not a valid phone number.",
    21614: "'To' number is not a valid mobile number",
    21610: "Attempt to send to unsubscribed recipient",
    21408: "Permission to send an SMS has not been enabled for the region indicated by the "
    "'To' number: +6281234567890.",
    21215: "Account not authorized to call +6281234567890. Perhaps you need to enable some "
    "international permissions: https://www.twilio.com/console/voice/calls/geo-permissions",
}


def _error_example(code: int, status: int, message: str) -> dict[str, Any]:
    return {
        "value": {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        }
    }


def _error_response(description: str, examples: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ERROR_SCHEMA, "examples": examples}},
    }


def _throttled_response() -> dict[str, Any]:
    response = _error_response(
        "Too Many Requests (Twilio error 20429)",
        {"e20429": _error_example(20429, 429, "Too Many Requests")},
    )
    response["headers"] = {
        "Retry-After": {
            "description": "Seconds to wait before retrying.",
            "schema": {"type": "integer", "example": RETRY_AFTER_S},
            "example": RETRY_AFTER_S,
        }
    }
    return response


def add_form_array_encoding(spec: dict[str, Any]) -> int:
    """Declare every array property of every form request body as exploded form style."""
    patched = 0
    for path_item in spec["paths"].values():
        for operation in path_item.values():
            if not isinstance(operation, dict):
                continue
            media = operation.get("requestBody", {}).get("content", {}).get(FORM)
            if media is None:
                continue
            properties = media.get("schema", {}).get("properties", {})
            arrays = [name for name, prop in properties.items() if prop.get("type") == "array"]
            if not arrays:
                continue
            encoding = media.setdefault("encoding", {})
            for name in arrays:
                encoding[name] = {"style": "form", "explode": True}
                patched += 1
    return patched


def add_error_responses(spec: dict[str, Any]) -> None:
    """Add Twilio's 400, 429 and 503 (and Prism's 422) to Message and Call creation."""
    for path in (MESSAGES_CREATE, CALLS_CREATE):
        responses = spec["paths"][path]["post"]["responses"]
        responses["400"] = _error_response(
            "Rejected destination (Twilio error code in the body)",
            {
                f"e{code}": _error_example(code, 400, message)
                for code, message in PERMANENT_EXAMPLES.items()
            },
        )
        responses["422"] = _error_response(
            "The request does not validate against this spec (Prism only; see sl-violations)",
            {"invalid": _error_example(422, 422, "request does not match Twilio's spec")},
        )
        responses["429"] = _throttled_response()
        responses["503"] = _error_response(
            "Service Unavailable",
            {"e20503": _error_example(20503, 503, "Service Unavailable")},
        )


PAGE_URIS = ("uri", "first_page_uri", "next_page_uri", "previous_page_uri")


def fix_list_responses(spec: dict[str, Any]) -> None:
    """Relative page URIs in the Message and Call lists; their 429 and 503."""
    for path in (MESSAGES_CREATE, CALLS_CREATE):
        responses = spec["paths"][path]["get"]["responses"]
        properties = responses["200"]["content"]["application/json"]["schema"]["properties"]
        for name in PAGE_URIS:
            properties[name].pop("format", None)
        responses["429"] = _throttled_response()
        responses["503"] = _error_response(
            "Service Unavailable",
            {"e20503": _error_example(20503, 503, "Service Unavailable")},
        )


def patch_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Apply every patch to a loaded spec in place and return it."""
    add_form_array_encoding(spec)
    add_error_responses(spec)
    fix_list_responses(spec)
    return spec


def write_patched_spec(out: Path, source: Path = SPEC_PATH) -> Path:
    """Write the patched spec to ``out`` (atomically) and return ``out``."""
    spec = json.loads(source.read_text(encoding="utf-8"))
    patch_spec(spec)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(spec), encoding="utf-8")
    tmp.replace(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Write the patched spec to the path given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="where to write the patched spec (JSON)")
    parser.add_argument("--source", type=Path, default=SPEC_PATH, help="Twilio's spec")
    args = parser.parse_args(argv)
    if not args.source.is_file():
        parser.exit(1, f"{args.source}: not found; run scripts/ensure-peers.sh first\n")
    write_patched_spec(args.out, args.source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
