"""Collect every source into the store: identity, privacy and scrubbing happen here, before storage.

For each event: drop it if its developer opted out or its file matches an exclude glob (counted by reason,
never stored); map its identities to a developer and a team; scrub every text field; then store the batch
and its cursor in one transaction. Running it twice over the same data stores nothing the second time.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from collectors import COLLECTORS
from collectors.base import Batch, Commit, Limits, Suggestion
from collectors.continue_dev import language_of, normalize_repo
from collectors.gitlog import count_commits, remote_name
from daemon.config import CollectConfig, SourceConfig, TeamConfig
from pipelines.progress import Progress
from pipelines.scrub import is_excluded, scrub
from pipelines.store import Rows, Store, now

log = logging.getLogger("devtune.ingest")

UNKNOWN_DEVELOPER = "unknown"

# A timer, a file event and a cycle can all ask for a collect at once inside the service; serialising them
# keeps two threads from reading one stream from the same cursor (their upserts would agree, but the work
# would be done twice and the drop counters double-counted).
_collect_lock = threading.Lock()


@dataclass(frozen=True)
class Directory:
    """Who is who: identities to developers and teams, and who opted out."""

    member_team: dict[str, str]  # lower-cased identity -> team
    repo_team: dict[str, str]  # normalised "owner/name" -> team
    default_team: str
    opt_out: frozenset[str]

    @classmethod
    def from_config(cls, teams: tuple[TeamConfig, ...], default_team: str, opt_out: tuple[str, ...]) -> Directory:
        return cls(
            member_team={m.strip().lower(): t.name for t in teams for m in t.members},
            repo_team={normalize_repo(r): t.name for t in teams for r in t.repos},
            default_team=default_team,
            opt_out=frozenset(o.strip().lower() for o in opt_out),
        )

    def team(self, developer: str, repo: str | None) -> str:
        """The developer's team, else the repository's, else the default team."""
        if developer.lower() in self.member_team:
            return self.member_team[developer.lower()]
        if repo and repo in self.repo_team:
            return self.repo_team[repo]
        return self.default_team

    def opted_out(self, *identities: str) -> bool:
        return any(i.lower() in self.opt_out for i in identities if i)


@dataclass
class SourceReport:
    source: str
    stored: Counter[str] = field(default_factory=Counter)  # suggestions, commits, quarantined
    seen: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "seen": self.seen, "stored": dict(self.stored), "notes": self.notes,
                "seconds": round(self.seconds, 3)}


def collect_all(store: Store, sources: tuple[SourceConfig, ...], cfg: CollectConfig,
                directory: Directory) -> list[SourceReport]:
    """Collect every configured source."""
    return [collect_source(store, s, cfg, directory) for s in sources]


def collect_source(store: Store, source: SourceConfig, cfg: CollectConfig, directory: Directory) -> SourceReport:
    """Collect one source from its saved cursors until it has nothing new."""
    with _collect_lock:
        return _collect_source(store, source, cfg, directory)


def _collect_source(store: Store, source: SourceConfig, cfg: CollectConfig, directory: Directory) -> SourceReport:
    name = source.name
    collector = COLLECTORS[source.kind]
    limits = Limits(batch_events=cfg.batch_events, max_line_bytes=cfg.max_line_bytes,
                    max_file_bytes=cfg.max_file_bytes)
    report = SourceReport(source=name)
    root = source.path
    if not root.exists():
        report.notes.append(f"{root} does not exist yet: nothing to collect")
        log.warning("source %s: %s does not exist yet; nothing collected", name, root)
        return report
    repo = remote_name(root) if source.kind == "git" else None
    for stream in collector.streams(root):
        cursor = store.load_cursor(name, stream)
        total = count_commits(root, cursor) if source.kind == "git" else None
        unit = "commits" if source.kind == "git" else "lines"
        progress = Progress(log, f"collect {name} {stream}", total, unit)
        for batch in collector.collect(root, stream, cursor, limits):
            if batch.note:
                log.warning("source %s stream %s: %s", name, stream, batch.note)
                report.notes.append(f"{stream}: {batch.note}")
            rows = to_rows(batch, source, repo, cfg, directory)
            applied = store.apply_batch(name, rows, batch.cursor)
            report.seen += len(batch.events) + len(batch.rejects)
            report.stored["suggestions"] += applied.suggestions
            report.stored["commits"] += applied.commits
            report.stored["quarantined"] += applied.rejects
            progress.advance(len(batch.events) + len(batch.rejects))
        report.seconds += progress.finish()
    return report


def to_rows(batch: Batch, source: SourceConfig, repo: str | None, cfg: CollectConfig,
            directory: Directory) -> Rows:
    """Apply privacy rules and scrubbing to a batch and lay it out for the store."""
    source_name = source.name
    rows = Rows([], [], [], [], [], Counter(), Counter())
    scrubs: Counter[str] = Counter()
    ingested = now()
    for event in batch.events:
        if isinstance(event, Suggestion):
            _suggestion_row(event, rows, source_name, source, cfg, directory, scrubs, ingested)
        elif isinstance(event, Commit):
            _commit_rows(event, rows, source_name, repo or "", cfg, directory, scrubs, ingested)
    for r in batch.rejects:
        rows.rejects.append({
            "source": source_name, "stream": r.stream, "offset": r.offset, "length": r.length,
            "line_sha1": r.line_sha1, "reason": r.reason, "excerpt": scrub(r.excerpt, scrubs),
            "quarantined_at": ingested,
        })
    rows.scrubs = dict(scrubs)
    return rows


def _suggestion_row(s: Suggestion, rows: Rows, source_name: str, source: SourceConfig, cfg: CollectConfig,
                    directory: Directory, scrubs: Counter[str], ingested: Any) -> None:
    # The source's configured owner beats the ids in the log: Continue's userId is usually "" and its
    # uniqueId is a machine id, not a person (FORMATS.md §1.2).
    developer = source.developer or next(iter(s.user_ids), UNKNOWN_DEVELOPER)
    if directory.opted_out(developer, *s.user_ids):
        rows.drops["opted_out"] += 1
        return
    if is_excluded(s.filepath, cfg.exclude_paths):
        rows.drops["excluded_path"] += 1
        return
    rows.suggestions.append({
        "id": s.key, "source": source_name, "source_kind": s.source_kind, "event_kind": s.event_kind,
        "shown_at": s.shown_at, "developer": developer, "team": directory.team(developer, s.repo),
        "repo": s.repo, "filepath": s.filepath, "language": language_of(s.filepath), "accepted": s.accepted,
        "partial": s.partial, "prefix": _scrub(s.prefix, scrubs), "prefix_compiled": _scrub(s.prefix_compiled, scrubs),
        "prefix_recovery": s.prefix_recovery, "suffix": _scrub(s.suffix, scrubs),
        "completion": _scrub(s.completion, scrubs), "model": s.model, "ingested_at": ingested,
    })


def _commit_rows(c: Commit, rows: Rows, source_name: str, repo: str, cfg: CollectConfig, directory: Directory,
                 scrubs: Counter[str], ingested: Any) -> None:
    opted_out = directory.opted_out(c.author_email)
    developer = "" if opted_out else c.author_email or UNKNOWN_DEVELOPER
    rows.commits.append({
        "sha": c.sha, "repo": repo, "source": source_name, "parents": list(c.parents),
        # An opted-out author's commit keeps only its sha, parents and time, so history counts stay
        # whole; no name, email, message or file of theirs is stored.
        "author_name": None if opted_out else c.author_name,
        "author_email": None if opted_out else c.author_email,
        "developer": developer, "team": "" if opted_out else directory.team(developer, repo),
        "authored_at": c.authored_at, "committed_at": c.committed_at,
        "message": None if opted_out else scrub(c.message, scrubs), "opted_out": opted_out,
        "ingested_at": ingested,
    })
    if opted_out:
        rows.drops["opted_out_commit"] += 1
        return
    for f in c.files:
        if is_excluded(f.path, cfg.exclude_paths):
            rows.drops["excluded_path"] += 1
            continue
        keep_blob = f.content is not None
        rows.files.append({"sha": c.sha, "path": f.path, "status": f.status,
                           "blob": f.blob if keep_blob else None,
                           "added": [list(r) for r in f.added], "diff": scrub(f.diff, scrubs)})
        if keep_blob:
            rows.blobs.append({"blob": f.blob, "content": scrub(f.content or "", scrubs)})


def _scrub(text: str | None, scrubs: Counter[str]) -> str | None:
    return None if text is None else scrub(text, scrubs)
