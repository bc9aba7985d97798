"""What each scope served when, read back from the registry's history files.

Every promotion, rollback and canary start or end is appended to `registry/<scope>/history.jsonl` with the
time it happened, so the history is a timeline: from each entry to the next, one version (or none) was
served to everyone in the scope, and while a team canary ran, its version was served to the developers of
its arm (`registry.in_canary`). Attribution (attribution.py) joins the editor events against these intervals.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pipelines.publish import registry

OPEN = datetime(9999, 12, 31)  # the end of an interval that has not ended


@dataclass(frozen=True)
class Interval:
    scope: str
    version: str | None  # None: nothing of the scope was served (the fallback was)
    start: datetime
    end: datetime


@dataclass(frozen=True)
class CanaryWindow:
    scope: str  # team:NAME
    version: str  # the canary
    previous: str | None  # what everyone else was served
    share: float
    start: datetime
    end: datetime  # OPEN while it runs


def served_intervals(state_dir: Path) -> tuple[list[Interval], list[CanaryWindow]]:
    """Every scope's served intervals and canary windows, from its history."""
    intervals: list[Interval] = []
    canaries: list[CanaryWindow] = []
    root = state_dir / "registry"
    for scope_dir in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        scope = scope_dir.name
        current: str | None = None
        since: datetime | None = None
        running: CanaryWindow | None = None
        for entry in registry.history(state_dir, scope):
            at = datetime.fromisoformat(entry["at"])
            action = entry.get("action")
            if action in ("promote", "rollback"):
                if since is not None:
                    intervals.append(Interval(scope, current, since, at))
                current, since = entry.get("version"), at
            elif action == "canary":
                running = CanaryWindow(scope, entry["version"], entry.get("previous"), float(entry["share"]), at, OPEN)
            elif action == "canary_end" and running is not None:
                canaries.append(dataclasses.replace(running, end=at))
                running = None
        if since is not None:
            intervals.append(Interval(scope, current, since, OPEN))
        if running is not None:
            canaries.append(running)
    return intervals, canaries
