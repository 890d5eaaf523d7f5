"""panicd ingest side: sources, decode, verify, dedup, locate and ingest (the daemon that
runs it beside dispatch is panicd/daemon.py)."""
