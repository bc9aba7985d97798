"""The field's verdicts: finish team canaries and roll back personal versions the editors say are worse.

After each collect (daemon/jobs.py), on one screen:
  1. attribute  each new suggestion to the version that served it (attribution.py)
  2. canaries   for each team canary: its arm against the rest of the team since it started (the same
                days, the same team, so the comparison is fair); worse -> no one gets it; not worse -> everyone
                does; undecided past [online] max_canary_h -> everyone does (the held-out gate passed it and
                the field showed no harm)
  3. personal   for each personal version not judged yet: the developer's suggestions since it was promoted
                against theirs in the `personal_lookback_h` before; worse -> rolled back (their team's, or
                their previous own, answers again); not worse -> judged, kept
Every decision, its numbers and its reason go into the scope's registry history, the log and `status`.
The statistics are in stats.py.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from pipelines.config import Config, OnlineConfig
from pipelines.files import read_json
from pipelines.online.attribution import attribute
from pipelines.online.stats import Arm, Verdict, judge, wilson
from pipelines.publish import registry
from pipelines.store.db import Store, now

log = logging.getLogger("devtune.online")


@dataclass(frozen=True)
class Decision:
    scope: str
    version: str
    action: str  # "promoted" | "rolled_back" | "kept" (a personal version judged not worse) | "wait"
    reason: str
    verdict: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def review(store: Store, cfg: Config) -> list[Decision]:
    """Attribute new events, then decide every canary and personal version the field can decide now."""
    attribute(store, cfg.state_dir, {cfg.serve.model_name})
    decisions = [d for scope in _scopes(cfg, "team:") if (d := _canary(store, cfg, scope)) is not None]
    if cfg.online.judge_personal:
        decisions += [d for scope in _scopes(cfg, "dev:") if (d := _personal(store, cfg, scope)) is not None]
    for d in decisions:
        if d.action != "wait":
            log.info("field verdict %s %s: %s (%s)", d.scope, d.version, d.action, d.reason)
    return decisions


def _canary(store: Store, cfg: Config, scope: str) -> Decision | None:
    running = registry.canary(cfg.state_dir, scope)
    if running is None:
        return None
    started = datetime.fromisoformat(running.started_at)
    counts = {(r["scope"], r["version"]): r for r in store.field_counts(since=started)}
    arm = _arm(counts.get((scope, running.version)))
    rest = _arm(counts.get((scope, running.previous or ""))) if running.previous else _arm(counts.get(("base", "")))
    verdict = _judge(arm, rest, cfg.online)
    overdue = now() - started > timedelta(hours=cfg.online.max_canary_h)
    if verdict.outcome == "wait" and not overdue:
        return Decision(scope, running.version, "wait", verdict.reason, _numbers(verdict, arm, rest))
    promote = verdict.outcome == "not_worse" or (verdict.outcome == "wait" and overdue)
    reason = verdict.reason if verdict.outcome != "wait" else \
        f"{verdict.reason}; [online] max_canary_h = {cfg.online.max_canary_h:g} passed without evidence of harm"
    numbers = _numbers(verdict, arm, rest)
    registry.end_canary(cfg.state_dir, scope, promote, reason, numbers)
    return Decision(scope, running.version, "promoted" if promote else "rolled_back", reason, numbers)


def _personal(store: Store, cfg: Config, scope: str) -> Decision | None:
    """The latest promotion of a personal scope, if it has not been judged yet."""
    history = registry.history(cfg.state_dir, scope)
    promoted = next((e for e in reversed(history) if e.get("action") in ("promote", "rollback")), None)
    if promoted is None or promoted.get("action") != "promote" or not promoted.get("version"):
        return None
    version = str(promoted["version"])
    if any(e.get("action") == "field_verdict" and e.get("version") == version for e in history):
        return None
    at = datetime.fromisoformat(promoted["at"])
    developer = scope.removeprefix("dev:")
    after = store.field_counts(since=at, developers=[developer])
    before = store.field_counts(since=at - timedelta(hours=cfg.online.personal_lookback_h), until=at,
                                developers=[developer])
    new = _arm(next((r for r in after if (r["scope"], r["version"]) == (scope, version)), None))
    old = _arm(_merge(before))
    verdict = _judge(new, old, cfg.online)
    numbers = _numbers(verdict, new, old)
    if verdict.outcome == "wait":
        return Decision(scope, version, "wait", verdict.reason, numbers)
    if verdict.outcome == "worse" and registry.served_version(cfg.state_dir, scope) == version:
        registry.rollback(cfg.state_dir, scope, reason=f"field: {verdict.reason}")
        action = "rolled_back"
    else:
        action = "kept"
    registry.record(cfg.state_dir, scope, {"action": "field_verdict", "version": version, "outcome": action,
                                           "reason": verdict.reason, "verdict": numbers})
    return Decision(scope, version, action, verdict.reason, numbers)


def _judge(candidate: Arm, control: Arm, cfg: OnlineConfig) -> Verdict:
    return judge(candidate, control, cfg.acceptance_margin, cfg.persistence_margin, cfg.min_shown, cfg.min_linked)


def _arm(row: dict[str, Any] | None) -> Arm:
    if row is None:
        return Arm(shown=0, accepted=0)
    return Arm(shown=row["shown"], accepted=row["accepted"], kept=row["kept"], linked=row["linked"])


def _merge(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: sum(r[k] for r in rows) for k in ("shown", "accepted", "kept", "linked")}


def _numbers(verdict: Verdict, candidate: Arm, control: Arm) -> dict[str, Any]:
    return {"outcome": verdict.outcome, "candidate": asdict(candidate), "control": asdict(control),
            "acceptance_diff": verdict.acceptance_diff, "persistence_diff": verdict.persistence_diff}


def _scopes(cfg: Config, prefix: str) -> list[str]:
    root = cfg.state_dir / "registry"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix)) if root.is_dir() else []


def online_report(store: Store, cfg: Config) -> dict[str, Any]:
    """Field numbers per scope and version (the `online` key of `devtune status --json`), with each version's
    cost: its training's wall time and GPU hours, and the gateway's latency while it served."""
    latency = store.latency_by_version()
    out: dict[str, dict[str, Any]] = {}
    for r in store.field_counts():
        low, high = wilson(r["accepted"], r["shown"])
        version = r["version"] or "base"
        entry = {
            "shown": r["shown"], "accepted": r["accepted"],
            "acceptance": round(r["accepted"] / r["shown"], 4) if r["shown"] else None,
            "acceptance_low": round(low, 4), "acceptance_high": round(high, 4),
            "accepted_chars_per_dev_day": round(r["accepted_chars"] / r["dev_days"], 1) if r["dev_days"] else 0.0,
            "kept_rate": round(r["kept"] / r["linked"], 4) if r["linked"] else None,
            "developers": r["developers"],
            **_cost(cfg, r["scope"], r["version"]), **latency.get((r["scope"], r["version"]), {}),
        }
        out.setdefault(r["scope"], {})[version] = entry
    return out


def _cost(cfg: Config, scope: str, version: str) -> dict[str, Any]:
    if not version or not scope.startswith(("team:", "dev:")):
        return {}
    train = (read_json(cfg.state_dir / "registry" / scope / version / "lineage.json") or {}).get("train") or {}
    seconds = float(train.get("seconds") or 0.0)
    gpus = int(train.get("processes") or 1) if str(train.get("device", "")).startswith("cuda") else 0
    return {"train_seconds": round(seconds, 1), "gpu_hours": round(seconds * gpus / 3600, 3),
            "device": train.get("device")}
