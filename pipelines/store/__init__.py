"""The DuckDB store (db.py), its row shapes (schema.py), migrations and the queries the pages and bench read."""


class StoreBusy(Exception):
    """Another process holds the store; the message says which and what to do. Here, not in db.py, so that
    the service and the CLI can catch it without importing DuckDB."""
