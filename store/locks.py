"""Every PostgreSQL advisory lock key panicd takes, in one place, so that no two uses can
share a key (two did once: the device-health leader's session lock was the outbox's claim
lock, and the leading instance's outbox waited on its own leadership for ever).

The single-bigint keys spell "panic" and a number; the device locks are the two-int4
key space (class, device hash), which PostgreSQL keeps apart from the single-bigint one.
"""

from __future__ import annotations

# panicctl migrate / an instance's start: one migrates at a time (store/pg_schema.py).
MIGRATION = 0x70616E6963_01
# Instances take turns claiming outbox rows (store/dispatch_outbox.py), per transaction.
OUTBOX_CLAIM = 0x70616E6963_02
# Held for a session by the instance that runs device health (store/leader.py).
HEALTH_LEADER = 0x70616E6963_03
# The class of the per-device locks around an ingest batch (store/pg_ingest.py).
DEVICE_CLASS = 0x70616E69

SINGLE_KEYS = {"MIGRATION": MIGRATION, "OUTBOX_CLAIM": OUTBOX_CLAIM,
               "HEALTH_LEADER": HEALTH_LEADER}
