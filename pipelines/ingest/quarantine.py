"""Quarantined lines: show one as it reads now, and re-parse them after a fix or an upgrade.

A line that parses now is stored with identity, privacy and scrubbing exactly as a collect would store it,
and leaves the quarantine in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from collectors import COLLECTORS
from collectors.base import Batch, Cursor
from collectors.jsonl import read_line
from pipelines.config import CollectConfig, SourceConfig
from pipelines.ingest.identity import Directory
from pipelines.ingest.ingest import collect_lock, to_rows
from pipelines.ingest.scrub import scrub
from pipelines.store.db import Store


@dataclass(frozen=True)
class RetryResult:
    id: str
    source: str
    stream: str
    offset: int
    outcome: str  # "stored" | "still quarantined" | "skipped"
    detail: str


def retry_quarantined(store: Store, sources: tuple[SourceConfig, ...], cfg: CollectConfig, directory: Directory,
                      qid: str | None = None) -> list[RetryResult]:
    """Re-read and re-parse quarantined lines (one by id, or all): a line that parses now is stored (with
    identity, privacy and scrubbing, as in a collect) and leaves the quarantine, in one transaction."""
    with collect_lock:
        return list(_retry(store, sources, cfg, directory.with_tombstones(store.tombstones()), qid))


def _retry(store: Store, sources: tuple[SourceConfig, ...], cfg: CollectConfig, directory: Directory,
           qid: str | None) -> Iterator[RetryResult]:
    by_name = {s.name: s for s in sources}
    for row in store.quarantined(limit=1_000_000, qid=qid):
        where = (row["id"], row["source"], row["stream"], row["offset"])
        source = by_name.get(row["source"])
        if source is None:
            yield RetryResult(*where, "skipped", f"source {row['source']!r} is no longer configured")
            continue
        parser = COLLECTORS[source.kind].line_parser(source.path, row["stream"])
        if parser is None or row["length"] - 1 > cfg.max_line_bytes:
            yield RetryResult(*where, "skipped", "this line cannot be re-parsed (over the line limit, or not a log)")
            continue
        raw = read_line(source.path / row["stream"], row["offset"], row["length"])
        parsed = parser(raw) if isinstance(raw, bytes) else raw
        if isinstance(parsed, str):
            store.requarantine(row, parsed)
            yield RetryResult(*where, "still quarantined", parsed)
            continue
        batch = Batch(events=parsed, rejects=(), cursor=Cursor(stream=row["stream"]))
        repo = COLLECTORS[source.kind].repo(source.path)
        store.apply_batch(source.name, to_rows(batch, source, repo, cfg, directory), None, settle=(row,))
        yield RetryResult(*where, "stored", f"{len(parsed)} event(s) parsed and stored")


def inspect_quarantined(store: Store, sources: tuple[SourceConfig, ...], cfg: CollectConfig,
                        qid: str) -> dict[str, Any] | None:
    """One quarantined line: its row, its file, the line as it reads now (scrubbed) and whether it parses now."""
    found = store.quarantined(limit=1, qid=qid)
    if not found:
        return None
    row = found[0]
    source = {s.name: s for s in sources}.get(row["source"])
    if source is None:
        return {**row, "file": None, "now": None, "parses_now": None,
                "verdict": f"source {row['source']!r} is no longer configured"}
    path = source.path / row["stream"]
    parser = COLLECTORS[source.kind].line_parser(source.path, row["stream"])
    raw = read_line(path, row["offset"], row["length"]) if row["length"] - 1 <= cfg.max_line_bytes \
        else "over the line limit: not read"
    if isinstance(raw, str) or parser is None:
        return {**row, "file": str(path), "now": None, "parses_now": False,
                "verdict": raw if isinstance(raw, str) else "not a line-based source"}
    parsed = parser(raw)
    text = raw[:4000].decode("utf-8", errors="replace")
    return {**row, "file": str(path), "now": scrub(text), "parses_now": not isinstance(parsed, str),
            "verdict": parsed if isinstance(parsed, str) else f"parses now into {len(parsed)} event(s): retry it"}
