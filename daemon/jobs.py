"""The jobs: each is one call into `pipelines`, run through daemon.runner by the CLI, scheduler and API."""

from __future__ import annotations

from typing import Any

from daemon.config import Config
from daemon.runner import claim_cycle, release_cycle, run_job, running_cycles
from pipelines.cycle import run_cycle
from pipelines.ingest import Directory, collect_all
from pipelines.rundir import new_run_id
from pipelines.status import status as status_report
from pipelines.store import Store


def collect(store: Store, cfg: Config, only: str | None = None) -> dict[str, Any]:
    """Collect every source, or only the one named `only` (a file event's source)."""
    directory = Directory.from_config(cfg.teams, cfg.default_team, cfg.collect.opt_out)
    sources = tuple(s for s in cfg.sources if only is None or s.name == only)
    outcome = run_job("collect", lambda: collect_all(store, sources, cfg.collect, directory))
    return {"sources": [r.as_dict() for r in outcome.value or []], "error": outcome.error}


def start_cycle(store: Store, cfg: Config, team: str) -> str | None:
    """Record a new cycle run for `team` and return its id, or None when one is already running."""
    scope = f"team:{team}"
    if not claim_cycle(scope):
        return None
    run_id = new_run_id(scope)
    try:
        store.start_run(run_id, scope)
    except BaseException:
        release_cycle(scope)
        raise
    return run_id


def finish_cycle(store: Store, cfg: Config, team: str, run_id: str) -> dict[str, Any]:
    """Run a started cycle to its end (success, skip or failure) and release its scope."""
    try:
        outcome = run_job("cycle", lambda: run_cycle(store, cfg, team, run_id), store, run_id)
    finally:
        release_cycle(f"team:{team}")
    result = outcome.value
    return {"run_id": run_id, "scope": f"team:{team}", "outcome": result.outcome if result else "failed",
            "version": result.version if result else None, "error": outcome.error,
            "summary": result.summary if result else {}}


def cycle(store: Store, cfg: Config, team: str) -> dict[str, Any]:
    run_id = start_cycle(store, cfg, team)
    if run_id is None:
        return {"run_id": None, "scope": f"team:{team}", "outcome": "busy", "version": None,
                "error": f"a cycle for team:{team} is already running", "summary": {}}
    return finish_cycle(store, cfg, team, run_id)


def status(store: Store, cfg: Config) -> dict[str, Any]:
    return {**status_report(store, cfg.state_dir), "cycles_running": running_cycles()}


# -- quarantine (issue 3) ------------------------------------------------------------------------------------

def quarantine_list(store: Store, source: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    return store.quarantined(limit=limit, source=source)


def quarantine_show(store: Store, cfg: Config, qid: str) -> dict[str, Any] | None:
    from pipelines.ingest import inspect_quarantined

    return inspect_quarantined(store, cfg.sources, cfg.collect, qid)


def quarantine_retry(store: Store, cfg: Config, qid: str | None) -> dict[str, Any]:
    """Re-parse one quarantined line (or all): those that parse now are stored and leave the quarantine."""
    from dataclasses import asdict

    from pipelines.ingest import retry_quarantined

    directory = Directory.from_config(cfg.teams, cfg.default_team, cfg.collect.opt_out, cfg.developers)
    outcome = run_job("quarantine-retry",
                      lambda: retry_quarantined(store, cfg.sources, cfg.collect, directory, qid))
    return {"results": [asdict(r) for r in outcome.value or []], "error": outcome.error}
