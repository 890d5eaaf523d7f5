"""Coverage-guided fuzzing of the decoders with atheris (libFuzzer).

    python -m tests.fuzz_decoders GROUP [libFuzzer flags] [CORPUS_DIR ...]

GROUP is a format (``native``, ``lora``, ``chirpstack``, ``ttn``, ``zigbee2mqtt``,
``shelly``, ``tasmota``, ``serial``); every decoding entry point of that format in
tests/formats_fuzz.py is fuzzed, starting from its valid example frames (written into the
first corpus directory given). The first input byte picks the entry point, the second
the example topic, the rest is the payload; tests/formats_fuzz.py's TOKENS are the
mutation dictionary. Any outcome but the target's own result
types or a DecodeError with a reason, storable, is a crash (libFuzzer exits non-zero and
writes the input to ``-artifact_prefix``). tests/test_fuzz_decoders.py runs every group
for a bounded time.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

GROUPS: dict[str, tuple[str, ...]] = {
    "native": ("native", "json-line", "serial-jsonl"),
    "lora": ("lora-frame", "lora-ack"),
    "chirpstack": ("chirpstack",),
    "ttn": ("ttn", "ttn-dev-eui"),
    "zigbee2mqtt": ("zigbee2mqtt", "zigbee2mqtt-availability"),
    "shelly": ("shelly", "shelly-availability", "shelly-event-count"),
    "tasmota": ("tasmota", "tasmota-availability"),
    "serial": ("reyax-line", "rak-line", "serial-rylr", "serial-rak3172"),
}


def write_seeds(corpus: Path, targets: Sequence[Any]) -> int:
    """Write every target's valid examples as inputs of this harness; returns how many."""
    corpus.mkdir(parents=True, exist_ok=True)
    count = 0
    for index, target in enumerate(targets):
        for topic_index, (_, payload) in enumerate(target.seeds):
            data = bytes([index, topic_index]) + payload
            (corpus / hashlib.sha256(data).hexdigest()[:16]).write_bytes(data)
            count += 1
    return count


def write_dictionary(path: Path, tokens: Sequence[bytes]) -> None:
    """A libFuzzer -dict file: the tokens that broke parsers, and JSON punctuation."""
    lines = ['"' + "".join(f"\\x{b:02x}" for b in token) + '"' for token in tokens
             if len(token) <= 64]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")


def main(argv: Sequence[str] | None = None) -> int:
    """Fuzz one group until libFuzzer's -runs / -max_total_time ends it (or a crash)."""
    args = list(sys.argv if argv is None else argv)
    if len(args) < 2 or args[1] not in GROUPS:
        sys.stderr.write(f"usage: {args[0]} {{{','.join(GROUPS)}}} [libFuzzer flags]\n")
        return 2
    group = args.pop(1)
    # No stubs ship with atheris; it is an optional dev dependency (test skips without it).
    atheris: Any = importlib.import_module("atheris")
    # Coverage feedback comes from instrumenting the decoders' bytecode as they import.
    with atheris.instrument_imports(include=["gateway"]):
        formats_fuzz: Any = importlib.import_module("tests.formats_fuzz")
    by_name = {t.name: t for t in formats_fuzz.fuzz_targets()}
    targets = [by_name[name] for name in GROUPS[group]]
    corpora = [a for a in args[1:] if not a.startswith("-")]
    if corpora:
        write_seeds(Path(corpora[0]), targets)
        if not any(a.startswith("-dict=") for a in args):
            dictionary = Path(corpora[0]).with_suffix(".dict")
            write_dictionary(dictionary, formats_fuzz.TOKENS)
            args.append(f"-dict={dictionary}")

    def test_one_input(data: bytes) -> None:
        if len(data) < 2:
            return
        target = targets[data[0] % len(targets)]
        topic = target.seeds[data[1] % len(target.seeds)][0]
        formats_fuzz.check_outcome(target, topic, data[2:])

    atheris.Setup(args, test_one_input)
    atheris.Fuzz()
    return 0  # not reached: libFuzzer exits the process


if __name__ == "__main__":
    sys.exit(main())
