"""Benchmarks that print figures.

Run them as modules (python -m bench.ingest, python -m bench.dispatch).
"""
