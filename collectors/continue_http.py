"""Continue's HTTP `data:` destination, as an inbox of day files the service appends to (FORMATS.md §1.7).

Continue POSTs one event per request and never retries, so the service must not answer 2xx before the
event is safe. It appends the event to `<inbox>/YYYY-MM-DD.jsonl` (UTC day of receipt) and fsyncs before
answering; this collector then reads those files like any other log, from a saved cursor, through the
same `continue_dev.parse_event` as the files Continue writes itself. So a crash right after the answer
loses nothing, and an event that arrives both ways is stored once (same completionId or content key).

Inbox line: {"received_at": ISO-8601 UTC, "developer": who sent it, "by": "token" | "header", "body": the POST
body}. "token": the developer owns the token the POST came with, and is the event's only identity (a body
cannot name someone else in its userId). "header": the team-wide token's X-Developer header (single-user
setups), placed ahead of the identities Continue logged; lines written before "by" existed read as "header".
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from collectors.base import (
    Batch,
    Cursor,
    EditOutcome,
    Found,
    Interaction,
    Limits,
    LineParser,
    RawEvent,
    Suggestion,
    Watch,
)
from collectors.continue_dev import EVENT_NAMES, parse_event, parse_timestamp
from collectors.jsonl import collect_lines, decode_object, pending_bytes

DAY_FILE = re.compile(r"^\d{4}-\d{2}-\d{2}\.jsonl$")
SCHEMAS = ("0.1.0", "0.2.0")
LEVELS = ("all", "noCode")
# Bytes an inbox line adds around a body: the received_at and developer fields and the braces.
LINE_OVERHEAD_BYTES = 512

_append_lock = threading.Lock()


class ContinueHttpCollector:
    kind = "continue_http"
    unit = "bytes"

    def pending(self, root: Path, stream: str, cursor: Cursor | None) -> int:
        return pending_bytes(root / stream, cursor)

    def repo(self, root: Path) -> str | None:
        return None

    def watch_paths(self, root: Path) -> list[Watch]:
        return []  # the route that appends to the inbox asks for a collect itself

    def discover(self) -> list[Found]:
        return []  # the service's own inbox: enabled by [continue_http], never found on a machine

    def streams(self, root: Path) -> list[str]:
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if DAY_FILE.match(p.name) and p.is_file())

    def collect(self, root: Path, stream: str, cursor: Cursor | None, limits: Limits) -> Iterator[Batch]:
        yield from collect_lines(root / stream, stream, cursor, limits, parse_line)

    def line_parser(self, root: Path, stream: str) -> LineParser:
        return parse_line


def check_body(raw: bytes) -> dict[str, Any] | str:
    """A POST body as Continue sends it, or what is wrong with it (answered as 400)."""
    body = decode_object(raw)
    if isinstance(body, str):
        return f"body is {body}"
    name, data = body.get("name"), body.get("data")
    if not isinstance(name, str) or not isinstance(data, dict):
        return "body must be {\"name\": <event name>, \"data\": {...}, \"schema\": ..., \"level\": ...}"
    schema, level = body.get("schema", "0.2.0"), body.get("level", "all")
    if schema not in SCHEMAS:
        return f"schema {schema!r} is not one Continue defines ({', '.join(SCHEMAS)})"
    if level not in LEVELS:
        return f"level {level!r} is not one Continue defines ({', '.join(LEVELS)})"
    return body


def wanted(body: dict[str, Any]) -> bool:
    """Whether devtune stores events of this body's kind (the others are answered 200 and not kept)."""
    return body["name"] in EVENT_NAMES


def append_to_inbox(inbox: Path, body: dict[str, Any], developer: str, received_at: datetime,
                    by_token: bool = True, scrubbed: dict[str, int] | None = None) -> Path:
    """Append one event to today's inbox file and fsync it (and the folder, for a new file) before returning.
    `body` is what may be kept on disk: the service scrubs it first, and `scrubbed` counts what that removed."""
    line = orjson.dumps({"received_at": received_at.isoformat(timespec="milliseconds") + "Z",
                         "developer": developer, "by": "token" if by_token else "header",
                         "scrubbed": scrubbed or {}, "body": body}) + b"\n"
    path = inbox / f"{received_at:%Y-%m-%d}.jsonl"
    with _append_lock:  # one writer at a time keeps lines whole (the server is threaded)
        new = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            dir_fd = os.open(inbox, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    return path


def parse_line(raw: bytes) -> tuple[RawEvent, ...] | str:
    """One inbox line: the body's event through the Continue parser, attributed to whoever sent it."""
    obj = decode_object(raw)
    if isinstance(obj, str):
        return obj
    received = parse_timestamp(obj.get("received_at"), None)
    if isinstance(received, str):
        return f"inbox line: {received}"
    body = obj.get("body")
    if not isinstance(body, dict):
        return "inbox line: field 'body' must be an object"
    checked = check_body(orjson.dumps(body))
    if isinstance(checked, str):
        return f"inbox line: {checked}"
    parsed = parse_event(checked["name"], checked["data"], received, checked.get("level", "all"))
    if isinstance(parsed, str):
        return parsed
    sender = obj.get("developer")
    developer = sender if isinstance(sender, str) else ""
    counted = obj.get("scrubbed")
    scrubbed = tuple(sorted((str(k), n) for k, n in counted.items() if isinstance(n, int))) \
        if isinstance(counted, dict) else ()
    return tuple(_attributed(e, developer, obj.get("by") == "token", scrubbed) for e in parsed)


def _attributed(event: RawEvent, developer: str, by_token: bool, scrubbed: tuple[tuple[str, int], ...]) -> RawEvent:
    if not isinstance(event, Suggestion | EditOutcome | Interaction):
        return event
    if not developer:
        return dataclasses.replace(event, scrubbed=scrubbed)
    # A token's owner is the only identity; a header names the person ahead of Continue's own (usually empty)
    # userId.
    return dataclasses.replace(event, user_ids=(developer,) if by_token else (developer, *event.user_ids),
                               scrubbed=scrubbed)
