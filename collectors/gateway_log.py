"""The serving gateway's request log: one line per completion request, in day files the gateway appends to.

The gateway (daemon/gateway.py) may run inside the service or as its own process (`devtune serve`), and
DuckDB allows one writer process, so it never writes the store: it appends each request to
`<state_dir>/gateway/requests-YYYY-MM-DD.jsonl` (UTC day of arrival) and fsyncs, and this collector reads
those files like any other log, from a saved cursor, into the `gateway_requests` table. A crash loses at
most the request being answered; a line read twice is stored once (its key is the completion id).

A line holds who asked, when, which adapter version answered and how it went; never the prompt or the
completion. `received_at` keeps milliseconds: the acceptance of each version is measured by joining these
lines to the editor's own events by developer and time.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

from collectors.base import Batch, Cursor, Found, GatewayRequest, Limits, LineParser, RawEvent, Watch
from collectors.continue_dev import parse_timestamp
from collectors.jsonl import collect_lines, decode_object, pending_bytes

DAY_FILE = re.compile(r"^requests-\d{4}-\d{2}-\d{2}\.jsonl$")
_append_lock = threading.Lock()
_FIELDS = {name: kind for name, kind in GatewayRequest.__annotations__.items()}


class GatewayLogCollector:
    kind = "gateway"
    unit = "bytes"

    def pending(self, root: Path, stream: str, cursor: Cursor | None) -> int:
        return pending_bytes(root / stream, cursor)

    def repo(self, root: Path) -> str | None:
        return None

    def watch_paths(self, root: Path) -> list[Watch]:
        # Every request appends a line: collecting on the interval, not on each change, keeps the store's
        # writer from chasing the traffic.
        return []

    def discover(self) -> list[Found]:
        return []  # the gateway's own log: enabled by [serve], never found on a machine

    def streams(self, root: Path) -> list[str]:
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if DAY_FILE.match(p.name) and p.is_file())

    def collect(self, root: Path, stream: str, cursor: Cursor | None, limits: Limits) -> Iterator[Batch]:
        yield from collect_lines(root / stream, stream, cursor, limits, parse_line)

    def line_parser(self, root: Path, stream: str) -> LineParser:
        return parse_line


def append_request(folder: Path, request: GatewayRequest) -> Path:
    """Append one request to its day's file and fsync it (and the folder, for a new file) before returning."""
    record: dict[str, Any] = asdict(request)
    record["received_at"] = request.received_at.isoformat(timespec="milliseconds") + "Z"
    line = orjson.dumps(record) + b"\n"
    path = folder / f"requests-{request.received_at:%Y-%m-%d}.jsonl"
    with _append_lock:  # one writer at a time keeps lines whole (the gateway is threaded)
        folder.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    return path


def parse_line(raw: bytes) -> tuple[RawEvent, ...] | str:
    """One request line, or why it is not one."""
    obj = decode_object(raw)
    if isinstance(obj, str):
        return obj
    missing = sorted(set(_FIELDS) - set(obj))
    if missing:
        return f"request line lacks {', '.join(missing)}"
    received = parse_timestamp(obj["received_at"], None)
    if isinstance(received, str):
        return f"request line: {received}"
    wrong = [name for name, want in (("key", str), ("developer", str), ("team", str), ("model", str),
                                     ("backend", str), ("stream", bool), ("status", int),
                                     ("prompt_tokens", int), ("completion_tokens", int))
             if not isinstance(obj[name], want)]
    wrong += [name for name in ("scope", "version", "served_name", "finish_reason", "error")
              if obj[name] is not None and not isinstance(obj[name], str)]
    wrong += [name for name in ("latency_ms", "first_token_ms")
              if not (isinstance(obj[name], int | float) or (obj[name] is None and name == "first_token_ms"))]
    if wrong or not obj["key"] or not obj["developer"]:
        return f"request line: bad {', '.join(wrong) or 'key or developer (empty)'}"
    return (GatewayRequest(
        key=obj["key"], received_at=received, developer=obj["developer"], team=obj["team"], scope=obj["scope"],
        version=obj["version"], served_name=obj["served_name"], model=obj["model"], backend=obj["backend"],
        stream=obj["stream"], status=obj["status"], latency_ms=float(obj["latency_ms"]),
        first_token_ms=float(obj["first_token_ms"]) if obj["first_token_ms"] is not None else None,
        prompt_tokens=obj["prompt_tokens"], completion_tokens=obj["completion_tokens"],
        finish_reason=obj["finish_reason"], error=obj["error"]),)
