"""Collect every source into the store: identity, privacy and scrubbing happen here, before storage.

For each event: map the identities its writer logged to a developer (through `[[developers]]`) and a team;
drop it if that developer opted out or its file matches an exclude glob (counted by reason, never stored);
scrub every text field; then store the batch and its cursor in one transaction. Running it twice over the
same data stores nothing the second time, and every counter is a keyed row, so replays count nothing twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import pyarrow as pa

from collectors import COLLECTORS
from collectors.base import (
    Batch,
    Commit,
    Cursor,
    EditOutcome,
    GatewayRequest,
    Interaction,
    Limits,
    RawEvent,
    Suggestion,
    TabbyAction,
    TabbyCompletion,
)
from collectors.continue_dev import language_of
from pipelines.config import CollectConfig, SourceConfig
from pipelines.ingest import parallel
from pipelines.ingest.identity import Directory, Identity
from pipelines.ingest.parallel import ScrubPool
from pipelines.ingest.scrub import (
    FileScrubber,
    cursor_spans,
    is_excluded,
    scrub,
    scrub_diff,
    scrub_fields,
    scrub_json,
)
from pipelines.progress import Progress
from pipelines.store.db import Applied, Rows, Store, now
from pipelines.store.schema import (
    BlobRow,
    CommitFileRow,
    CommitRow,
    DropRow,
    EditOutcomeRow,
    GatewayRequestRow,
    IdentityRow,
    InteractionRow,
    QuarantineRow,
    ScrubRow,
    SuggestionRow,
    TabbyActionRow,
    TabbyCompletionRow,
)

log = logging.getLogger("devtune.ingest")

# A timer, a file event and a cycle can all ask for a collect at once inside the service; serialising them
# keeps two threads from reading one stream from the same cursor (their upserts would agree, but the work
# would be done twice).
collect_lock = threading.Lock()


@dataclass
class SourceReport:
    source: str
    stored: Counter[str] = field(default_factory=Counter)  # suggestions, commits, quarantined, ...
    seen: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    workers: int = 0  # scrub worker processes a large stream was read with (parallel.py); 0: none

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "seen": self.seen, "stored": dict(self.stored), "notes": self.notes,
                "seconds": round(self.seconds, 3), "workers": self.workers}


def collect_source(store: Store, source: SourceConfig, cfg: CollectConfig, directory: Directory) -> SourceReport:
    """Collect one source from its saved cursors until it has nothing new."""
    with collect_lock:  # held by a forget too: no batch of a person can land after their forget
        return _collect_source(store, source, cfg, directory.with_tombstones(store.tombstones()))


def limits_of(cfg: CollectConfig) -> Limits:
    return Limits(batch_events=cfg.batch_events, max_line_bytes=cfg.max_line_bytes,
                  max_file_bytes=cfg.max_file_bytes)


def _collect_source(store: Store, source: SourceConfig, cfg: CollectConfig, directory: Directory) -> SourceReport:
    name = source.name
    collector = COLLECTORS[source.kind]
    limits = limits_of(cfg)
    report = SourceReport(source=name)
    root = source.path
    if not root.exists():
        report.notes.append(f"{root} does not exist yet: nothing to collect")
        log.warning("source=%s: %s does not exist yet; nothing collected", name, root)
        return report
    repo = collector.repo(root)
    contents = FileScrubber()  # a file's versions share most of their pieces across commits and batches
    # Each batch is stored (with its cursor, in one transaction, in order) in a second thread while the next
    # one is read and scrubbed: DuckDB lets go of the GIL while it inserts, compresses and commits, and the
    # harvest of a 5k-commit history spent ~2 of its ~8 s there with the other core half idle (git runs on
    # it). One batch in flight: at most two batches in memory, and nothing is stored out of order.
    streams = {stream: store.load_cursor(name, stream) for stream in collector.streams(root)}
    pendings = {stream: collector.pending(root, stream, cursor) for stream, cursor in streams.items()}
    # A large backlog goes to worker processes (parallel.py), even spread over many small files (Tabby's days)
    workers = parallel.wanted(cfg, source, sum(pendings.values()))
    pool: ScrubPool | None = None  # started when a stream needs it
    with ThreadPoolExecutor(1, thread_name_prefix=f"store-{name}") as writer, contextlib.ExitStack() as stack:
        for stream, cursor in streams.items():
            if cursor is None:
                log.info("source=%s: new stream %s", name, stream)
            pending = pendings[stream]
            # Progress in the collector's unit (bytes of a log file, commits of a repository): a rate and an ETA.
            progress = Progress(log, f"collect source={name} stream={stream}", pending, collector.unit)
            storing: tuple[Future[Applied], int] | None = None  # the batch in flight, and its events
            if workers and pending and collector.line_parser(root, stream) is not None:
                if pool is None:
                    pool = ScrubPool(workers, source, repo, cfg, directory, to_rows)
                    stack.callback(pool.close)
                report.workers = workers
                log.info("source=%s stream=%s: %.0f MB to read, parsed and scrubbed by %d worker processes", name,
                         stream, pending / 1e6, workers)

                def store_tables(tables: dict[str, pa.Table], touched: set[str], at: Cursor, events: int) -> None:
                    nonlocal storing
                    storing = _store_next(report, storing, writer, events, store.apply_tables, name, tables, touched,
                                          at)

                pool.collect(stream, cursor, progress, store_tables, report.notes)
                _settle(report, storing)
                report.seconds += progress.finish()
                continue
            # A batch is scrubbed as it comes; parts of one (Batch.partial: git hands over 256 commits at a time,
            # so that it reads ahead while they are scrubbed) are stored `batch_events` at a time. Stored one by
            # one, psf/requests' 26 parts kept the storing thread busy 4.4 s instead of 2.6 s for 4 transactions,
            # most of it waiting for the GIL between its statements, and the harvest took 5.4-5.7 s, not 5.1-5.4.
            rows, events, last = Rows(), 0, None
            batches = collector.collect(root, stream, cursor, limits)
            while True:
                try:
                    batch = next(batches, None)
                except BaseException:
                    if last is not None:  # what was read before the collector failed is stored, with its cursor
                        storing = _store_next(report, storing, writer, events, store.apply_batch, name, rows, last)
                    raise
                if batch is not None:
                    if batch.note:
                        log.warning("source=%s stream=%s: %s", name, stream, batch.note)
                        report.notes.append(f"{stream}: {batch.note}")
                    to_rows(batch, source, repo, cfg, directory, contents, rows)
                    events, last = events + len(batch.events) + len(batch.rejects), batch.cursor
                    progress.advance(batch.read)
                if last is not None and (batch is None or not batch.partial or events >= cfg.batch_events):
                    storing = _store_next(report, storing, writer, events, store.apply_batch, name, rows, last)
                    rows, events, last = Rows(), 0, None
                if batch is None:
                    break
            _settle(report, storing)
            report.seconds += progress.finish()
    return report


def _store_next(report: SourceReport, storing: tuple[Future[Applied], int] | None, writer: ThreadPoolExecutor,
                events: int, apply: Callable[..., Applied], *batch: Any) -> tuple[Future[Applied], int]:
    """Wait for the batch in flight, then hand the next one to the storing thread (`apply(*batch)`:
    Store.apply_batch, or apply_tables for a scrub worker's tables): the new one in flight, with its events."""
    _settle(report, storing)
    return writer.submit(apply, *batch), events


def _settle(report: SourceReport, storing: tuple[Future[Applied], int] | None) -> None:
    """Wait for the batch in flight, if any, and count it (its failure is raised here)."""
    if storing is not None:
        _account(report, storing[0].result(), storing[1])


def _account(report: SourceReport, applied: Applied, n: int) -> None:
    report.seen += n
    report.stored["suggestions"] += applied.suggestions
    report.stored["commits"] += applied.commits
    report.stored["quarantined"] += applied.rejects
    report.stored["edit_outcomes"] += applied.edits
    report.stored["interactions"] += applied.interactions
    report.stored["gateway_requests"] += applied.requests


def to_rows(batch: Batch, source: SourceConfig, repo: str | None, cfg: CollectConfig,
            directory: Directory, contents: FileScrubber | None = None, rows: Rows | None = None) -> Rows:
    """Apply identity, privacy rules and scrubbing to a batch and lay it out for the store (added to `rows` when
    given: the batches before it, to be stored with it).

    `contents` scrubs committed file contents; pass one for all the batches of a harvest, so that each
    version of a file costs only what it changed."""
    rows = rows if rows is not None else Rows()
    ingested = now()
    contents = contents or FileScrubber()
    for event in batch.events:
        _event_rows(event, rows, source, repo, cfg, directory, ingested, contents)
    for r in batch.rejects:
        scrubs: Counter[str] = Counter()
        rows.add(QuarantineRow(
            source=source.name, stream=r.stream, offset=r.offset, length=r.length,
            line_sha1=r.line_sha1, reason=r.reason, excerpt=scrub(r.excerpt, scrubs),
            quarantined_at=ingested,
        ))
        _scrubbed(rows, "quarantine", f"{r.stream}/{r.offset}/{r.line_sha1}", scrubs)
    return rows


def _event_rows(event: RawEvent, rows: Rows, source: SourceConfig, repo: str | None, cfg: CollectConfig,
                directory: Directory, ingested: datetime, contents: FileScrubber) -> None:
    if isinstance(event, Commit):
        _commit_rows(event, rows, source.name, repo or "", cfg, directory, ingested, contents)
        return
    if isinstance(event, GatewayRequest):
        _request_row(event, rows, source.name, directory, ingested)
        return
    if isinstance(event, TabbyAction):
        # An action holds ids and times only; it is dropped with its developer, and links to nothing when
        # its completion was dropped for its path.
        who = directory.resolve(source.developer, event.user_ids)
        if why := directory.withheld(who.developer, *event.user_ids):
            _dropped(rows, source.name, why, event.key)
            return
        rows.add(TabbyActionRow(id=event.key, completion_id=event.completion_id, source=source.name,
                                kind=event.kind, acted_at=event.at, choice_index=event.choice_index,
                                line_select=event.line_select, developer=who.developer))
        rows.tabby_touched.add(event.completion_id)
        return
    who = directory.resolve(source.developer, event.user_ids)
    if why := directory.withheld(who.developer, *event.user_ids):
        _dropped(rows, source.name, why, event.key)
        return
    filepath = event.filepath
    if filepath and is_excluded(filepath, cfg.exclude_paths):
        _dropped(rows, source.name, "excluded_path", event.key)
        return
    repo_of_event = getattr(event, "repo", None)
    team = directory.team(who.developer, repo_of_event)
    _identity(rows, who, event.source_kind if not isinstance(event, TabbyCompletion) else "tabby")
    scrubs: Counter[str] = Counter(dict(getattr(event, "scrubbed", ())))
    if isinstance(event, Suggestion):
        prefix, compiled, header, suffix, completion = _scrub_prefixes(event, scrubs)
        rows.add(SuggestionRow(
            id=event.key, source=source.name, source_kind=event.source_kind, event_kind=event.event_kind,
            shown_at=event.shown_at, developer=who.developer, team=team, repo=event.repo,
            filepath=event.filepath, language=language_of(event.filepath), accepted=event.accepted,
            partial=event.partial, prefix=prefix, prefix_compiled=compiled,
            prefix_recovery=event.prefix_recovery, suffix=suffix, completion=completion,
            model=event.model, ingested_at=ingested, prefix_header=header,
        ))
        _scrubbed(rows, "suggestions", event.key, scrubs)
    elif isinstance(event, EditOutcome):
        instruction, before, after = scrub_fields([event.instruction, event.before_text, event.after_text], scrubs)
        rows.add(EditOutcomeRow(
            id=event.key, source=source.name, source_kind=event.source_kind, event_kind=event.event_kind,
            decided_at=event.decided_at, developer=who.developer, team=team, repo=event.repo,
            filepath=event.filepath, accepted=event.accepted, instruction=instruction,
            before_text=before, after_text=after, model=event.model, ingested_at=ingested,
        ))
        _scrubbed(rows, "edit_outcomes", event.key, scrubs)
    elif isinstance(event, Interaction):
        prompt, completion = scrub_fields([event.prompt, event.completion], scrubs)
        detail = orjson.dumps(scrub_json(event.detail, scrubs)).decode() if event.detail is not None else None
        rows.add(InteractionRow(
            id=event.key, source=source.name, source_kind=event.source_kind, event_kind=event.event_kind,
            occurred_at=event.occurred_at, developer=who.developer, team=team, filepath=event.filepath,
            model=event.model, session_id=event.session_id, prompt=prompt, completion=completion,
            label=event.label, detail=detail, ingested_at=ingested,
        ))
        _scrubbed(rows, "interactions", event.key, scrubs)
    elif isinstance(event, TabbyCompletion):
        at_prefix, *at_choices, at_suffix = cursor_spans(event.prefix, list(event.choices), event.suffix)
        prefix, suffix, *choices = scrub_fields([event.prefix, event.suffix, *event.choices], scrubs,
                                                [at_prefix, at_suffix, *at_choices])
        rows.add(TabbyCompletionRow(
            id=event.key, source=source.name, created_at=event.created_at, developer=who.developer,
            team=team, repo=event.repo, filepath=event.filepath, language=event.language,
            prefix=prefix, suffix=suffix, choices=[c or "" for c in choices], ingested_at=ingested,
        ))
        rows.tabby_touched.add(event.key)
        _scrubbed(rows, "tabby_completions", event.key, scrubs)


def _scrub_prefixes(s: Suggestion, scrubs: Counter[str]) -> tuple[str | None, ...]:
    """A suggestion's texts, scrubbed: prefix, compiled prefix, header, suffix, completion. When the compiled
    prefix ends with the raw one (always, when recovered) only the header before it is scrubbed and kept, and
    the compiled prefix is None: the store keeps the raw prefix once (migration 0060_prefix_header)."""
    prefix, compiled, suffix, completion = s.prefix, s.prefix_compiled, s.suffix, s.completion
    if prefix is not None and compiled is not None and compiled.endswith(prefix):
        # Template headers end at a line break or a special token, so no secret spans the seam.
        header = compiled[: len(compiled) - len(prefix)]
        at_prefix, at_completion, at_suffix = cursor_spans(prefix, [completion], suffix)
        header_s, prefix_s, suffix_s, completion_s = scrub_fields(
            [header, prefix, suffix, completion], scrubs, [[], at_prefix, at_suffix, at_completion])
        return prefix_s, None, header_s or "", suffix_s, completion_s
    # Otherwise each prefix there is meets the cursor (the compiled one may end with something the template
    # added); without a raw prefix, the compiled one alone is read with the completion and the suffix.
    at_cursor, at_completion, at_suffix = cursor_spans(compiled if prefix is None else prefix, [completion], suffix)
    if prefix is None:
        at_prefix, at_compiled = [], at_cursor
    else:
        at_prefix = at_cursor
        at_compiled = cursor_spans(compiled, [completion], suffix)[0] if compiled is not None else []
    prefix_s, compiled_s, suffix_s, completion_s = scrub_fields([prefix, compiled, suffix, completion], scrubs,
                                                                [at_prefix, at_compiled, at_suffix, at_completion])
    return prefix_s, compiled_s, None, suffix_s, completion_s


def _commit_rows(c: Commit, rows: Rows, source_name: str, repo: str, cfg: CollectConfig, directory: Directory,
                 ingested: datetime, contents: FileScrubber) -> None:
    who = directory.resolve("", (c.author_email,))
    why = directory.withheld(who.developer, c.author_email, c.author_name)
    opted_out = why is not None
    scrubs: Counter[str] = Counter()
    rows.add(CommitRow(
        sha=c.sha, repo=repo, source=source_name, parents=list(c.parents),
        # An opted-out (or bot) author's commit keeps only its sha, parents and time, so history counts stay
        # whole; no name, email, message or file of theirs is stored, and nothing of it is trained on.
        author_name=None if opted_out else c.author_name,
        author_email=None if opted_out else c.author_email,
        developer="" if opted_out else who.developer,
        team="" if opted_out else directory.team(who.developer, repo),
        authored_at=c.authored_at, committed_at=c.committed_at,
        message=None if opted_out else scrub(c.message, scrubs), opted_out=opted_out,
        ingested_at=ingested,
    ))
    _scrubbed(rows, "commits", c.sha, scrubs)
    if why is not None:
        _dropped(rows, source_name, f"{why}_commit", c.sha)
        return
    _identity(rows, who, "git")
    for f in c.files:
        if is_excluded(f.path, cfg.exclude_paths):
            _dropped(rows, source_name, "excluded_path", f"{c.sha}:{f.path}")
            continue
        keep_blob = f.content is not None
        if f.old_content is not None and f.old_blob not in contents.versions:
            contents.scrub_version(f.old_blob, f.old_content)  # stored by an earlier harvest: only its secrets matter
        if keep_blob:
            scrubs = Counter()
            # Read against the version before (the blob this commit changed), scrubbed here or just above.
            rows.add(BlobRow(blob=f.blob, content=contents.scrub_version(f.blob, f.content or "", scrubs,
                                                                         f.old_blob)))
            _scrubbed(rows, "blobs", f.blob, scrubs)
        scrubs = Counter()
        # The diff's "+" lines are lines of this version and its "-" lines of the one before: what scrubbing
        # those whole found goes from the diff too, and where both were scrubbed here that is all of it.
        known = [*(contents.found_in.get(f.blob, ()) if keep_blob else ()), *contents.found_in.get(f.old_blob, ())]
        both = (keep_blob or f.status == "D") and (f.status == "A" or f.old_blob in contents.versions)
        rows.add(CommitFileRow(sha=c.sha, path=f.path, status=f.status, blob=f.blob if keep_blob else None,
                               added=[list(r) for r in f.added], diff=scrub_diff(f.diff, scrubs, known, both)))
        _scrubbed(rows, "commit_files", f"{c.sha}:{f.path}", scrubs)


def _request_row(r: GatewayRequest, rows: Rows, source: str, directory: Directory, ingested: datetime) -> None:
    """A served request: its developer is already the token's owner; a withheld one's requests are dropped."""
    if why := directory.withheld(r.developer):
        _dropped(rows, source, why, r.key)
        return
    scrubs: Counter[str] = Counter()
    rows.add(GatewayRequestRow(
        id=r.key, received_at=r.received_at, developer=r.developer, team=r.team, scope=r.scope, version=r.version,
        served_name=r.served_name, model=r.model, backend=r.backend, stream=r.stream, status=r.status,
        latency_ms=r.latency_ms, first_token_ms=r.first_token_ms, prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens, finish_reason=r.finish_reason,
        error=scrub(r.error, scrubs) if r.error is not None else None, ingested_at=ingested))
    _scrubbed(rows, "gateway_requests", r.key, scrubs)


def _dropped(rows: Rows, source: str, reason: str, key: str) -> None:
    # The key is hashed: a count needs no more, and a dropped event's id says nothing about it.
    rows.add(DropRow(source=source, reason=reason, key=hashlib.sha1(key.encode()).hexdigest()))


def _scrubbed(rows: Rows, target: str, key: str, scrubs: Counter[str]) -> None:
    for kind, n in scrubs.items():
        rows.add(ScrubRow(target=target, key=key, kind=kind, count=n))


def _identity(rows: Rows, who: Identity, source_kind: str) -> None:
    rows.add(IdentityRow(identity=who.raw, source_kind=source_kind, developer=who.developer, mapped=who.mapped))
