"""panicd's composition: the daemon and panicctl, above both halves.

``gateway/`` (sources, decode, verify, dedup, locate, ingest) and ``dispatch/``
(routing, escalation, channels, webhooks) each do one half; ``store/`` keeps the state
both halves share. Only this package puts them together: ``panicd.daemon`` runs them as
one process (``python -m panicd``, the ``panicd`` command), ``panicd.cli`` is
``panicctl``. Nothing below imports from here (tests/test_layout.py).
"""
