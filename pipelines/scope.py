"""A scope is what one adapter is trained for: a team ("team:payments") or one developer ("dev:alice@x.com").

The string form is used everywhere a scope is named: in the store (runs.scope), on disk
(registry/<scope>/, served/<scope>) and on the command line (--scope team:NAME|dev:ID).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"^[A-Za-z0-9@._+-]+$")


class ScopeError(ValueError):
    """A scope string that is not team:NAME or dev:ID."""


@dataclass(frozen=True)
class Scope:
    kind: str  # "team" | "dev"
    name: str  # a team name, or a developer id (usually an email)

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"

    @classmethod
    def parse(cls, text: str) -> Scope:
        kind, _, name = text.partition(":")
        if kind not in ("team", "dev") or not _NAME.match(name):
            raise ScopeError(f"scope {text!r} is not team:NAME or dev:ID (letters, digits, @ . _ + -)")
        return cls(kind, name)


def team(name: str) -> Scope:
    return Scope("team", name)


def dev(developer: str) -> Scope:
    return Scope("dev", developer)
