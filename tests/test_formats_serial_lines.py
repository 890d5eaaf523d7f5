"""Serial receiver line parsers (REYAX, RAK3172 P2P, JSON lines)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import DecodeError
from gateway.formats import lora_frame, serial_lines
from gateway.formats.serial_lines import Err, Event, Ok, Ready, Received, RxData, RxMeta
from gateway.model import PressKind
from tests.formats_fuzz import SNAKE_CASE


# REYAX LoRa AT Command Guide (RYLR896/RYLR406 and RYLR998/RYLR498):
# "+RCV=50,5,HELLO,-99,40" — address, length, data, RSSI, SNR.
def test_reyax_rcv_documented_example() -> None:
    line = serial_lines.parse_reyax_line(b"+RCV=50,5,HELLO,-99,40\r\n")
    assert line == Received(data=b"HELLO", rssi=-99, snr=40.0, addr=50)


def test_reyax_data_with_commas_is_sliced_by_length() -> None:
    assert serial_lines.parse_reyax_line(b"+RCV=7,8,a,b,,c,d,-41,11") == Received(
        data=b"a,b,,c,d", rssi=-41, snr=11.0, addr=7
    )


def test_reyax_hex_frame_round_trips_into_the_binary_decoder() -> None:
    frame = lora_frame.encode(device="L00000010", counter=5, kind=PressKind.PANIC, key=b"k")
    data = frame.hex().upper().encode()
    line = serial_lines.parse_reyax_line(b"+RCV=16,%d,%s,-80,9\r\n" % (len(data), data))
    assert isinstance(line, Received)
    assert lora_frame.decode("", bytes.fromhex(line.data.decode())).counter == 5


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [(b"+READY", Ready()), (b"+OK\r\n", Ok()), (b"+ERR=4", Err(code=4, text="+ERR=4"))],
)
def test_reyax_status_lines(raw: bytes, parsed: object) -> None:
    assert serial_lines.parse_reyax_line(raw) == parsed


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"+RCV=50,20,HELLO,-99,40", "truncated_line"),
        (b"+RCV=50,9,HELLO,-99,40", "bad_line"),
        (b"+RCV=50,5,HELLOX,-99,40", "bad_line"),
        (b"+RCV=99999,5,HELLO,-99,40", "bad_line"),
        (b"+RCV=50,241," + b"x" * 241 + b",-99,40", "bad_line"),
        (b"+ERR=x", "bad_line"),
    ],
)
def test_reyax_malformed_lines(raw: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        serial_lines.parse_reyax_line(raw)
    assert info.value.reason == reason


def test_reyax_send_builder() -> None:
    assert serial_lines.reyax_send(16, b"ACK0000002A") == b"AT+SEND=16,11,ACK0000002A\r\n"
    with pytest.raises(ValueError, match="CR or LF"):
        serial_lines.reyax_send(16, b"a\nb")
    with pytest.raises(ValueError, match="exceeds"):
        serial_lines.reyax_send(16, b"x" * 241)


# RAKwireless Knowledge Hub, AT Migration Guide (RUI3): "+EVT:RXP2P:-60:11:AABBCCDD";
# older RAK3172 firmware: "+EVT:RXP2P, RSSI -60, SNR 11" then "+EVT:AABBCCDD".
def test_rak_rui3_single_line_event() -> None:
    line = serial_lines.parse_rak_line(b"+EVT:RXP2P:-60:11:AABBCCDD\r\n")
    assert line == Received(data=bytes.fromhex("AABBCCDD"), rssi=-60, snr=11.0)


def test_rak_legacy_two_line_event() -> None:
    meta = serial_lines.parse_rak_line(b"+EVT:RXP2P, RSSI -60, SNR 11")
    data = serial_lines.parse_rak_line(b"+EVT:AABBCCDD")
    assert isinstance(meta, RxMeta)
    assert isinstance(data, RxData)
    assert serial_lines.join_legacy_rak(meta, data) == Received(
        data=bytes.fromhex("AABBCCDD"), rssi=-60, snr=11.0
    )


def test_rak_other_lines() -> None:
    assert serial_lines.parse_rak_line(b"+EVT:TXP2P DONE") == Event("TXP2P DONE")
    assert serial_lines.parse_rak_line(b"+EVT:RXP2P RECEIVE TIMEOUT") == Event(
        "RXP2P RECEIVE TIMEOUT"
    )
    assert serial_lines.parse_rak_line(b"OK") == Ok()
    assert serial_lines.parse_rak_line(b"AT_PARAM_ERROR") == Err(code=None, text="AT_PARAM_ERROR")
    with pytest.raises(DecodeError):
        serial_lines.parse_rak_line(b"+EVT:RXP2P:-60:11:ABC")
    assert serial_lines.rak_send(b"\x01\xff") == b"AT+PSEND=01FF\r\n"


def test_json_lines() -> None:
    assert serial_lines.parse_json_line(b'{"v":1}\r\n') == b'{"v":1}'
    assert serial_lines.parse_json_line(b"\r\n") is None
    with pytest.raises(DecodeError) as info:
        serial_lines.parse_json_line(b"garbage")
    assert info.value.reason == "not_a_json_frame"


@given(st.binary(max_size=300))
def test_arbitrary_lines_only_raise_decode_error(raw: bytes) -> None:
    for parse in (
        serial_lines.parse_reyax_line,
        serial_lines.parse_rak_line,
        serial_lines.parse_json_line,
    ):
        try:
            parse(raw)
        except DecodeError as exc:
            assert SNAKE_CASE.fullmatch(exc.reason)


@given(
    st.integers(0, 65535),
    st.binary(max_size=240).filter(lambda b: b"\r" not in b and b"\n" not in b),
    st.integers(-150, 0),
    st.integers(-20, 20),
)
def test_reyax_lines_round_trip_any_data(addr: int, data: bytes, rssi: int, snr: int) -> None:
    raw = b"+RCV=%d,%d,%s,%d,%d" % (addr, len(data), data, rssi, snr)
    assert serial_lines.parse_reyax_line(raw) == Received(
        data=data, rssi=rssi, snr=float(snr), addr=addr
    )
