"""What `devtune status` shows: store counts, what is served, the last gate decisions, recent runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.config import SourceConfig
from pipelines.publish import registry
from pipelines.publish.publish import exports_of
from pipelines.store.db import Store


def status(store: Store, state_dir: Path, teams: list[str], sources: tuple[SourceConfig, ...]) -> dict[str, Any]:
    """One JSON-ready object; the keys `suggestions`, `commits`, `quarantined` and `served` are a contract
    that outside checks rely on (see README)."""
    report = store.counts()
    collected = store.source_streams()
    health = store.source_health()
    report["sources"] = {}
    for source in sources:
        name = source.name
        h = health.get(name, {})
        report["sources"][name] = {
            "kind": source.kind, "path": str(source.path), **collected.get(name, {"streams": 0, "collected_at": None}),
            "failures": h.get("failures", 0), "error": h.get("error"),
            "failed_at": h["failed_at"].isoformat() if h.get("failed_at") else None,
            "suggestions": report["suggestions"]["by_source"].get(name, {}).get("total", 0),
            "commits": report["commits"]["by_source"].get(name, 0),
            "quarantined": report["quarantined"]["by_source"].get(name, 0),
        }
    served = {}
    for scope, s in registry.served(state_dir).items():
        scores = s.lineage.get("eval", {})
        served[scope] = {
            "version": s.version,
            "path": str(s.path),
            "heldout_loss": scores.get("candidate", {}).get("heldout_loss"),
            "base_heldout_loss": scores.get("base", {}).get("heldout_loss"),
            "metrics": scores.get("candidate"),
            "base_metrics": scores.get("base"),
            "run_id": s.lineage.get("run_id"),
            "registered_at": s.lineage.get("registered_at"),
            "started_from": s.lineage.get("init"),
            "exports": _exports(s),
        }
    report["served"] = served
    marks = store.retrain_marks()
    report["retrain_required"] = {scope: {"version": s["version"], "reason": marks[(scope, s["version"])]}
                                  for scope, s in served.items() if (scope, s["version"]) in marks}
    report["forgotten"] = store.forget_counts()
    report["gate"] = {
        run["scope"]: {"run_id": run["run_id"], "finished_at": run["finished_at"], **run["summary"]["gate"]}
        for run in store.latest_runs_by_scope(with_gate=True)}
    # Which adapter each developer's editor should load: their own, else their team's, else the base model.
    developers = {}
    for team in teams:
        for developer in store.team_developers(team):
            use = registry.adapter_for(state_dir, developer, team)
            developers[developer] = {"team": team, "adapter": use.scope if use else None,
                                     "path": str(state_dir / "served" / use.scope) if use else None}
    report["developers"] = developers
    report["gateway"] = store.gateway_counts()
    report["runs"] = store.runs(limit=10)
    report["state_dir"] = str(state_dir)
    return report


def _exports(served: registry.Served) -> dict[str, Any] | None:
    """{"ok": true, "served_name"} when the version has exports; what its failed export said; None when it was
    registered before exports existed (`devtune publish VERSION --scope S` writes them)."""
    manifest = exports_of(served.path)
    if manifest is not None:
        return {"ok": True, "served_name": manifest["served_name"]}
    recorded: dict[str, Any] | None = served.lineage.get("exports")
    return recorded
