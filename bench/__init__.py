"""Benchmarks that print figures; run as modules: python -m bench.ingest, python -m bench.dispatch."""
