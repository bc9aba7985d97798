"""The DuckDB store: every SQL statement devtune runs lives in this module.

DuckDB allows one read-write process per database file, and in 2.0 a second process cannot even open it
read-only while the first holds it. The service therefore keeps one connection for its lifetime and
hands each thread a cursor; CLI commands reach the store through the service's local API while it runs,
and open the file themselves (waiting up to `lock_timeout_s` for a short-lived holder) when it does not.

Schema changes are named migrations (migrations.py), applied in order and recorded in `schema_migrations`.
The rows ingest writes are declared in schema.py; the typed records queries hand to the stages above, in
records.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa

from collectors.base import Cursor
from pipelines.files import now
from pipelines.scope import Scope
from pipelines.store import StoreBusy
from pipelines.store.migrations import MIGRATIONS
from pipelines.store.records import (
    BlobContent,
    CommittedFile,
    EditRecord,
    LinkCandidate,
    LinkedSuggestion,
    RepoFile,
    ToLink,
    VersionKey,
)
from pipelines.store.schema import TABLES, Row, SuggestionLinkRow, Table, arrow_table, as_arrow, text_columns

R = TypeVar("R")
log = logging.getLogger("devtune.store")
# DuckDB's vector, the rows its compressed columns are read in (Store._blob_contents).
VECTOR_ROWS = 2048
# Up to this many blobs are read apart from the query that names them (Store._blob_contents): a night's new
# commits' files are a few hundred; a first build, which needs every file, reads them through the join.
BLOB_READ_APART = 5000
RELEASE_ROWS = 65_536  # _records: rows streamed between two releases of DuckDB's cached blocks
# After a batch met a row stored before, its tables take the key lookup for this many batches: a log read again
# (every batch conflicting) then redoes one batch in 65, and one event that came twice costs one batch twice.
UPSERT_BATCHES = 64
RELEASE_LIMIT = "256MB"  # Store.release_cache: above what a collector's or the API's queries pin at once


def _unique(rows: list[Any], key: tuple[str, ...]) -> list[Any]:
    seen: set[tuple[Any, ...]] = set()
    out = []
    for r in rows:
        k = tuple(getattr(r, c) for c in key)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


@dataclass
class Rows:
    """Rows for one batch, per table (each a row class of schema.py), ready for a bulk insert."""

    tables: dict[Table, list[Row]] = field(default_factory=dict)
    tabby_touched: set[str] = field(default_factory=set)  # completion ids whose suggestion may change

    def add(self, row: Row) -> None:
        self.tables.setdefault(TABLES[type(row)], []).append(row)


_TABLES_BY_NAME = {t.name: t for t in TABLES.values()}


def arrow_tables(rows: Rows) -> dict[str, pa.Table]:
    """A batch's rows as one Arrow table per store table (by name), each row once by its key: what
    `Store.apply_tables` inserts. A collect's scrub workers build them (pipelines/ingest/parallel.py)."""
    return {table.name: as_arrow(table, _unique(batch, table.key)) for table, batch in rows.tables.items() if batch}


@dataclass(frozen=True)
class Applied:
    """What one batch changed in the store."""

    suggestions: int
    commits: int
    rejects: int
    edits: int = 0
    interactions: int = 0
    requests: int = 0  # gateway_requests


def quarantine_id(source: str, stream: str, offset: int, line_sha1: str) -> str:
    """The short id `devtune quarantine show|retry` take (the same as the SQL in Store.quarantined)."""
    import hashlib

    return hashlib.md5(f"{source}/{stream}/{offset}/{line_sha1}".encode()).hexdigest()[:12]


_QUARANTINE_ID = "substr(md5(concat_ws('/', source, stream, \"offset\", line_sha1)), 1, 12)"


class Store:
    """One DuckDB connection (or a per-thread cursor on it) and devtune's queries."""

    def __init__(self, con: duckdb.DuckDBPyConnection, path: Path):
        self.con = con
        self.path = path
        self._lock = threading.Lock()
        self._upserting: dict[str, int] = {}  # table -> batches left that take the key lookup (apply_tables)

    @classmethod
    def open(cls, path: Path, lock_timeout_s: float = 0.0) -> Store:
        """Open (creating and migrating) the store, waiting up to `lock_timeout_s` for another process. A store
        marked by `request_rewrite` is rewritten into a fresh file first."""
        path.parent.mkdir(parents=True, exist_ok=True)
        con = cls._connect(path, lock_timeout_s)
        if _rewrite_marker(path).exists():
            con = _rewrite(con, path)
        # DuckDB checkpoints (compresses and writes the WAL into the file) every 16 MB of WAL by default: with
        # 2-20 KB events that is every few batches. 64 MB made the ingest's storage path 1.4-1.5x faster and
        # the file 25% smaller (bigger checkpoints compress better). A checkpoint's cost grows with the table,
        # not with what it writes (it writes the primary key's whole index again, duckdb/duckdb#24848): at
        # 64 MB, 9 checkpoints took 16 of a 200k-event ingest's 35 s of storing, at 256 MB 2 took 5 s (peak RSS
        # 1,016 -> 734 MB; bench/README.md). A crash replays at most that WAL: 0.8 s to open a store killed
        # with 190 MB of it.
        con.execute("SET checkpoint_threshold = '256MB'")
        store = cls(con, path)
        store.migrate()
        return store

    @staticmethod
    def _connect(path: Path, lock_timeout_s: float) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + lock_timeout_s
        delay = 0.05
        while True:
            try:
                con = duckdb.connect(str(path))
                break
            except duckdb.IOException as e:
                if "lock" not in str(e).lower():
                    raise
                if time.monotonic() >= deadline:
                    raise StoreBusy(
                        f"the store {path} is in use by another process ({_holder(e)}). If the devtune "
                        "service is running, CLI commands go through its API: check that its "
                        f"{path.parent / 'service.json'} is readable; otherwise wait for that process to "
                        "finish or stop it.") from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        return con

    def close(self) -> None:
        self.con.close()

    def release_cache(self) -> None:
        """Let go of the table blocks DuckDB keeps after a large read. It evicts them only when its memory limit
        (80% of RAM by default) presses: after a 1M-suggestion build's link pass it held 620 MB of them and the
        process 1,121 MB, 260 MB once they were let go. A lower limit for a moment evicts them (DuckDB then
        returns the memory); the default comes back at once. A query on another cursor that needed more than
        RELEASE_LIMIT pinned in that moment would fail like any out-of-memory query, and be retried with its
        job."""
        try:
            self.con.execute(f"SET memory_limit = '{RELEASE_LIMIT}'")
        except duckdb.Error as e:  # more than that is pinned: nothing is let go, nothing breaks
            log.debug("store: could not let go of cached blocks: %s", e)
        finally:
            self.con.execute("RESET memory_limit")

    def cursor(self) -> Store:
        """A Store on a new cursor of the same database, for use by one other thread."""
        return Store(self.con.cursor(), self.path)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._lock:
            self.con.execute("BEGIN TRANSACTION")
            try:
                yield
            except BaseException:
                self.con.execute("ROLLBACK")
                raise
            self.con.execute("COMMIT")

    # -- migrations ----------------------------------------------------------------------------------------

    def migrate(self) -> list[str]:
        """Apply the migrations this file has not seen yet; returns their names."""
        self.con.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                         "(name VARCHAR PRIMARY KEY, applied_at TIMESTAMP NOT NULL)")
        done = {r[0] for r in self.con.execute("SELECT name FROM schema_migrations").fetchall()}
        applied = []
        for name, sql in MIGRATIONS:
            if name in done:
                continue
            with self.transaction():
                self.con.execute(sql)
                self.con.execute("INSERT INTO schema_migrations VALUES (?, ?)", [name, now()])
            applied.append(name)
        return applied

    def migrations(self) -> list[str]:
        return [r[0] for r in self.con.execute("SELECT name FROM schema_migrations ORDER BY name").fetchall()]

    # -- ingest --------------------------------------------------------------------------------------------

    def load_cursor(self, source: str, stream: str) -> Cursor | None:
        row = self.con.execute(
            'SELECT "offset", head_sha1, head_len, sha FROM cursors WHERE source = ? AND stream = ?',
            [source, stream]).fetchone()
        if row is None:
            return None
        return Cursor(stream=stream, offset=row[0], head_sha1=row[1], head_len=row[2], sha=row[3])

    def drop_cursor(self, source: str, stream: str) -> None:
        """Forget where a stream was read to (its file is gone for good)."""
        with self.transaction():
            self.con.execute("DELETE FROM cursors WHERE source = ? AND stream = ?", [source, stream])

    def apply_batch(self, source: str, rows: Rows, cursor: Cursor | None,
                    settle: tuple[dict[str, Any], ...] = ()) -> Applied:
        """Store one batch and its cursor atomically; rows already present are left as they are.

        `settle` lists quarantine rows (by their key columns) that this batch resolves: they are deleted in the
        same transaction (`devtune quarantine retry`).
        """
        return self.apply_tables(source, arrow_tables(rows), rows.tabby_touched, cursor, settle)

    def apply_tables(self, source: str, tables: dict[str, pa.Table], tabby_touched: set[str], cursor: Cursor | None,
                     settle: tuple[dict[str, Any], ...] = ()) -> Applied:
        """`apply_batch` for rows already laid out as Arrow tables (`arrow_tables`), named by store table.

        A fresh table's rows (`Table.fresh`) are inserted plainly: `ON CONFLICT` looks every key up first, and that
        lookup grows with the table (27.5 -> 46.7 ms a 2,000-row batch from 40k to 760k suggestions, a plain
        INSERT 17-26 ms; bench/README.md). A row stored before fails the INSERT, which undoes the whole batch; it
        is then stored again with the lookups, and so are that table's next UPSERT_BATCHES batches (a log read
        again conflicts on every batch)."""
        plain = {name for name in tables if _TABLES_BY_NAME[name].fresh and not self._upserting.get(name)}
        for name in tables:
            if self._upserting.get(name):
                self._upserting[name] -= 1
        if plain:
            try:
                return self._apply_tables(source, tables, tabby_touched, cursor, settle, plain)
            except duckdb.ConstraintException as e:
                log.debug("store: %s stored again with key lookups (%s)", sorted(plain), e)
                self._upserting.update(dict.fromkeys(plain, UPSERT_BATCHES))
        return self._apply_tables(source, tables, tabby_touched, cursor, settle, set())

    def _apply_tables(self, source: str, tables: dict[str, pa.Table], tabby_touched: set[str], cursor: Cursor | None,
                      settle: tuple[dict[str, Any], ...], plain: set[str]) -> Applied:
        with self.transaction():
            n = {name: self._insert_arrow(_TABLES_BY_NAME[name], batch, name in plain)
                 for name, batch in tables.items()}
            if tabby_touched:
                self.link_tabby(tabby_touched)
            for q in settle:
                self.con.execute('DELETE FROM quarantine WHERE source = ? AND stream = ? AND "offset" = ? '
                                 "AND line_sha1 = ?", [q["source"], q["stream"], q["offset"], q["line_sha1"]])
            if cursor is not None:
                self.con.execute(
                    "INSERT OR REPLACE INTO cursors VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [source, cursor.stream, cursor.offset, cursor.head_sha1, cursor.head_len, cursor.sha, now()])
        return Applied(suggestions=n.get("suggestions", 0), commits=n.get("commits", 0),
                       rejects=n.get("quarantine", 0), edits=n.get("edit_outcomes", 0),
                       interactions=n.get("interactions", 0), requests=n.get("gateway_requests", 0))

    def _insert(self, table: Table, rows: list[Any]) -> int:
        return self._insert_arrow(table, as_arrow(table, _unique(rows, table.key)))

    def _insert_arrow(self, table: Table, batch: pa.Table, plain: bool = False) -> int:
        """Insert `batch`; `plain`: without ON CONFLICT, so a row whose key is stored fails the statement."""
        cols = ", ".join(f'"{c}"' for c in table.columns)
        conflict = "" if plain else f" ON CONFLICT {table.on_conflict}"
        result = self.con.execute(f"INSERT INTO {table.name} ({cols}) SELECT {cols} FROM batch{conflict}")
        row = result.fetchone()
        return int(row[0]) if row else 0

    def link_tabby(self, completion_ids: set[str]) -> None:
        """(Re)derive the suggestions of these Tabby completions from every action stored for them.

        Shown = at least one view, select or dismiss; accepted = any select; partial = every select was
        kind "line"; the text is the chosen choice (FORMATS.md §2.3). Called with the batch that stored
        the lines, so a select arriving a day later flips its suggestion to accepted.
        """
        touched = arrow_table({"id": sorted(completion_ids)}, pa.schema([("id", pa.string())]))  # noqa: F841
        # BY NAME: each column is named once, by its alias here (a misspelt one fails the statement).
        self.con.execute("""
            INSERT INTO suggestions BY NAME
            SELECT c.id, c.source, 'tabby' AS source_kind, 'completion' AS event_kind, a.shown_at, c.developer,
                   c.team, c.repo, c.filepath, c.language, a.selects > 0 AS accepted,
                   a.selects > 0 AND a.full_selects = 0 AS partial, c.prefix, NULL AS prefix_compiled,
                   if(c.prefix IS NULL, NULL, '') AS prefix_header,
                   'raw' AS prefix_recovery, c.suffix, c.choices[a.choice + 1] AS completion, NULL AS model,
                   ? AS ingested_at
            FROM tabby_completions c JOIN (
                SELECT completion_id, min(acted_at) AS shown_at,
                       count(*) FILTER (WHERE kind = 'select') AS selects,
                       count(*) FILTER (WHERE kind = 'select' AND NOT line_select) AS full_selects,
                       coalesce(min(choice_index) FILTER (WHERE kind = 'select'), min(choice_index)) AS choice
                FROM tabby_actions WHERE completion_id IN (SELECT id FROM touched) GROUP BY completion_id
            ) a ON a.completion_id = c.id
            ON CONFLICT (id) DO UPDATE SET shown_at = excluded.shown_at, accepted = excluded.accepted,
                partial = excluded.partial, completion = excluded.completion
        """, [now()])

    # -- status --------------------------------------------------------------------------------------------

    def counts(self) -> dict[str, Any]:
        """Totals for `devtune status`."""
        c = self.con

        def one(sql: str) -> Any:
            row = c.execute(sql).fetchone()
            return row[0] if row else 0

        total, accepted, partial = c.execute(
            "SELECT count(*), count(*) FILTER (WHERE accepted), count(*) FILTER (WHERE partial) FROM suggestions"
        ).fetchone() or (0, 0, 0)
        by_source = {r[0]: {"total": r[1], "accepted": r[2]} for r in c.execute(
            "SELECT source, count(*), count(*) FILTER (WHERE accepted) FROM suggestions GROUP BY 1 ORDER BY 1"
        ).fetchall()}
        by_kind = {f"{r[0]}/{r[1]}": {"total": r[2], "accepted": r[3]} for r in c.execute(
            "SELECT source_kind, event_kind, count(*), count(*) FILTER (WHERE accepted) FROM suggestions "
            "GROUP BY 1, 2 ORDER BY 1, 2").fetchall()}
        edits = {r[0]: {"total": r[1], "accepted": r[2]} for r in c.execute(
            "SELECT event_kind, count(*), count(*) FILTER (WHERE accepted) FROM edit_outcomes GROUP BY 1 ORDER BY 1"
        ).fetchall()}
        interactions = dict(c.execute(
            "SELECT event_kind, count(*) FROM interactions GROUP BY 1 ORDER BY 1").fetchall())
        commits = one("SELECT count(*) FROM commits")
        commits_by_repo = dict(c.execute("SELECT repo, count(*) FROM commits GROUP BY 1 ORDER BY 1").fetchall())
        commits_by_source = dict(c.execute("SELECT source, count(*) FROM commits GROUP BY 1 ORDER BY 1").fetchall())
        quarantined = one("SELECT count(*) FROM quarantine")
        q_by_source = dict(c.execute("SELECT source, count(*) FROM quarantine GROUP BY 1 ORDER BY 1").fetchall())
        drops = dict(c.execute("SELECT reason, count(*) FROM drops GROUP BY 1 ORDER BY 1").fetchall())
        drops_by_source = {f"{r[0]}/{r[1]}": r[2] for r in c.execute(
            "SELECT source, reason, count(*) FROM drops GROUP BY 1, 2 ORDER BY 1, 2").fetchall()}
        scrubs = {k: int(n) for k, n in c.execute(
            "SELECT kind, sum(count) FROM scrubs GROUP BY 1 ORDER BY 1").fetchall()}
        scrubs_by_table = {f"{r[0]}/{r[1]}": int(r[2]) for r in c.execute(
            "SELECT target, kind, sum(count) FROM scrubs GROUP BY 1, 2 ORDER BY 1, 2").fetchall()}
        tabby_completions = one("SELECT count(*) FROM tabby_completions")
        unassigned = [{"identity": r[0], "source_kind": r[1], "suggestions": r[2], "commits": r[3]}
                      for r in c.execute("""
            SELECT i.identity, i.source_kind,
                   (SELECT count(*) FROM suggestions s WHERE s.developer = i.developer),
                   (SELECT count(*) FROM commits m WHERE m.developer = i.developer)
            FROM identities i WHERE NOT i.mapped ORDER BY 1, 2""").fetchall()]
        return {
            "suggestions": {"total": total, "accepted": accepted, "rejected": total - accepted, "partial": partial,
                            "by_source": by_source, "by_kind": by_kind},
            "edit_outcomes": {"total": sum(v["total"] for v in edits.values()), "by_kind": edits},
            "interactions": {"total": sum(interactions.values()), "by_kind": interactions},
            "tabby": {"completions": tabby_completions,
                      "not_shown": one("SELECT count(*) FROM tabby_completions c WHERE NOT EXISTS "
                                       "(SELECT 1 FROM suggestions s WHERE s.id = c.id)")},
            "commits": {"total": commits, "by_repo": commits_by_repo, "by_source": commits_by_source},
            "quarantined": {"total": quarantined, "by_source": q_by_source},
            "dropped": drops,
            "dropped_by_source": drops_by_source,
            "scrubbed": scrubs,
            "scrubbed_by_table": scrubs_by_table,
            "unassigned": unassigned,
        }

    def record_collect(self, source: str, error: str | None) -> None:
        """Note how a source's collect went: a failure counts up (for the back-off), a success resets it."""
        with self.transaction():
            if error is None:
                self.con.execute(
                    "INSERT INTO source_health VALUES (?, 0, NULL, NULL, ?) ON CONFLICT (source) DO UPDATE SET "
                    "failures = 0, last_error = NULL, ok_at = excluded.ok_at", [source, now()])
            else:
                self.con.execute(
                    "INSERT INTO source_health VALUES (?, 1, ?, ?, NULL) ON CONFLICT (source) DO UPDATE SET "
                    "failures = source_health.failures + 1, last_error = excluded.last_error, "
                    "failed_at = excluded.failed_at", [source, error, now()])

    def source_health(self) -> dict[str, dict[str, Any]]:
        """Per source that was ever collected: failures since its last success, the last error and when."""
        return {r[0]: {"failures": r[1], "error": r[2], "failed_at": r[3], "ok_at": r[4]}
                for r in self.con.execute("SELECT * FROM source_health ORDER BY source").fetchall()}

    def source_streams(self) -> dict[str, dict[str, Any]]:
        """Per source: how many streams (files, refs) it has a cursor for, and when one last moved."""
        return {r[0]: {"streams": r[1], "collected_at": r[2].isoformat()} for r in self.con.execute(
            "SELECT source, count(*), max(updated_at) FROM cursors GROUP BY 1 ORDER BY 1").fetchall()}

    # -- quarantine ----------------------------------------------------------------------------------------

    def quarantined(self, limit: int = 50, source: str | None = None, qid: str | None = None) -> list[dict[str, Any]]:
        """Quarantined lines, newest first; `qid` picks one by the id `devtune quarantine list` shows."""
        where, args = [], []
        if source is not None:
            where.append("source = ?")
            args.append(source)
        if qid is not None:
            where.append(f"{_QUARANTINE_ID} = ?")
            args.append(qid)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = self.con.execute(
            f'SELECT {_QUARANTINE_ID}, source, stream, "offset", length, line_sha1, reason, excerpt, quarantined_at '
            f'FROM quarantine {clause}ORDER BY quarantined_at DESC, source, stream, "offset" LIMIT ?',
            [*args, limit]).fetchall()
        return [{"id": r[0], "source": r[1], "stream": r[2], "offset": r[3], "length": r[4], "line_sha1": r[5],
                 "reason": r[6], "excerpt": r[7], "quarantined_at": r[8].isoformat()} for r in rows]

    def requarantine(self, row: dict[str, Any], reason: str) -> None:
        """Record a new reason for a quarantined line that still does not parse."""
        with self.transaction():
            self.con.execute('UPDATE quarantine SET reason = ?, quarantined_at = ? WHERE source = ? AND stream = ? '
                             'AND "offset" = ? AND line_sha1 = ?',
                             [reason, now(), row["source"], row["stream"], row["offset"], row["line_sha1"]])

    # -- datasets ------------------------------------------------------------------------------------------

    def scope_suggestions(self, scope: Scope, max_prefix_chars: int, max_suffix_chars: int
                          ) -> Iterator[LinkedSuggestion]:
        """Every suggestion of a scope (a team's, or one developer's) with its link, in no set order: the caller
        sorts what it keeps by (shown_at, id). An ORDER BY here makes DuckDB sort the whole result before the
        first row comes (1M suggestions: 2.8 GB held at once, beside Python's copy, 5.7 GB at the peak, 3.6 GB
        without it; and 14.6 s against 10.2 s).

        Prefix and suffix come cut to one character more than the dataset keeps, so `clip_prefix` /
        `clip_suffix` still see a cut to move to a line boundary, without pulling whole files into Python.
        """
        column = "s.team" if scope.kind == "team" else "s.developer"
        cur = self.con.cursor()  # the cached blocks are let go (release_cache, on self.con) while it streams
        cur.execute(
            "SELECT s.id, s.source_kind, s.developer, s.shown_at, s.repo, s.filepath, s.accepted, s.partial, "
            "right(s.prefix, ?) AS prefix, left(s.suffix, ?) AS suffix, s.completion, "
            "l.status AS link_status, l.committed_text, l.repo AS link_repo, l.path AS link_path "
            "FROM suggestions s LEFT JOIN suggestion_links l ON l.suggestion_id = s.id "
            f"WHERE {column} = ?",
            [max_prefix_chars + 1, max_suffix_chars + 1, scope.name])
        yield from _records(cur, LinkedSuggestion, release=self.release_cache)

    def count_scope_suggestions(self, scope: Scope) -> int:
        column = "team" if scope.kind == "team" else "developer"
        row = self.con.execute(f"SELECT count(*) FROM suggestions WHERE {column} = ?", [scope.name]).fetchone()
        return int(row[0]) if row else 0

    def scope_edit_outcomes(self, scope: Scope) -> Iterator[EditRecord]:
        """Continue edit outcomes of a scope, oldest first."""
        column = "team" if scope.kind == "team" else "developer"
        cur = self.con.execute(
            "SELECT id, event_kind, developer, decided_at, repo, filepath, accepted, instruction, before_text, "
            f"after_text FROM edit_outcomes WHERE {column} = ? ORDER BY decided_at, id", [scope.name])
        yield from _records(cur, EditRecord)

    def committed_files(self, scope: Scope, shas: Iterable[str] | None = None) -> Iterator[CommittedFile]:
        """Files a scope's commits added lines to, with the content after the commit, oldest first; only those
        of `shas` when given."""
        column = "c.team" if scope.kind == "team" else "c.developer"
        only = "" if shas is None else "AND c.sha IN (SELECT unnest(?)) "
        select = ("SELECT c.sha, c.developer, c.committed_at, f.path, f.added, {} "
                  "FROM commits c JOIN commit_files f ON f.sha = c.sha JOIN blobs b ON b.blob = f.blob "
                  f"WHERE {column} = ? AND NOT c.opted_out AND len(f.added) > 0 {only}"
                  "ORDER BY c.committed_at, c.sha, f.path")
        wanted = None if shas is None else sorted(shas)
        params = [scope.name] + ([] if wanted is None else [wanted])
        # A night's new commits: their contents read apart (_blob_contents). Not a first build's every commit:
        # that many commits hold more files than the bound as a rule, and their keys would be read only to be dropped.
        if wanted is not None and len(wanted) <= BLOB_READ_APART:
            rows = self.con.execute(select.format("f.blob"), params).fetchall()
            contents = self._blob_contents({r[-1] for r in rows})
            if contents is not None:
                yield from (CommittedFile(sha, developer, at, path, added, contents[blob])
                            for sha, developer, at, path, added, blob in rows if blob in contents)
                return
        yield from _records(self.con.execute(select.format("b.content"), params), CommittedFile)

    def _blob_contents(self, blobs: set[str]) -> dict[str, str] | None:
        """The contents of a few `blobs`, reading only the parts of the table that hold them; None when they are
        many or spread over most of it (then a join reads them best, in one pass).

        DuckDB compresses the content column a vector (2,048 rows) at a time, and reading any row decompresses
        its vector. A join or an IN on the blob key made it decompress every vector for the night's few: with
        the 10k-commit history of bench/nightly_growth.py (17.6k blobs, 235 MB), the 173 files of the night's 100
        commits took 0.18-0.33 s against 0.006 s with 1k commits, growing with the history. Blobs are stored in
        the order they were harvested, so a night's new ones share the table's last vectors: found by their row
        ids (only the key column is read), then read by row-id range, they took 0.02-0.04 s."""
        if not blobs or len(blobs) > BLOB_READ_APART:
            return None if blobs else {}
        keys = sorted(blobs)
        rowids = sorted(r for (r,) in self.con.execute(
            "SELECT rowid FROM blobs WHERE blob IN (SELECT unnest(?::VARCHAR[]))", [keys]).fetchall())
        (last,) = self.con.execute("SELECT coalesce(max(rowid), 0) FROM blobs").fetchone() or (0,)
        runs: list[list[int]] = []  # rowid ranges, apart where a whole vector lies between two wanted rows
        for r in rowids:
            if runs and r - runs[-1][1] < VECTOR_ROWS:
                runs[-1][1] = r
            else:
                runs.append([r, r])
        vectors = sum(hi // VECTOR_ROWS - lo // VECTOR_ROWS + 1 for lo, hi in runs)
        if vectors * 2 > last // VECTOR_ROWS + 1:
            return None
        out: dict[str, str] = {}
        for lo, hi in runs:
            out.update(self.con.execute(
                "SELECT blob, content FROM blobs WHERE rowid BETWEEN ? AND ? AND blob IN (SELECT unnest(?::VARCHAR[]))",
                [lo, hi, keys]).fetchall())
        # A row id moves only when a checkpoint compacts deleted rows (a forget), between the two reads above
        if len(out) < len(rowids):
            out.update(self.con.execute("SELECT blob, content FROM blobs WHERE blob IN (SELECT unnest(?::VARCHAR[]))",
                                        [sorted(set(keys) - set(out))]).fetchall())
        return out

    def committed_file_keys(self, scope: Scope) -> list[tuple[str, str, datetime, str]]:
        """(sha, developer, committed_at, path) of `committed_files`, in its order, without reading content."""
        column = "c.team" if scope.kind == "team" else "c.developer"
        return self.con.execute(
            "SELECT c.sha, c.developer, c.committed_at, f.path "
            "FROM commits c JOIN commit_files f ON f.sha = c.sha JOIN blobs b ON b.blob = f.blob "
            f"WHERE {column} = ? AND NOT c.opted_out AND len(f.added) > 0 "
            "ORDER BY c.committed_at, c.sha, f.path", [scope.name]).fetchall()

    def team_repos(self, team: str) -> list[str]:
        """Repositories the team's commits were made in."""
        return [r for (r,) in self.con.execute("SELECT DISTINCT repo FROM commits WHERE team = ? ORDER BY 1",
                                               [team]).fetchall()]

    def repo_files_at(self, repos: list[str], before: datetime) -> Iterator[RepoFile]:
        """Each file of `repos` as the last stored commit before `before` left it, by repository and path; files
        deleted by then, or whose last version was not stored (too large, excluded), are left out."""
        cur = self.con.execute(
            "SELECT repo, path, committed_at, content FROM ("
            " SELECT c.repo, f.path, c.committed_at, f.status, b.content, row_number() OVER ("
            "  PARTITION BY c.repo, f.path ORDER BY c.committed_at DESC, c.sha DESC) AS latest"
            " FROM commits c JOIN commit_files f ON f.sha = c.sha LEFT JOIN blobs b ON b.blob = f.blob"
            " WHERE c.repo IN (SELECT unnest(?)) AND c.committed_at < ? AND NOT c.opted_out)"
            " WHERE latest = 1 AND status <> 'D' AND content IS NOT NULL ORDER BY repo, path",
            [repos, before])
        yield from _records(cur, RepoFile)

    # -- linking -------------------------------------------------------------------------------------------

    def repo_paths(self) -> dict[str, list[str]]:
        """Every file path each repository's stored commits touched: what suggestion paths are mapped onto."""
        out: dict[str, list[str]] = {}
        for repo, path in self.con.execute(
                "SELECT DISTINCT c.repo, f.path FROM commits c JOIN commit_files f ON f.sha = c.sha "
                "WHERE NOT c.opted_out ORDER BY 1, 2").fetchall():
            out.setdefault(repo, []).append(path)
        return out

    def suggestions_to_link(self) -> Iterator[ToLink]:
        """Accepted suggestions whose link may still change: never linked, linked before their window closed,
        or left unknown and since joined by a stored commit of their developer inside their window.

        Only a commit inside the window can change a verdict (link_versions lists no other), so an unknown is not
        relinked for a commit outside it: relinking every unknown of a developer with any new commit made the
        nightly link pass grow with the history (bench/nightly_growth.py; see bench/README.md)."""
        cur = self.con.execute(
            "SELECT s.id, s.developer, s.shown_at, s.repo, s.filepath FROM suggestions s "
            "LEFT JOIN suggestion_links l ON l.suggestion_id = s.id "
            "WHERE s.accepted AND s.prefix IS NOT NULL AND s.completion IS NOT NULL AND (l.suggestion_id IS NULL "
            "OR l.linked_at < l.window_closes_at OR (l.status = 'unknown' AND EXISTS (SELECT 1 FROM commits c "
            "WHERE c.developer = s.developer AND c.ingested_at > l.linked_at AND c.committed_at > s.shown_at "
            "AND c.committed_at <= l.window_closes_at))) ORDER BY s.id")
        yield from _records(cur, ToLink)

    def link_candidates(self, mapped: pa.Table) -> Iterator[LinkCandidate]:
        """The mapped suggestions (`mapped` holds id, repo, path) with their texts, in no set order: the caller
        sorts them by file (link.by_file). With an ORDER BY here, and the versions' contents sorted too, DuckDB
        held both sorted results at once (231 and 615 MB by duckdb_memory() for a first 1M-suggestion build,
        beside 590 MB of cached blocks: the link pass peaked at 2.2 GB)."""
        cur = self.con.cursor()
        cur.register("mapped", mapped)
        cur.execute("SELECT m.repo, m.path, s.developer, s.id, s.shown_at, s.partial, s.prefix, s.suffix, "
                    "s.completion FROM mapped m JOIN suggestions s ON s.id = m.id")
        yield from _records(cur, LinkCandidate, release=self.release_cache)

    def link_versions(self, mapped: pa.Table, window_h: float) -> list[VersionKey]:
        """Every version of the mapped suggestions' files their developers committed inside some suggestion's
        window, sorted by (repo, path, developer, committed_at, sha), with the blob holding its content (None
        when the file was deleted or not kept); `blob_contents` reads the contents."""
        cur = self.con.cursor()
        cur.register("mapped", mapped)
        return cur.execute(
            "WITH wanted AS (SELECT m.repo, m.path, s.developer, min(s.shown_at) AS first_at, "
            "  max(s.shown_at) + to_microseconds(CAST(? * 3600e6 AS BIGINT)) AS last_at "
            "  FROM mapped m JOIN suggestions s ON s.id = m.id GROUP BY ALL) "
            "SELECT w.repo, w.path, c.developer, c.sha, c.committed_at, f.status, f.blob "
            "FROM wanted w JOIN commits c ON c.repo = w.repo AND c.developer = w.developer "
            "  AND c.committed_at > w.first_at AND c.committed_at <= w.last_at "
            "JOIN commit_files f ON f.sha = c.sha AND f.path = w.path "
            "WHERE NOT c.opted_out ORDER BY w.repo, w.path, c.developer, c.committed_at, c.sha",
            [window_h]).fetchall()

    def blob_contents(self, blobs: set[str]) -> Iterator[tuple[str, str]]:
        """(blob, content) of those of `blobs` that are stored, in no set order. A night's few are read apart
        (`_blob_contents`); many, in one pass over the table."""
        few = self._blob_contents(blobs)
        if few is not None:
            yield from few.items()
            return
        cur = self.con.cursor()
        cur.execute("SELECT blob, content FROM blobs WHERE blob IN (SELECT unnest(?::VARCHAR[]))", [sorted(blobs)])
        # ~35 KB a content at 1M suggestions: 35 MB of rows between two releases, and more of cached blocks
        yield from _records(cur, BlobContent, batch_rows=1024, release=self.release_cache, release_rows=1024)

    def token_counts(self, tokenizer: str, hashes: list[bytes]) -> dict[bytes, int]:
        """The token counts of `hashes` (text hashes) that earlier dataset builds stored for `tokenizer` (a
        fingerprint)."""
        if not hashes:
            return {}
        c = self.con.cursor()  # registered Arrow tables stay on this cursor
        try:
            c.register("asked", arrow_table({"text_hash": hashes}, pa.schema([("text_hash", pa.binary())])))
            return dict(c.execute("SELECT t.text_hash, t.tokens FROM token_counts t JOIN asked a "
                                  "ON a.text_hash = t.text_hash WHERE t.tokenizer = ?", [tokenizer]).fetchall())
        finally:
            c.close()

    def save_token_counts(self, tokenizer: str, counts: dict[bytes, int]) -> None:
        """Add counts a build made (their hashes were not stored yet for `tokenizer`)."""
        if not counts:
            return
        new = arrow_table({"text_hash": list(counts), "tokens": list(counts.values())},
                          pa.schema([("text_hash", pa.binary()), ("tokens", pa.int32())]))
        c = self.con.cursor()  # registered Arrow tables stay on this cursor; one statement, so one transaction
        c.register("new_counts", new)
        with self._lock:
            c.execute("INSERT INTO token_counts SELECT ?, n.text_hash, n.tokens FROM new_counts n "
                      "WHERE n.text_hash NOT IN (SELECT text_hash FROM token_counts WHERE tokenizer = ?)",
                      [tokenizer, tokenizer])
        c.close()

    def save_links(self, rows: list[SuggestionLinkRow]) -> None:
        """Insert or replace links (a relink replaces the earlier decision)."""
        if not rows:
            return
        with self.transaction():
            self._insert(TABLES[SuggestionLinkRow], rows)

    def link_counts(self) -> dict[str, int]:
        return dict(self.con.execute("SELECT status, count(*) FROM suggestion_links GROUP BY 1 ORDER BY 1")
                    .fetchall())

    def team_developers(self, team: str) -> list[str]:
        """Every developer with suggestions or (not opted-out) commits in `team`, sorted."""
        rows = self.con.execute(
            "SELECT developer FROM suggestions WHERE team = ? UNION "
            "SELECT developer FROM commits WHERE team = ? AND NOT opted_out ORDER BY 1", [team, team]).fetchall()
        return [r[0] for r in rows if r[0]]

    # -- forgetting (pipelines/forget.py) ------------------------------------------------------------------

    def _mine(self, table: str, developer: str, ids: list[str]) -> tuple[str, list[Any]]:
        """The WHERE clause selecting a developer's own rows of `table`, and its arguments."""
        where, params = _MINE[table]
        return where, [developer if p == "developer" else ids for p in params]

    def footprint(self, developer: str, ids: list[str], sources: list[str]) -> dict[str, int]:
        """What is stored of a developer: their rows per table, their quarantined lines (of `sources`, or naming
        them), their runs, and other rows whose text names them (replaced, not removed)."""
        counts = {}
        for table in _MINE:
            where, args = self._mine(table, developer, ids)
            row = self.con.execute(f"SELECT count(*) FROM {table} WHERE {where}", args).fetchone()
            counts[table] = int(row[0]) if row else 0
        where, args = _quarantine_of(sources, ids)
        counts["quarantine"] = int((self.con.execute(f"SELECT count(*) FROM quarantine WHERE {where}", args)
                                    .fetchone() or (0,))[0])
        counts["runs"] = int((self.con.execute("SELECT count(*) FROM runs WHERE scope = ?", [f"dev:{developer}"])
                              .fetchone() or (0,))[0])
        counts["named_in_other_rows"] = sum(n for _, _, n in self._naming(ids))
        return counts

    def team_runs_of(self, developer: str) -> tuple[list[str], list[str]]:
        """The teams a developer's rows went to, and those teams' runs (whose datasets held the rows)."""
        teams = [r[0] for r in self.con.execute(
            "SELECT team FROM suggestions WHERE developer = ? UNION SELECT team FROM edit_outcomes WHERE developer = ? "
            "UNION SELECT team FROM interactions WHERE developer = ? UNION SELECT team FROM tabby_completions "
            "WHERE developer = ? UNION SELECT team FROM commits WHERE developer = ? AND NOT opted_out ORDER BY 1",
            [developer] * 5).fetchall() if r[0]]
        runs = [r[0] for r in self.con.execute(
            "SELECT run_id FROM runs WHERE scope IN (SELECT 'team:' || unnest(?::VARCHAR[])) ORDER BY 1",
            [teams]).fetchall()]
        return teams, runs

    def forget_rows(self, developer: str, ids: list[str], sources: list[str], hashes: list[str],
                    marks: list[tuple[str, str, str]], job_id: str, plan: dict[str, Any]) -> None:
        """One transaction: a developer's rows go, their commits keep only sha, parents and time, other rows'
        texts lose their identities, and the tombstones, retrain marks and the job for the files are written."""
        with self.transaction():
            c = self.con
            for table, target in (("suggestions", "suggestions"), ("edit_outcomes", "edit_outcomes"),
                                  ("interactions", "interactions"), ("tabby_completions", "tabby_completions"),
                                  ("gateway_requests", "gateway_requests")):
                where, args = self._mine(table, developer, ids)
                c.execute(f"DELETE FROM scrubs WHERE target = '{target}' AND key IN (SELECT id FROM {table} "
                          f"WHERE {where})", args)
                if table == "suggestions":
                    c.execute(f"DELETE FROM suggestion_links WHERE suggestion_id IN (SELECT id FROM suggestions "
                              f"WHERE {where})", args)
                if table == "tabby_completions":
                    where_a, args_a = self._mine("tabby_actions", developer, ids)
                    c.execute(f"DELETE FROM tabby_actions WHERE {where_a}", args_a)
                c.execute(f"DELETE FROM {table} WHERE {where}", args)
            where, args = self._mine("commits", developer, ids)
            c.execute(f"CREATE OR REPLACE TEMP TABLE forget_shas AS SELECT sha FROM commits WHERE {where}", args)
            c.execute("DELETE FROM scrubs WHERE (target = 'commits' AND key IN (SELECT sha FROM forget_shas)) OR "
                      "(target = 'commit_files' AND split_part(key, ':', 1) IN (SELECT sha FROM forget_shas))")
            c.execute("DELETE FROM commit_files WHERE sha IN (SELECT sha FROM forget_shas)")
            c.execute("UPDATE commits SET author_name = NULL, author_email = NULL, developer = '', team = '', "
                      "message = NULL, opted_out = TRUE WHERE sha IN (SELECT sha FROM forget_shas)")
            c.execute("DROP TABLE forget_shas")
            c.execute("DELETE FROM scrubs WHERE target = 'blobs' AND key NOT IN "
                      "(SELECT blob FROM commit_files WHERE blob IS NOT NULL)")
            c.execute("DELETE FROM blobs WHERE blob NOT IN (SELECT blob FROM commit_files WHERE blob IS NOT NULL)")
            where, args = self._mine("identities", developer, ids)
            c.execute(f"DELETE FROM identities WHERE {where}", args)
            where, args = _quarantine_of(sources, ids)
            c.execute(f"DELETE FROM quarantine WHERE {where}", args)
            c.execute("DELETE FROM runs WHERE scope = ?", [f"dev:{developer}"])
            # A cache of hashes of row texts; dropped whole so none of a forgotten developer's rows is left in it.
            c.execute("DELETE FROM token_counts")
            for table, column, _ in self._naming(ids):
                c.execute(f"UPDATE {table} SET {column} = regexp_replace({column}, ?, '<forgotten>', 'g') "
                          f"WHERE regexp_matches({column}, ?)", [_any_of(ids)] * 2)
            stamp = now()
            if hashes:
                c.execute("INSERT INTO tombstones SELECT unnest(?::VARCHAR[]), ? ON CONFLICT DO NOTHING",
                          [hashes, stamp])
            for scope, version, reason in marks:
                c.execute("INSERT INTO retrain_marks VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                          [scope, version, reason, stamp])
            c.execute("INSERT INTO forget_jobs VALUES (?, ?, NULL, ?)", [job_id, stamp, json.dumps(plan)])

    def _naming(self, ids: list[str]) -> list[tuple[str, str, int]]:
        """(table, text column, rows) whose text names one of `ids` (run summaries included)."""
        if not ids:
            return []
        found = []
        columns = [(t.name, col) for t in TABLES.values() for col in text_columns(t)]
        for table, col in [*columns, ("runs", "summary"), ("runs", "error")]:
            row = self.con.execute(f"SELECT count(*) FROM {table} WHERE regexp_matches({col}, ?)",
                                   [_any_of(ids)]).fetchone()
            if row and row[0]:
                found.append((table, col, int(row[0])))
        return found

    def stored_identities(self, developer: str) -> list[str]:
        """Every identity a developer's events were stored under, and their git author emails and names."""
        return [r[0] for r in self.con.execute(
            "SELECT identity FROM identities WHERE developer = ? UNION SELECT author_email FROM commits "
            "WHERE developer = ? AND author_email IS NOT NULL UNION SELECT author_name FROM commits "
            "WHERE developer = ? AND author_name IS NOT NULL ORDER BY 1", [developer] * 3).fetchall() if r[0]]

    def has_rows_of(self, developer: str, ids: list[str]) -> bool:
        """Whether any row of the developer's own is stored (cheap: a LIMIT 1 per table)."""
        for table in _MINE:
            where, args = self._mine(table, developer, ids)
            if self.con.execute(f"SELECT 1 FROM {table} WHERE {where} LIMIT 1", args).fetchone():
                return True
        return False

    def tombstones(self) -> frozenset[str]:
        return frozenset(r[0] for r in self.con.execute("SELECT hash FROM tombstones").fetchall())

    def remove_tombstones(self, hashes: list[str]) -> int:
        with self.transaction():
            row = self.con.execute("DELETE FROM tombstones WHERE hash IN (SELECT unnest(?::VARCHAR[]))",
                                   [hashes]).fetchone()
        return int(row[0]) if row else 0

    def pending_forgets(self) -> list[tuple[str, dict[str, Any]]]:
        return [(r[0], json.loads(r[1])) for r in self.con.execute(
            "SELECT id, plan FROM forget_jobs WHERE done_at IS NULL ORDER BY created_at").fetchall()]

    def finish_forget(self, job_id: str) -> None:
        with self.transaction():
            self.con.execute("UPDATE forget_jobs SET done_at = ? WHERE id = ?", [now(), job_id])

    def forget_counts(self) -> dict[str, int]:
        """How many people were forgotten (jobs with tombstones) and identities are tombstoned: no names."""
        row = self.con.execute("SELECT (SELECT count(*) FROM forget_jobs WHERE CAST(json_extract(plan, '$.tombstone') "
                               "AS BOOLEAN)), (SELECT count(*) FROM tombstones)").fetchone()
        return {"forgotten": int(row[0]), "tombstones": int(row[1])} if row else {"forgotten": 0, "tombstones": 0}

    def retrain_marks(self) -> dict[tuple[str, str], str]:
        return {(r[0], r[1]): r[2] for r in self.con.execute(
            "SELECT scope, version, reason FROM retrain_marks ORDER BY 1, 2").fetchall()}

    # -- online (pipelines/online/) --------------------------------------------------------------------------

    def online_state(self, key: str) -> str | None:
        row = self.con.execute("SELECT value FROM online_state WHERE key = ?", [key]).fetchone()
        return str(row[0]) if row else None

    def set_online_state(self, key: str, value: str) -> None:
        with self.transaction():
            self.con.execute("INSERT OR REPLACE INTO online_state VALUES (?, ?)", [key, value])

    def developers_of_teams(self, teams: list[str]) -> list[tuple[str, str]]:
        """(developer, team) of everyone with suggestions in these teams."""
        return [(r[0], r[1]) for r in self.con.execute(
            "SELECT DISTINCT developer, team FROM suggestions WHERE team IN (SELECT unnest(?::VARCHAR[])) "
            "ORDER BY 1, 2", [teams]).fetchall()]

    def attribute_suggestions(self, intervals: pa.Table, arms: pa.Table, names: list[str], window_s: float,
                              since: datetime | None, models: list[str] | None = None) -> dict[str, int]:
        """Attribute suggestions (all, or those not yet attributed, those shown after `since` and those naming
        one of `models`) to the version that served them: the gateway's log first, then the served timeline
        (`intervals`: scope, version, start_at, end_at; `arms`: developer, scope, version, start_at, end_at of
        canary arms), for events naming one of `names`; else unknown. Returns events per way they were
        attributed."""
        c = self.cursor().con  # registered Arrow tables stay on this cursor
        c.register("intervals", intervals)
        c.register("arms", arms)
        with self._lock:
            c.execute("BEGIN TRANSACTION")
            try:
                c.execute("""
                    CREATE OR REPLACE TEMP TABLE todo AS
                    SELECT s.id, s.developer, s.team, s.shown_at, s.model FROM suggestions s
                    WHERE ?::TIMESTAMP IS NULL OR s.shown_at >= ?::TIMESTAMP
                       OR s.model IN (SELECT unnest(?::VARCHAR[]))
                       OR s.id NOT IN (SELECT suggestion_id FROM suggestion_served)""", [since, since, models or []])
                c.execute("""
                    INSERT OR REPLACE INTO suggestion_served
                    WITH gateway AS (
                        SELECT t.id, coalesce(r.scope, 'base') AS scope, r.version
                        FROM todo t ASOF JOIN (SELECT * FROM gateway_requests WHERE status = 200) r
                          ON r.developer = t.developer AND r.received_at <= t.shown_at
                        WHERE t.shown_at - r.received_at <= to_microseconds(CAST(? * 1e6 AS BIGINT))),
                    timeline AS (
                        SELECT t.id,
                               CASE WHEN d.version IS NOT NULL THEN d.scope WHEN a.version IS NOT NULL THEN a.scope
                                    WHEN m.version IS NOT NULL THEN m.scope ELSE 'base' END AS scope,
                               coalesce(d.version, a.version, m.version) AS version
                        FROM todo t
                        LEFT JOIN intervals d ON d.scope = 'dev:' || t.developer AND d.version IS NOT NULL
                             AND t.shown_at >= d.start_at AND t.shown_at < d.end_at
                        LEFT JOIN arms a ON a.developer = t.developer AND a.scope = 'team:' || t.team
                             AND t.shown_at >= a.start_at AND t.shown_at < a.end_at
                        LEFT JOIN intervals m ON m.scope = 'team:' || t.team AND m.version IS NOT NULL
                             AND t.shown_at >= m.start_at AND t.shown_at < m.end_at
                        WHERE t.model IN (SELECT unnest(?::VARCHAR[])))
                    SELECT t.id,
                           CASE WHEN g.id IS NOT NULL THEN g.scope WHEN l.id IS NOT NULL THEN l.scope END,
                           CASE WHEN g.id IS NOT NULL THEN g.version WHEN l.id IS NOT NULL THEN l.version END,
                           CASE WHEN g.id IS NOT NULL THEN 'gateway' WHEN l.id IS NOT NULL THEN 'timeline'
                                ELSE 'unknown' END,
                           ?
                    FROM todo t LEFT JOIN gateway g ON g.id = t.id LEFT JOIN timeline l ON l.id = t.id""",
                          [window_s, names, now()])
                by = dict(c.execute("SELECT v.served_by, count(*) FROM todo t JOIN suggestion_served v "
                                    "ON v.suggestion_id = t.id GROUP BY 1 ORDER BY 1").fetchall())
                c.execute("DROP TABLE todo")
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        return {str(k): int(v) for k, v in by.items()}

    def field_counts(self, since: datetime | None = None, until: datetime | None = None,
                     developers: list[str] | None = None) -> list[dict[str, Any]]:
        """Per (scope, version) that served suggestions (in a time window, of some developers): shown,
        accepted, accepted characters, developer-days, developers, kept and decided links."""
        rows = self.con.execute("""
            SELECT v.scope, coalesce(v.version, '') AS version, count(*), count(*) FILTER (WHERE s.accepted),
                   coalesce(sum(length(s.completion)) FILTER (WHERE s.accepted), 0),
                   count(DISTINCT (s.developer, CAST(s.shown_at AS DATE))), count(DISTINCT s.developer),
                   count(*) FILTER (WHERE s.accepted AND l.status = 'kept'),
                   count(*) FILTER (WHERE s.accepted AND l.status IN ('kept', 'rewritten', 'deleted'))
            FROM suggestions s JOIN suggestion_served v ON v.suggestion_id = s.id
            LEFT JOIN suggestion_links l ON l.suggestion_id = s.id
            WHERE v.served_by != 'unknown' AND (?::TIMESTAMP IS NULL OR s.shown_at >= ?::TIMESTAMP)
              AND (?::TIMESTAMP IS NULL OR s.shown_at < ?::TIMESTAMP)
              AND (?::VARCHAR[] IS NULL OR s.developer IN (SELECT unnest(?::VARCHAR[])))
            GROUP BY 1, 2 ORDER BY 1, 2""", [since, since, until, until, developers, developers]).fetchall()
        keys = ("scope", "version", "shown", "accepted", "accepted_chars", "dev_days", "developers", "kept", "linked")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def latency_by_version(self) -> dict[tuple[str, str], dict[str, float]]:
        """The gateway's p50 and p95 latency (ms) and requests per (scope, version) it answered with."""
        rows = self.con.execute(
            "SELECT coalesce(scope, 'base'), coalesce(version, ''), count(*), quantile_cont(latency_ms, 0.5), "
            "quantile_cont(latency_ms, 0.95) FROM gateway_requests WHERE status = 200 GROUP BY 1, 2").fetchall()
        return {(r[0], r[1]): {"requests": int(r[2]), "latency_p50_ms": round(r[3], 1),
                               "latency_p95_ms": round(r[4], 1)} for r in rows}

    def served_for_scope(self, scope: Scope) -> dict[str, int]:
        """A scope's suggestions by the version that served them ("team:x/v0003", "base", "unknown")."""
        column = "s.team" if scope.kind == "team" else "s.developer"
        return dict(self.con.execute(
            "SELECT CASE WHEN v.served_by = 'unknown' OR v.scope IS NULL THEN 'unknown' WHEN v.version IS NULL "
            "THEN v.scope ELSE v.scope || '/' || v.version END AS what, count(*) FROM suggestions s "
            f"JOIN suggestion_served v ON v.suggestion_id = s.id WHERE {column} = ? GROUP BY 1 ORDER BY 1",
            [scope.name]).fetchall())

    def served_counts(self) -> dict[str, int]:
        """Suggestions by how their serving version was found (gateway, timeline, unknown)."""
        return dict(self.con.execute("SELECT served_by, count(*) FROM suggestion_served GROUP BY 1 ORDER BY 1")
                    .fetchall())

    # -- runs ----------------------------------------------------------------------------------------------

    def start_run(self, run_id: str, scope: str) -> None:
        with self.transaction():
            self.con.execute("INSERT INTO runs (run_id, scope, status, stage, started_at, summary, attempts) "
                             "VALUES (?, ?, 'running', 'dataset', ?, '{}', 1)", [run_id, scope, now()])

    def update_run(self, run_id: str, *, stage: str | None = None, status: str | None = None,
                   summary: dict[str, Any] | None = None, error: str | None = None) -> None:
        sets: list[str] = []
        args: list[Any] = []
        if stage is not None:
            sets.append("stage = ?")
            args.append(stage)
        if status is not None:
            sets.append("status = ?")
            args.append(status)
            if status != "running":
                sets.append("finished_at = ?")
                args.append(now())
        if summary is not None:
            sets.append("summary = ?")
            args.append(json.dumps(summary, default=str))
        if error is not None:
            sets.append("error = ?")
            args.append(error)
        with self.transaction():
            self.con.execute(f"UPDATE runs SET {', '.join(sets)} WHERE run_id = ?", [*args, run_id])

    def resumable_run(self, scope: str, max_attempts: int) -> str | None:
        """The scope's latest run, if it stopped during training and may be tried again.

        Only the latest: once a newer run of the scope exists, an older interrupted one is stale.
        """
        row = self.con.execute(
            "SELECT run_id, status, stage, coalesce(attempts, 1) FROM runs WHERE scope = ? "
            "ORDER BY started_at DESC, run_id DESC LIMIT 1", [scope]).fetchone()
        if row is None or row[1] != "failed" or row[2] != "train" or row[3] > max_attempts:
            return None
        return str(row[0])

    def restart_run(self, run_id: str) -> int:
        """Mark an interrupted run running again; returns its attempt number."""
        with self.transaction():
            row = self.con.execute(
                "UPDATE runs SET status = 'running', finished_at = NULL, error = NULL, "
                "attempts = coalesce(attempts, 1) + 1 WHERE run_id = ? RETURNING attempts", [run_id]).fetchone()
        assert row is not None, f"no run {run_id}"
        return int(row[0])

    def latest_runs_by_scope(self, with_gate: bool = False) -> list[dict[str, Any]]:
        """The most recent run of every scope; with `with_gate`, the most recent that has a gate decision."""
        where = """WHERE summary LIKE '%"gate": {%'""" if with_gate else ""
        rows = self.con.execute(
            f"SELECT {self._RUN_COLUMNS} FROM runs {where} "
            "QUALIFY row_number() OVER (PARTITION BY scope ORDER BY started_at DESC, run_id DESC) = 1 "
            "ORDER BY scope").fetchall()
        return [_run_dict(r) for r in rows]

    _RUN_COLUMNS = "run_id, scope, status, stage, started_at, finished_at, summary, error, coalesce(attempts, 1)"

    def runs(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = self.con.execute(f"SELECT {self._RUN_COLUMNS} FROM runs ORDER BY started_at DESC, run_id DESC "
                                "LIMIT ?", [limit]).fetchall()
        return [_run_dict(r) for r in rows]

    def run(self, run_id: str) -> dict[str, Any] | None:
        row = self.con.execute(f"SELECT {self._RUN_COLUMNS} FROM runs WHERE run_id = ?", [run_id]).fetchone()
        return _run_dict(row) if row else None

    def gateway_counts(self) -> dict[str, Any]:
        """Requests the serving gateway answered, per adapter version that answered ("base" for none)."""
        by_adapter = {r[0]: {"requests": r[1], "ok": r[2], "last_at": r[3].isoformat() if r[3] else None}
                      for r in self.con.execute(
            "SELECT coalesce(scope || '/' || version, 'base'), count(*), count(*) FILTER (WHERE status = 200), "
            "max(received_at) FROM gateway_requests GROUP BY 1 ORDER BY 1").fetchall()}
        return {"total": sum(v["requests"] for v in by_adapter.values()), "by_adapter": by_adapter}

    def fail_interrupted_runs(self) -> int:
        """Mark runs left 'running' by a process that died as failed (called at service start)."""
        with self.transaction():
            row = self.con.execute(
                "UPDATE runs SET status = 'failed', finished_at = ?, "
                "error = coalesce(error, 'interrupted: the process running it stopped') "
                "WHERE status = 'running'", [now()]).fetchone()
        return int(row[0]) if row else 0


def _records(cur: duckdb.DuckDBPyConnection, record: type[R], batch_rows: int = 2000,
             release: Callable[[], None] | None = None, release_rows: int | None = None) -> Iterator[R]:
    """A query's rows as `record`s, fetched in batches so a large result never sits in memory twice. The
    query's column names must be the record's fields, in order: checked once, before the first row.

    `release` (Store.release_cache), when given, is called every `release_rows` rows (RELEASE_ROWS when None):
    a query streaming from a large table leaves each block it read cached (DuckDB keeps them until its memory
    limit presses), 420 MB for a 1M-suggestion build's read of its suggestions, which need not stay while the
    rest streams."""
    names = [d[0] for d in cur.description]
    make = getattr(record, "_make", None)  # a NamedTuple (records.LinkedSuggestion), else a dataclass
    fields = list(record._fields if make else record.__dataclass_fields__)  # type: ignore[attr-defined]
    assert names == fields, f"query columns {names} are not {record.__name__}'s fields {fields}"
    every = release_rows or RELEASE_ROWS
    since_release = 0
    while rows := cur.fetchmany(batch_rows):
        if make:
            yield from map(make, rows)
        else:
            for r in rows:
                yield record(*r)
        since_release += len(rows)
        if release is not None and since_release >= every:
            release()
            since_release = 0


# A developer's own rows, per table: the WHERE clause, and what each `?` stands for (the developer's id, or
# the list of their lower-cased identities).
_MINE: dict[str, tuple[str, tuple[str, ...]]] = {
    "suggestions": ("developer = ?", ("developer",)),
    "edit_outcomes": ("developer = ?", ("developer",)),
    "interactions": ("developer = ?", ("developer",)),
    "tabby_completions": ("developer = ?", ("developer",)),
    "tabby_actions": ("developer = ? OR completion_id IN (SELECT id FROM tabby_completions WHERE developer = ?)",
                      ("developer", "developer")),
    "commits": ("NOT opted_out AND (developer = ? OR lower(author_email) IN (SELECT unnest(?::VARCHAR[])))",
                ("developer", "ids")),
    "identities": ("developer = ? OR lower(identity) IN (SELECT unnest(?::VARCHAR[]))", ("developer", "ids")),
    "gateway_requests": ("developer = ?", ("developer",)),  # the completions the serving gateway gave them
}


# Identities shorter than this are removed with their own rows but not searched for in other rows' text:
# a 3-letter alias would otherwise turn "malice" into "m<forgotten>e".
MIN_NAMING_CHARS = 6


def request_rewrite(path: Path) -> None:
    """Ask for the store to be rewritten into a fresh file at its next open: DuckDB keeps a deleted row's bytes
    in the file (a forgotten person's text was still there after DELETE, CHECKPOINT and VACUUM) until then."""
    _rewrite_marker(path).touch()


def _rewrite_marker(path: Path) -> Path:
    return path.with_name(path.name + ".rewrite")


def _rewrite(con: duckdb.DuckDBPyConnection, path: Path) -> duckdb.DuckDBPyConnection:
    """Copy every table into a fresh file (COPY FROM DATABASE keeps keys and defaults), put it in the store's
    place and reconnect. A kill at any point leaves the old file, or the new one, and the marker until done."""
    fresh = path.with_name(path.name + ".fresh")
    for stale in (fresh, fresh.with_name(fresh.name + ".wal")):
        stale.unlink(missing_ok=True)
    started = time.monotonic()
    name = con.execute("SELECT current_database()").fetchone()[0]
    con.execute("CHECKPOINT")
    con.execute(f"ATTACH '{fresh}' AS fresh")
    con.execute(f"COPY FROM DATABASE \"{name}\" TO fresh")
    con.execute("DETACH fresh")
    con.close()
    with fresh.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(fresh, path)
    _rewrite_marker(path).unlink(missing_ok=True)
    log.info("rewrote %s without the bytes of deleted rows (%.1fs)", path, time.monotonic() - started)
    return duckdb.connect(str(path))


def _any_of(ids: list[str]) -> str:
    """An RE2 pattern matching any of `ids` (each taken literally, \\Q...\\E) case-insensitively, or nothing."""
    usable = [f"\\Q{i}\\E" for i in ids if len(i) >= MIN_NAMING_CHARS and "\\E" not in i]
    return "(?i)" + "|".join(usable) if usable else "[^\\s\\S]"


def _quarantine_of(sources: list[str], ids: list[str]) -> tuple[str, list[Any]]:
    """Quarantined lines of a developer: every line of their own sources, and any line that names them."""
    return ("source IN (SELECT unnest(?::VARCHAR[])) OR regexp_matches(excerpt, ?)", [sources, _any_of(ids)])


def _run_dict(r: tuple[Any, ...]) -> dict[str, Any]:
    return {"run_id": r[0], "scope": r[1], "status": r[2], "stage": r[3], "started_at": r[4].isoformat(),
            "finished_at": r[5].isoformat() if r[5] else None, "summary": json.loads(r[6]), "error": r[7],
            "attempts": r[8]}


def _holder(error: duckdb.IOException) -> str:
    text = str(error)
    start = text.find("(PID")
    return text[start + 1: text.find(")", start)] if start >= 0 else "unknown process"
