"""Logged file paths mapped onto the paths stored for each repository.

Tabby logs the path relative to the git root; Continue logs a file:// URI of an absolute path
(percent-encoded, Windows drives as /c%3A/...). Both are mapped onto the repo-relative paths stored for the
suggestion's repository (its normalised owner/name; every repository when it has none): the longest
path suffix of the logged path that is a stored path wins, case-sensitively first, then ignoring case.
A suggestion without a repository maps only when exactly one repository has that longest match.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlparse


@dataclass(frozen=True)
class PathIndex:
    """Each repository's stored paths, exactly and lower-cased."""

    exact: dict[str, frozenset[str]]
    folded: dict[str, dict[str, str]]  # repo -> lower-cased path -> stored path

    @classmethod
    def build(cls, repo_paths: dict[str, list[str]]) -> PathIndex:
        return cls(exact={r: frozenset(ps) for r, ps in repo_paths.items()},
                   folded={r: {p.lower(): p for p in ps} for r, ps in repo_paths.items()})

    def map(self, repo: str | None, filepath: str) -> tuple[str, str] | None:
        """(repo, repo-relative path) of a logged file, or None when no stored repository has it."""
        parts = path_parts(filepath)
        if not parts:
            return None
        if repo:
            if repo not in self.exact:
                return None
            found = self._longest(repo, parts)
            return (repo, found[1]) if found else None
        hits = [(n, r, p) for r in sorted(self.exact) if (m := self._longest(r, parts)) for n, p in [m]]
        if not hits:
            return None
        best = max(n for n, _, _ in hits)
        winners = [(r, p) for n, r, p in hits if n == best]
        return winners[0] if len(winners) == 1 else None

    def _longest(self, repo: str, parts: list[str]) -> tuple[int, str] | None:
        exact, folded = self.exact[repo], self.folded[repo]
        for i in range(len(parts)):
            candidate = "/".join(parts[i:])
            if candidate in exact:
                return len(parts) - i, candidate
        for i in range(len(parts)):
            stored = folded.get("/".join(parts[i:]).lower())
            if stored is not None:
                return len(parts) - i, stored
        return None


def path_parts(filepath: str) -> list[str]:
    """The components of a logged path: a file:// URI (percent-decoded) or a plain relative/absolute path."""
    text = filepath.strip()
    if text.lower().startswith("file:"):
        text = unquote(urlparse(text).path)
    return [p for p in text.replace("\\", "/").split("/") if p and p != "."]
