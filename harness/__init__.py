"""The evaluation engine: batches of samples through an adapter under a method, records, resume, results.

The engine knows the *interfaces* of tasks, adapters, methods and backends, never a concrete model family,
benchmark or paper; what it shares with tasks and reports lives in :mod:`core`.
"""

__version__ = "0.1.0"
