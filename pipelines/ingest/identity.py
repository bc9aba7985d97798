"""Who is who: the identities an event's writer logged, mapped to one developer and a team, and opt-outs.

A developer is the source's configured `developer` when set; otherwise the first identity the tool logged
(Continue userId then uniqueId, Tabby user, the git author email, the HTTP destination's token owner) that a
`[[developers]]` table or a team's `members` names, mapped to that developer's `id`; otherwise the first
logged identity as it is (listed as unassigned by `devtune status`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from collectors.continue_dev import normalize_repo
from pipelines.config import Config, DeveloperConfig, TeamConfig

UNKNOWN_DEVELOPER = "unknown"


def tombstone(key: bytes, identity: str) -> str:
    """A forgotten identity as it is kept: HMAC-SHA256 under this installation's key, so a copy of the store
    alone cannot be searched for a guessed email the way a plain hash could."""
    return hmac.new(key, identity.strip().lower().encode(), hashlib.sha256).hexdigest()


def tombstone_key(state_dir: Path) -> bytes:
    """The installation's tombstone key (<state_dir>/forget.key, 32 random bytes, mode 0600), made on first use.
    Lose it and tombstones stop matching: back it up with the store."""
    path = state_dir / "forget.key"
    if path.is_file():
        return bytes.fromhex(path.read_text().strip())
    state_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return key


@dataclass(frozen=True)
class Identity:
    developer: str  # the canonical id when the config knows the identity, else the raw identity
    mapped: bool  # the config named it ([[developers]], [[teams]] members, a source's developer)
    raw: str  # the identity that decided it ("" when the writer logged none)


@dataclass(frozen=True)
class Directory:
    """Who is who: identities to canonical developers and teams, and who opted out."""

    teams: tuple[TeamConfig, ...]
    default_team: str
    opt_out_ids: tuple[str, ...]
    developers: tuple[DeveloperConfig, ...] = ()
    exclude_authors: tuple[str, ...] = ()
    tombstones: frozenset[str] = frozenset()  # forgotten identities, as `tombstone` hashes
    tombstone_key: bytes = b""

    @classmethod
    def from_config(cls, cfg: Config) -> Directory:
        return cls(cfg.teams, cfg.default_team, cfg.collect.opt_out, cfg.developers, cfg.collect.exclude_authors,
                   frozenset(), tombstone_key(cfg.state_dir))

    def with_tombstones(self, tombstones: frozenset[str]) -> Directory:
        """This directory, withholding the forgotten people too (`Store.tombstones()`, read where it is used:
        a forget may land between building a directory and collecting)."""
        return dataclasses.replace(self, tombstones=tombstones) if tombstones != self.tombstones else self

    @functools.cached_property
    def canonical(self) -> dict[str, str]:
        """Lower-cased identity ([[developers]] ids and aliases, team members) -> canonical developer id."""
        found: dict[str, str] = {}
        for d in self.developers:
            for identity in (d.id, *d.aliases):
                found[identity.strip().lower()] = d.id.strip()
        for t in self.teams:
            for m in t.members:
                found.setdefault(m.strip().lower(), m.strip())
        return found

    @functools.cached_property
    def member_team(self) -> dict[str, str]:
        """Lower-cased canonical id -> team."""
        return {self.canonical[m.strip().lower()].lower(): t.name for t in self.teams for m in t.members}

    @functools.cached_property
    def repo_team(self) -> dict[str, str]:
        return {normalize_repo(r): t.name for t in self.teams for r in t.repos}

    @functools.cached_property
    def opt_out(self) -> frozenset[str]:
        """Lower-cased opted-out identities and the canonical ids they map to."""
        raw = {o.strip().lower() for o in self.opt_out_ids}
        return frozenset(raw | {self.canonical.get(o, o).lower() for o in raw})

    def resolve(self, configured: str, logged: tuple[str, ...]) -> Identity:
        """The developer behind an event: a source's configured owner first, else the first logged identity
        the config knows, else the first logged one as it is."""
        if configured:
            return Identity(self.canonical.get(configured.lower(), configured), True, configured)
        for identity in logged:
            found = self.canonical.get(identity.lower())
            if found is not None:
                return Identity(found, True, identity)
        first = next((i for i in logged if i), "")
        return Identity(first or UNKNOWN_DEVELOPER, False, first or UNKNOWN_DEVELOPER)

    def team(self, developer: str, repo: str | None) -> str:
        """The developer's team, else the repository's, else the default team."""
        if developer.lower() in self.member_team:
            return self.member_team[developer.lower()]
        if repo and repo in self.repo_team:
            return self.repo_team[repo]
        return self.default_team

    def opted_out(self, *identities: str) -> bool:
        return any(i.lower() in self.opt_out for i in identities if i)

    @functools.cached_property
    def _bots(self) -> re.Pattern[str] | None:
        if not self.exclude_authors:
            return None
        # Globs with * and ? only: "dependabot[bot]" is a name, not a character class.
        parts = ("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in g.strip().lower())
                 for g in self.exclude_authors)
        return re.compile("|".join(f"(?:{p})" for p in parts))

    def forgotten(self, *identities: str) -> bool:
        return bool(self.tombstones) and any(tombstone(self.tombstone_key, i) in self.tombstones
                                             for i in identities if i)

    def identities_of(self, developer: str) -> list[str]:
        """A developer's canonical id and every alias the config gives them, lower-cased."""
        return sorted({developer.lower(), *(i for i, d in self.canonical.items() if d.lower() == developer.lower())})

    def withheld(self, *identities: str) -> str | None:
        """Why an event of these identities is not stored ("forgotten", "opted_out", "excluded_author"), or None."""
        if self.forgotten(*identities):
            return "forgotten"
        if self.opted_out(*identities):
            return "opted_out"
        if self.is_bot(*identities):
            return "excluded_author"
        return None

    def is_bot(self, *identities: str) -> bool:
        """An identity matches [collect] exclude_authors (a bot or a CI account)."""
        bots = self._bots
        if bots is None:
            return False
        known = self._bot_verdicts  # a source's events carry the same few identities (2.3 us an event uncached)
        for i in identities:
            if i:
                if i not in known:
                    known[i] = bots.fullmatch(i.strip().lower()) is not None
                if known[i]:
                    return True
        return False

    @functools.cached_property
    def _bot_verdicts(self) -> dict[str, bool]:
        return {}
