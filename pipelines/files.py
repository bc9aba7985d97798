"""Small JSON files that several processes read while one writes them (service.json, progress.json, eval.json)."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so a reader never sees half a file: a temp file renamed over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def now() -> datetime:
    """The store's clock: UTC without a zone (DuckDB TIMESTAMP). Here, not in the store, so that the registry
    and the gateway can stamp their records without importing DuckDB (the service process never does)."""
    return datetime.now(UTC).replace(tzinfo=None)
