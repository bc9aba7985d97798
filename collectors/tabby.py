"""Tabby server event logs: `<root>/events/YYYY-MM-DD.json`, one file per UTC day (FORMATS.md §2).

`root` is a Tabby root (`$TABBY_ROOT`, default `~/.tabby`), the folder holding `events/`. The files are JSON
Lines despite their name; the server buffers and flushes every 5 s, so the last line of today's file can
be half-written (the shared line policy in collectors/jsonl.py leaves it for the next run).

A suggestion's events are spread over lines and day files: the `completion` (prompt, segments, choices),
then `view`, `select` (`kind: "line"` for accept-line/word) and `dismiss` lines that share its
`completion_id`, possibly after midnight in the next file. This collector yields each line as a typed
record; the store links them (pipelines/store/db.py `link_tabby`), so the outcome of a completion read
yesterday still changes when its `select` arrives today.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from collectors.base import Batch, Cursor, Found, Limits, LineParser, RawEvent, TabbyAction, TabbyCompletion, Watch
from collectors.continue_dev import MAX_TS_MS, MIN_TS_MS, found_at, normalize_repo
from collectors.jsonl import collect_lines, decode_object, pending_bytes

DAY_FILE = re.compile(r"^\d{4}-\d{2}-\d{2}\.json$")
ACTIONS = ("view", "select", "dismiss")


class TabbyCollector:
    kind = "tabby"
    unit = "bytes"

    def pending(self, root: Path, stream: str, cursor: Cursor | None) -> int:
        return pending_bytes(root / stream, cursor)

    def repo(self, root: Path) -> str | None:
        return None  # each completion names its own (`segments.git_url`)

    def watch_paths(self, root: Path) -> list[Watch]:
        # A new day file is a "created" event in this folder, so it is picked up like an append.
        return [Watch(root / "events", recursive=False, suffixes=(".json",))]

    def discover(self) -> list[Found]:
        """The Tabby root at $TABBY_ROOT, else ~/.tabby, when it holds events/."""
        return found_at("TABBY_ROOT", "~/.tabby", "events")

    def streams(self, root: Path) -> list[str]:
        # Day order is event order across files, which keeps a completion ahead of its later select.
        folder = root / "events"
        if not folder.is_dir():
            return []
        return sorted(f"events/{p.name}" for p in folder.iterdir() if DAY_FILE.match(p.name) and p.is_file())

    def collect(self, root: Path, stream: str, cursor: Cursor | None, limits: Limits) -> Iterator[Batch]:
        yield from collect_lines(root / stream, stream, cursor, limits, parse_line)

    def line_parser(self, root: Path, stream: str) -> LineParser:
        return parse_line


def parse_line(raw: bytes) -> tuple[RawEvent, ...] | str:
    """One event line as typed records (none for events without a code suggestion), or why it was rejected."""
    obj = decode_object(raw)
    if isinstance(obj, str):
        return obj
    ts = obj.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        return "field 'ts' must be epoch milliseconds" if "ts" in obj else "missing required field 'ts'"
    if not MIN_TS_MS <= ts <= MAX_TS_MS:
        return f"field 'ts' {ts} is not epoch milliseconds between 2000 and 2100"
    at = datetime.fromtimestamp(ts / 1000, UTC).replace(tzinfo=None)
    event = obj.get("event")
    if not isinstance(event, dict) or len(event) != 1:
        return "field 'event' must be an object with exactly one key (the event kind)"
    (kind, body), = event.items()
    if kind == "chat_completion":
        return ()  # no code suggestion in it (FORMATS.md §2.2)
    if not isinstance(body, dict):
        return f"event '{kind}' must be an object"
    user = obj.get("user")
    if user is not None and not isinstance(user, str):
        return "field 'user' must be a string or null"
    if kind == "completion":
        # Before v0.11 there was no top-level user; the completion carried its own (FORMATS.md §2.4).
        inner = body.get("user")
        one: RawEvent | str = _completion(body, at, user or (inner if isinstance(inner, str) else None))
    elif kind in ACTIONS:
        one = _action(kind, body, at, user, raw)
    else:
        return f"unknown event kind '{kind}' (expected completion, view, select, dismiss or chat_completion)"
    return one if isinstance(one, str) else (one,)


def _completion(body: dict[str, Any], at: datetime, user: str | None) -> TabbyCompletion | str:
    cid = body.get("completion_id")
    if not isinstance(cid, str) or not cid:
        return "completion: field 'completion_id' must be a non-empty string"
    choices = body.get("choices")
    if not isinstance(choices, list) or not all(
            isinstance(c, dict) and isinstance(c.get("text"), str) and _is_index(c.get("index", 0))
            for c in choices):
        return "completion: field 'choices' must be a list of {index, text}"
    texts: dict[int, str] = {c.get("index", i): c["text"] for i, c in enumerate(choices)}
    ordered = tuple(texts.get(i, "") for i in range(max(texts, default=-1) + 1))
    segments = body.get("segments")
    if segments is None:
        segments = {}  # raw-prompt and next-edit requests log no segments
    if not isinstance(segments, dict):
        return "completion: field 'segments' must be an object"
    for name in ("prefix", "suffix", "filepath", "git_url"):
        if segments.get(name) is not None and not isinstance(segments[name], str):
            return f"completion: field 'segments.{name}' must be a string"
    language = body.get("language")
    git_url = segments.get("git_url")
    return TabbyCompletion(
        key=cid,
        created_at=at,
        language=language if isinstance(language, str) and language else "unknown",
        filepath=segments.get("filepath") or "",
        prefix=segments.get("prefix"),
        suffix=segments.get("suffix"),
        choices=ordered,
        repo=normalize_repo(git_url) if git_url else None,
        user_ids=(user,) if user else (),
    )


def _action(kind: str, body: dict[str, Any], at: datetime, user: str | None, raw: bytes) -> TabbyAction | str:
    cid = body.get("completion_id")
    if not isinstance(cid, str) or not cid:
        return f"{kind}: field 'completion_id' must be a non-empty string"
    index = body.get("choice_index", 0)
    if not _is_index(index):
        return f"{kind}: field 'choice_index' must be a whole number >= 0"
    select_kind = body.get("kind")
    if select_kind is not None and not isinstance(select_kind, str):
        return f"{kind}: field 'kind' must be a string"
    return TabbyAction(
        # Identical lines are one event written twice; key order is not part of the format.
        key=hashlib.sha1(orjson.dumps(orjson.loads(raw), option=orjson.OPT_SORT_KEYS)).hexdigest(),
        completion_id=cid,
        kind=kind,
        at=at,
        choice_index=index,
        line_select=kind == "select" and select_kind == "line",
        user_ids=(user,) if user else (),
    )


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 16
