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
from dataclasses import dataclass, field
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
    ("0003_collectors", """
        -- Continue chat, edit and tool events that carry no accept flag on code (FORMATS.md §1.3).
        CREATE TABLE interactions (
            id VARCHAR PRIMARY KEY,           -- toolUsage: toolCallId; else sha1 of the content
            source VARCHAR NOT NULL,
            source_kind VARCHAR NOT NULL,     -- continue
            event_kind VARCHAR NOT NULL,      -- chatFeedback|chatInteraction|editInteraction|toolUsage|quickEdit
            occurred_at TIMESTAMP NOT NULL,   -- UTC
            developer VARCHAR NOT NULL,
            team VARCHAR NOT NULL,
            filepath VARCHAR,
            model VARCHAR,
            session_id VARCHAR,
            prompt VARCHAR,
            completion VARCHAR,
            label BOOLEAN,                    -- chatFeedback: thumbs up; toolUsage: the call was approved
            detail VARCHAR,                   -- JSON: the kind's other fields (tool name and arguments, diffs, ...)
            ingested_at TIMESTAMP NOT NULL
        );
        -- Tabby logs a completion and its view/select/dismiss lines separately, possibly in different day
        -- files; both are kept, and `suggestions` rows are derived from them (Store.link_tabby).
        CREATE TABLE tabby_completions (
            id VARCHAR PRIMARY KEY,           -- completion_id
            source VARCHAR NOT NULL,
            created_at TIMESTAMP NOT NULL,
            developer VARCHAR NOT NULL,
            team VARCHAR NOT NULL,
            repo VARCHAR,
            filepath VARCHAR NOT NULL,
            language VARCHAR NOT NULL,
            prefix VARCHAR,
            suffix VARCHAR,
            choices VARCHAR[] NOT NULL,
            ingested_at TIMESTAMP NOT NULL
        );
        CREATE TABLE tabby_actions (
            id VARCHAR PRIMARY KEY,           -- sha1 of the event
            completion_id VARCHAR NOT NULL,
            source VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,            -- view | select | dismiss
            acted_at TIMESTAMP NOT NULL,
            choice_index INTEGER NOT NULL,
            line_select BOOLEAN NOT NULL      -- a select of kind "line": a partial accept
        );
        -- Counters become keyed rows, so a batch stored twice (a replaced file re-read, a harvest resumed,
        -- one event arriving by file and by HTTP) is counted once.
        DROP TABLE drops;
        CREATE TABLE drops (                  -- events not stored, by reason
            source VARCHAR NOT NULL,
            reason VARCHAR NOT NULL,          -- opted_out | excluded_path | opted_out_commit
            key VARCHAR NOT NULL,             -- sha1 of the dropped event's own key
            PRIMARY KEY (source, reason, key)
        );
        DROP TABLE scrubs;
        CREATE TABLE scrubs (                 -- secrets replaced before storage
            target VARCHAR NOT NULL,          -- the table the scrubbed row went to
            key VARCHAR NOT NULL,             -- that row's key
            kind VARCHAR NOT NULL,
            count INTEGER NOT NULL,
            PRIMARY KEY (target, key, kind)
        );
        CREATE TABLE identities (             -- identities that decided an event's developer
            identity VARCHAR NOT NULL,
            source_kind VARCHAR NOT NULL,     -- continue | tabby | git
            developer VARCHAR NOT NULL,       -- what it resolved to when last seen
            mapped BOOLEAN NOT NULL,          -- named by the config ([[developers]], [[teams]], a source's developer)
            PRIMARY KEY (identity, source_kind)
        );
    """),
    # What became of each accepted suggestion in its developer's later commits (pipelines/link.py): the
    # evidence a dataset build reads instead of re-reading history, and what `kept`/`rewritten` counts rest on.
    ("0010_suggestion_links", """
        CREATE TABLE suggestion_links (
            suggestion_id VARCHAR PRIMARY KEY,
            status VARCHAR NOT NULL,          -- kept | rewritten | deleted | unknown
            reason VARCHAR NOT NULL,          -- how it was decided, e.g. exact, similar, no_commit_in_window
            repo VARCHAR,                     -- the committed file the suggestion's file maps to
            path VARCHAR,
            sha VARCHAR,                      -- the commit that decided it
            line INTEGER,                     -- 1-based line of the matched (or replacing) text in that file
            similarity DOUBLE,                -- 0-1, suggestion vs the committed text at its place, whitespace ignored
            committed_text VARCHAR,           -- rewritten: what replaced it, as a middle for the logged prefix/suffix
            window_closes_at TIMESTAMP NOT NULL,
            linked_at TIMESTAMP NOT NULL
        );
    """),
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
LINK_SCHEMA = pa.schema([
    ("suggestion_id", pa.string()), ("status", pa.string()), ("reason", pa.string()), ("repo", pa.string()),
    ("path", pa.string()), ("sha", pa.string()), ("line", pa.int32()), ("similarity", pa.float64()),
    ("committed_text", pa.string()), ("window_closes_at", pa.timestamp("us")), ("linked_at", pa.timestamp("us")),
])
EDIT_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("source_kind", pa.string()), ("event_kind", pa.string()),
    ("decided_at", pa.timestamp("us")), ("developer", pa.string()), ("team", pa.string()), ("repo", pa.string()),
    ("filepath", pa.string()), ("accepted", pa.bool_()), ("instruction", pa.string()),
    ("before_text", pa.string()), ("after_text", pa.string()), ("model", pa.string()),
    ("ingested_at", pa.timestamp("us")),
])
INTERACTION_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("source_kind", pa.string()), ("event_kind", pa.string()),
    ("occurred_at", pa.timestamp("us")), ("developer", pa.string()), ("team", pa.string()),
    ("filepath", pa.string()), ("model", pa.string()), ("session_id", pa.string()), ("prompt", pa.string()),
    ("completion", pa.string()), ("label", pa.bool_()), ("detail", pa.string()), ("ingested_at", pa.timestamp("us")),
])
TABBY_COMPLETION_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("created_at", pa.timestamp("us")), ("developer", pa.string()),
    ("team", pa.string()), ("repo", pa.string()), ("filepath", pa.string()), ("language", pa.string()),
    ("prefix", pa.string()), ("suffix", pa.string()), ("choices", pa.list_(pa.string())),
    ("ingested_at", pa.timestamp("us")),
])
TABBY_ACTION_SCHEMA = pa.schema([
    ("id", pa.string()), ("completion_id", pa.string()), ("source", pa.string()), ("kind", pa.string()),
    ("acted_at", pa.timestamp("us")), ("choice_index", pa.int32()), ("line_select", pa.bool_()),
])
DROP_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string()), ("key", pa.string())])
SCRUB_SCHEMA = pa.schema([("target", pa.string()), ("key", pa.string()), ("kind", pa.string()),
                          ("count", pa.int32())])
IDENTITY_SCHEMA = pa.schema([("identity", pa.string()), ("source_kind", pa.string()), ("developer", pa.string()),
                             ("mapped", pa.bool_())])
REJECT_SCHEMA = pa.schema([
    ("source", pa.string()), ("stream", pa.string()), ("offset", pa.int64()), ("length", pa.int64()),
    ("line_sha1", pa.string()), ("reason", pa.string()), ("excerpt", pa.string()),
    ("quarantined_at", pa.timestamp("us")),
])


# Per table: its Arrow schema, its primary key (for dropping in-batch duplicates: two rows with one key in a
# single INSERT make ON CONFLICT fail, so the first wins, as it does against rows stored by earlier
# batches) and what a conflict does.
@dataclass(frozen=True)
class Table:
    name: str
    schema: pa.Schema
    key: tuple[str, ...]
    on_conflict: str = "DO NOTHING"


# One event can arrive twice with different amounts of text: a Continue `data:` destination at level noCode
# sends no code, the local file sends all of it. The copy with text fills in what the other lacks.
_FILL_TEXT = ("DO UPDATE SET prefix = excluded.prefix, prefix_compiled = excluded.prefix_compiled, "
              "prefix_recovery = excluded.prefix_recovery, suffix = excluded.suffix, completion = excluded.completion "
              "WHERE suggestions.prefix_compiled IS NULL AND excluded.prefix_compiled IS NOT NULL")
_FILL_EDIT = ("DO UPDATE SET instruction = excluded.instruction, before_text = excluded.before_text, "
              "after_text = excluded.after_text "
              "WHERE edit_outcomes.after_text IS NULL AND excluded.after_text IS NOT NULL")
TABLES = {t.name: t for t in (
    Table("suggestions", SUGGESTION_SCHEMA, ("id",), _FILL_TEXT),
    Table("edit_outcomes", EDIT_SCHEMA, ("id",), _FILL_EDIT),
    Table("interactions", INTERACTION_SCHEMA, ("id",)),
    Table("commits", COMMIT_SCHEMA, ("sha",)),
    Table("commit_files", FILE_SCHEMA, ("sha", "path")),
    Table("blobs", BLOB_SCHEMA, ("blob",)),
    Table("tabby_completions", TABBY_COMPLETION_SCHEMA, ("id",)),
    Table("tabby_actions", TABBY_ACTION_SCHEMA, ("id",)),
    Table("quarantine", REJECT_SCHEMA, ("source", "stream", "offset", "line_sha1")),
    Table("drops", DROP_SCHEMA, ("source", "reason", "key")),
    Table("scrubs", SCRUB_SCHEMA, ("target", "key", "kind")),
    # An identity resolves as the config says now: a later sighting after a config change updates it.
    Table("identities", IDENTITY_SCHEMA, ("identity", "source_kind"),
          "DO UPDATE SET developer = excluded.developer, mapped = excluded.mapped"),
)}


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
    """Rows for one batch, per table, ready for a bulk insert (see TABLES)."""

    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    tabby_touched: set[str] = field(default_factory=set)  # completion ids whose suggestion may change

    def add(self, table: str, row: dict[str, Any]) -> None:
        assert table in TABLES, table
        self.tables.setdefault(table, []).append(row)

    def count(self, table: str) -> int:
        return len(self.tables.get(table, ()))


@dataclass(frozen=True)
class Applied:
    """What one batch changed in the store."""

    suggestions: int
    commits: int
    rejects: int
    edits: int = 0
    interactions: int = 0


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
        # DuckDB checkpoints (compresses and writes the WAL into the file) every 16 MB of WAL by default: with
        # 2-20 KB events that is every few batches. 64 MB made the ingest's storage path 1.4-1.5x faster and
        # the file 25% smaller (bigger checkpoints compress better; bench/README.md), while keeping the WAL a
        # crash replays small.
        con.execute("SET checkpoint_threshold = '64MB'")
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

    def apply_batch(self, source: str, rows: Rows, cursor: Cursor | None,
                    settle: tuple[dict[str, Any], ...] = ()) -> Applied:
        """Store one batch and its cursor atomically; rows already present are left as they are.

        `settle` lists quarantine rows (by their key columns) that this batch resolves: they are deleted in the
        same transaction (`devtune quarantine retry`).
        """
        with self.transaction():
            n = {name: self._insert(TABLES[name], rows.tables[name]) for name in rows.tables if rows.tables[name]}
            if rows.tabby_touched:
                self.link_tabby(rows.tabby_touched)
            for q in settle:
                self.con.execute('DELETE FROM quarantine WHERE source = ? AND stream = ? AND "offset" = ? '
                                 "AND line_sha1 = ?", [q["source"], q["stream"], q["offset"], q["line_sha1"]])
            if cursor is not None:
                self.con.execute(
                    "INSERT OR REPLACE INTO cursors VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [source, cursor.stream, cursor.offset, cursor.head_sha1, cursor.head_len, cursor.sha, now()])
        return Applied(suggestions=n.get("suggestions", 0), commits=n.get("commits", 0),
                       rejects=n.get("quarantine", 0), edits=n.get("edit_outcomes", 0),
                       interactions=n.get("interactions", 0))

    def _insert(self, table: Table, rows: list[dict[str, Any]]) -> int:
        batch = pa.Table.from_pylist(_unique(rows, table.key), schema=table.schema)  # noqa: F841 - read by DuckDB
        cols = ", ".join(f'"{c}"' for c in table.schema.names)
        result = self.con.execute(f"INSERT INTO {table.name} ({cols}) SELECT {cols} FROM batch "
                                  f"ON CONFLICT {table.on_conflict}")
        row = result.fetchone()
        return int(row[0]) if row else 0

    def link_tabby(self, completion_ids: set[str]) -> None:
        """(Re)derive the suggestions of these Tabby completions from every action stored for them.

        Shown = at least one view, select or dismiss; accepted = any select; partial = every select was
        kind "line"; the text is the chosen choice (FORMATS.md §2.3). Called with the batch that stored
        the lines, so a select arriving a day later flips its suggestion to accepted.
        """
        touched = pa.table({"id": sorted(completion_ids)})  # noqa: F841 - read by DuckDB
        self.con.execute("""
            INSERT INTO suggestions (id, source, source_kind, event_kind, shown_at, developer, team, repo, filepath,
                                     language, accepted, partial, prefix, prefix_compiled, prefix_recovery, suffix,
                                     completion, model, ingested_at)
            SELECT c.id, c.source, 'tabby', 'completion', a.shown_at, c.developer, c.team, c.repo, c.filepath,
                   c.language, a.selects > 0, a.selects > 0 AND a.full_selects = 0, c.prefix, c.prefix, 'raw',
                   c.suffix, c.choices[a.choice + 1], NULL, ?
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
            "commits": {"total": commits, "by_repo": commits_by_repo},
            "quarantined": {"total": quarantined, "by_source": q_by_source},
            "dropped": drops,
            "dropped_by_source": drops_by_source,
            "scrubbed": scrubs,
            "scrubbed_by_table": scrubs_by_table,
            "unassigned": unassigned,
        }

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
                          ) -> Iterator[dict[str, Any]]:
        """Every suggestion of a scope (a team's, or one developer's) with its link, oldest first.

        Prefix and suffix come cut to one character more than the dataset keeps, so `clip_prefix` /
        `clip_suffix` still see a cut to move to a line boundary, without pulling whole files into Python.
        """
        column = "s.team" if scope.kind == "team" else "s.developer"
        cur = self.con.execute(
            "SELECT s.id, s.source_kind, s.developer, s.shown_at, s.repo, s.filepath, s.accepted, s.partial, "
            "right(s.prefix, ?) AS prefix, left(s.suffix, ?) AS suffix, s.completion, "
            "l.status AS link_status, l.committed_text, l.repo AS link_repo, l.path AS link_path "
            "FROM suggestions s LEFT JOIN suggestion_links l ON l.suggestion_id = s.id "
            f"WHERE {column} = ? ORDER BY s.shown_at, s.id",
            [max_prefix_chars + 1, max_suffix_chars + 1, scope.name])
        yield from _dicts(cur)

    def count_scope_suggestions(self, scope: Scope) -> int:
        column = "team" if scope.kind == "team" else "developer"
        row = self.con.execute(f"SELECT count(*) FROM suggestions WHERE {column} = ?", [scope.name]).fetchone()
        return int(row[0]) if row else 0

    def scope_edit_outcomes(self, scope: Scope) -> Iterator[dict[str, Any]]:
        """Continue edit outcomes of a scope, oldest first."""
        column = "team" if scope.kind == "team" else "developer"
        cur = self.con.execute(
            "SELECT id, event_kind, developer, decided_at, repo, filepath, accepted, instruction, before_text, "
            f"after_text FROM edit_outcomes WHERE {column} = ? ORDER BY decided_at, id", [scope.name])
        yield from _dicts(cur)

    def committed_files(self, scope: Scope) -> Iterator[dict[str, Any]]:
        """Files a scope's commits added lines to, with the content after the commit, oldest first."""
        column = "c.team" if scope.kind == "team" else "c.developer"
        cur = self.con.execute(
            "SELECT c.sha, c.developer, c.committed_at, f.path, f.added, b.content "
            "FROM commits c JOIN commit_files f ON f.sha = c.sha JOIN blobs b ON b.blob = f.blob "
            f"WHERE {column} = ? AND NOT c.opted_out AND len(f.added) > 0 "
            "ORDER BY c.committed_at, c.sha, f.path", [scope.name])
        yield from _dicts(cur)

    # -- linking -------------------------------------------------------------------------------------------

    def repo_paths(self) -> dict[str, list[str]]:
        """Every file path each repository's stored commits touched: what suggestion paths are mapped onto."""
        out: dict[str, list[str]] = {}
        for repo, path in self.con.execute(
                "SELECT DISTINCT c.repo, f.path FROM commits c JOIN commit_files f ON f.sha = c.sha "
                "WHERE NOT c.opted_out ORDER BY 1, 2").fetchall():
            out.setdefault(repo, []).append(path)
        return out

    def suggestions_to_link(self) -> Iterator[dict[str, Any]]:
        """Accepted suggestions whose link may still change: never linked, linked before their window closed,
        or left unknown and followed by newly stored commits of their developer."""
        cur = self.con.execute(
            "SELECT s.id, s.developer, s.shown_at, s.repo, s.filepath FROM suggestions s "
            "LEFT JOIN suggestion_links l ON l.suggestion_id = s.id "
            "WHERE s.accepted AND s.prefix IS NOT NULL AND s.completion IS NOT NULL AND (l.suggestion_id IS NULL "
            "OR l.linked_at < l.window_closes_at OR (l.status = 'unknown' AND EXISTS (SELECT 1 FROM commits c "
            "WHERE c.developer = s.developer AND c.ingested_at > l.linked_at))) ORDER BY s.id")
        yield from _dicts(cur)

    def link_groups(self, mapped: pa.Table, window_h: float
                    ) -> tuple[Iterator[dict[str, Any]], Iterator[dict[str, Any]]]:
        """Two streams sorted alike by (repo, path, developer): the mapped suggestions (`mapped` holds id, repo,
        path), and every version of those files their developers committed inside some suggestion's window.

        They come as two streams, merged by the caller, so no more than one file's history is held at once.
        """
        sug = self.con.cursor()
        sug.register("mapped", mapped)
        suggestions = sug.execute(
            "SELECT m.repo, m.path, s.developer, s.id, s.shown_at, s.partial, s.prefix, s.suffix, s.completion "
            "FROM mapped m JOIN suggestions s ON s.id = m.id ORDER BY m.repo, m.path, s.developer, s.shown_at, s.id")
        com = self.con.cursor()
        com.register("mapped", mapped)
        versions = com.execute(
            "WITH wanted AS (SELECT m.repo, m.path, s.developer, min(s.shown_at) AS first_at, "
            "  max(s.shown_at) + to_microseconds(CAST(? * 3600e6 AS BIGINT)) AS last_at "
            "  FROM mapped m JOIN suggestions s ON s.id = m.id GROUP BY ALL) "
            "SELECT w.repo, w.path, c.developer, c.sha, c.committed_at, f.status, b.content "
            "FROM wanted w JOIN commits c ON c.repo = w.repo AND c.developer = w.developer "
            "  AND c.committed_at > w.first_at AND c.committed_at <= w.last_at "
            "JOIN commit_files f ON f.sha = c.sha AND f.path = w.path LEFT JOIN blobs b ON b.blob = f.blob "
            "WHERE NOT c.opted_out ORDER BY w.repo, w.path, c.developer, c.committed_at, c.sha", [window_h])
        return _dicts(suggestions), _dicts(versions)

    def save_links(self, rows: list[dict[str, Any]]) -> None:
        """Insert or replace links (a relink replaces the earlier decision)."""
        if not rows:
            return
        batch = pa.Table.from_pylist(rows, schema=LINK_SCHEMA)  # noqa: F841 - read by DuckDB
        with self.transaction():
            self.con.execute("INSERT OR REPLACE INTO suggestion_links SELECT * FROM batch")

    def link_counts(self) -> dict[str, int]:
        return dict(self.con.execute("SELECT status, count(*) FROM suggestion_links GROUP BY 1 ORDER BY 1")
                    .fetchall())

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


def _dicts(cur: duckdb.DuckDBPyConnection, batch_rows: int = 2000) -> Iterator[dict[str, Any]]:
    """A query's rows as dicts, fetched in batches so a large result never sits in memory twice."""
    names = [d[0] for d in cur.description]
    while rows := cur.fetchmany(batch_rows):
        for r in rows:
            yield dict(zip(names, r, strict=True))


def _run_dict(r: tuple[Any, ...]) -> dict[str, Any]:
    return {"run_id": r[0], "scope": r[1], "status": r[2], "stage": r[3], "started_at": r[4].isoformat(),
            "finished_at": r[5].isoformat() if r[5] else None, "summary": json.loads(r[6]), "error": r[7],
            "attempts": r[8]}


def _holder(error: duckdb.IOException) -> str:
    text = str(error)
    start = text.find("(PID")
    return text[start + 1: text.find(")", start)] if start >= 0 else "unknown process"
