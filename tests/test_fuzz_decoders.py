"""Every decoder fuzzed with random input and mutated valid frames (hypothesis, atheris).

The only outcomes allowed are a Frame, an Ignored, or a DecodeError with a snake_case
reason (each target's own result types for the line parsers, the ACK decoder and the
availability reports), and whatever comes out must be storable. Then the same mutated
frames go through the real ingest pipeline and SQLite store: each rejection becomes a
dead letter with its reason, and nothing stalls the queue behind it. Last, the atheris
harness (tests/fuzz_decoders.py) fuzzes each format coverage-guided for a few seconds.
"""

from __future__ import annotations

import asyncio
import importlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.dedup import DedupPolicy
from gateway.errors import DecodeError
from gateway.formats import lora_ack
from gateway.ingest import DeadLettered, Ingestor
from gateway.model import Frame, Ignored, Trust
from store.sqlite import SqliteStore
from tests.formats_fuzz import (
    Target,
    check_outcome,
    field_swaps,
    fuzz_targets,
    json_bytes,
    mutated_topic,
    mutations,
    tricky_values,
)
from tests.fuzz_decoders import GROUPS
from tests.pipeline import T0, Collector, Fleet, make_fleet, rows

TARGETS = fuzz_targets()
BY_NAME = {target.name: target for target in TARGETS}
FUZZ = settings(max_examples=250, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def test_every_format_and_entry_point_is_a_fuzz_target() -> None:
    from gateway.explain import FORMATS  # noqa: PLC0415 -- the operator's list of formats

    covered = {"native", "lora-frame", "chirpstack", "ttn", "zigbee2mqtt", "shelly", "tasmota",
               "lora-ack", "reyax-line", "rak-line", "json-line", "serial-rylr",
               "serial-rak3172", "serial-jsonl"}
    assert covered <= set(BY_NAME)
    assert {f for f in FORMATS if f != "app"} <= {*BY_NAME, "rylr", "rak3172"}
    for target in TARGETS:
        assert target.seeds, target.name
    assert {t.name for t in TARGETS} == {n for names in GROUPS.values() for n in names}


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
@FUZZ
@given(data=st.data())
def test_mutated_valid_frames_decode_or_are_rejected_with_a_reason(
    target: Target, data: st.DataObject
) -> None:
    topic, seed = data.draw(st.sampled_from(target.seeds), label="seed")
    payload = data.draw(mutations(seed), label="payload")
    if data.draw(st.booleans(), label="mutate topic"):
        topic = data.draw(mutated_topic(topic), label="topic")
    check_outcome(target, topic, payload)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
@FUZZ
@given(data=st.data())
def test_random_input_decodes_or_is_rejected_with_a_reason(
    target: Target, data: st.DataObject
) -> None:
    topic, _ = data.draw(st.sampled_from(target.seeds), label="seed")
    payload = data.draw(st.binary(max_size=300) | json_bytes(tricky_values), label="payload")
    check_outcome(target, data.draw(st.just(topic) | st.text(max_size=60)), payload)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_every_field_of_every_valid_frame_swapped_for_every_edge_value(target: Target) -> None:
    swapped = [(topic, payload) for topic, seed in target.seeds for payload in field_swaps(seed)]
    for topic, payload in swapped:
        check_outcome(target, topic, payload)
    assert swapped or not any(seed.startswith(b"{") for _, seed in target.seeds)


@FUZZ
@given(data=st.data())
def test_a_mutated_ack_never_verifies_as_a_different_ack(data: st.DataObject) -> None:
    # A forged ACK silences a real panic: no edit may produce another valid ACK.
    target = BY_NAME["lora-ack"]
    _, seed = data.draw(st.sampled_from(target.seeds))
    payload = data.draw(mutations(seed))
    ack = check_outcome(target, "", payload)
    original = lora_ack.decode(seed, key=b"fuzz-key-0123456789abcdef-fuzz!!")
    assert ack is None or (payload == seed and ack == original)


# -- through the real pipeline --------------------------------------------------------------

# The third-party seeds' devices are registered (keyless, network trust), so a mutated
# frame that still names one goes all the way to a stored press.
REGISTRY = "".join(
    f'[[device]]\nid = "{device_id}"\nhardware = "{hardware}"\n'
    'location = { lat = -7.62182, lon = 111.53096 }\n'
    f'external_ids = {{ {fmt} = "{ref}" }}\n'
    for device_id, hardware, fmt, ref in (
        ("CS-1", "lora-button", "chirpstack", "0004a30b001c0530"),
        ("TTN-1", "lora-button", "ttn", "dev1"),
        ("ZB-1", "zigbee-sos", "zigbee2mqtt", "sos_rt03"),
        ("SH-1", "shelly-button", "shelly", "shellybutton1-A4CF12F45301"),
        ("TA-1", "tasmota-button", "tasmota", "tombol_rw05"),
    )
) + '[[device]]\nid = "L0000BEEF"\nhardware = "lora-button"\n' \
    'location = { lat = -7.62182, lon = 111.53096 }\n'
PIPELINE_FORMATS = ("native", "lora-frame", "chirpstack", "ttn", "zigbee2mqtt", "shelly",
                    "tasmota")


@pytest.fixture(scope="module")
def fuzz_fleet() -> Fleet:
    """One fleet for every example (hypothesis examples must not share a function fixture)."""
    directory = Path(tempfile.mkdtemp(prefix="panicd-fuzz-"))
    return make_fleet(directory, extra_registry=REGISTRY)


async def _ingest(fleet: Fleet, items: list[tuple[str, str, bytes]]) -> list[tuple[
        Frame | DecodeError, object]]:
    decoded: list[tuple[str, bytes, Frame | DecodeError]] = []
    for name, topic, payload in items:
        try:
            result = BY_NAME[name].decode(topic, payload)
        except DecodeError as exc:
            result = exc
        if isinstance(result, Ignored):
            continue  # sources log and drop these; nothing reaches ingest
        assert isinstance(result, Frame | DecodeError)
        decoded.append((name, payload, result))
    async with (
        SqliteStore(fleet.database) as store,
        Ingestor(store, fleet.config, fleet.locator, policy=DedupPolicy()) as ingestor,
    ):
        pipe = Collector(ingestor)
        batch = [
            pipe.item(payload, at=T0, decoded=result, format_name=name, path=f"fuzz:{name}",
                      trust=Trust.SIGNED if name in ("native", "lora-frame") else Trust.NETWORK)
            for name, payload, result in decoded
        ]
        # A value the store cannot write makes the ingest loop retry the batch forever.
        async with asyncio.timeout(10):
            outcomes = await pipe.send(*batch)
    return [(result, outcome) for (_, _, result), outcome in zip(decoded, outcomes, strict=True)]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_through_the_pipeline_every_rejection_is_a_dead_letter_with_its_reason(
    fuzz_fleet: Fleet, data: st.DataObject
) -> None:
    items = []
    for _ in range(data.draw(st.integers(1, 6), label="items")):
        name = data.draw(st.sampled_from(PIPELINE_FORMATS), label="format")
        topic, seed = data.draw(st.sampled_from(BY_NAME[name].seeds), label="seed")
        items.append((name, topic, data.draw(mutations(seed), label="payload")))
    before = len(rows(fuzz_fleet.database, "SELECT id FROM dead_letters")) \
        if fuzz_fleet.database.exists() else 0
    with structlog.testing.capture_logs() as logs:
        results = asyncio.run(_ingest(fuzz_fleet, items))
    assert not [e for e in logs if e["event"] == "store.commit_failed"], logs
    rejected = [(r.reason, r.detail[:500]) for r, outcome in results if isinstance(r, DecodeError)]
    for result, outcome in results:
        if isinstance(result, DecodeError):
            assert outcome == DeadLettered(result.reason)
    stored = rows(fuzz_fleet.database,
                  "SELECT reason, detail FROM dead_letters WHERE id > ? ORDER BY id", (before,))
    for reason_detail in rejected:
        assert reason_detail in stored


# -- regressions: what the fuzzers found ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "topic", "payload"),
    [
        ("native", "", b'{"\\ud800": 1}'),
        ("chirpstack", "", b'{"deviceInfo": {"devEui": "\\ud800"}, "object": {"event": "panic"}}'),
        ("ttn", "", b'{"end_device_ids": {"device_id": "\\udfff"}, "uplink_message":'
                    b' {"decoded_payload": {"event": "panic"}}}'),
        ("zigbee2mqtt", "zigbee2mqtt/sos_rt03", b'{"action": "\\ud800"}'),
        ("shelly", "shellies/b/input_event/0", b'{"event": "\\ud800", "event_cnt": 1}'),
        ("tasmota", "stat/t/RESULT", b'{"Button1": {"Action": "\\ud800"}}'),
    ],
)
def test_an_unpaired_surrogate_escape_never_reaches_the_store_as_one(
    name: str, topic: str, payload: bytes
) -> None:
    # json.loads makes "\ud800" a lone surrogate; SQLite refuses it, so the batch holding
    # it failed and was retried forever, every press behind it waiting.
    outcome = check_outcome(BY_NAME[name], topic, payload)
    assert "\ufffd" in str(getattr(outcome, "detail", "")) + str(getattr(outcome, "device_ref", ""))


@pytest.mark.parametrize("name", ["chirpstack", "ttn"])
@pytest.mark.parametrize("f_cnt", [2**32, 2**63, 2**64])
def test_a_lorawan_frame_counter_past_32_bits_is_rejected(name: str, f_cnt: int) -> None:
    payload = (
        b'{"deviceInfo": {"devEui": "0004a30b001c0530"}, "fCnt": %d, "object": {"event": "panic"}}'
        if name == "chirpstack" else
        b'{"end_device_ids": {"device_id": "dev1"}, "uplink_message":'
        b' {"f_cnt": %d, "decoded_payload": {"event": "panic"}}}'
    ) % f_cnt
    with pytest.raises(DecodeError) as info:
        BY_NAME[name].decode("", payload)
    assert info.value.reason == "bad_counter"
    ok = payload.replace(b"%d" % f_cnt, b"%d" % (2**32 - 1))
    assert isinstance(BY_NAME[name].decode("", ok), Frame)


def test_a_frame_the_store_could_not_write_does_not_stall_the_presses_behind_it(
    fuzz_fleet: Fleet,
) -> None:
    # Before: UnicodeEncodeError / OverflowError on every commit attempt, retried forever.
    native_seed = BY_NAME["native"].seeds[2][1]
    items = [
        ("ttn", "", b'{"end_device_ids": {"device_id": "\\ud800"}, "uplink_message":'
                    b' {"decoded_payload": {"event": "panic"}}}'),
        ("chirpstack", "", b'{"deviceInfo": {"devEui": "0004a30b001c0530"},'
                           b' "fCnt": 18446744073709551616, "object": {"event": "panic"}}'),
        ("native", "", native_seed),
    ]
    with structlog.testing.capture_logs() as logs:
        results = asyncio.run(_ingest(fuzz_fleet, items))
    assert [e for e in logs if e["event"] == "store.commit_failed"] == []
    assert [outcome for _, outcome in results][:2] == [
        DeadLettered("unknown_device"), DeadLettered("bad_counter"),
    ]


# -- coverage-guided: atheris ---------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
ATHERIS_SECONDS = 3  # per group; eight groups stay under a minute with interpreter start


def _atheris_missing() -> str | None:
    try:
        importlib.import_module("atheris")
    except ImportError as exc:
        return (f"atheris is not installed ({exc}); `make test` installs it from the dev "
                "extras (pip install atheris: a cp311 manylinux x86_64 wheel, no compiler)")
    return None


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_atheris_finds_no_crash_in_the_decoders(group: str, tmp_path: Path) -> None:
    missing = _atheris_missing()
    if missing is not None:
        pytest.skip(f"COVERAGE-GUIDED FUZZING NOT RUN: {missing}")
    corpus = tmp_path / "corpus"
    result = subprocess.run(
        [sys.executable, "-m", "tests.fuzz_decoders", group, "-runs=1000000",
         f"-max_total_time={ATHERIS_SECONDS}", f"-artifact_prefix={tmp_path}/", str(corpus)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("crash-"))
    assert (result.returncode, crashes) == (0, []), result.stderr[-4000:]
    done = re.search(r"Done (\d+) runs", result.stderr)
    assert done is not None, result.stderr[-2000:]
    assert int(done[1]) > 1000, f"only {done[1]} inputs ran"
