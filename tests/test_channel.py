"""The console channel prints one block per message and satisfies the Channel protocol."""

from __future__ import annotations

import io

import pytest

from dispatch.channel import Channel, ConsoleChannel, DeliveryStatus


async def test_console_sms_prints_the_text_and_reports_a_fake_sid() -> None:
    out = io.StringIO()
    channel: Channel = ConsoleChannel(out)
    result = await channel.send_sms("+6281234567890", "DARURAT #K7Q2", status_callback=None)
    assert result.status is DeliveryStatus.SENT
    assert result.provider_sid is not None
    assert result.provider_sid.startswith("CONSOLE-SM")
    assert "DARURAT #K7Q2\n" in out.getvalue()


async def test_console_masks_numbers_as_the_logs_do() -> None:
    out = io.StringIO()
    channel = ConsoleChannel(out)
    await channel.send_sms("+6281234567890", "DARURAT #K7Q2", status_callback=None)
    await channel.place_call("+6281234567891", twiml_url="https://p/voice/1",
                             status_callback=None)
    printed = out.getvalue()
    assert "+6281234567890" not in printed
    assert "+6281234567891" not in printed
    # Two responders stay apart: the masked form keeps the last digits.
    assert "to +62812****890 " in printed
    assert "to +62812****891\n" in printed


async def test_console_call_prints_its_script_url(capsys: pytest.CaptureFixture[str]) -> None:
    channel = ConsoleChannel()
    first = await channel.place_call("+628111", twiml_url="https://p/voice/1", status_callback=None)
    second = await channel.place_call(
        "+628111", twiml_url="https://p/voice/1", status_callback=None
    )
    printed = capsys.readouterr().out
    assert printed.count("----- CALL CONSOLE-CA") == 2
    assert "https://p/voice/1" in printed
    assert first.provider_sid != second.provider_sid
