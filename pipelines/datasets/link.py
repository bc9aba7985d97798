"""Link each accepted suggestion to what its developer committed: kept, rewritten, deleted or unknown.

For an accepted suggestion shown at time t, the candidates are the commits *of the same developer* that
touched the suggestion's file with `t < committed_at <= t + [datasets] link_window_h` (72 h by default:
a working day plus a weekend is the longest a change usually sits uncommitted). Each candidate's file
content after the commit is compared with the suggestion:

  kept       the suggestion's text is at its place in the committed file: exactly once whitespace is
             ignored (starting up to `NEAR_LINES` lines after its place), or with small edits (the lines
             right at its place are at least `link_min_similarity` similar to it, below).
  rewritten  something else is at its place; the committed text there is kept as the replacement, laid out
             as a middle for the logged prefix and suffix (NULL when the committed lines no longer start
             with the cursor line's text before the cursor, so no middle fits that prefix).
  deleted    nothing is left between the code before and after its place, or the file was deleted.
  unknown    no commit of the developer touched the file in the window, the file is in no stored
             repository, or its place cannot be found (the code around it changed too).

With several candidates the strongest verdict wins (kept > rewritten > deleted > unknown; the earliest
commit among equals), so a commit that staged only part of the file does not hide a later one that kept it.

The place. The suggestion was inserted between the last full lines of its prefix and the first full lines
of its suffix. Lines are normalised (all whitespace removed, blank lines skipped), so re-indenting and
formatter runs do not matter. The place is found by the last `ANCHOR_LINES` non-blank prefix lines
(the occurrence nearest the cursor's line number wins) and the first `ANCHOR_LINES` suffix lines after it.
The suggestion's text is its cursor line (text before the cursor + suggestion + text after it) and the
lines it adds; "exact" means those normalised lines start at most `NEAR_LINES` lines after the place.

The threshold. Similarity is difflib's ratio 2*M/T over the normalised text. 0.8 keeps a 50-character line
with a 5-character edit (a renamed argument: ratio 0.9) and a typo fix, and calls a changed condition or
call in a 20-character line (0.75 and below) a rewrite. Set too low, rewrites become "kept" and their
committed text is lost as a DPO "chosen"; too high, every touched-up suggestion becomes a preference pair.

Partial accepts (Tabby `select` with `kind:"line"`, stored as `partial`) record no length, so their
accepted part is the suggestion's first line (`accepted_part`), and that part is what gets linked.

Paths are mapped onto the stored repositories' paths as paths.py says.
"""

from __future__ import annotations

import bisect
import difflib
import itertools
import logging
import time
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.config import DatasetsConfig
from pipelines.datasets.context import ByteSpool
from pipelines.datasets.paths import PathIndex
from pipelines.progress import Progress
from pipelines.store.db import Store, now
from pipelines.store.records import FileVersion, LinkCandidate, VersionKey
from pipelines.store.schema import SuggestionLinkRow, arrow_table

log = logging.getLogger("devtune.link")

ANCHOR_LINES = 2  # two non-blank lines pin a place in a file; one ("return x", "}") often repeats
NEAR_LINES = 3  # the suggestion may start this many lines after its place (the developer added some above it)
FAR_LINES = 20  # with only the following code found, or for a replacement, look this far back / ahead
STRENGTH = {"kept": 3, "rewritten": 2, "deleted": 1, "unknown": 0}
# The suggestions whose file was found in a repository, as handed to Store.link_candidates and link_versions.
MAPPED = pa.schema([("id", pa.string()), ("repo", pa.string()), ("path", pa.string())])


@dataclass(frozen=True)
class Decision:
    """The verdict for one suggestion, with its evidence."""

    status: str  # kept | rewritten | deleted | unknown
    reason: str
    sha: str | None = None
    line: int | None = None  # 1-based line in the committed file
    similarity: float | None = None
    committed_text: str | None = None  # rewritten: the replacing middle


@dataclass(frozen=True)
class LinkReport:
    linked: int  # suggestions (re)linked by this pass
    counts: dict[str, int]  # status -> suggestions, this pass
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"linked": self.linked, "counts": self.counts, "seconds": round(self.seconds, 3)}


def link_suggestions(store: Store, cfg: DatasetsConfig, folder: Path | None = None) -> LinkReport:
    """(Re)link every accepted suggestion whose verdict may still change, and store the verdicts. The texts being
    linked wait in a spool in `folder` (the system's temporary folder when None) while the pass runs."""
    started = time.monotonic()
    index = PathIndex.build(store.repo_paths())
    todo = list(store.suggestions_to_link())
    window = timedelta(hours=cfg.link_window_h)
    linked_at = now()
    counts: Counter[str] = Counter()
    rows: list[SuggestionLinkRow] = []
    mapped: dict[str, list[str]] = {"id": [], "repo": [], "path": []}
    targets: dict[tuple[str | None, str], tuple[str, str] | None] = {}  # many suggestions share a file
    for s in todo:
        where = (s.repo, s.filepath)
        if where not in targets:
            targets[where] = index.map(*where)
        target = targets[where]
        if target is None:
            rows.append(_link_row(s.id, Decision("unknown", "file_not_in_repo"), None, None,
                                  s.shown_at + window, linked_at))
            counts["unknown"] += 1
            continue
        mapped["id"].append(s.id)
        mapped["repo"].append(target[0])
        mapped["path"].append(target[1])
    progress = Progress(log, "link", len(todo), "suggestions")
    progress.advance(len(todo) - len(mapped["id"]))
    table = arrow_table(mapped, MAPPED)
    spool = ByteSpool(folder, ".link-")
    try:
        suggestions = by_file(store.link_candidates(table), spool)
        versions = with_contents(store.link_versions(table, cfg.link_window_h), store, spool)
        for (repo, path, _), group, history in merge_groups(suggestions, versions):
            times = [v.committed_at for v in history]
            parsed: dict[str, FileText | None] = {}
            for c in group:
                lo = bisect.bisect_right(times, c.shown_at)
                hi = bisect.bisect_right(times, c.shown_at + window)
                text = accepted_part(c.completion) if c.partial else c.completion
                decision = decide(c.prefix, c.suffix or "", text, history[lo:hi], parsed, cfg.link_min_similarity)
                rows.append(_link_row(c.id, decision, repo, path, c.shown_at + window, linked_at))
                counts[decision.status] += 1
            progress.advance(len(group))
            if len(rows) >= 5000:
                store.save_links(rows)
                rows = []
        log.debug("link: %.0f MB of texts and file versions spooled", spool.size / 2**20)
    finally:
        spool.close()
    store.save_links(rows)
    progress.finish()
    return LinkReport(linked=len(todo), counts=dict(counts), seconds=time.monotonic() - started)


def _link_row(suggestion_id: str, d: Decision, repo: str | None, path: str | None, closes: datetime,
              linked_at: datetime) -> SuggestionLinkRow:
    return SuggestionLinkRow(suggestion_id=suggestion_id, status=d.status, reason=d.reason, repo=repo, path=path,
                             sha=d.sha, line=d.line, similarity=d.similarity, committed_text=d.committed_text,
                             window_closes_at=closes, linked_at=linked_at)


def by_file(candidates: Iterable[LinkCandidate], spool: ByteSpool) -> Iterator[LinkCandidate]:
    """`candidates` sorted by (repo, path, developer, shown_at, id), their texts waiting in `spool` meanwhile.

    Sorted here, not by the store: DuckDB sorts a result with all its columns and holds it whole, and the texts
    (prefix, suffix and completion: ~2 KB a suggestion) are most of it. What stays in memory is a key per
    suggestion (about 270 bytes of objects: ~80 MB for the 300k accepted suggestions of a first 1M build; the
    whole link pass peaks at ~930 MB there, against 2.2 GB with the store's sorts)."""
    keys: list[tuple[str, str, str, datetime, str, int]] = []
    names: dict[str, str] = {}  # one string per repository, path and developer, not one per suggestion
    offsets = array("q")  # per suggestion: where its texts start
    sizes = array("i")  # per suggestion: their bytes, then the prefix's and the suffix's characters
    flags = bytearray()  # per suggestion: partial, and whether it has a suffix
    for c in candidates:
        suffix = c.suffix or ""
        data = (c.prefix + suffix + c.completion).encode("utf-8", "surrogatepass")  # one encode, not three
        offsets.append(spool.write(data))
        sizes.extend((len(data), len(c.prefix), len(suffix)))
        flags.append(c.partial | (c.suffix is not None) << 1)
        keys.append((names.setdefault(c.repo, c.repo), names.setdefault(c.path, c.path),
                     names.setdefault(c.developer, c.developer), c.shown_at, c.id, len(keys)))
    keys.sort()  # the order of the ORDER BY it replaces: DuckDB compares VARCHARs by their UTF-8 bytes, which
    # order as Python's code points do
    for repo, path, developer, shown_at, id_, n in keys:
        size, p, s = sizes[3 * n], sizes[3 * n + 1], sizes[3 * n + 2]
        text = spool.read(offsets[n], size).decode("utf-8", "surrogatepass")
        yield LinkCandidate(repo, path, developer, id_, shown_at, bool(flags[n] & 1), text[:p],
                            text[p:p + s] if flags[n] & 2 else None, text[p + s:])


def with_contents(rows: list[VersionKey], store: Store, spool: ByteSpool) -> Iterator[FileVersion]:
    """The listed versions with their contents, which wait in `spool` until their file's turn comes (a first
    1M-suggestion build's 17k versions: DuckDB held 615 MB sorting them with their contents)."""
    where: dict[str, tuple[int, int]] = {}
    for key, content in store.blob_contents({r[-1] for r in rows if r[-1] is not None}):
        data = content.encode("utf-8", "surrogatepass")
        where[key] = spool.write(data), len(data)
    for repo, path, developer, sha, at, status, blob in rows:
        stored = None if blob is None else where.get(blob)
        yield FileVersion(repo, path, developer, sha, at, status,
                          None if stored is None else spool.read(*stored).decode("utf-8", "surrogatepass"))


def merge_groups(suggestions: Iterator[LinkCandidate], versions: Iterator[FileVersion]
                 ) -> Iterator[tuple[tuple[str, str, str], list[LinkCandidate], list[FileVersion]]]:
    """Pair each (repo, path, developer) group of suggestions with that group's committed versions.

    Both streams are sorted by that key (DuckDB compares VARCHARs by their bytes, as Python compares str).
    """
    def key(r: LinkCandidate | FileVersion) -> tuple[str, str, str]:
        return (r.repo, r.path, r.developer)

    pending = itertools.groupby(versions, key=key)
    current = next(pending, None)
    for k, group in itertools.groupby(suggestions, key=key):
        while current is not None and current[0] < k:
            current = next(pending, None)
        history = list(current[1]) if current is not None and current[0] == k else []
        if current is not None and current[0] == k:
            current = next(pending, None)
        yield k, list(group), history


def accepted_part(completion: str) -> str:
    """What a partial (accept-line) accept took: the completion up to and including its first line break
    after some text, or all of it when it is one line."""
    start = len(completion) - len(completion.lstrip("\n"))
    nl = completion.find("\n", start)
    return completion if nl < 0 else completion[: nl + 1]


# -- matching ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileText:
    """A committed file's lines, and its non-blank lines normalised for matching."""

    lines: list[str]  # original lines, line ends kept
    norm: list[str]  # normalised non-blank lines
    where: list[int]  # index in `lines` of each normalised line
    starts: dict[str, list[int]]  # normalised line -> its positions in `norm`

    @classmethod
    def parse(cls, content: str) -> FileText:
        lines = content.splitlines(keepends=True)
        norm: list[str] = []
        where: list[int] = []
        starts: dict[str, list[int]] = {}
        if content.isascii() and not any(c in content for c in _OTHER_BREAKS):
            # Only "\n" ends a line and only " ", "\t", "\x1f" are other whitespace: one translate and one
            # split normalise every line at once (FileText.parse took 14 of 46 s of a profiled 300k link).
            normalised: Iterable[str] = content.translate(_DROP_SPACE).split("\n")
        else:
            normalised = map(normalise, lines)
        for i, n in enumerate(normalised):
            if n:
                starts.setdefault(n, []).append(len(norm))
                norm.append(n)
                where.append(i)
        return cls(lines=lines, norm=norm, where=where, starts=starts)

    def find(self, seq: list[str], lo: int = 0) -> list[int]:
        """Positions in `norm` at or after `lo` where `seq` starts."""
        k = len(seq)
        return [p for p in self.starts.get(seq[0], ()) if p >= lo and self.norm[p:p + k] == seq]


# ASCII characters that str.splitlines breaks at, besides "\n" (six `in` tests: a regex character class took
# 110 us per file); and the ASCII whitespace str.split drops, besides those and "\n".
_OTHER_BREAKS = "\r\x0b\x0c\x1c\x1d\x1e"
_DROP_SPACE = str.maketrans("", "", " \t\x1f")


def normalise(line: str) -> str:
    """A line with every whitespace character removed: indentation and formatting do not count."""
    return "".join(line.split())


@dataclass(frozen=True)
class Site:
    """Where a suggestion went, in the terms the matcher needs."""

    before: list[str]  # last non-blank prefix lines (normalised); [] = the file's start
    after: list[str]  # first non-blank suffix lines after the cursor line; [] = the file's end
    text: list[str]  # the cursor line with the suggestion in it, and the lines it adds (normalised)
    cursor_line: int  # 0-based line of the cursor in the file as the editor had it (a lower bound)
    before_cursor: str  # the cursor line's text before the cursor
    after_cursor: str  # the cursor line's text after the cursor
    ends_line: bool  # the suggestion ends with a line break


def site_of(prefix: str, suffix: str, text: str) -> Site:
    before_cursor = prefix[prefix.rfind("\n") + 1:]
    # A suggestion ending with a line break ends its line: the suffix then starts on the next line and has no
    # rest of the cursor line (taking its first line for one made an inserted-then-deleted line look kept).
    nl = -1 if text.endswith("\n") else suffix.find("\n")
    after_cursor = "" if text.endswith("\n") else suffix if nl < 0 else suffix[:nl]
    before: list[str] = []
    end = len(prefix) - len(before_cursor)
    while end > 0 and len(before) < ANCHOR_LINES:  # walk back line by line: prefixes run to thousands of chars
        start = prefix.rfind("\n", 0, end - 1) + 1
        n = normalise(prefix[start:end])
        if n:
            before.insert(0, n)
        end = start
    after: list[str] = []
    if nl >= 0 or text.endswith("\n"):
        for line in suffix[nl + 1:].split("\n", 64):
            n = normalise(line)
            if n:
                after.append(n)
                if len(after) == ANCHOR_LINES:
                    break
    lines = [n for n in map(normalise, (before_cursor + text + after_cursor).split("\n")) if n]
    return Site(before=before, after=after, text=lines, cursor_line=prefix.count("\n"),
                before_cursor=before_cursor, after_cursor=after_cursor, ends_line=text.endswith("\n"))


def decide(prefix: str, suffix: str, text: str, versions: list[FileVersion], parsed: dict[str, FileText | None],
           min_similarity: float) -> Decision:
    """The strongest verdict over the candidate commits (`versions`: sha, status, content; oldest first)."""
    if not versions:
        return Decision("unknown", "no_commit_in_window")
    site = site_of(prefix, suffix, text)
    if not site.text:
        return Decision("unknown", "blank_suggestion")
    best = Decision("unknown", "place_not_found")
    for v in versions:
        if v.status == "D":
            d = Decision("deleted", "file_deleted", sha=v.sha)
        else:
            if v.sha not in parsed:
                parsed[v.sha] = FileText.parse(v.content) if v.content is not None else None
            ft = parsed[v.sha]
            d = (Decision("unknown", "content_not_stored") if ft is None
                 else decide_in_file(site, ft, min_similarity, v.sha))
        if STRENGTH[d.status] > STRENGTH[best.status]:
            best = d
            if d.status == "kept":
                break
    return best


def decide_in_file(site: Site, ft: FileText, min_similarity: float, sha: str) -> Decision:
    """The verdict against one committed version of the file."""
    k = len(site.text)
    places = _places_after_prefix(site, ft)
    a = places[0] if places else None
    b = _place_of_suffix(site, ft, a)
    for o in ft.find(site.text):
        if places:
            ok = any(p <= o <= p + NEAR_LINES for p in places)
        elif b is not None:
            ok = b - k - FAR_LINES <= o and o + k <= b
        else:
            ok = True
        if ok:
            return Decision("kept", "exact" if places or b is not None else "exact_unplaced", sha=sha,
                            line=ft.where[o] + 1, similarity=1.0)
    if a is None:
        return Decision("unknown", "place_not_found", sha=sha)
    end = b if b is not None else len(ft.norm)
    if end <= a:
        return Decision("deleted", "nothing_at_its_place", sha=sha, line=_line(ft, a), similarity=0.0)
    # Edited text is compared only with the lines right at its place: searching a few lines on, as the exact
    # match does, let "return a / b" match "return a ** b" two lines further (0.84) in the tests.
    sim = difflib.SequenceMatcher(None, "\n".join(site.text), "\n".join(ft.norm[a:min(a + k, end)]),
                                  autojunk=False).ratio()
    if sim >= min_similarity:
        return Decision("kept", "similar", sha=sha, line=ft.where[a] + 1, similarity=round(sim, 4))
    # What replaced it runs to the code that followed it, when that code was found close by; otherwise (the
    # suffix was empty, so "the file's end" is all we know) it is as many lines as the suggestion had.
    stop = end if site.after and b is not None and end - a <= k + FAR_LINES else min(a + k, end)
    replaced = "".join(ft.lines[ft.where[a]: ft.where[stop - 1] + 1])
    middle = _as_middle(replaced, site)
    if middle is not None and not normalise(middle):
        return Decision("deleted", "nothing_at_its_place", sha=sha, line=ft.where[a] + 1, similarity=0.0)
    return Decision("rewritten", "replaced" if middle is not None else "replaced_unaligned", sha=sha,
                    line=ft.where[a] + 1, similarity=round(sim, 4), committed_text=middle)


def _line(ft: FileText, pos: int) -> int:
    return ft.where[pos] + 1 if pos < len(ft.where) else len(ft.lines) + 1


def _places_after_prefix(site: Site, ft: FileText) -> list[int]:
    """Positions in `ft.norm` just after the prefix's last lines (0 when the prefix has none), likeliest first."""
    if not site.before:
        return [0]
    n = len(site.before)
    # The prefix may be cut at its top (Continue prunes it to its token budget), so its line count is a lower
    # bound of the cursor's line: the occurrence nearest to it is the likeliest.
    found = sorted(ft.find(site.before), key=lambda p: abs(ft.where[p + n - 1] + 1 - site.cursor_line))
    return [p + n for p in found]


def _place_of_suffix(site: Site, ft: FileText, a: int | None) -> int | None:
    """Position in `ft.norm` where the suffix's first lines start (the file's end when it has none)."""
    if not site.after:
        return len(ft.norm)
    found = ft.find(site.after, a or 0)
    return found[0] if found else None


def _as_middle(replaced: str, site: Site) -> str | None:
    """Committed full lines as a middle between the logged prefix and suffix, or None when the cursor line's
    text before (or after) the cursor is no longer there to frame it."""
    if not replaced.startswith(site.before_cursor):
        return None
    middle = replaced[len(site.before_cursor):]
    if site.after_cursor:
        for tail in (site.after_cursor + "\n", site.after_cursor):
            if middle.endswith(tail):
                return middle[: len(middle) - len(tail)]
        return None
    if not site.ends_line and middle.endswith("\n"):
        middle = middle[:-1]
    return middle
