"""A large backlog of log lines parsed and scrubbed in worker processes, and stored here, in order.

A log stream's first collect can be a developer's months of Continue events: 200k events are 874 MB
(bench/ingest_continue.py). Parsing, identifying and scrubbing a line costs ~90 µs of Python, and in one process
all of it ran on one core under the GIL: the collect used 1.2 of this machine's 2 cores (the storing thread,
which lets go of the GIL in DuckDB, most of the rest). Here this process cuts the stream into byte ranges of
`[collect] batch_events` lines (`jsonl.line_ranges`, by their newlines alone) and hands each range to a worker
process, which reads its lines from the log itself, parses them with the stream's `line_parser`, applies
identity, privacy rules and scrubbing (`ingest.to_rows`, the same code as the serial path) and hands back one
Arrow table per store table. This process stores each range's tables with its cursor in one transaction, in
file order, as the serial path stores a batch: a kill at any point leaves the stream where its last stored
batch ended, and nothing is stored twice.

What crosses the pipes was measured (200k events, 2 workers): sending each batch's lines took this process 3 s
of a 21 s collect, so workers read them; sending back row objects, whose unpickling took the GIL from the
storing thread, made the collect 25.5 s instead of 27 s, so workers build the Arrow tables (21 s).

Only log collectors (a `line_parser`) and only a source with MIN_BYTES or more to read take this path (in one
stream or many: Tabby writes a file a day): a worker costs ~0.5 s to start (it imports the scrubber and the
store's schema), more than the service's usual few lines take. Unscrubbed text stays in the log file and in
the workers' memory; what comes back is scrubbed.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from collectors import COLLECTORS
from collectors.base import Batch, Cursor, LineParser, RawEvent, Reject
from collectors.jsonl import cursor_at, iter_lines, line_ranges, resume_offset, take_line
from pipelines.config import CollectConfig, SourceConfig
from pipelines.ingest.identity import Directory
from pipelines.progress import Progress
from pipelines.store.db import Rows, arrow_tables

log = logging.getLogger("devtune.ingest")

MIN_BYTES = 64 << 20  # ~15k Continue events, ~2 s of serial collect: a pool's start is a small part of that
MAX_WORKERS = 4

RowMaker = Callable[[Batch, SourceConfig, "str | None", CollectConfig, Directory], Rows]


def workers(cfg: CollectConfig) -> int:
    """How many scrub workers a large stream gets: `[collect] scrub_workers`, or one per CPU core this process
    may run on, at most MAX_WORKERS (on 2 cores, 2: this process then mostly waits on them and DuckDB)."""
    if cfg.scrub_workers > 0:
        return cfg.scrub_workers
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return min(MAX_WORKERS, cores)


def wanted(cfg: CollectConfig, source: SourceConfig, pending: int) -> int:
    """Workers for the log streams of `source`, which has `pending` units left to read in all; 0 to collect it
    in this process. Only streams with a `line_parser` (log files) can go to them."""
    n = workers(cfg)
    if n <= 1 or COLLECTORS[source.kind].unit != "bytes" or pending < MIN_BYTES:
        return 0
    return n


@dataclass(frozen=True)
class _Context:
    """What every batch of a source is scrubbed with: sent to each worker once, when it starts."""

    source: SourceConfig
    repo: str | None
    cfg: CollectConfig
    directory: Directory
    to_rows: RowMaker  # ingest.to_rows, passed (by name) so that this module does not import ingest's


_context: _Context | None = None  # a worker's own, set by _start
_parsers: dict[str, LineParser] = {}  # a worker's parser per stream


def _start(context: _Context) -> None:
    global _context
    _context = context


def _scrub(stream: str, start: int, end: int) -> tuple[dict[str, pa.Table], set[str], int]:
    """In a worker: the lines from byte `start` to `end` of the stream (`line_ranges`) as the store's Arrow tables,
    the Tabby completions they touch, and how many events and rejects they held (what the serial path counts as
    seen)."""
    assert _context is not None, "a scrub worker starts with its source's context"
    c = _context
    path = c.source.path / stream
    parse = _parsers.get(stream)
    if parse is None:
        # Continue's parser reads the file's mtime once, for legacy lines without a timestamp: as the serial path
        # does when it starts reading the stream (it can only be later here, never earlier).
        made = COLLECTORS[c.source.kind].line_parser(c.source.path, stream)
        assert made is not None, "only log collectors take this path (wanted)"
        parse = _parsers[stream] = made
    events: list[RawEvent] = []
    rejects: list[Reject] = []
    at = start
    for item in iter_lines(path, start, c.cfg.max_line_bytes):
        if item.end > end:
            break
        at = item.end
        take_line(item, stream, parse, c.cfg.max_line_bytes, events, rejects)  # as the serial collect_lines does
        if at == end:
            break
    if at != end:
        raise RuntimeError(f"{path}: the lines from byte {start} do not end at byte {end} as they did when the "
                           "collect began; the file was replaced while it was read: collect again")
    rows = c.to_rows(Batch(tuple(events), tuple(rejects), Cursor(stream=stream)), c.source, c.repo, c.cfg,
                     c.directory)
    return arrow_tables(rows), rows.tabby_touched, len(events) + len(rejects)


class ScrubPool:
    """Worker processes for one source's large streams, started on first use and stopped with `close`."""

    def __init__(self, n: int, source: SourceConfig, repo: str | None, cfg: CollectConfig, directory: Directory,
                 to_rows: RowMaker):
        self.n = n
        self._context = _Context(source, repo, cfg, directory, to_rows)
        self._pool: ProcessPoolExecutor | None = None

    def collect(self, stream: str, cursor: Cursor | None, progress: Progress,
                store: Callable[[dict[str, pa.Table], set[str], Cursor, int], None],
                notes: list[str]) -> None:
        """Read `stream` after `cursor`, each batch scrubbed by a worker and handed to `store(tables, touched,
        cursor, events)` in file order. A worker's failure is raised here, after every batch before it was
        handed on; so is a read error, after every batch read before it."""
        source = self._context.source
        path = source.path / stream
        start, note = resume_offset(path, cursor)
        if note:
            log.warning("source=%s stream=%s: %s", source.name, stream, note)
            notes.append(f"{stream}: {note}")
        pool = self._started()
        # Each worker has a batch queued behind the one it scrubs, so none waits while this process stores.
        inflight: collections.deque[tuple[Future[tuple[dict[str, pa.Table], set[str], int]], Cursor, int]] = \
            collections.deque()

        def hand_on(keep: int) -> None:
            while len(inflight) > keep:
                future, at, read = inflight.popleft()
                tables, touched, events = future.result()
                store(tables, touched, at, events)
                progress.advance(read)

        end = start
        try:
            for begin, end in line_ranges(path, start, self._context.cfg.batch_events):
                inflight.append((pool.submit(_scrub, stream, begin, end), cursor_at(path, stream, end), end - begin))
                hand_on(2 * self.n)
        except OSError:
            hand_on(0)  # what was read before the file failed is stored, with its cursor, as in the serial path
            raise
        if end == start and note:  # the file was replaced by an empty one: its cursor goes back to the start
            store({}, set(), cursor_at(path, stream, start), 0)
        hand_on(0)

    def _started(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn, not fork: this process runs DuckDB's and the storing thread's threads, and a forked child
            # would inherit their locks in whatever state they were.
            self._pool = ProcessPoolExecutor(self.n, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start, initargs=(self._context,))
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
