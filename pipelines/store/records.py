"""The typed records store queries hand to the stages above (linking and the dataset builders).

Each record's fields are its query's columns in order: `Store` builds them positionally and checks the
query's column names against the fields once per query, so a query and its record cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple


class LinkedSuggestion(NamedTuple):
    """A scope's suggestion with its link (`Store.scope_suggestions`): what an `Outcome` is made from.

    A named tuple, not a frozen dataclass like the records below: every build makes one per stored suggestion,
    and a frozen dataclass's __init__ (15 `object.__setattr__` calls) took 2.1 us against 0.3 us for
    `_make` (1M suggestions: 1.8 s)."""

    id: str
    source_kind: str
    developer: str
    shown_at: datetime
    repo: str | None
    filepath: str
    accepted: bool
    partial: bool
    prefix: str | None  # cut to one character more than the dataset keeps
    suffix: str | None
    completion: str | None
    link_status: str | None  # None: never linked
    committed_text: str | None
    link_repo: str | None
    link_path: str | None


@dataclass(frozen=True, slots=True)
class EditRecord:
    """A Continue edit outcome of a scope (`Store.scope_edit_outcomes`)."""

    id: str
    event_kind: str
    developer: str
    decided_at: datetime
    repo: str | None
    filepath: str
    accepted: bool
    instruction: str | None
    before_text: str | None
    after_text: str | None


@dataclass(frozen=True, slots=True)
class CommittedFile:
    """A file a scope's commit added lines to, with its content after the commit (`Store.committed_files`)."""

    sha: str
    developer: str
    committed_at: datetime
    path: str
    added: list[list[int]]  # [[first, last], ...] 1-based
    content: str


@dataclass(frozen=True, slots=True)
class RepoFile:
    """A repository's file as the last commit before some time left it (`Store.repo_files_at`)."""

    repo: str
    path: str
    committed_at: datetime
    content: str


@dataclass(frozen=True, slots=True)
class ToLink:
    """An accepted suggestion whose link may still change (`Store.suggestions_to_link`)."""

    id: str
    developer: str
    shown_at: datetime
    repo: str | None
    filepath: str


@dataclass(frozen=True, slots=True)
class LinkCandidate:
    """A suggestion mapped onto a repository file, ready to be linked (`Store.link_candidates`)."""

    repo: str
    path: str
    developer: str
    id: str
    shown_at: datetime
    partial: bool
    prefix: str
    suffix: str | None
    completion: str


@dataclass(frozen=True, slots=True)
class FileVersion:
    """A version of a file its developer committed inside some suggestion's window (`Store.link_versions`)."""

    repo: str
    path: str
    developer: str
    sha: str
    committed_at: datetime
    status: str  # A, M, D, T
    content: str | None  # None when deleted or not kept


class BlobContent(NamedTuple):
    """A stored file content by its blob key (`Store.blob_contents`)."""

    blob: str
    content: str


# A FileVersion as Store.link_versions lists it: its content's blob key in place of the content.
VersionKey = tuple[str, str, str, str, datetime, str, str | None]
