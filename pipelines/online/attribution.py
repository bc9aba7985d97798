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
The result is stored per suggestion (`suggestion_served`, with how it was decided) and recomputed whole when a
history changes (a promotion, rollback or canary); otherwise only new and recent events are (re)attributed,
since a gateway log line can be collected after the editor's event.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipelines.online.timeline import served_intervals
from pipelines.publish import registry
from pipelines.publish.names import served_name
from pipelines.store.db import Store, now

log = logging.getLogger("devtune.online")

GATEWAY_WINDOW_S = 60.0
# Events this recent are attributed again at each pass: a gateway request log is collected on its own
# schedule, and may arrive after the editor event it explains.
RECENT = timedelta(hours=24)


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
    fingerprint = history_fingerprint(state_dir)
    full = store.online_state("history") != fingerprint
    intervals, canaries = served_intervals(state_dir)
    teams = {c.scope for c in canaries}
    arms = []
    for developer, team in store.developers_of_teams([t.removeprefix("team:") for t in teams]):
        for c in canaries:
            if c.scope == f"team:{team}" and registry.in_canary(developer, c.version, c.share):
                arms.append((developer, c.scope, c.version, c.start, c.end))
    names = sorted(model_names | {served_name(scope, v) for scope in _scopes(state_dir)
                                  for v in registry.versions(state_dir, scope)})
    by = store.attribute_suggestions(
        pa.table({"scope": [i.scope for i in intervals], "version": [i.version for i in intervals],
                  "start_at": [i.start for i in intervals], "end_at": [i.end for i in intervals]}),
        pa.table({"developer": [a[0] for a in arms], "scope": [a[1] for a in arms], "version": [a[2] for a in arms],
                  "start_at": [a[3] for a in arms], "end_at": [a[4] for a in arms]},
                 schema=pa.schema([("developer", pa.string()), ("scope", pa.string()), ("version", pa.string()),
                                   ("start_at", pa.timestamp("us")), ("end_at", pa.timestamp("us"))])),
        names, GATEWAY_WINDOW_S, None if full else now() - RECENT)
    store.set_online_state("history", fingerprint)
    report = AttributionReport(sum(by.values()), by, full, time.monotonic() - started)
    if report.attributed:
        log.info("attributed %d suggestion(s) to the versions that served them (%s)%s", report.attributed,
                 ", ".join(f"{k} {v}" for k, v in sorted(by.items())), "; histories changed" if full else "")
    return report


def history_fingerprint(state_dir: Path) -> str:
    """Changes when any scope's history does (they are append-only: their sizes say it)."""
    root = state_dir / "registry"
    sizes = sorted((p.parent.name, p.stat().st_size) for p in root.glob("*/history.jsonl")) if root.is_dir() else []
    return hashlib.sha1(repr(sizes).encode()).hexdigest()


def _scopes(state_dir: Path) -> list[str]:
    root = state_dir / "registry"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(("team:", "dev:"))) \
        if root.is_dir() else []
