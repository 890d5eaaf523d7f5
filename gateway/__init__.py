"""panicd ingest side: sources, decode, verify, dedup, locate, store and the daemon."""
