"""The collector contract: read one source from a saved cursor and yield typed raw events in batches.

A collector knows one on-disk format and nothing else: no database, no config file, no torch. It yields
`Batch`es; each batch carries the cursor that points just past it, and the store commits a batch's
events, rejects and cursor in one transaction. So a crash between batches resumes exactly where the last
committed batch ended, and a crash inside one re-reads it (upserts on each event's key make that a no-op).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

EXCERPT_CHARS = 160


@dataclass(frozen=True)
class Limits:
    """Bounds every collector honours; they come from the `[collect]` config section."""

    batch_events: int = 2000  # events per batch, i.e. per store transaction
    # Lines longer than this are rejected unread: a real Continue autocomplete line is 2-20 KB, and 1 MiB
    # bounds the memory one bad line can take (a crashed writer can leave megabytes without a newline).
    max_line_bytes: int = 1 << 20
    max_file_bytes: int = 512 * 1024  # committed files (and per-file diffs) larger than this are not kept


@dataclass(frozen=True)
class Cursor:
    """Where collection stopped in one stream of a source.

    A file stream is identified by a hash of its first `head_len` bytes rather than its inode: editors,
    rsync and backups replace files, and an append-only log keeps its head. A git stream is a ref.
    """

    stream: str  # file path relative to the source root, or a git ref name
    offset: int = 0  # file: bytes consumed (always at a line boundary)
    head_sha1: str = ""  # file: sha1 of the first `head_len` bytes when the cursor was saved
    head_len: int = 0
    sha: str = ""  # git: the commit the ref pointed at when its history was last harvested


@dataclass(frozen=True)
class Suggestion:
    """One code suggestion shown to a developer, and what they did with it."""

    key: str  # the writer's own id (Continue completionId, Tabby completion_id): the dedupe key
    source_kind: str  # "continue" | "tabby"
    event_kind: str  # "autocomplete", ...
    shown_at: datetime  # UTC, naive
    accepted: bool
    partial: bool  # accepted only in part (Tabby accept-line/word)
    filepath: str  # as logged: a file URI (Continue) or a repo-relative path (Tabby)
    prefix: str | None  # raw editor text before the cursor, when recoverable
    prefix_compiled: str | None  # the prefix exactly as logged (may hold retrieved-context headers)
    prefix_recovery: str  # how `prefix` was obtained from the logged one: see continue_dev.recover_prefix
    suffix: str | None
    completion: str | None
    repo: str | None  # "owner/name" when the writer knew the git remote
    model: str | None
    user_ids: tuple[str, ...]  # identities the writer logged, strongest first (userId, uniqueId, ...)
    # Secrets the sender already replaced before the event touched disk (kind, count): counted as if found here.
    scrubbed: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class FileChange:
    """One file a commit added or modified, with its new content when it is text and small enough."""

    path: str
    status: str  # "A" added, "M" modified, "D" deleted, "T" type change
    blob: str  # new blob sha ("" when deleted)
    added: tuple[tuple[int, int], ...]  # 1-based inclusive line ranges the commit added in the new file
    diff: str  # the patch for this file, as `git log -p --unified=0` prints it
    content: str | None  # the file after the commit; None when binary, deleted or too large
    old_blob: str = ""  # the blob sha before the commit ("" when added): what the diff's "-" lines come from
    # The file before the commit, for a modified file whose old version this harvest has not read already
    # (an incremental harvest's first commit to it): the secrets it held must leave the diff's "-" lines too.
    old_content: str | None = None


@dataclass(frozen=True)
class Commit:
    """One commit reachable from a repository's HEAD."""

    sha: str
    parents: tuple[str, ...]
    author_name: str
    author_email: str
    authored_at: datetime  # UTC, naive
    committed_at: datetime  # UTC, naive
    message: str
    files: tuple[FileChange, ...]


@dataclass(frozen=True)
class EditOutcome:
    """A rewrite of a region that the developer accepted or rejected (Continue editOutcome, nextEditOutcome)."""

    key: str  # nextEditOutcome: completionId; editOutcome: sha1 of its content (see continue_dev.content_key)
    source_kind: str  # "continue"
    event_kind: str  # "editOutcome" | "nextEditOutcome"
    decided_at: datetime  # UTC, naive
    accepted: bool
    filepath: str  # file URI
    instruction: str | None  # editOutcome: the user's instruction; nextEdit: None
    before_text: str | None  # editOutcome: previousCode; nextEdit: originalEditableRange (None at noCode level)
    after_text: str | None  # editOutcome: newCode; nextEdit: completion
    repo: str | None
    model: str | None
    user_ids: tuple[str, ...]
    scrubbed: tuple[tuple[str, int], ...] = ()  # see Suggestion.scrubbed


@dataclass(frozen=True)
class Interaction:
    """A chat or tool event without an accept flag on code (chat feedback, chat/edit/tool interactions, quickEdit)."""

    key: str  # toolCallId for toolUsage, else sha1 of the content
    source_kind: str  # "continue"
    event_kind: str  # "chatFeedback" | "chatInteraction" | "editInteraction" | "toolUsage" | "quickEdit"
    occurred_at: datetime  # UTC, naive
    filepath: str | None
    model: str | None
    session_id: str | None
    prompt: str | None
    completion: str | None
    label: bool | None  # chatFeedback: thumbs up (True) / down (False); toolUsage: approved; else None
    detail: dict[str, Any] | None  # the kind's other fields (tool name and arguments, diffs, rules, ...)
    user_ids: tuple[str, ...]
    scrubbed: tuple[tuple[str, int], ...] = ()  # see Suggestion.scrubbed


@dataclass(frozen=True)
class TabbyCompletion:
    """A completion the Tabby server generated; it becomes a suggestion once a `view` or `select` links to it."""

    key: str  # completion_id ("cmpl-<uuid>")
    created_at: datetime  # UTC, naive
    language: str
    filepath: str  # relative to the git root ("" before Tabby v0.12, which did not log it)
    prefix: str | None  # raw editor text (None when the request used a raw prompt)
    suffix: str | None
    choices: tuple[str, ...]  # choices[i].text by index
    repo: str | None
    user_ids: tuple[str, ...]


@dataclass(frozen=True)
class TabbyAction:
    """A view, select or dismiss of a Tabby completion."""

    key: str  # sha1 of the event (identical lines are the same event)
    completion_id: str
    kind: str  # "view" | "select" | "dismiss"
    at: datetime  # UTC, naive
    choice_index: int
    line_select: bool  # a select of kind "line" (accept-line or accept-word): a partial accept
    user_ids: tuple[str, ...]


@dataclass(frozen=True)
class GatewayRequest:
    """One completion request the serving gateway answered (or refused after authenticating the caller): who
    asked, when, which adapter version answered, how long it took and how many tokens. Never the code."""

    key: str  # the completion id the gateway answered with ("cmpl-<hex>")
    received_at: datetime  # UTC, naive, millisecond precision: when the request arrived
    developer: str  # the caller's token's owner: a canonical developer id
    team: str  # the team the gateway resolved them to
    scope: str | None  # what answered: "team:payments", "dev:alice@example.com"; None = the base model
    version: str | None  # "v0003"; None = the base model
    served_name: str | None  # the version's never-reused name on the serving backend
    model: str  # the model name the editor asked for (the stable name)
    backend: str  # builtin | vllm
    stream: bool
    status: int  # the HTTP status answered
    latency_ms: float  # arrival to the last byte
    first_token_ms: float | None  # arrival to the first generated text (streamed or not)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None  # stop | length | cancelled | error
    error: str | None  # what went wrong, in devtune's words (never a backend's body, which may quote the prompt)


RawEvent = Suggestion | Commit | EditOutcome | Interaction | TabbyCompletion | TabbyAction | GatewayRequest

# Parses one complete line (without its newline) of a log stream: the events it holds (none for a line that
# carries nothing to store) or the reason it was rejected.
LineParser = Callable[[bytes], "tuple[RawEvent, ...] | str"]


@dataclass(frozen=True)
class Reject:
    """A line that could not be parsed: it goes to the quarantine table, and collection goes on."""

    stream: str
    offset: int
    length: int
    line_sha1: str
    reason: str
    excerpt: str


@dataclass(frozen=True)
class Batch:
    """Events and rejects read from one stream, and the cursor just past them."""

    events: tuple[RawEvent, ...]
    rejects: tuple[Reject, ...]
    cursor: Cursor
    note: str = ""  # something worth logging once, e.g. "file was replaced: re-reading from the start"
    read: int = 0  # how much of the stream this batch consumed, in the collector's `unit` (for progress)
    # Part of a batch: stored with the parts after it, [collect] batch_events at a time, in one transaction with
    # the last one's cursor (git hands over 256 commits at a time, so that it reads ahead while they are scrubbed).
    partial: bool = False


@dataclass(frozen=True)
class Watch:
    """A folder whose changes mean a source has something new to collect."""

    folder: Path
    recursive: bool
    suffixes: tuple[str, ...]  # file name endings that matter (e.g. ".jsonl"); () = any file


@dataclass(frozen=True)
class Found:
    """A source installed on this machine where its tool puts it by default (for `devtune init`)."""

    path: Path
    why: str  # e.g. "dev_data/ found at $CONTINUE_GLOBAL_DIR"


class Collector(Protocol):
    """Reads one kind of source. The built-ins and any third-party collector go through `COLLECTORS`: a
    new source is one module with one such class, and one entry in that table."""

    kind: str  # what a [[sources]] table's `kind` names
    unit: str  # what `pending` and `Batch.read` count: "bytes" of a log file, "commits" of a repository

    def streams(self, root: Path) -> list[str]:
        """The streams under `root` this collector reads (files relative to root, or git refs)."""
        ...

    def collect(self, root: Path, stream: str, cursor: Cursor | None, limits: Limits) -> Iterator[Batch]:
        """Yield batches from `stream` after `cursor`; the last batch's cursor is where the next run starts."""
        ...

    def line_parser(self, root: Path, stream: str) -> LineParser | None:
        """How one line of `stream` is parsed (for `devtune quarantine retry`); None for line-less sources."""
        ...

    def pending(self, root: Path, stream: str, cursor: Cursor | None) -> int:
        """How much of `stream` is left after `cursor`, in `unit`s (the progress line's total and ETA)."""
        ...

    def repo(self, root: Path) -> str | None:
        """The "owner/name" every event of the source belongs to (a git source's origin remote), or None
        when the events name their own repository."""
        ...

    def watch_paths(self, root: Path) -> list[Watch]:
        """The folders whose changes the service watches to collect the source soon after it changes."""
        ...

    def discover(self) -> list[Found]:
        """This machine's installs of the tool, where it writes by default (`devtune init` adds them)."""
        ...


def excerpt(raw: bytes) -> str:
    """A short printable prefix of a rejected line (scrubbed again before it is stored)."""
    text = raw[: EXCERPT_CHARS * 4].decode("utf-8", errors="replace")
    return text[:EXCERPT_CHARS]
