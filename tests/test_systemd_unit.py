"""The systemd unit, sysusers and tmpfiles snippets, checked by systemd's own tools."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNIT = SYSTEMD / "panicd.service"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
MAX_EXPOSURE = 2.0


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (systemd tools are needed to check the unit)")
    return path


def unit_settings() -> list[tuple[str, str]]:
    """Key/value pairs of the unit in file order; keys may repeat, as in systemd."""
    pairs: list[tuple[str, str]] = []
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            pairs.append((key, value))
    return pairs


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A filesystem root holding the stock units, the unit and a stub ExecStart binary.

    `verify` insists that ExecStart's binary exists; in a container or CI runner there is
    no installed panicd, so the root supplies one instead of weakening the unit.
    """
    if not (SYSTEM_UNITS / "sysinit.target").exists():
        pytest.skip(f"no stock systemd units under {SYSTEM_UNITS}")
    shutil.copytree(SYSTEM_UNITS, tmp_path / "usr/lib/systemd/system", symlinks=True)
    stub = tmp_path / "usr/bin/panicd"
    stub.parent.mkdir(parents=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, tmp_path / "etc/systemd/system/panicd.service")
    return tmp_path


def test_unit_verifies_without_any_warning(root: Path) -> None:
    analyze = tool("systemd-analyze")
    result = subprocess.run(
        [analyze, "verify", f"--root={root}", "panicd.service"],
        capture_output=True,
        text=True,
        check=False,
    )
    # verify exits 0 even for unknown keys and unparsable values; it only warns.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_security_exposure_is_at_most_two() -> None:
    analyze = tool("systemd-analyze")
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for panicd\.service: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match[1]) <= MAX_EXPOSURE, result.stdout


def test_unit_declares_the_operations_contract() -> None:
    settings = unit_settings()
    single = dict(settings)
    assert single["Type"] == "notify"
    assert single["NotifyAccess"] == "main"
    assert single["WatchdogSec"] == "30"
    assert single["Restart"] == "on-failure"
    assert single["StateDirectory"] == "panicd"
    assert single["ExecStart"] == "/usr/bin/panicd --config /etc/panicd/panicd.toml"
    credentials = {v.partition(":")[0] for k, v in settings if k == "LoadCredential"}
    assert credentials == {"twilio-auth-token", "device-keys", "ack-link-secret"}
    assert "PrivateDevices" not in single  # it would hide the LoRa serial adapters
    assert ("DeviceAllow", "char-ttyUSB rw") in settings


def test_sysusers_snippet_creates_the_panicd_user(tmp_path: Path) -> None:
    sysusers = tool("systemd-sysusers")
    conf = tmp_path / "usr/lib/sysusers.d/panicd.conf"
    conf.parent.mkdir(parents=True)
    shutil.copy(SYSTEMD / "panicd.sysusers", conf)
    result = subprocess.run(
        [sysusers, f"--root={tmp_path}", "--dry-run", "panicd.conf"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Creating user 'panicd'" in result.stdout + result.stderr


def test_tmpfiles_snippet_makes_the_credential_store_root_only(tmp_path: Path) -> None:
    tmpfiles = tool("systemd-tmpfiles")
    if os.geteuid() != 0:
        pytest.skip("tmpfiles must run as root to give the directory to root")
    conf = tmp_path / "usr/lib/tmpfiles.d/panicd.conf"
    conf.parent.mkdir(parents=True)
    shutil.copy(SYSTEMD / "panicd.tmpfiles", conf)
    result = subprocess.run(
        [tmpfiles, f"--root={tmp_path}", "--create", "panicd.conf"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "etc/panicd/credentials").stat().st_mode & 0o777 == 0o700
