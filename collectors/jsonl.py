"""Tail an append-only JSON Lines file from a byte offset, with the line policy every log collector shares.

Policy: split on b"\\n"; blank lines are yielded (so the cursor moves past them) and skipped by callers;
a line longer than `max_line_bytes` is rejected without being parsed or held in memory; a last line with
no newline yet is left for the next run (Tabby flushes every 5 s and Continue appends with a single
write, so a missing newline means a write in progress, not garbage).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from collectors.base import Batch, Cursor, Limits, LineParser, RawEvent, Reject, excerpt

HEAD_BYTES = 4096  # the identity of a log file: its first 4 KiB (or all of it while it is shorter)
CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Line:
    offset: int
    raw: bytes  # without the trailing newline
    end: int  # offset just past the newline


@dataclass(frozen=True)
class Oversized:
    offset: int
    head: bytes  # the first bytes, for the excerpt
    end: int


def head_digest(path: Path, length: int) -> str:
    with path.open("rb") as f:
        return hashlib.sha1(f.read(length)).hexdigest()


def resume_offset(path: Path, cursor: Cursor | None) -> tuple[int, str]:
    """Where to resume reading `path`, and a note when the saved cursor no longer fits the file."""
    if cursor is None or cursor.offset == 0:
        return 0, ""
    size = path.stat().st_size
    if size < cursor.offset:
        return 0, f"file shrank from {cursor.offset} to {size} bytes (truncated?): re-reading from the start"
    if cursor.head_len and head_digest(path, cursor.head_len) != cursor.head_sha1:
        return 0, "file was replaced (its first bytes changed): re-reading from the start"
    return cursor.offset, ""


def cursor_at(path: Path, stream: str, offset: int) -> Cursor:
    head_len = min(offset, HEAD_BYTES)
    return Cursor(stream=stream, offset=offset, head_sha1=head_digest(path, head_len), head_len=head_len)


def iter_lines(path: Path, start: int, max_line_bytes: int) -> Iterator[Line | Oversized]:
    """Complete lines from `start` (blank ones too); stops before a trailing line without a newline."""
    with path.open("rb") as f:
        f.seek(start)
        pos = start  # file offset of buf[0]
        buf = b""
        skipping: Oversized | None = None  # inside an oversized line: discard until its newline
        while True:
            chunk = f.read(CHUNK_BYTES)
            if not chunk:
                return
            buf += chunk
            cut = 0
            while True:
                nl = buf.find(b"\n", cut)
                if nl < 0:
                    break
                if skipping is not None:
                    yield Oversized(skipping.offset, skipping.head, pos + nl + 1)
                    skipping = None
                elif nl - cut > max_line_bytes:
                    yield Oversized(pos + cut, buf[cut : cut + 256], pos + nl + 1)
                else:
                    yield Line(pos + cut, buf[cut:nl], pos + nl + 1)
                cut = nl + 1
            buf = buf[cut:]
            pos += cut
            if skipping is None and len(buf) > max_line_bytes:
                skipping = Oversized(pos, buf[:256], -1)
            if skipping is not None:
                pos += len(buf)
                buf = b""


def line_ranges(path: Path, start: int, lines: int) -> Iterator[tuple[int, int]]:
    """(start, end) byte ranges of `lines` complete lines each from `start` (the last range may hold fewer),
    found by their newlines alone: `iter_lines` over a range gives its lines. A trailing line without a newline
    is in no range, as `iter_lines` leaves it for the next run."""
    with path.open("rb") as f:
        f.seek(start)
        pos = begin = last = start  # where the chunk, the range and the last complete line end
        count = 0
        while chunk := f.read(CHUNK_BYTES):
            at = 0
            while (nl := chunk.find(b"\n", at)) >= 0:
                at = nl + 1
                count += 1
                if count == lines:
                    yield begin, pos + at
                    begin, count = pos + at, 0
            last = pos + at if at else last
            pos += len(chunk)
        if last > begin:
            yield begin, last


def reject(stream: str, offset: int, raw: bytes, length: int, reason: str) -> Reject:
    return Reject(stream=stream, offset=offset, length=length, line_sha1=hashlib.sha1(raw).hexdigest(),
                  reason=reason, excerpt=excerpt(raw))


def oversized_reject(stream: str, item: Oversized, max_line_bytes: int) -> Reject:
    return Reject(stream=stream, offset=item.offset, length=item.end - item.offset,
                  line_sha1=hashlib.sha1(item.head).hexdigest(),
                  reason=f"line is {item.end - item.offset - 1} bytes, over the {max_line_bytes}-byte limit; "
                         "not parsed",
                  excerpt=excerpt(item.head))


def decode_object(raw: bytes) -> dict[str, Any] | str:
    """The line as a JSON object, or the reason it is not one."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as u:
            return f"not UTF-8 (byte {u.start})"
        return f"not JSON: {e.msg} at column {e.colno}"
    if not isinstance(value, dict):
        return f"not a JSON object (got {type(value).__name__})"
    return value


def take_line(item: Line | Oversized, stream: str, parse: LineParser, max_line_bytes: int, events: list[RawEvent],
              rejects: list[Reject]) -> None:
    """One line of `iter_lines` under the policy: an oversized one rejected unparsed, a blank one skipped (the
    cursor still moves past it), any other parsed into `events` or rejected with the parser's reason."""
    if isinstance(item, Oversized):
        rejects.append(oversized_reject(stream, item, max_line_bytes))
    elif item.raw and not item.raw.isspace():  # what strip() leaves of it, without copying a 4 KB line to see
        parsed = parse(item.raw)
        if isinstance(parsed, str):
            rejects.append(reject(stream, item.offset, item.raw, item.end - item.offset, parsed))
        else:
            events.extend(parsed)


def collect_lines(path: Path, stream: str, cursor: Cursor | None, limits: Limits,
                  parse: LineParser) -> Iterator[Batch]:
    """Batches of what `parse` makes of each complete line after `cursor`: the loop every log collector shares."""
    start, note = resume_offset(path, cursor)
    events: list[RawEvent] = []
    rejects: list[Reject] = []
    end = done = start
    for item in iter_lines(path, start, limits.max_line_bytes):
        take_line(item, stream, parse, limits.max_line_bytes, events, rejects)
        end = item.end
        if len(events) + len(rejects) >= limits.batch_events:
            yield Batch(tuple(events), tuple(rejects), cursor_at(path, stream, end), note, read=end - done)
            events, rejects, note, done = [], [], "", end
    if events or rejects or end != (cursor.offset if cursor else 0) or note:
        yield Batch(tuple(events), tuple(rejects), cursor_at(path, stream, end), note, read=end - done)


def pending_bytes(path: Path, cursor: Cursor | None) -> int:
    """Bytes of `path` after `cursor`: what a log collector has left to read."""
    return max(0, path.stat().st_size - (cursor.offset if cursor else 0))


def read_line(path: Path, offset: int, length: int) -> bytes | str:
    """The line of `length` bytes (newline included) at `offset`, without its newline, or why it is not there."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read(length)
    except OSError as e:
        return f"cannot read {path}: {e.strerror}"
    if len(data) < length or not data.endswith(b"\n") or b"\n" in data[:-1]:
        # A fix must keep the line's length (pad it with spaces: JSON allows them), or every saved cursor
        # after it would point into the middle of a line.
        return (f"{path} no longer holds a line of {length} bytes at offset {offset}: fix the line in place "
                "keeping its length (pad with spaces), then retry")
    return data[:-1]
