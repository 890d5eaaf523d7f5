"""panicd's database schema: the migrations and the code that applies them.

Each migration moves the schema from version N to N+1 (``PRAGMA user_version``); they run
in one transaction each when any component opens the database.
"""

from __future__ import annotations

import aiosqlite

from store.errors import refuse_newer_schema

# Each entry moves the schema from version N to N+1 (PRAGMA user_version). Never edit a
# shipped migration: append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE devices (
        id            TEXT PRIMARY KEY,
        last_counter  INTEGER,
        last_seen_at  REAL,
        last_kind     TEXT,
        last_path     TEXT,
        battery       INTEGER
    );
    CREATE TABLE incidents (
        id               INTEGER PRIMARY KEY,
        device_id        TEXT NOT NULL,
        status           TEXT NOT NULL
                         CHECK (status IN ('open', 'acknowledged', 'resolved', 'cancelled')),
        test             INTEGER NOT NULL,
        urgent           INTEGER NOT NULL DEFAULT 0,
        opened_at        REAL NOT NULL,
        updated_at       REAL NOT NULL,
        closed_at        REAL,
        press_count      INTEGER NOT NULL,
        last_press_at    REAL NOT NULL,
        lat              REAL,
        lon              REAL,
        location_source  TEXT NOT NULL,
        kelurahan_kode   TEXT,
        kelurahan        TEXT,
        kecamatan        TEXT,
        kelurahan_match  TEXT NOT NULL,
        address          TEXT NOT NULL,
        landmark         TEXT NOT NULL
    );
    CREATE INDEX incidents_active ON incidents (device_id, test)
        WHERE status IN ('open', 'acknowledged');
    CREATE INDEX incidents_opened ON incidents (opened_at);
    CREATE TABLE presses (
        id           INTEGER PRIMARY KEY,
        device_id    TEXT NOT NULL,
        counter      INTEGER,
        kind         TEXT NOT NULL,
        format       TEXT NOT NULL,
        trust        TEXT NOT NULL,
        received_at  REAL NOT NULL,
        device_time  INTEGER,
        battery      INTEGER,
        lat          REAL,
        lon          REAL,
        accuracy_m   REAL,
        incident_id  INTEGER REFERENCES incidents (id),
        outcome      TEXT NOT NULL
    );
    CREATE INDEX presses_device_counter ON presses (device_id, counter);
    -- A signed counter is never reused, so the database itself refuses a second copy.
    CREATE UNIQUE INDEX presses_signed_unique ON presses (device_id, counter)
        WHERE trust = 'signed';
    CREATE INDEX presses_incident ON presses (incident_id);
    CREATE TABLE press_paths (
        press_id        INTEGER NOT NULL REFERENCES presses (id),
        path            TEXT NOT NULL,
        first_heard_at  REAL NOT NULL,
        last_heard_at   REAL NOT NULL,
        heard           INTEGER NOT NULL DEFAULT 1,
        rssi            REAL,
        snr             REAL,
        PRIMARY KEY (press_id, path)
    );
    CREATE TABLE incident_events (
        id           INTEGER PRIMARY KEY,
        incident_id  INTEGER NOT NULL REFERENCES incidents (id),
        at           REAL NOT NULL,
        event        TEXT NOT NULL,
        reason       TEXT NOT NULL,
        actor        TEXT,
        press_id     INTEGER,
        detail       TEXT
    );
    CREATE INDEX incident_events_incident ON incident_events (incident_id, id);
    CREATE TABLE dead_letters (
        id           INTEGER PRIMARY KEY,
        received_at  REAL NOT NULL,
        source       TEXT NOT NULL,
        path         TEXT NOT NULL,
        format       TEXT NOT NULL,
        device_ref   TEXT,
        reason       TEXT NOT NULL,
        detail       TEXT NOT NULL,
        payload      BLOB NOT NULL
    );
    CREATE INDEX dead_letters_received ON dead_letters (received_at);
    """,
    # 2: dispatch — escalation steps with due times, the outbox, acks (DESIGN §2).
    """
    CREATE TABLE incident_dispatch (
        incident_id   INTEGER PRIMARY KEY REFERENCES incidents (id),
        policy_id     TEXT NOT NULL,
        route         TEXT NOT NULL,
        planned_at    REAL NOT NULL,
        closed_at     REAL,
        close_reason  TEXT,
        handled_by    TEXT
    );
    CREATE TABLE escalation_steps (
        key          TEXT PRIMARY KEY,
        incident_id  INTEGER NOT NULL REFERENCES incidents (id),
        round        INTEGER NOT NULL,
        level        INTEGER NOT NULL,
        due_at       REAL NOT NULL,
        state        TEXT NOT NULL CHECK (state IN ('pending', 'fired', 'cancelled')),
        fired_at     REAL
    );
    CREATE INDEX escalation_steps_due ON escalation_steps (due_at) WHERE state = 'pending';
    CREATE INDEX escalation_steps_incident ON escalation_steps (incident_id);
    CREATE TABLE outbox (
        id            INTEGER PRIMARY KEY,
        key           TEXT NOT NULL UNIQUE,
        -- NULL for operations messages (device health) that belong to no incident.
        incident_id   INTEGER REFERENCES incidents (id),
        person_id     TEXT NOT NULL,
        phone         TEXT NOT NULL,
        channel       TEXT NOT NULL CHECK (channel IN ('sms', 'voice')),
        purpose       TEXT NOT NULL,
        round         INTEGER,
        level         INTEGER,
        body          TEXT NOT NULL,
        state         TEXT NOT NULL CHECK (state IN ('pending', 'sending', 'sent', 'delivered',
                                                     'failed', 'no_answer', 'cancelled')),
        attempts      INTEGER NOT NULL DEFAULT 0,
        provider_sid  TEXT,
        error_code    INTEGER,
        error         TEXT,
        created_at    REAL NOT NULL,
        due_at        REAL NOT NULL,
        updated_at    REAL NOT NULL
    );
    CREATE INDEX outbox_pending ON outbox (due_at) WHERE state = 'pending';
    CREATE INDEX outbox_incident ON outbox (incident_id);
    CREATE UNIQUE INDEX outbox_sid ON outbox (provider_sid) WHERE provider_sid IS NOT NULL;
    CREATE TABLE acks (
        id           INTEGER PRIMARY KEY,
        incident_id  INTEGER NOT NULL REFERENCES incidents (id),
        person_id    TEXT,
        actor        TEXT NOT NULL,
        via          TEXT NOT NULL,
        at           REAL NOT NULL,
        first        INTEGER NOT NULL
    );
    CREATE INDEX acks_incident ON acks (incident_id);
    """,
    # 3: device and source health conditions, each raised once and cleared once (issue 5).
    """
    CREATE TABLE device_health (
        id          INTEGER PRIMARY KEY,
        subject     TEXT NOT NULL,
        condition   TEXT NOT NULL,
        raised_at   REAL NOT NULL,
        cleared_at  REAL,
        detail      TEXT
    );
    CREATE UNIQUE INDEX device_health_active ON device_health (subject, condition)
        WHERE cleared_at IS NULL;
    CREATE INDEX device_health_raised ON device_health (raised_at);
    """,
    # 4: partial indexes for recurring reads that scanned whole tables (SQLite 3.40 without
    # ANALYZE, as deployed): the messages left 'sending', which the outbox requeues every
    # 60 s under the write lock ingest shares, and the closed incidents and finished
    # messages /metrics counts. Plain indexes on these columns made other plans worse.
    """
    CREATE INDEX outbox_sending ON outbox (updated_at) WHERE state = 'sending';
    CREATE INDEX incidents_closed ON incidents (status)
        WHERE status IN ('resolved', 'cancelled');
    CREATE INDEX outbox_final ON outbox (channel, state)
        WHERE state IN ('sent', 'delivered', 'failed', 'no_answer', 'cancelled');
    """,
    # 5: signed counters and network frame counters are separate sequences, and signed
    # counters get an anti-replay window (gateway/verify.py, docs/SECURITY.md). Before,
    # last_counter held whichever sequence the newest press carried, so a network frame
    # (fCnt 4294967295) could lock a keyed button out. A device whose newest press was
    # network-trusted has that counter moved over, and its signed counter recomputed from
    # its signed presses. The window starts knowing only last_counter itself.
    """
    ALTER TABLE devices ADD COLUMN replay_window INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE devices ADD COLUMN last_network_counter INTEGER;
    UPDATE devices SET last_network_counter = last_counter
        WHERE (SELECT p.trust FROM presses AS p WHERE p.device_id = devices.id
               ORDER BY p.id DESC LIMIT 1) = 'network';
    UPDATE devices SET last_counter = (SELECT MAX(p.counter) FROM presses AS p
                                       WHERE p.device_id = devices.id AND p.trust = 'signed')
        WHERE last_network_counter IS NOT NULL;
    UPDATE devices SET replay_window = 1 WHERE last_counter IS NOT NULL;
    """,
    # 6: a message whose request may have been accepted without panicd hearing of it (a
    # crash mid-send, a dropped connection) is "in doubt" from the time of that request:
    # before sending it again the outbox asks the provider (issue 12 item 3). Rows a crash
    # left 'sending' are in doubt since their claim. A call carries nothing of panicd's,
    # so a number has at most one call unsettled (sending, or pending in doubt) at a time:
    # the index finds it for the claim.
    """
    ALTER TABLE outbox ADD COLUMN in_doubt_since REAL;
    UPDATE outbox SET in_doubt_since = updated_at WHERE state = 'sending';
    CREATE INDEX outbox_unsettled_calls ON outbox (phone) WHERE channel = 'voice'
        AND (state = 'sending' OR (state = 'pending' AND in_doubt_since IS NOT NULL));
    """,
    # 7: several instances on one database (issue 13 item 3): a row in 'sending' names the
    # instance that claimed it and until when its claim (the lease) holds. A peer takes a
    # row whose lease ran out back, in doubt, as a restart takes back its own; rows left
    # 'sending' from before have no claimant and count as every instance's own.
    """
    ALTER TABLE outbox ADD COLUMN claimed_by TEXT;
    ALTER TABLE outbox ADD COLUMN lease_until REAL;
    CREATE INDEX outbox_lease ON outbox (lease_until) WHERE state = 'sending';
    """,
    # 8: PostgreSQL's version 8 adds the triggers that wake peer instances (LISTEN/NOTIFY,
    # store/pg_schema.py); one process on one file has no peer to wake, so nothing here
    # but the version, which stays the same number on both backends.
    """
    -- nothing to change
    """,
    # 9: every instance receives every transmission of a press; the copy that answers a
    # transmission "received" is recorded, so that the others do not answer it again
    # (gateway/batch.py SAME_TRANSMISSION_S). PostgreSQL's 9 also adds the instances'
    # heartbeats, which one process has no use for.
    """
    ALTER TABLE presses ADD COLUMN answered_at REAL;
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


async def migrate(db: aiosqlite.Connection) -> int:
    """Bring the schema to :data:`SCHEMA_VERSION`; refuses a database from a newer panicd."""
    await db.execute("PRAGMA journal_mode = WAL")
    # FULL: a commit survives power loss, not only a killed process. Grouped commits
    # keep the fsync cost per press small.
    await db.execute("PRAGMA synchronous = FULL")
    await db.execute("PRAGMA foreign_keys = ON")
    await db.execute("PRAGMA busy_timeout = 5000")
    rows = list(await db.execute_fetchall("PRAGMA user_version"))
    version = int(rows[0][0])
    refuse_newer_schema(version, SCHEMA_VERSION)
    for target in range(version, SCHEMA_VERSION):
        await db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(MIGRATIONS[target]):
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {target + 1}")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
    return SCHEMA_VERSION


def _statements(script: str) -> list[str]:
    """Split a migration into statements (executescript would commit on its own)."""
    out: list[str] = []
    current: list[str] = []
    for line in script.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("--"):
            continue
        current.append(line)
        if stripped.endswith(";"):
            out.append("\n".join(current))
            current = []
    if current:
        out.append("\n".join(current))
    return out
