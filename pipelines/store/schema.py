"""Every table ingest writes, declared once: one frozen dataclass per row shape.

A row class's fields are the table's columns, in the table's order; the Arrow schema of a bulk insert
and the insert's column list are derived from it (`arrow_schema`, `Table.columns`). The migrations that
create the tables are history and are not rewritten, so `tests/test_store.py` checks that the tables they
leave have exactly these columns and types.

`Int32` marks an INTEGER column (a plain `int` is BIGINT); `list[...]` is a DuckDB list column.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import typing
from dataclasses import dataclass
from datetime import datetime
from types import NoneType, UnionType
from typing import Annotated, Any

import pyarrow as pa

Int32 = Annotated[int, "INTEGER"]


@dataclass(frozen=True, slots=True)
class SuggestionRow:
    id: str  # the writer's id: Continue completionId, Tabby completion_id
    source: str  # [[sources]] name it was first collected from
    source_kind: str  # continue | tabby
    event_kind: str  # autocomplete | completion | ...
    shown_at: datetime  # UTC
    developer: str
    team: str
    repo: str | None  # owner/name, lower case
    filepath: str
    language: str
    accepted: bool
    partial: bool
    prefix: str | None  # raw editor prefix (None when it could not be recovered)
    prefix_compiled: str | None  # the prefix as logged
    prefix_recovery: str
    suffix: str | None
    completion: str | None
    model: str | None
    ingested_at: datetime
    # When the logged prefix is the raw one after a template's header, only the header is kept and
    # prefix_compiled is NULL: the logged prefix is prefix_header || prefix (see migration 0060).
    prefix_header: str | None = None


@dataclass(frozen=True, slots=True)
class CommitRow:
    sha: str
    repo: str
    source: str
    parents: list[str]
    author_name: str | None  # None for an opted-out author (only the sha and time are kept)
    author_email: str | None
    developer: str
    team: str
    authored_at: datetime
    committed_at: datetime
    message: str | None
    opted_out: bool
    ingested_at: datetime


@dataclass(frozen=True, slots=True)
class CommitFileRow:
    sha: str
    path: str
    status: str  # A, M, D, T
    blob: str | None  # None when deleted or when the content was not kept
    added: list[list[Int32]]  # [[first, last], ...] 1-based line ranges the commit added
    diff: str


@dataclass(frozen=True, slots=True)
class BlobRow:
    blob: str  # git blob sha of the original; content is scrubbed
    content: str


@dataclass(frozen=True, slots=True)
class EditOutcomeRow:
    id: str  # nextEditOutcome: completionId; editOutcome: sha1 of its content
    source: str
    source_kind: str
    event_kind: str  # editOutcome | nextEditOutcome
    decided_at: datetime
    developer: str
    team: str
    repo: str | None
    filepath: str
    accepted: bool
    instruction: str | None
    before_text: str | None
    after_text: str | None
    model: str | None
    ingested_at: datetime


@dataclass(frozen=True, slots=True)
class InteractionRow:
    id: str  # toolUsage: toolCallId; else sha1 of the content
    source: str
    source_kind: str
    event_kind: str
    occurred_at: datetime
    developer: str
    team: str
    filepath: str | None
    model: str | None
    session_id: str | None
    prompt: str | None
    completion: str | None
    label: bool | None  # chatFeedback: thumbs up; toolUsage: the call was approved
    detail: str | None  # JSON: the kind's other fields
    ingested_at: datetime


@dataclass(frozen=True, slots=True)
class TabbyCompletionRow:
    id: str  # completion_id
    source: str
    created_at: datetime
    developer: str
    team: str
    repo: str | None
    filepath: str
    language: str
    prefix: str | None
    suffix: str | None
    choices: list[str]
    ingested_at: datetime


@dataclass(frozen=True, slots=True)
class TabbyActionRow:
    id: str  # sha1 of the event
    completion_id: str
    source: str
    kind: str  # view | select | dismiss
    acted_at: datetime
    choice_index: Int32
    line_select: bool  # a select of kind "line": a partial accept
    developer: str | None  # who acted (None: before migration 0005, when its completion was never stored)


@dataclass(frozen=True, slots=True)
class QuarantineRow:
    source: str
    stream: str
    offset: int
    length: int
    line_sha1: str
    reason: str
    excerpt: str  # scrubbed
    quarantined_at: datetime


@dataclass(frozen=True, slots=True)
class DropRow:
    source: str
    reason: str  # opted_out | excluded_path | opted_out_commit
    key: str  # sha1 of the dropped event's own key


@dataclass(frozen=True, slots=True)
class ScrubRow:
    target: str  # the table the scrubbed row went to
    key: str  # that row's key
    kind: str
    count: Int32


@dataclass(frozen=True, slots=True)
class IdentityRow:
    identity: str
    source_kind: str  # continue | tabby | git
    developer: str  # what it resolved to when last seen
    mapped: bool  # named by the config ([[developers]], [[teams]], a source's developer)


@dataclass(frozen=True, slots=True)
class SuggestionLinkRow:
    suggestion_id: str
    status: str  # kept | rewritten | deleted | unknown
    reason: str
    repo: str | None
    path: str | None
    sha: str | None
    line: Int32 | None
    similarity: float | None
    committed_text: str | None
    window_closes_at: datetime
    linked_at: datetime


@dataclass(frozen=True, slots=True)
class GatewayRequestRow:
    id: str  # the completion id the gateway answered with
    received_at: datetime  # UTC, milliseconds
    developer: str
    team: str
    scope: str | None  # None = the base model answered
    version: str | None
    served_name: str | None
    model: str  # the name the editor asked for
    backend: str  # builtin | vllm
    stream: bool
    status: Int32
    latency_ms: float
    first_token_ms: float | None
    prompt_tokens: Int32
    completion_tokens: Int32
    finish_reason: str | None
    error: str | None
    ingested_at: datetime


Row = (SuggestionRow | CommitRow | CommitFileRow | BlobRow | EditOutcomeRow | InteractionRow | TabbyCompletionRow
       | TabbyActionRow | QuarantineRow | DropRow | ScrubRow | IdentityRow | SuggestionLinkRow | GatewayRequestRow)


@dataclass(frozen=True)
class Table:
    """A table and its row class; `key` drops in-batch duplicates (two rows with one key in a single INSERT
    make ON CONFLICT fail, so the first wins, as it does against rows stored by earlier batches)."""

    name: str
    row: type
    key: tuple[str, ...]
    on_conflict: str = "DO NOTHING"
    # Keyed by one event, commit or line of its own: a batch's rows are new but for a log read again or an event
    # that came twice, so its batches are first inserted without the key lookup (Store.apply_tables).
    fresh: bool = True

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.row))

    @property
    def schema(self) -> pa.Schema:
        return arrow_schema(self.row)


# One event can arrive twice with different amounts of text: a Continue `data:` destination at level noCode
# sends no code, the local file sends all of it. The copy with text fills in what the other lacks.
_FILL_TEXT = ("DO UPDATE SET prefix = excluded.prefix, prefix_compiled = excluded.prefix_compiled, "
              "prefix_header = excluded.prefix_header, prefix_recovery = excluded.prefix_recovery, "
              "suffix = excluded.suffix, completion = excluded.completion "
              "WHERE suggestions.prefix_compiled IS NULL AND suggestions.prefix_header IS NULL "
              "AND (excluded.prefix_compiled IS NOT NULL OR excluded.prefix_header IS NOT NULL)")
_FILL_EDIT = ("DO UPDATE SET instruction = excluded.instruction, before_text = excluded.before_text, "
              "after_text = excluded.after_text "
              "WHERE edit_outcomes.after_text IS NULL AND excluded.after_text IS NOT NULL")

TABLES: dict[type, Table] = {t.row: t for t in (
    Table("suggestions", SuggestionRow, ("id",), _FILL_TEXT),
    Table("edit_outcomes", EditOutcomeRow, ("id",), _FILL_EDIT),
    Table("interactions", InteractionRow, ("id",)),
    Table("commits", CommitRow, ("sha",)),
    Table("commit_files", CommitFileRow, ("sha", "path")),
    # A file's content recurs: a revert, an empty __init__.py. With blobs fresh, the second batch of every harvest
    # met one stored before and was stored twice (psf/requests, pallets/flask, Pillow, the generated history).
    Table("blobs", BlobRow, ("blob",), fresh=False),
    Table("tabby_completions", TabbyCompletionRow, ("id",)),
    Table("tabby_actions", TabbyActionRow, ("id",)),
    Table("quarantine", QuarantineRow, ("source", "stream", "offset", "line_sha1")),
    Table("drops", DropRow, ("source", "reason", "key")),
    Table("scrubs", ScrubRow, ("target", "key", "kind"), fresh=False),  # a recurring blob's secrets recur with it
    # An identity resolves as the config says now: a later sighting after a config change updates it.
    Table("identities", IdentityRow, ("identity", "source_kind"),
          "DO UPDATE SET developer = excluded.developer, mapped = excluded.mapped", fresh=False),
    # A relink replaces the earlier decision.
    Table("suggestion_links", SuggestionLinkRow, ("suggestion_id",), "DO UPDATE SET " + ", ".join(
        f"{c} = excluded.{c}" for c in (f.name for f in dataclasses.fields(SuggestionLinkRow))
        if c != "suggestion_id"), fresh=False),
    Table("gateway_requests", GatewayRequestRow, ("id",)),
)}


def text_columns(table: Table) -> list[str]:
    """The columns of a table that hold free text (not its key): where a person's name can appear."""
    hints = typing.get_type_hints(table.row)
    return [c for c in table.columns if c not in table.key and hints[c] in (str, str | None)]


def arrow_schema(row: type) -> pa.Schema:
    """The Arrow schema of a row class: explicit, so an all-NULL column in a batch is not inferred as null."""
    hints = typing.get_type_hints(row, include_extras=True)
    return pa.schema([(f.name, _arrow_type(hints[f.name])) for f in dataclasses.fields(row)])


def _arrow_type(hint: Any) -> pa.DataType:
    if isinstance(hint, UnionType) or typing.get_origin(hint) is typing.Union:
        (inner,) = [a for a in typing.get_args(hint) if a is not NoneType]
        return _arrow_type(inner)
    if typing.get_origin(hint) is Annotated:
        base, *marks = typing.get_args(hint)
        assert base is int and marks == ["INTEGER"], hint
        return pa.int32()
    if typing.get_origin(hint) is list:
        return pa.list_(_arrow_type(typing.get_args(hint)[0]))
    scalar = {str: pa.string(), bool: pa.bool_(), int: pa.int64(), float: pa.float64(),
              datetime: pa.timestamp("us")}
    return scalar[hint]


def as_arrow(table: Table, rows: list[Any]) -> pa.Table:
    """Rows of one table as an Arrow table, built column by column (no dict per row)."""
    return arrow_table({c: [getattr(r, c) for r in rows] for c in table.columns}, table.schema)


def arrow_table(columns: dict[str, list[Any]], schema: pa.Schema) -> pa.Table:
    """An Arrow table from Python lists, one `pa.array` a column, of the types `schema` gives.

    Every table devtune hands DuckDB is built here, never with `pa.table(dict)`, `Table.from_pydict` or a
    `pa.array` that infers its type: those import pandas whenever it is installed, even after
    `_pyarrow_without_pandas`."""
    _pyarrow_without_pandas()
    return pa.Table.from_arrays([pa.array(columns[f.name], type=f.type) for f in schema], schema=schema)


class _NoPandas:
    """A meta path finder that fails an import of pandas (installed on purpose in `_pyarrow_without_pandas`)."""

    @staticmethod
    def find_spec(name: str, path: Any = None, target: Any = None) -> None:
        if name == "pandas":
            raise ImportError("pandas is not imported for an Arrow conversion")


@functools.cache
def _pyarrow_without_pandas() -> None:
    """Let pyarrow know that these conversions need no pandas, so that it does not import it.

    The first `pa.array` of a Python list imports pandas, when it is installed, to ask whether the list is a
    pandas object: 0.15-0.35 s of a process's first insert. The harvest of a real 677-commit repository took
    0.62 s with it and 0.44 s without (bench/README.md, "Fixed cost"). devtune does not depend on pandas, but a
    training server's environment often holds it (trl and datasets pull it in). pyarrow tries that import
    once and remembers a failure, so it is made to fail here, once; `pa.Table.from_pydict` and `pa.table(dict)`
    try again, which is why `arrow_table` uses neither. Where pandas is already imported there is nothing to
    save, and a later `import pandas` (or `to_pandas()`) works as usual."""
    if "pandas" in sys.modules:
        return
    sys.meta_path.insert(0, _NoPandas)
    try:
        pa.array([], type=pa.string())
    finally:
        sys.meta_path.remove(_NoPandas)
