"""The jobs: each is one call into `pipelines`, run through daemon.runner by the CLI, scheduler and API."""

from __future__ import annotations

import functools
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from daemon.config import HTTP_SOURCE, inbox_dir
from daemon.runner import claim_cycle, release_cycle, run_job, running_cycles, training_queue
from pipelines.config import Config
from pipelines.cycle import plan_start, run_cycle
from pipelines.datasets.build import build_datasets
from pipelines.datasets.cache import cache_dir
from pipelines.forget import finish_forgets, forget, forget_opted_out, plan_forget, undo_forget
from pipelines.ingest.identity import Directory
from pipelines.ingest.ingest import SourceReport, collect_source
from pipelines.ingest.quarantine import inspect_quarantined, retry_quarantined
from pipelines.online.review import online_report, review
from pipelines.pretrain.run import pretrain_scope, run_pretrain
from pipelines.publish import registry
from pipelines.scope import Scope, ScopeError
from pipelines.status import status as status_report
from pipelines.store import series
from pipelines.store.db import Store, now
from pipelines.tokens import load_base_tokenizer
from pipelines.train import backends, ray_backend
from pipelines.train.rundir import new_run_id

log = logging.getLogger("devtune.jobs")


# One forget at a time (a collect finishes pending ones first): two would race on the same files.
forgetting = threading.Lock()
# A timer, a file event, a cycle and `devtune collect` can each ask the service for a collect at once. Their
# sources are read one at a time (ingest.collect_lock), but what follows a source's collect was not: two collects
# ending together both inserted a new source's health row (a constraint error, the second collect failed) and
# attributed the same new suggestions to what served them (the online review failed). One collect at a time.
collecting = threading.Lock()

# A failing source is tried again after interval_s, then twice that, and so on up to an hour: a repository
# that cannot be read is not re-walked every 5 minutes, and one that was fixed is picked up within the hour.
MAX_BACKOFF_S = 3600.0


def collect(store: Store, cfg: Config, only: str | None = None, due_only: bool = False) -> dict[str, Any]:
    """Collect every source, or only the one named `only` (a file event's source), each as a job of its own:
    a source that fails is reported (and recorded for `status`) while every other one is collected.

    `due_only` (the service's timer) skips a failed source until its back-off has passed; a collect asked
    for by hand or by a file event tries it at once. First, an interrupted forget is finished and what was
    stored of developers added to `opt_out` since is removed."""
    with collecting:
        return _collect(store, cfg, only, due_only)


def _collect(store: Store, cfg: Config, only: str | None, due_only: bool) -> dict[str, Any]:
    with forgetting:
        forgotten = run_job("forget-pending", lambda: (finish_forgets(store, cfg), forget_opted_out(store, cfg)))
    if forgotten.error:  # the rows stay until the next collect tries again; collecting is still safe
        log.error("collect: finishing forgets failed: %s", forgotten.error)
    directory = Directory.from_config(cfg)
    health = store.source_health()
    reports: list[dict[str, Any]] = []
    for source in cfg.sources:
        if only is not None and source.name != only:
            continue
        wait = retry_in(health.get(source.name), cfg.collect.interval_s)
        if due_only and wait > 0:
            reports.append({**SourceReport(source.name).as_dict(), "error": None,
                            "skipped": f"failed {health[source.name]['failures']} time(s); next try in {wait:.0f}s"})
            continue
        outcome = run_job(f"collect source={source.name}",
                          functools.partial(collect_source, store, source, cfg.collect, directory))
        store.record_collect(source.name, outcome.error)
        report = outcome.value or SourceReport(source.name)
        reports.append({**report.as_dict(), "error": outcome.error})
    prune_inbox(store, cfg)
    # What was just collected may decide a canary or a personal version (pipelines/online/review.py); a failure
    # there is logged and leaves collecting alone.
    decided = run_job("online-review", lambda: review(store, cfg))
    failed = [r for r in reports if r["error"]]
    return {"sources": reports, "failed": [r["source"] for r in failed],
            "error": "; ".join(f"source {r['source']}: {r['error']}" for r in failed) or None,
            "online": [d.as_dict() for d in decided.value or [] if d.action != "wait"]}


def prune_inbox(store: Store, cfg: Config) -> list[str]:
    """Remove the HTTP inbox's day files that are over (a past UTC day) and collected to their end: their
    events are in the store, and the inbox would otherwise grow for ever. Returns the files removed."""
    inbox = inbox_dir(cfg.state_dir)
    today = f"{now():%Y-%m-%d}.jsonl"
    removed = []
    for path in sorted(inbox.glob("*.jsonl")) if inbox.is_dir() else []:
        cursor = store.load_cursor(HTTP_SOURCE, path.name)
        if path.name < today and cursor is not None and cursor.offset == path.stat().st_size:
            path.unlink()
            store.drop_cursor(HTTP_SOURCE, path.name)
            removed.append(path.name)
    return removed


def retry_in(health: dict[str, Any] | None, interval_s: float) -> float:
    """Seconds until a source that failed its last `failures` collects may be tried again (0: now)."""
    if not health or not health["failures"] or health["failed_at"] is None:
        return 0.0
    backoff = min(interval_s * 2 ** (health["failures"] - 1), MAX_BACKOFF_S)
    return max(0.0, backoff - (now() - health["failed_at"]).total_seconds())


def start_cycle(store: Store, cfg: Config, team: str, scope: str | None = None) -> str | None:
    """Record a cycle run for `scope` (default team:<team>) and return its id, or None when one is running.

    When the scope's latest run stopped during training (kill -9, service stop, timeout) and has not used
    up [train] resume_attempts, that run is handed back: the cycle resumes it from its checkpoint.
    """
    scope = scope or f"team:{team}"
    if not claim_cycle(scope):
        return None
    try:
        resumable = store.resumable_run(scope, cfg.train.resume_attempts)
        resumable_dir = cfg.state_dir / "runs" / str(resumable)
        if resumable and (resumable_dir / "config.json").is_file() and not backends.cancelled(resumable_dir):
            attempt = store.restart_run(resumable)
            log.info("run %s %s: picked up again (attempt %d)", resumable, scope, attempt)
            return resumable
        run_id = new_run_id(scope)
        store.start_run(run_id, scope)
    except BaseException:
        release_cycle(scope)
        raise
    return run_id


def due_retrains(store: Store, cfg: Config) -> list[tuple[str, int]]:
    """Teams to retrain now on new data ([schedule] retrain_after_accepted), with their new accepted
    suggestions: at least that many ingested since the team's last run started, and that run at least
    min_retrain_interval_h ago. The cron stays; this only brings a busy team's cycle forward."""
    wanted = cfg.schedule.retrain_after_accepted
    if wanted <= 0:
        return []
    due = []
    for team in cfg.team_names():
        last = series.last_run_started(store, f"team:{team}")
        if last is not None and (now() - last).total_seconds() < cfg.schedule.min_retrain_interval_h * 3600:
            continue
        new = series.accepted_since(store, team, last)
        if new >= wanted:
            due.append((team, new))
    return due


def finish_cycle(store: Store, cfg: Config, team: str, run_id: str) -> dict[str, Any]:
    """Run a started team cycle to its end, then a cycle for each of the team's developers."""
    result = _finish(store, cfg, Scope("team", team), team, run_id)
    result["developers"] = []
    if cfg.train.dev_adapters and result["outcome"] != "failed":
        scopes, unnamed = [], []
        for developer in store.team_developers(team):
            try:
                scopes.append(Scope.parse(f"dev:{developer}"))
            except ScopeError:
                unnamed.append(developer)
        if unnamed:
            log.warning("team:%s: %d developer id(s) cannot name an adapter (letters, digits, @ . _ + - only), "
                        "skipped: %s", team, len(unnamed), ", ".join(map(repr, unnamed[:5])))
        # Whether a developer may start depends on the team's adapter only (it is where theirs starts from):
        # when it cannot, one line for all of them and no run each (a real history has dozens of authors).
        why = plan_start(cfg, scopes[0], team, store.retrain_marks()).why if scopes else ""
        if why:
            log.info("team:%s: %d developer adapter(s) wait: %s", team, len(scopes), why)
            result["developers_waiting"] = {"count": len(scopes), "why": why}
            scopes = []

        def developer_cycle(scope: Scope) -> dict[str, Any] | None:
            mine = store.cursor()  # a DuckDB cursor per thread
            dev_run = start_cycle(mine, cfg, team, str(scope))
            return None if dev_run is None else _finish(mine, cfg, scope, team, dev_run)

        # The developers' runs go at once, as many as the queue has slots (one per GPU slot here, [ray]
        # max_jobs on a cluster): with one slot they run one after another, as before.
        slots = len(training_queue(cfg.train, cfg.ray).slots)
        with ThreadPoolExecutor(max_workers=slots, thread_name_prefix=f"dev-{team}") as pool:
            result["developers"] = [r for r in pool.map(developer_cycle, scopes) if r is not None]
    return result


def reattach(store: Store, cfg: Config, left_running: list[str]) -> list[str]:
    """At service start with `[train] backend = "ray"`: resume now the runs a killed service left running
    whose Ray job is still pending or running, or succeeded meanwhile. Each watches its recorded job again
    (ray_backend.attach_or_submit) instead of submitting a second one, then evaluates, gates and promotes as
    usual; a team's run goes on to its developers. Returns the run ids resumed."""
    if cfg.train.backend != "ray":
        return []
    resumed = []
    for run_id in left_running:
        run = store.run(run_id)
        run_dir = cfg.state_dir / "runs" / run_id
        if run is None or run["stage"] not in ("train", "evaluate") or not (run_dir / "config.json").is_file() \
                or backends.cancelled(run_dir):
            continue
        sid = run_job(f"reattach run={run_id}", functools.partial(ray_backend.live_job, run_dir, cfg.ray.address)).value
        scope = Scope.parse(run["scope"])
        team = scope.name if scope.kind == "team" else _team_of(store, cfg, scope.name)
        if sid is None or team is None or not claim_cycle(str(scope)):
            continue
        store.restart_run(run_id)
        log.info("run %s %s: its Ray job %s outlived the last service; watching it again", run_id, scope, sid)
        work = (functools.partial(finish_cycle, store.cursor(), cfg, team, run_id) if scope.kind == "team"
                else functools.partial(_finish, store.cursor(), cfg, scope, team, run_id))
        threading.Thread(target=work, name=f"reattach-{run_id}", daemon=True).start()
        resumed.append(run_id)
    return resumed


def _team_of(store: Store, cfg: Config, developer: str) -> str | None:
    return next((t for t in cfg.team_names() if developer in store.team_developers(t)), None)


def _finish(store: Store, cfg: Config, scope: Scope, team: str, run_id: str) -> dict[str, Any]:
    queue = training_queue(cfg.train, cfg.ray)
    try:
        outcome = run_job("cycle", lambda: run_cycle(store, cfg, scope, team, run_id, queue.turn,
                                                     lambda: collect(store, cfg)["sources"]), store, run_id)
    finally:
        release_cycle(str(scope))
    result = outcome.value
    return {"run_id": run_id, "scope": str(scope), "outcome": result.outcome if result else "failed",
            "version": result.version if result else None, "error": outcome.error,
            "summary": result.summary if result else {}}


def cycle(store: Store, cfg: Config, team: str) -> dict[str, Any]:
    run_id = start_cycle(store, cfg, team)
    if run_id is None:
        return {"run_id": None, "scope": f"team:{team}", "outcome": "busy", "version": None,
                "error": f"a cycle for team:{team} is already running", "summary": {}, "developers": []}
    return finish_cycle(store, cfg, team, run_id)


def start_pretrain(store: Store, cfg: Config, team: str) -> str | None:
    """Record a continued-pretraining run for `team` (resuming an interrupted one, as cycles do); None when one
    is running."""
    return start_cycle(store, cfg, team, pretrain_scope(cfg, team))


def finish_pretrain(store: Store, cfg: Config, team: str, run_id: str) -> dict[str, Any]:
    scope = pretrain_scope(cfg, team)
    queue = training_queue(cfg.train, cfg.ray)
    try:
        outcome = run_job("pretrain", lambda: run_pretrain(store, cfg, team, run_id, queue.turn), store, run_id)
    finally:
        release_cycle(scope)
    result = outcome.value
    return {"run_id": run_id, "scope": scope, "outcome": result.outcome if result else "failed",
            "version": result.version if result else None, "error": outcome.error,
            "summary": result.summary if result else {}}


def pretrain(store: Store, cfg: Config, team: str) -> dict[str, Any]:
    """`devtune pretrain`: one gated continued pretraining of `team`'s code."""
    run_id = start_pretrain(store, cfg, team)
    if run_id is None:
        scope = pretrain_scope(cfg, team)
        return {"run_id": None, "scope": scope, "outcome": "busy", "version": None,
                "error": f"a run for {scope} is already running", "summary": {}}
    return finish_pretrain(store, cfg, team, run_id)


def build_dataset(store: Store, cfg: Config, scope: Scope, out: Path) -> dict[str, Any]:
    """Write `scope`'s datasets into `out` (the files a cycle writes into its run's data/ folder)."""
    tokenizer = load_base_tokenizer(cfg.base_model)
    return build_datasets(store, scope, cfg.datasets, tokenizer, out, cache_dir(cfg.state_dir)).as_dict()


EXPORT_KEEP_S = 3600


def export_dataset(store: Store, cfg: Config, scope: Scope) -> dict[str, Any]:
    """Build `scope`'s datasets for `devtune dataset build` while the service holds the store.

    The service writes into <state_dir>/exports/ and the CLI copies the files to the folder it was given:
    under systemd the service has its own user, a private /tmp and a read-only /home, so a folder the
    command names could not be written by the service, or would land where its user never sees it.
    Exports older than an hour are removed first (one 1M-suggestion build is about 1 GB of JSONL).
    """
    exports = cfg.state_dir / "exports"
    if exports.is_dir():
        for old in exports.iterdir():
            if time.time() - old.stat().st_mtime > EXPORT_KEEP_S:
                shutil.rmtree(old, ignore_errors=True)
    return build_dataset(store, cfg, scope, exports / new_run_id(str(scope)))


def promote(state_dir: Path, scope: str, version: str) -> dict[str, Any]:
    """Serve `version` of `scope` now (by hand): an atomic symlink swap, recorded in the history."""
    previous = registry.served_version(state_dir, scope)
    link = registry.promote(state_dir, scope, version, reason="promoted by hand")
    return {"scope": scope, "version": version, "previous": previous, "path": str(link.resolve())}


def rollback(state_dir: Path, scope: str) -> dict[str, Any]:
    """Serve again what `scope` served before its current version (atomic; recorded in the history)."""
    current = registry.served_version(state_dir, scope)
    version = registry.rollback(state_dir, scope, reason="rolled back by hand")
    return {"scope": scope, "version": version, "previous": current}


def forget_developer(store: Store, cfg: Config, developer: str, dry_run: bool = False, undo: bool = False
                     ) -> dict[str, Any]:
    """`devtune forget`: what forgetting `developer` removes (`dry_run`), or do it; `undo` lets their future
    events in again."""
    if undo:
        return {"developer": developer, "tombstones_removed": undo_forget(store, cfg, developer)}
    with forgetting:
        plan = plan_forget(store, cfg, developer) if dry_run else forget(store, cfg, developer)
    return {**plan.as_dict(), "done": not dry_run}


def cancel(store: Store, cfg: Config, run_id: str) -> dict[str, Any]:
    """Stop a running run for good (`devtune cancel`): its training or evaluation, local or on Ray, is
    stopped, it fails as cancelled and no later cycle resumes it."""
    run = store.run(run_id)
    if run is None:
        return {"run_id": run_id, "cancelled": False, "error": f"no run {run_id}"}
    if run["status"] != "running":
        return {"run_id": run_id, "cancelled": False, "error": f"run {run_id} is {run['status']}, not running"}
    stopped = backends.cancel(cfg.state_dir / "runs" / run_id)
    log.info("run %s %s: cancelled by hand (%d process(es) or job(s) stopped)", run_id, run["scope"], stopped)
    return {"run_id": run_id, "cancelled": True, "stopped": stopped, "error": None}


def status(store: Store, cfg: Config) -> dict[str, Any]:
    return {**status_report(store, cfg.state_dir, cfg.team_names(), cfg.sources), "online": online_report(store, cfg),
            "field": field_decisions(cfg), "cycles_running": running_cycles(),
            "training_queue": training_queue(cfg.train, cfg.ray).snapshot()}


def field_decisions(cfg: Config) -> dict[str, Any]:
    """Per scope: its running canary, and its last field decision (a canary's end or a personal version's
    verdict, with numbers and reason), from the registry histories."""
    out: dict[str, Any] = {}
    root = cfg.state_dir / "registry"
    for scope in sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        if not scope.startswith(("team:", "dev:")):
            continue
        running = registry.canary(cfg.state_dir, scope)
        last = next((e for e in reversed(registry.history(cfg.state_dir, scope))
                     if e.get("action") in ("canary_end", "field_verdict")), None)
        if running or last:
            out[scope] = {"canary": asdict(running) if running else None, "last": last}
    return out


# -- quarantine ----------------------------------------------------------------------------------------------

def quarantine_list(store: Store, source: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    return store.quarantined(limit=limit, source=source)


def quarantine_show(store: Store, cfg: Config, qid: str) -> dict[str, Any] | None:
    return inspect_quarantined(store, cfg.sources, cfg.collect, qid)


def quarantine_retry(store: Store, cfg: Config, qid: str | None) -> dict[str, Any]:
    """Re-parse one quarantined line (or all): those that parse now are stored and leave the quarantine."""
    directory = Directory.from_config(cfg)
    outcome = run_job("quarantine-retry",
                      lambda: retry_quarantined(store, cfg.sources, cfg.collect, directory, qid))
    return {"results": [asdict(r) for r in outcome.value or []], "error": outcome.error}
