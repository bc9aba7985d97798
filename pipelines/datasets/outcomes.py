"""What became of each shown suggestion: the one record the SFT, DPO and KTO builders all read.

An `Outcome` is a suggestion from the store with its link (link.py): shown, accepted or not, and for an
accepted one whether it was kept, rewritten (with the committed text that replaced it) or deleted before
commit. Its `Side`s are the same facts as completions a developer wanted or did not want for one context:
what the FIM builder keeps (sft.py), what DPO pairs (dpo.py) and what KTO labels (kto.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipelines.config import DatasetsConfig
from pipelines.datasets.context import Context, Spool, WithContext, spool_or_text
from pipelines.datasets.link import accepted_part
from pipelines.datasets.paths import PathIndex, path_parts
from pipelines.datasets.quality import content_problem, path_problem
from pipelines.store.records import LinkedSuggestion


@dataclass(frozen=True, slots=True)
class Outcome(WithContext):
    """One shown suggestion, what the developer did with it, and what became of it in git."""

    id: str
    developer: str
    ts: datetime
    path: str  # "owner/name/repo-relative path" when the file maps onto a stored repository, else as logged
    context: Context  # the prefix clipped to max_prefix_chars, the suffix to max_suffix_chars
    text: str  # the suggestion (its accepted part for a partial accept)
    accepted: bool
    link: str  # "kept" | "rewritten" | "deleted" | "unknown" (accepted); "" (rejected)
    committed_text: str | None  # rewritten: the committed middle that replaced it (None: not alignable)


@dataclass(frozen=True, slots=True)
class Side(WithContext):
    """One completion for one context, and whether the developer wanted it."""

    id: str  # the suggestion's id (a rewrite's replacement: id + ":committed")
    signal: str  # chosen: "kept" | "accepted" | "rewritten"; rejected: "rejected" | "replaced" | "deleted"
    desirable: bool
    developer: str
    ts: datetime
    path: str
    context: Context
    text: str


def clip_prefix(text: str, max_chars: int) -> str:
    """The last `max_chars` of `text`, starting at a line start when the cut falls mid-line."""
    if len(text) <= max_chars:
        return text
    clipped = text[len(text) - max_chars:]
    nl = clipped.find("\n")
    return clipped[nl + 1:] if 0 <= nl < len(clipped) - 1 else clipped


def clip_suffix(text: str, max_chars: int) -> str:
    """The first `max_chars` of `text`, ending at a line end when the cut falls mid-line."""
    if len(text) <= max_chars:
        return text
    clipped = text[:max_chars]
    nl = clipped.rfind("\n")
    return clipped[: nl + 1] if nl > 0 else clipped


def outcomes(rows: Iterable[LinkedSuggestion], index: PathIndex, cfg: DatasetsConfig,
             dropped: Counter[str], spool: Spool | None = None) -> Iterator[Outcome]:
    """Suggestions from the store (`Store.scope_suggestions`) as Outcomes, minus the rows no set can use; their
    contexts are written to `spool` when there is one (pipelines.datasets.context)."""
    files: dict[tuple[str | None, str], tuple[str, str, str | None]] = {}
    # The store hands over a new string per row for the same developer or link status: one object each instead
    # (a million rows held ~70 MB of copies of a few developers' names)
    shared: dict[str, str] = {}
    for r in rows:
        if r.prefix is None:
            dropped["no_raw_prefix"] += 1  # the logged prefix held context we could not strip (FORMATS §1.5)
            continue
        text = r.completion or ""
        if r.partial:
            text = accepted_part(text)
        if not text.strip():
            dropped["empty_middle"] += 1
            continue
        where = (r.repo, r.filepath)
        if where not in files:  # many suggestions share a file: map and check each file once
            target = (r.link_repo, r.link_path) if r.link_path else index.map(r.repo, r.filepath)
            path = f"{target[0]}/{target[1]}" if target else r.filepath
            relative = target[1] if target else "/".join(path_parts(r.filepath))
            files[where] = (path, relative, path_problem(relative))
        path, relative, problem = files[where]
        suffix = r.suffix or ""
        if problem is None:
            problem = content_problem(r.prefix + text + suffix, starts_file=False)
        if problem is not None:
            dropped[problem] += 1
            continue
        link = (r.link_status or "unknown") if r.accepted else ""
        yield Outcome(
            id=r.id, developer=shared.setdefault(r.developer, r.developer), ts=r.shown_at, path=path,
            # Continue logs "\n" for an empty suffix; the model saw "\n" too, so keep it as logged.
            context=spool_or_text(spool, clip_prefix(r.prefix, cfg.max_prefix_chars),
                                  clip_suffix(suffix, cfg.max_suffix_chars)),
            text=text, accepted=bool(r.accepted),
            link=shared.setdefault(link, link),
            committed_text=r.committed_text,
        )


def sides(items: Iterable[Outcome]) -> list[Side]:
    """Every chosen or rejected completion the outcomes hold (a rewritten suggestion holds one of each)."""
    out = []
    for o in items:
        common: dict[str, Any] = {"developer": o.developer, "ts": o.ts, "path": o.path, "context": o.context}
        if not o.accepted:
            out.append(Side(id=o.id, signal="rejected", desirable=False, text=o.text, **common))
        elif o.link == "rewritten":
            out.append(Side(id=o.id, signal="replaced", desirable=False, text=o.text, **common))
            if o.committed_text is not None:
                out.append(Side(id=f"{o.id}:committed", signal="rewritten", desirable=True, text=o.committed_text,
                                **common))
        elif o.link == "deleted":
            out.append(Side(id=o.id, signal="deleted", desirable=False, text=o.text, **common))
        else:
            out.append(Side(id=o.id, signal="kept" if o.link == "kept" else "accepted", desirable=True, text=o.text,
                            **common))
    return out
