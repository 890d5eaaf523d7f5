"""The private PostgreSQL (firmware_sim/pgserver.py, fixture tests/pg.py): its own cluster
on its own port, durable as deployed, and a commit on one connection seen by another."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import asyncpg
import pytest

from firmware_sim.pgserver import PostgresNotInstalledError, PostgresServer, find_bin_dir

SYSTEM_PORT = 5432


async def test_private_server_is_its_own_cluster_on_a_port_other_than_5432(
    postgres: PostgresServer,
) -> None:
    assert postgres.port != SYSTEM_PORT
    assert postgres.dsn == f"postgresql://panicd@127.0.0.1:{postgres.port}/panicd_test"
    conn = await asyncpg.connect(postgres.dsn)
    try:
        assert await conn.fetchval("SHOW port") == str(postgres.port)
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
        assert postgres.workdir is not None
        data_dir = Path(await conn.fetchval("SHOW data_directory"))
        assert data_dir.is_relative_to(postgres.workdir)
        assert await conn.fetchval("SHOW unix_socket_directories") == str(postgres.socket_dir)
        assert await conn.fetchval("SELECT current_database()") == "panicd_test"
    finally:
        await conn.close()


async def test_private_server_keeps_commits_durable(postgres: PostgresServer) -> None:
    conn = await asyncpg.connect(postgres.dsn)
    try:
        assert await conn.fetchval("SHOW fsync") == "on"
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
    finally:
        await conn.close()


async def test_commit_on_one_connection_is_seen_from_another(postgres: PostgresServer) -> None:
    # A name of its own: the cluster is shared by the whole session.
    table = f"seen_{uuid.uuid4().hex[:12]}"
    writer = await asyncpg.connect(postgres.dsn)
    reader = await asyncpg.connect(postgres.dsn)
    try:
        await writer.execute(f"CREATE TABLE {table} (device_id text, counter bigint, "
                             "UNIQUE (device_id, counter))")
        transaction = writer.transaction()
        await transaction.start()
        inserted = await writer.fetchval(
            f"INSERT INTO {table} VALUES ($1, $2) ON CONFLICT (device_id, counter) "
            "DO NOTHING RETURNING counter", "SIM-00001", 7)
        assert inserted == 7
        assert await reader.fetchval(f"SELECT count(*) FROM {table}") == 0
        await transaction.commit()
        rows = await reader.fetch(f"SELECT device_id, counter FROM {table}")
        assert [tuple(row) for row in rows] == [("SIM-00001", 7)]
    finally:
        await writer.execute(f"DROP TABLE IF EXISTS {table}")
        await writer.close()
        await reader.close()


async def test_new_server_starts_empty_and_stop_removes_it() -> None:
    # Its own cluster, not the session's: emptiness does not depend on test order.
    server = PostgresServer()
    server.start()
    try:
        workdir = server.workdir
        assert workdir is not None
        conn = await asyncpg.connect(server.dsn)
        try:
            tables = await conn.fetchval(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')"
                " AND n.nspname NOT LIKE 'pg_toast%'")
            assert tables == 0
        finally:
            await conn.close()
    finally:
        server.stop()
    assert not workdir.exists()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), 1):
        pass


def test_newest_installed_major_is_chosen(tmp_path: Path) -> None:
    for major in ("9.6", "15", "16"):
        tool = tmp_path / major / "bin" / "initdb"
        tool.parent.mkdir(parents=True)
        tool.touch()
    assert find_bin_dir(tmp_path) == tmp_path / "16" / "bin"


def test_missing_binaries_name_the_install_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PostgresNotInstalledError, match=r"scripts/ensure-postgres\.sh"):
        find_bin_dir(tmp_path)
