"""`devtune run`: the long-running service. It decides when things happen, never how.

It keeps the store open for its lifetime (DuckDB allows one writer process), schedules a collect every
`[collect] interval_s` and each team's nightly cycle, collects soon after watched files change, serves the
local API, and tells systemd when it is ready and when it stops. SIGTERM stops it cleanly: new work stops,
running training children are stopped (they resume from their checkpoint next time), the store is closed.
"""

from __future__ import annotations

import contextlib
import ctypes
import hmac
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import pyarrow as pa
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from collectors.continue_http import append_to_inbox, check_body, wanted
from daemon import jobs
from daemon.api import ApiServer, Inbound, ensure_token, remove_service_file, write_service_file
from daemon.auth import TokenBook
from daemon.config import HTTP_SOURCE, http_token_file, inbox_dir
from daemon.gateway import start_gateway
from daemon.notify import notify
from daemon.runner import training_queue
from daemon.watch import Debouncer, start_watching
from daemon.web.dashboard import build_dashboard
from pipelines.config import Config
from pipelines.ingest.scrub import scrub_event
from pipelines.pretrain.run import pretrain_scope
from pipelines.scope import Scope, ScopeError
from pipelines.store.db import Store
from pipelines.tokens import TokenizerError
from pipelines.train import backends

log = logging.getLogger("devtune.service")


def run_service(cfg: Config) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit status."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    # pyarrow's default pool (mimalloc) keeps what the batches of a collect used: 18 MB of the idle service's
    # RSS after 1,000 events (bench/idle_service.py). The system allocator gives it back, and ingest is no
    # slower with it (bench/ingest_continue.py, 10k events, three alternating pairs: 1,354-1,412 events/s
    # against 1,244-1,308).
    pa.set_memory_pool(pa.system_memory_pool())
    store = Store.open(cfg.state_dir / "store.duckdb", lock_timeout_s=cfg.api.lock_timeout_s)
    left_running = [r["run_id"] for r in store.runs(limit=1000) if r["status"] == "running"]
    interrupted = store.fail_interrupted_runs()
    if interrupted:
        log.warning("marked %d run(s) left running by a previous process as failed", interrupted)

    def collect_now(only: str | None = None) -> dict[str, Any]:
        result = jobs.collect(store.cursor(), cfg, only)
        retrain_on_new_data()
        give_back_memory()
        return result

    def collect_due() -> dict[str, Any]:  # the timer: failed sources wait out their back-off
        result = jobs.collect(store.cursor(), cfg, due_only=True)
        retrain_on_new_data()
        give_back_memory()
        return result

    def retrain_on_new_data() -> None:
        """[schedule] retrain_after_accepted: a team with enough new accepted suggestions retrains now."""
        for team, new in jobs.due_retrains(store.cursor(), cfg):
            log.info("team=%s: %d accepted suggestions since its last run (retrain_after_accepted = %d): "
                     "starting its cycle now", team, new, cfg.schedule.retrain_after_accepted)
            threading.Thread(target=cycle_now, args=[team], name=f"cycle-{team}", daemon=True).start()

    def cycle_now(team: str) -> None:
        result = jobs.cycle(store.cursor(), cfg, team)
        if result["error"]:
            log.warning("cycle team=%s run=%s: %s", team, result["run_id"], result["error"])
        give_back_memory()

    def pretrain_now(team: str) -> None:
        result = jobs.pretrain(store.cursor(), cfg, team)
        if result["error"]:
            log.warning("pretrain team=%s run=%s: %s", team, result["run_id"], result["error"])
        give_back_memory()

    scheduler = _scheduler(cfg, collect_due, cycle_now, pretrain_now)
    debouncer = Debouncer(cfg.collect.debounce_s, collect_now)
    token = ensure_token(cfg.state_dir / "api.token")
    api = ApiServer(cfg.api.host, cfg.api.port, token, *_routes(cfg, store, collect_now),
                    inbound=_inbound(cfg, debouncer.trigger),
                    web=build_dashboard(store, cfg, token) if cfg.api.dashboard else None).start()
    observer = start_watching(cfg.sources, debouncer) if cfg.collect.watch else None
    gateway = start_gateway(cfg) if cfg.serve.enabled and cfg.serve.in_service else None
    scheduler.start()
    # Ray jobs a killed service left running are watched again, not resubmitted (asking the cluster may take
    # a while: not before READY).
    threading.Thread(target=jobs.reattach, args=(store.cursor(), cfg, left_running), name="reattach",
                     daemon=True).start()
    write_service_file(cfg.state_dir, api.url)
    notify("READY=1")
    serving = f"; completions at {gateway.url}/v1" if gateway is not None else ""
    notify(f"STATUS=serving {api.url}{serving}; {len(cfg.sources)} sources, teams {', '.join(cfg.team_names())}")
    if cfg.api.dashboard:
        log.info("dashboard at %s/dashboard (log in with the token in %s), Prometheus metrics at %s/metrics",
                 api.url, cfg.state_dir / "api.token", api.url)
    log.info("devtune service ready: api=%s state_dir=%s sources=%d teams=%s", api.url, cfg.state_dir,
             len(cfg.sources), ",".join(cfg.team_names()))

    watchdog_s = int(os.environ.get("WATCHDOG_USEC", "0")) / 2e6
    while not stop.wait(timeout=watchdog_s or 3600):
        if watchdog_s:
            notify("WATCHDOG=1")

    notify("STOPPING=1")
    log.info("stopping: finishing or stopping running work")
    debouncer.cancel()
    if observer is not None:
        observer.stop()
    scheduler.shutdown(wait=False)
    if gateway is not None:
        gateway.stop()  # its worker child goes with it
    training_queue(cfg.train, cfg.ray).close()  # runs still waiting for a GPU slot give up now
    stopped = backends.stop_all()
    if stopped:
        log.info("stopped %d training/evaluation process(es) or Ray job(s); they resume from their checkpoints "
                 "next cycle", stopped)
    api.stop()
    _wait_for_jobs(scheduler, timeout_s=60)
    remove_service_file(cfg.state_dir)
    store.close()
    log.info("stopped")
    return 0


def give_back_memory() -> None:
    """Hand the heap a job freed back to the system: glibc keeps freed memory in its arenas, and the service
    then sits idle for hours at its busiest size (after a collect of 1,000 events, ~5-10 MB)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _scheduler(cfg: Config, collect_now: Any, cycle_now: Any, pretrain_now: Any = None) -> BackgroundScheduler:
    tz = cfg.schedule.timezone or None
    scheduler = BackgroundScheduler(
        timezone=tz,
        # A job that missed its time while the machine slept runs once when it wakes, not once per miss.
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 6 * 3600},
    )
    scheduler.add_job(collect_now, "interval", seconds=cfg.collect.interval_s, id="collect",
                      next_run_time=datetime.now().astimezone())
    for team in cfg.team_names():
        cron = next((t.cycle_cron for t in cfg.teams if t.name == team and t.cycle_cron), cfg.schedule.cycle_cron)
        scheduler.add_job(cycle_now, CronTrigger.from_crontab(cron, timezone=tz), args=[team], id=f"cycle:{team}")
        log.info("team=%s cycle cron=%r", team, cron)
        if cfg.pretrain.cron and pretrain_now is not None:
            scheduler.add_job(pretrain_now, CronTrigger.from_crontab(cfg.pretrain.cron, timezone=tz), args=[team],
                              id=f"pretrain:{team}")
    return scheduler


def _routes(cfg: Config, store: Store, collect_now: Any) -> tuple[dict[Any, Any], dict[Any, Any]]:
    def status(_: dict[str, Any]) -> tuple[int, Any]:
        return HTTPStatus.OK, jobs.status(store.cursor(), cfg)

    def collect(body: dict[str, Any]) -> tuple[int, Any]:
        return HTTPStatus.OK, collect_now(body.get("source"))

    def team_run(body: dict[str, Any], kind: str) -> tuple[int, Any]:
        """POST /api/cycle and /api/pretrain: the team's run is started in a thread and its id answered at once;
        409 while that team's run of the same kind is still going."""
        team = body.get("team") or cfg.default_team
        if unknown := cfg.unknown_team(team):
            return HTTPStatus.NOT_FOUND, {"error": unknown}
        start, finish, scope, busy = {
            "cycle": (jobs.start_cycle, jobs.finish_cycle, f"team:{team}",
                      f"a cycle for team:{team} is already running"),
            "pretrain": (jobs.start_pretrain, jobs.finish_pretrain, pretrain_scope(cfg, team),
                         f"continued pretraining of team {team} is already running"),
        }[kind]
        cursor = store.cursor()
        run_id = start(cursor, cfg, team)
        if run_id is None:
            return HTTPStatus.CONFLICT, {"error": busy}
        name = f"cycle-{team}" if kind == "cycle" else f"cycle-{kind}-{team}"  # "cycle-*": the stop waits for it
        threading.Thread(target=finish, args=(cursor, cfg, team, run_id), name=name, daemon=True).start()
        return HTTPStatus.ACCEPTED, {"run_id": run_id, "scope": scope}

    def cycle(body: dict[str, Any]) -> tuple[int, Any]:
        return team_run(body, "cycle")

    def pretrain(body: dict[str, Any]) -> tuple[int, Any]:
        return team_run(body, "pretrain")

    def dataset(body: dict[str, Any]) -> tuple[int, Any]:
        try:
            scope = Scope.parse(str(body.get("scope", "")))
        except ScopeError as e:
            return HTTPStatus.BAD_REQUEST, {"error": str(e)}
        if scope.kind == "team" and (unknown := cfg.unknown_team(scope.name)):
            return HTTPStatus.NOT_FOUND, {"error": unknown}
        try:
            return HTTPStatus.OK, jobs.export_dataset(store.cursor(), cfg, scope)
        except TokenizerError as e:
            return HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(e)}

    def run(run_id: str) -> tuple[int, Any]:
        found = store.cursor().run(run_id)
        return (HTTPStatus.OK, found) if found else (HTTPStatus.NOT_FOUND, {"error": f"no run {run_id}"})

    def cancel(body: dict[str, Any]) -> tuple[int, Any]:
        return HTTPStatus.OK, jobs.cancel(store.cursor(), cfg, str(body.get("run_id") or ""))

    def quarantine_list(body: dict[str, Any]) -> tuple[int, Any]:
        return HTTPStatus.OK, jobs.quarantine_list(store.cursor(), body.get("source"), int(body.get("limit", 50)))

    def quarantine_show(qid: str) -> tuple[int, Any]:
        found = jobs.quarantine_show(store.cursor(), cfg, qid)
        return (HTTPStatus.OK, found) if found else (HTTPStatus.NOT_FOUND, {"error": f"no quarantined line {qid}"})

    def quarantine_retry(body: dict[str, Any]) -> tuple[int, Any]:
        return HTTPStatus.OK, jobs.quarantine_retry(store.cursor(), cfg, body.get("id"))

    def forget(body: dict[str, Any]) -> tuple[int, Any]:
        developer = str(body.get("developer") or "")
        if not developer:
            return HTTPStatus.BAD_REQUEST, {"error": "give the developer's id or an alias"}
        return HTTPStatus.OK, jobs.forget_developer(store.cursor(), cfg, developer, dry_run=bool(body.get("dry_run")),
                                                    undo=bool(body.get("undo")))

    routes = {("GET", "/api/status"): status, ("POST", "/api/collect"): collect, ("POST", "/api/cycle"): cycle,
              ("POST", "/api/pretrain"): pretrain,
              ("POST", "/api/dataset"): dataset,
              ("POST", "/api/quarantine/list"): quarantine_list, ("POST", "/api/quarantine/retry"): quarantine_retry,
              ("POST", "/api/forget"): forget, ("POST", "/api/cancel"): cancel}
    return routes, {("GET", "/api/runs/"): run, ("GET", "/api/quarantine/"): quarantine_show}


def _inbound(cfg: Config, collect_soon: Callable[[str], None]) -> dict[str, Inbound]:
    """Continue's HTTP `data:` destination: append each event durably to the inbox, then answer."""
    if not cfg.continue_http.enabled:
        return {}
    inbox = inbox_dir(cfg.state_dir)
    inbox.mkdir(parents=True, exist_ok=True)
    book = TokenBook(cfg.state_dir)
    shared = ensure_token(http_token_file(cfg)) if cfg.continue_http.shared_token else None
    log.info("continue http destination on: POST /continue/devdata with a developer's token%s",
             f" or the team-wide token in {http_token_file(cfg)}" if shared else "")

    def caller(token: str) -> str | None:
        """A developer token's owner; "" for the team-wide token (then X-Developer says who); None: refused."""
        developer = book.developer(token)
        if developer is not None:
            return developer
        if shared is not None and hmac.compare_digest(token.encode(), shared.encode()):
            return ""
        return None

    def devdata(developer: str, headers: Mapping[str, str], raw: bytes) -> tuple[int, Any]:
        body = check_body(raw)
        if isinstance(body, str):
            log.warning("continue http destination: refused a body: %s", body)
            return HTTPStatus.BAD_REQUEST, {"error": body}
        if not wanted(body):
            return HTTPStatus.OK, {"stored": False, "reason": f"devtune does not keep {body['name']} events"}
        # The raw body never touches disk: it is scrubbed as ingest would scrub it (~70 us for a 3.5 KB event,
        # against ~1.2 ms a POST costs at the destination's ~800/s), and the inbox line counts what went.
        # Continue never retries, so the answer waits for the fsync: a crash after it loses nothing.
        found: Counter[str] = Counter()
        body = {**body, "data": scrub_event(body["data"], found)}
        try:
            append_to_inbox(inbox, body, developer or headers.get("x-developer", "").strip(),
                            datetime.now(UTC).replace(tzinfo=None), by_token=bool(developer), scrubbed=dict(found))
        except OSError as e:
            log.error("continue http destination: cannot write to %s (%s): free space or fix its permissions; "
                      "events are refused with 503 meanwhile", inbox, e.strerror)
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"the devtune inbox is not writable: {e.strerror}"}
        collect_soon(HTTP_SOURCE)
        return HTTPStatus.OK, {"stored": True}

    return {"/continue/devdata": Inbound(caller, cfg.continue_http.max_body_bytes, devdata)}


def _wait_for_jobs(scheduler: BackgroundScheduler, timeout_s: float) -> None:
    """Give running jobs (now without their children) a bounded time to record how they ended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = [t for t in threading.enumerate() if t.name.startswith(("cycle-", "APScheduler", "ThreadPool"))]
        if not any(t.is_alive() and not t.daemon for t in busy) and not jobs.running_cycles():
            return
        time.sleep(0.2)
    log.warning("jobs still running after %.0fs; exiting anyway", timeout_s)
