"""The DuckDB store: every SQL statement devtune runs lives in this module.

DuckDB allows one read-write process per database file, and in 2.0 a second process cannot even open it
read-only while the first holds it. The service therefore keeps one connection for its lifetime and
hands each thread a cursor; CLI commands reach the store through the service's local API while it runs,
and open the file themselves (waiting up to `lock_timeout_s` for a short-lived holder) when it does not.

Schema changes are named migrations, applied in order and recorded in `schema_migrations`.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from collectors.base import Cursor
from pipelines.scope import Scope

MIGRATIONS: list[tuple[str, str]] = [
    ("0001_initial", """
        CREATE TABLE suggestions (
            id VARCHAR PRIMARY KEY,          -- the writer's id: Continue completionId, Tabby completion_id
            source VARCHAR NOT NULL,         -- [[sources]] name it was first collected from
            source_kind VARCHAR NOT NULL,    -- continue | tabby
            event_kind VARCHAR NOT NULL,     -- autocomplete | ...
            shown_at TIMESTAMP NOT NULL,     -- UTC
            developer VARCHAR NOT NULL,
            team VARCHAR NOT NULL,
            repo VARCHAR,                    -- owner/name, lower case
            filepath VARCHAR NOT NULL,
            language VARCHAR NOT NULL,
            accepted BOOLEAN NOT NULL,
            partial BOOLEAN NOT NULL,
            prefix VARCHAR,                  -- raw editor prefix (NULL when it could not be recovered)
            prefix_compiled VARCHAR,         -- the prefix as logged
            prefix_recovery VARCHAR NOT NULL,
            suffix VARCHAR,
            completion VARCHAR,
            model VARCHAR,
            ingested_at TIMESTAMP NOT NULL
        );
        CREATE TABLE commits (
            sha VARCHAR PRIMARY KEY,
            repo VARCHAR NOT NULL,
            source VARCHAR NOT NULL,
            parents VARCHAR[] NOT NULL,
            author_name VARCHAR,             -- NULL for an opted-out author (only the sha and time are kept)
            author_email VARCHAR,
            developer VARCHAR NOT NULL,
            team VARCHAR NOT NULL,
            authored_at TIMESTAMP NOT NULL,
            committed_at TIMESTAMP NOT NULL,
            message VARCHAR,
            opted_out BOOLEAN NOT NULL,
            ingested_at TIMESTAMP NOT NULL
        );
        CREATE TABLE commit_files (
            sha VARCHAR NOT NULL,
            path VARCHAR NOT NULL,
            status VARCHAR NOT NULL,          -- A, M, D, T
            blob VARCHAR,                     -- NULL when deleted or when the content was not kept
            added INTEGER[][] NOT NULL,       -- [[first, last], ...] 1-based line ranges the commit added
            diff VARCHAR NOT NULL,
            PRIMARY KEY (sha, path)
        );
        CREATE TABLE blobs (
            blob VARCHAR PRIMARY KEY,         -- git blob sha of the original; content is scrubbed
            content VARCHAR NOT NULL
        );
        CREATE TABLE cursors (
            source VARCHAR NOT NULL,
            stream VARCHAR NOT NULL,
            "offset" BIGINT NOT NULL,
            head_sha1 VARCHAR NOT NULL,
            head_len INTEGER NOT NULL,
            sha VARCHAR NOT NULL,
            updated_at TIMESTAMP NOT NULL,
            PRIMARY KEY (source, stream)
        );
        CREATE TABLE quarantine (
            source VARCHAR NOT NULL,
            stream VARCHAR NOT NULL,
            "offset" BIGINT NOT NULL,
            length BIGINT NOT NULL,
            line_sha1 VARCHAR NOT NULL,
            reason VARCHAR NOT NULL,
            excerpt VARCHAR NOT NULL,         -- scrubbed
            quarantined_at TIMESTAMP NOT NULL,
            PRIMARY KEY (source, stream, "offset", line_sha1)
        );
        CREATE TABLE drops (                  -- events not stored, by reason (counted once per batch)
            source VARCHAR NOT NULL,
            reason VARCHAR NOT NULL,
            count BIGINT NOT NULL,
            PRIMARY KEY (source, reason)
        );
        CREATE TABLE scrubs (                 -- secrets replaced before storage, by kind
            kind VARCHAR PRIMARY KEY,
            count BIGINT NOT NULL
        );
        CREATE TABLE runs (
            run_id VARCHAR PRIMARY KEY,
            scope VARCHAR NOT NULL,
            status VARCHAR NOT NULL,          -- running | succeeded | failed | skipped
            stage VARCHAR NOT NULL,           -- the stage it is in or stopped at
            started_at TIMESTAMP NOT NULL,
            finished_at TIMESTAMP,
            summary VARCHAR NOT NULL,         -- JSON: counts, timings, metrics, gate decision
            error VARCHAR
        );
    """),
    # Continue Edit-mode and Next Edit outcomes (FORMATS.md §1.3): an accepted or rejected rewrite of a
    # region, the signal for chat-format SFT rows and edit preference pairs.
    ("0002_edit_outcomes", """
        CREATE TABLE edit_outcomes (
            id VARCHAR PRIMARY KEY,           -- nextEditOutcome: completionId; editOutcome: sha1 of its content
            source VARCHAR NOT NULL,
            source_kind VARCHAR NOT NULL,     -- continue
            event_kind VARCHAR NOT NULL,      -- editOutcome | nextEditOutcome
            decided_at TIMESTAMP NOT NULL,    -- UTC
            developer VARCHAR NOT NULL,
            team VARCHAR NOT NULL,
            repo VARCHAR,
            filepath VARCHAR NOT NULL,
            accepted BOOLEAN NOT NULL,
            instruction VARCHAR,              -- editOutcome: the user's instruction; nextEdit: NULL
            before_text VARCHAR,              -- editOutcome: previousCode; nextEdit: originalEditableRange
            after_text VARCHAR,               -- editOutcome: newCode; nextEdit: completion
            model VARCHAR,
            ingested_at TIMESTAMP NOT NULL
        );
    """),
    # Migration names by area, so parallel work never collides: 0003-0009 collectors and ingest,
    # 0010-0019 datasets, 0020-0029 training and registry.
    # A run interrupted in training (kill -9, service stop, timeout) is resumed by a later cycle from its
    # checkpoint, in the same run directory; `attempts` counts how often it was started, so a run that
    # fails the same way every time is given up after [train] resume_attempts.
    ("0020_run_attempts", """
        ALTER TABLE runs ADD COLUMN attempts INTEGER DEFAULT 1;
    """),
]


class StoreBusy(Exception):
    """Another process holds the store; the message says which and what to do."""


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


# Arrow schemas for bulk inserts: explicit, so an all-NULL column in a batch is not inferred as type null.
SUGGESTION_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("source_kind", pa.string()), ("event_kind", pa.string()),
    ("shown_at", pa.timestamp("us")), ("developer", pa.string()), ("team", pa.string()),
    ("repo", pa.string()), ("filepath", pa.string()), ("language", pa.string()), ("accepted", pa.bool_()),
    ("partial", pa.bool_()), ("prefix", pa.string()), ("prefix_compiled", pa.string()),
    ("prefix_recovery", pa.string()), ("suffix", pa.string()), ("completion", pa.string()),
    ("model", pa.string()), ("ingested_at", pa.timestamp("us")),
])
COMMIT_SCHEMA = pa.schema([
    ("sha", pa.string()), ("repo", pa.string()), ("source", pa.string()), ("parents", pa.list_(pa.string())),
    ("author_name", pa.string()), ("author_email", pa.string()), ("developer", pa.string()),
    ("team", pa.string()), ("authored_at", pa.timestamp("us")), ("committed_at", pa.timestamp("us")),
    ("message", pa.string()), ("opted_out", pa.bool_()), ("ingested_at", pa.timestamp("us")),
])
FILE_SCHEMA = pa.schema([
    ("sha", pa.string()), ("path", pa.string()), ("status", pa.string()), ("blob", pa.string()),
    ("added", pa.list_(pa.list_(pa.int32()))), ("diff", pa.string()),
])
BLOB_SCHEMA = pa.schema([("blob", pa.string()), ("content", pa.string())])
REJECT_SCHEMA = pa.schema([
    ("source", pa.string()), ("stream", pa.string()), ("offset", pa.int64()), ("length", pa.int64()),
    ("line_sha1", pa.string()), ("reason", pa.string()), ("excerpt", pa.string()),
    ("quarantined_at", pa.timestamp("us")),
])


# Primary keys, for dropping in-batch duplicates: two rows with one key in a single INSERT make ON CONFLICT
# fail, so the first wins, as it does against rows stored by earlier batches.
KEYS = {
    "suggestions": ("id",), "commits": ("sha",), "commit_files": ("sha", "path"), "blobs": ("blob",),
    "quarantine": ("source", "stream", "offset", "line_sha1"),
}


def _unique(rows: list[dict[str, Any]], key: tuple[str, ...]) -> list[dict[str, Any]]:
    seen: set[tuple[Any, ...]] = set()
    out = []
    for r in rows:
        k = tuple(r[c] for c in key)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


@dataclass
class Rows:
    """Column-oriented rows for one batch, ready for a bulk insert."""

    suggestions: list[dict[str, Any]]
    commits: list[dict[str, Any]]
    files: list[dict[str, Any]]
    blobs: list[dict[str, Any]]
    rejects: list[dict[str, Any]]
    drops: dict[str, int]
    scrubs: dict[str, int]


@dataclass(frozen=True)
class Applied:
    """What one batch changed in the store."""

    suggestions: int
    commits: int
    rejects: int


class Store:
    """One DuckDB connection (or a per-thread cursor on it) and devtune's queries."""

    def __init__(self, con: duckdb.DuckDBPyConnection, path: Path):
        self.con = con
        self.path = path
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, lock_timeout_s: float = 0.0) -> Store:
        """Open (creating and migrating) the store, waiting up to `lock_timeout_s` for another process."""
        path.parent.mkdir(parents=True, exist_ok=True)
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
        store = cls(con, path)
        store.migrate()
        return store

    def close(self) -> None:
        self.con.close()

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

    def apply_batch(self, source: str, rows: Rows, cursor: Cursor) -> Applied:
        """Store one batch and its cursor atomically; rows already present are left as they are."""
        with self.transaction():
            n_sug = self._insert("suggestions", rows.suggestions, SUGGESTION_SCHEMA)
            n_com = self._insert("commits", rows.commits, COMMIT_SCHEMA)
            self._insert("commit_files", rows.files, FILE_SCHEMA)
            self._insert("blobs", rows.blobs, BLOB_SCHEMA)
            n_rej = self._insert("quarantine", rows.rejects, REJECT_SCHEMA)
            for reason, n in rows.drops.items():
                self.con.execute("INSERT INTO drops VALUES (?, ?, ?) ON CONFLICT (source, reason) "
                                 "DO UPDATE SET count = count + excluded.count", [source, reason, n])
            for kind, n in rows.scrubs.items():
                self.con.execute("INSERT INTO scrubs VALUES (?, ?) ON CONFLICT (kind) "
                                 "DO UPDATE SET count = count + excluded.count", [kind, n])
            self.con.execute(
                "INSERT OR REPLACE INTO cursors VALUES (?, ?, ?, ?, ?, ?, ?)",
                [source, cursor.stream, cursor.offset, cursor.head_sha1, cursor.head_len, cursor.sha, now()])
        return Applied(suggestions=n_sug, commits=n_com, rejects=n_rej)

    def _insert(self, table: str, rows: list[dict[str, Any]], schema: pa.Schema) -> int:
        if not rows:
            return 0
        batch = pa.Table.from_pylist(_unique(rows, KEYS[table]), schema=schema)  # noqa: F841 - read by DuckDB
        cols = ", ".join(f'"{c}"' for c in schema.names)
        result = self.con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM batch ON CONFLICT DO NOTHING")
        row = result.fetchone()
        return int(row[0]) if row else 0

    # -- status --------------------------------------------------------------------------------------------

    def counts(self) -> dict[str, Any]:
        """Totals for `devtune status`."""
        c = self.con
        total, accepted = c.execute(
            "SELECT count(*), count(*) FILTER (WHERE accepted) FROM suggestions").fetchone() or (0, 0)
        by_source = {r[0]: {"total": r[1], "accepted": r[2]} for r in c.execute(
            "SELECT source, count(*), count(*) FILTER (WHERE accepted) FROM suggestions GROUP BY 1 ORDER BY 1"
        ).fetchall()}
        commits = (c.execute("SELECT count(*) FROM commits").fetchone() or (0,))[0]
        commits_by_repo = dict(c.execute("SELECT repo, count(*) FROM commits GROUP BY 1 ORDER BY 1").fetchall())
        quarantined = (c.execute("SELECT count(*) FROM quarantine").fetchone() or (0,))[0]
        q_by_source = dict(c.execute("SELECT source, count(*) FROM quarantine GROUP BY 1 ORDER BY 1").fetchall())
        drops: dict[str, int] = {}
        for reason, n in c.execute("SELECT reason, sum(count) FROM drops GROUP BY 1 ORDER BY 1").fetchall():
            drops[reason] = int(n)
        scrubs = {k: int(n) for k, n in c.execute("SELECT kind, count FROM scrubs ORDER BY kind").fetchall()}
        return {
            "suggestions": {"total": total, "accepted": accepted, "rejected": total - accepted,
                            "by_source": by_source},
            "commits": {"total": commits, "by_repo": commits_by_repo},
            "quarantined": {"total": quarantined, "by_source": q_by_source},
            "dropped": drops,
            "scrubbed": scrubs,
        }

    def quarantined(self, limit: int = 50) -> list[dict[str, Any]]:
        rows = self.con.execute(
            'SELECT source, stream, "offset", reason, excerpt, quarantined_at FROM quarantine '
            'ORDER BY quarantined_at DESC, source, stream, "offset" LIMIT ?', [limit]).fetchall()
        return [{"source": r[0], "stream": r[1], "offset": r[2], "reason": r[3], "excerpt": r[4],
                 "quarantined_at": r[5].isoformat()} for r in rows]

    # -- datasets ------------------------------------------------------------------------------------------

    def accepted_suggestions(self, scope: Scope) -> list[dict[str, Any]]:
        """Accepted suggestions of a scope (a team's, or one developer's) whose raw prefix is known, oldest first."""
        column = "team" if scope.kind == "team" else "developer"
        cur = self.con.execute(
            "SELECT id, developer, shown_at, filepath, language, prefix, suffix, completion, partial "
            f"FROM suggestions WHERE {column} = ? AND accepted AND prefix IS NOT NULL AND completion IS NOT NULL "
            "ORDER BY shown_at, id", [scope.name])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def committed_files(self, scope: Scope) -> Iterator[dict[str, Any]]:
        """Files a scope's commits added lines to, with the content after the commit, oldest first."""
        column = "c.team" if scope.kind == "team" else "c.developer"
        cur = self.con.execute(
            "SELECT c.sha, c.developer, c.committed_at, f.path, f.added, b.content "
            "FROM commits c JOIN commit_files f ON f.sha = c.sha JOIN blobs b ON b.blob = f.blob "
            f"WHERE {column} = ? AND NOT c.opted_out AND len(f.added) > 0 "
            "ORDER BY c.committed_at, c.sha, f.path", [scope.name])
        names = [d[0] for d in cur.description]
        while rows := cur.fetchmany(1000):
            for r in rows:
                yield dict(zip(names, r, strict=True))

    def team_developers(self, team: str) -> list[str]:
        """Every developer with suggestions or (not opted-out) commits in `team`, sorted."""
        rows = self.con.execute(
            "SELECT developer FROM suggestions WHERE team = ? UNION "
            "SELECT developer FROM commits WHERE team = ? AND NOT opted_out ORDER BY 1", [team, team]).fetchall()
        return [r[0] for r in rows if r[0]]

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

    def fail_interrupted_runs(self) -> int:
        """Mark runs left 'running' by a process that died as failed (called at service start)."""
        with self.transaction():
            row = self.con.execute(
                "UPDATE runs SET status = 'failed', finished_at = ?, "
                "error = coalesce(error, 'interrupted: the process running it stopped') "
                "WHERE status = 'running'", [now()]).fetchone()
        return int(row[0]) if row else 0


def _run_dict(r: tuple[Any, ...]) -> dict[str, Any]:
    return {"run_id": r[0], "scope": r[1], "status": r[2], "stage": r[3], "started_at": r[4].isoformat(),
            "finished_at": r[5].isoformat() if r[5] else None, "summary": json.loads(r[6]), "error": r[7],
            "attempts": r[8]}


def _holder(error: duckdb.IOException) -> str:
    text = str(error)
    start = text.find("(PID")
    return text[start + 1: text.find(")", start)] if start >= 0 else "unknown process"
