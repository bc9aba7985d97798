"""Read-only series over the store for the dashboard and `/metrics`: counts per day, per source, per
developer, per served version. Nothing here writes; every function takes the service's own cursor.

Days are UTC dates, as every timestamp in the store is UTC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from pipelines.store.db import Store, now

# Events of every kind the collectors store, each with its own time column: what "events per day" counts.
_EVENTS = """
    SELECT shown_at AS event_at, source, developer FROM suggestions
    UNION ALL SELECT decided_at, source, developer FROM edit_outcomes
    UNION ALL SELECT occurred_at, source, developer FROM interactions
    UNION ALL SELECT committed_at, source, developer FROM commits
"""
# What served a suggestion, as the dashboard and the field table name it ("team:x/v0003", "base", "unknown").
_SERVED = ("CASE WHEN v.scope IS NULL OR v.served_by = 'unknown' THEN 'unknown' WHEN v.version IS NULL THEN v.scope "
           "ELSE v.scope || '/' || v.version END")


@dataclass(frozen=True)
class DayCount:
    day: date
    key: str  # a source, a developer, a served version: what the row counts by
    count: int


@dataclass(frozen=True)
class DayRate:
    day: date
    key: str  # the served version ("team:x/v0003", "base", "unknown")
    shown: int
    accepted: int


@dataclass(frozen=True)
class DeveloperVolume:
    developer: str
    team: str
    suggestions: int
    accepted: int
    commits: int
    edits: int
    last_seen: datetime | None


def since(days: int, today: date | None = None) -> date:
    """The first day of a window of `days` days ending today."""
    return (today or now().date()) - timedelta(days=days - 1)


def events_per_day(store: Store, by: str, first_day: date) -> list[DayCount]:
    """Stored events (suggestions, edit outcomes, interactions, commits) per day and `by` ("source" or
    "developer")."""
    assert by in ("source", "developer"), by
    rows = store.con.execute(
        f"SELECT CAST(event_at AS DATE), {by}, count(*) FROM ({_EVENTS}) WHERE event_at >= ? "
        "GROUP BY 1, 2 ORDER BY 1, 2", [first_day]).fetchall()
    return [DayCount(r[0], r[1], int(r[2])) for r in rows]


def acceptance_per_day(store: Store, first_day: date) -> list[DayRate]:
    """Suggestions shown and accepted per day and the version that served them (pipelines/online)."""
    rows = store.con.execute(
        f"SELECT CAST(s.shown_at AS DATE), {_SERVED}, count(*), count(*) FILTER (WHERE s.accepted) "
        "FROM suggestions s LEFT JOIN suggestion_served v ON v.suggestion_id = s.id WHERE s.shown_at >= ? "
        "GROUP BY 1, 2 ORDER BY 1, 2", [first_day]).fetchall()
    return [DayRate(r[0], r[1], int(r[2]), int(r[3])) for r in rows]


def quarantined_per_day(store: Store, first_day: date) -> list[DayCount]:
    rows = store.con.execute(
        "SELECT CAST(quarantined_at AS DATE), source, count(*) FROM quarantine WHERE quarantined_at >= ? "
        "GROUP BY 1, 2 ORDER BY 1, 2", [first_day]).fetchall()
    return [DayCount(r[0], r[1], int(r[2])) for r in rows]


def developer_volumes(store: Store) -> list[DeveloperVolume]:
    """Per stored developer: their team, how much of their data is stored, when they were last seen."""
    rows = store.con.execute(f"""
        WITH e AS ({_EVENTS}), t AS (
            SELECT developer, any_value(team) AS team FROM (
                SELECT developer, team FROM suggestions UNION ALL SELECT developer, team FROM commits
                UNION ALL SELECT developer, team FROM edit_outcomes) GROUP BY 1)
        SELECT d.developer, coalesce(t.team, ''),
               (SELECT count(*) FROM suggestions s WHERE s.developer = d.developer),
               (SELECT count(*) FROM suggestions s WHERE s.developer = d.developer AND s.accepted),
               (SELECT count(*) FROM commits c WHERE c.developer = d.developer),
               (SELECT count(*) FROM edit_outcomes o WHERE o.developer = d.developer),
               d.last_seen
        FROM (SELECT developer, max(event_at) AS last_seen FROM e GROUP BY 1) d LEFT JOIN t USING (developer)
        ORDER BY 3 + 5 DESC, 1""").fetchall()
    return [DeveloperVolume(r[0], r[1], int(r[2]), int(r[3]), int(r[4]), int(r[5]), r[6]) for r in rows]


def ingested_by_source(store: Store) -> dict[tuple[str, str], int]:
    """Stored rows per (source, kind of row): suggestions, commits, edit outcomes, interactions."""
    rows = store.con.execute("""
        SELECT source, 'suggestion', count(*) FROM suggestions GROUP BY 1
        UNION ALL SELECT source, 'commit', count(*) FROM commits GROUP BY 1
        UNION ALL SELECT source, 'edit_outcome', count(*) FROM edit_outcomes GROUP BY 1
        UNION ALL SELECT source, 'interaction', count(*) FROM interactions GROUP BY 1""").fetchall()
    return {(r[0], r[1]): int(r[2]) for r in rows}


def runs_by_outcome(store: Store) -> dict[tuple[str, str], int]:
    """Runs per (scope kind, status): team or dev; succeeded, failed, skipped, running."""
    rows = store.con.execute(
        "SELECT split_part(scope, ':', 1), status, count(*) FROM runs GROUP BY 1, 2").fetchall()
    return {(r[0], r[1]): int(r[2]) for r in rows}


def gateway_latencies(store: Store, bounds_ms: tuple[float, ...]) -> dict[str, Any]:
    """The gateway's answered requests per (adapter, status), and a cumulative latency histogram over
    `bounds_ms` (as Prometheus histograms count: requests at or under each bound), with the sum."""
    requests = {(r[0], int(r[1])): int(r[2]) for r in store.con.execute(
        "SELECT coalesce(scope || '/' || version, 'base'), status, count(*) FROM gateway_requests GROUP BY 1, 2"
    ).fetchall()}
    cases = ", ".join(f"count(*) FILTER (WHERE latency_ms <= {float(b)!r})" for b in bounds_ms)
    row = store.con.execute(f"SELECT {cases}, count(*), coalesce(sum(latency_ms), 0) FROM gateway_requests"
                            ).fetchone()
    assert row is not None
    return {"requests": requests, "buckets": [int(n) for n in row[:len(bounds_ms)]],
            "count": int(row[len(bounds_ms)]), "sum_ms": float(row[-1])}


def collect_lag_s(store: Store) -> dict[str, float]:
    """Per source: seconds since one of its cursors last moved (how stale its data may be)."""
    at = now()
    return {r[0]: (at - r[1]).total_seconds() for r in store.con.execute(
        "SELECT source, max(updated_at) FROM cursors GROUP BY 1").fetchall() if r[1] is not None}


def accepted_since(store: Store, team: str, after: datetime | None) -> int:
    """A team's accepted suggestions ingested after `after` (all when None): the new data a retrain would
    learn from ([schedule] retrain_after_accepted)."""
    row = store.con.execute(
        "SELECT count(*) FROM suggestions WHERE team = ? AND accepted AND (?::TIMESTAMP IS NULL OR ingested_at > ?)",
        [team, after, after]).fetchone()
    return int(row[0]) if row else 0


def last_run_started(store: Store, scope: str) -> datetime | None:
    row = store.con.execute("SELECT max(started_at) FROM runs WHERE scope = ?", [scope]).fetchone()
    return row[0] if row else None
