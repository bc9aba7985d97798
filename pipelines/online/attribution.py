"""Which version served each suggestion a developer was shown: the join that turns editor logs into field
measurements per version.

For every suggestion (Continue, Tabby, the HTTP destination), in order:
  1. gateway   the developer's latest successful gateway request at most GATEWAY_WINDOW_S before the event:
               Continue logs an autocomplete event once it is decided (Tab, or 10 s after display without
               one), so the request that produced it comes shortly before, never after
  2. timeline  else, when the event names the model the gateway serves (its stable name) or a version's
               served name, what the registry history says the developer was served then: their own version,
               else their team's canary (if in its arm) or served version, else the base model
  3. unknown   else: another model, a server devtune does not feed (Tabby's own), or no history yet
The result is stored per suggestion (`suggestion_served`, with how it was decided). Each pass (re)attributes
the new events and the recent ones, since a gateway log line can be collected after the editor's event. When
a history grows (a promotion, rollback or canary), the events from its first new entry on are attributed again,
and those naming a newly registered version: the histories are append-only, so every interval before that
entry stays as it was (a night at 100k stored suggestions redid all 100k after each promotion). A history that
shrank or vanished (a developer forgotten), or a model name that is gone, recomputes everything.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.online.timeline import served_intervals
from pipelines.publish import registry
from pipelines.publish.names import served_name
from pipelines.store.db import Store, now
from pipelines.store.schema import arrow_table

log = logging.getLogger("devtune.online")

GATEWAY_WINDOW_S = 60.0
# Events this recent are attributed again at each pass: a gateway request log is collected on its own
# schedule, and may arrive after the editor event it explains.
RECENT = timedelta(hours=24)
# What each scope served when, and the canary arms (a developer's share of a team's canary), as handed to
# Store.attribute_suggestions.
INTERVALS = pa.schema([("scope", pa.string()), ("version", pa.string()),
                       ("start_at", pa.timestamp("us")), ("end_at", pa.timestamp("us"))])
ARMS = pa.schema([("developer", pa.string()), *INTERVALS])


@dataclass(frozen=True)
class AttributionReport:
    attributed: int
    by: dict[str, int]  # gateway | timeline | unknown -> events (this pass)
    full: bool  # the whole history was recomputed (a history changed)
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"attributed": self.attributed, "by": self.by, "full": self.full, "seconds": round(self.seconds, 3)}


def attribute(store: Store, state_dir: Path, model_names: set[str]) -> AttributionReport:
    """(Re)attribute the suggestions whose version may have changed; see the module docstring."""
    started = time.monotonic()
    sizes = history_sizes(state_dir)
    intervals, canaries = served_intervals(state_dir)
    teams = {c.scope for c in canaries}
    arms = []
    for developer, team in store.developers_of_teams([t.removeprefix("team:") for t in teams]):
        for c in canaries:
            if c.scope == f"team:{team}" and registry.in_canary(developer, c.version, c.share):
                arms.append((developer, c.scope, c.version, c.start, c.end))
    names = sorted(model_names | {served_name(scope, v) for scope in _scopes(state_dir)
                                  for v in registry.versions(state_dir, scope)})
    since, added = redo_from(state_dir, store.online_state("history"), sizes, names)
    full = since is None
    by = store.attribute_suggestions(
        arrow_table({"scope": [i.scope for i in intervals], "version": [i.version for i in intervals],
                     "start_at": [i.start for i in intervals], "end_at": [i.end for i in intervals]}, INTERVALS),
        arrow_table({"developer": [a[0] for a in arms], "scope": [a[1] for a in arms], "version": [a[2] for a in arms],
                     "start_at": [a[3] for a in arms], "end_at": [a[4] for a in arms]}, ARMS),
        names, GATEWAY_WINDOW_S, since, added)
    store.set_online_state("history", json.dumps({"sizes": sizes, "names": names}))
    report = AttributionReport(sum(by.values()), by, full, time.monotonic() - started)
    if report.attributed:
        log.info("attributed %d suggestion(s) to the versions that served them (%s)%s", report.attributed,
                 ", ".join(f"{k} {v}" for k, v in sorted(by.items())), "; histories changed" if full else "")
    return report


def history_sizes(state_dir: Path) -> dict[str, int]:
    """Each scope's history size in bytes: the histories are append-only, so their sizes say what is new."""
    root = state_dir / "registry"
    return {p.parent.name: p.stat().st_size for p in sorted(root.glob("*/history.jsonl"))} if root.is_dir() else {}


def redo_from(state_dir: Path, last: str | None, sizes: dict[str, int],
              names: list[str]) -> tuple[datetime | None, list[str]]:
    """(time from which events are attributed again, model names new since the last pass); None: every event.

    `last` is what the last pass recorded ({"sizes", "names"}). Every event before the earliest entry any
    history gained keeps its intervals and canary arms: an entry only closes the interval open at its time
    and opens the next one."""
    since = now() - RECENT
    try:
        before = json.loads(last or "null")
        seen, known = dict(before["sizes"]), set(before["names"])
    except (ValueError, TypeError, KeyError):
        return None, []  # first pass, or a store from before this format
    if not known <= set(names) or any(sizes.get(scope, 0) < size for scope, size in seen.items()):
        return None, []
    for scope, size in sizes.items():
        if size != seen.get(scope, 0):
            first = _first_new_entry(state_dir / "registry" / scope / "history.jsonl", seen.get(scope, 0))
            if first is None:
                return None, []
            since = min(since, first)
    return since, sorted(set(names) - known)


def _first_new_entry(path: Path, offset: int) -> datetime | None:
    """The earliest `at` of the entries appended past `offset`; None when that is not a line boundary or an
    entry cannot be read (then everything is recomputed)."""
    with path.open("rb") as f:
        if offset:
            f.seek(offset - 1)
            if f.read(1) != b"\n":
                return None
        tail = f.read()
    try:
        stamps = [datetime.fromisoformat(json.loads(line)["at"]) for line in tail.split(b"\n") if line.strip()]
    except (ValueError, KeyError, TypeError):
        return None
    # The registry writes the store's clock (naive UTC); a zone written by hand is converted to it.
    return min((t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t for t in stamps), default=None)


def _scopes(state_dir: Path) -> list[str]:
    root = state_dir / "registry"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(("team:", "dev:"))) \
        if root.is_dir() else []
