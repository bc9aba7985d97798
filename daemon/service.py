"""`devtune run`: the long-running service. It decides when things happen, never how.

It schedules a collect every `[collect] interval_s` and each team's nightly cycle, collects soon after
watched files change, takes Continue's events into the inbox, serves the local API (and the gateway when
[serve] in_service), and tells systemd when it is ready and when it stops. What needs the store is done by
its store worker (daemon/worker.py), a child it starts when needed and stops when idle (daemon/front.py):
the service at rest holds no DuckDB. SIGTERM stops it cleanly: new work stops, the worker stops its
training children (they resume from their checkpoint next time) and closes the store.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.cron import CronTrigger

from collectors import COLLECTORS
from collectors.base import Watch
from collectors.continue_http import append_to_inbox, check_body, wanted
from daemon.api import ApiServer, Inbound, ensure_token, remove_service_file, write_service_file
from daemon.auth import TokenBook
from daemon.config import HTTP_SOURCE, http_token_file, inbox_dir
from daemon.front import StoreWorker, WorkerError
from daemon.notify import notify
from daemon.watch import Debouncer, start_watching
from pipelines.config import Config, SourceConfig
from pipelines.ingest.scrub import scrub_event

log = logging.getLogger("devtune.service")

# A timed collect is skipped while no source's files changed since the last one and none failed; at least
# this often it runs anyway (a change a file's size and mtime do not show, a source that is not a folder).
FORCED_COLLECT_S = 3600.0


def run_service(cfg: Config, config_path: Path, log_level: str | None = None) -> int:
    """Run until SIGTERM or SIGINT; returns the process exit status."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    token = ensure_token(cfg.state_dir / "api.token")
    worker = StoreWorker(config_path, token, cfg.api.worker_idle_s, log_level)
    try:
        # Before READY: the store is ours (or the start fails here, saying why), runs a killed service left
        # running are marked, and its Ray jobs re-attached.
        worker.ensure()
    except WorkerError as e:
        log.error("%s", e)
        return 1
    timer = TimedCollect(cfg)

    def collect_now(only: str | None = None) -> None:
        try:
            worker.call("POST", "/api/collect", {"source": only})
        except WorkerError as e:
            log.error("collect source=%s: %s", only, e)

    def collect_due() -> None:
        if timer.skip():
            return
        try:
            timer.done(worker.call("POST", "/api/collect", {"due_only": True}))
        except WorkerError as e:
            log.error("timed collect: %s", e)

    def team_run(kind: str) -> Callable[[str], None]:
        def start(team: str) -> None:  # the worker runs it in a thread of its own and answers at once
            try:
                started = worker.call("POST", f"/api/{kind}", {"team": team})
                log.info("team=%s: %s run=%s started", team, kind, started["run_id"])
            except WorkerError as e:
                log.warning("team=%s: no %s started: %s", team, kind, e)
        return start

    scheduler = _scheduler(cfg, collect_due, team_run("cycle"), team_run("pretrain"))
    debouncer = Debouncer(cfg.collect.debounce_s, collect_now)
    api = ApiServer(cfg.api.host, cfg.api.port, token, {}, {}, inbound=_inbound(cfg, debouncer.trigger),
                    forward=worker.forward).start()
    observer = start_watching(cfg.sources, debouncer) if cfg.collect.watch else None
    gateway = None
    if cfg.serve.enabled and cfg.serve.in_service:
        # Imported only here: its tokenizer library is ~10 MB of a service that serves no completions.
        from daemon.gateway import start_gateway

        gateway = start_gateway(cfg)
    scheduler.start()
    worker.watch_idle(stop)
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
    api.stop()
    worker.stop()
    remove_service_file(cfg.state_dir)
    log.info("stopped")
    return 0


class TimedCollect:
    """Whether the timer's collect has anything to do: the size and mtime of every file a source's collector
    watches (its log folder, a repository's refs; the whole folder for a source with nothing to watch), as
    they were before the last timed collect. Starting the store worker to find nothing new would cost ~0.6 s
    and ~165 MB every interval_s."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._seen: dict[str, Any] | None = None
        self._pending: dict[str, Any] = {}
        self._last = 0.0

    def skip(self) -> bool:
        self._pending = {s.name: _fingerprint(s) for s in self.cfg.sources}
        if (self._seen is None or self._pending != self._seen or None in self._pending.values()
                or time.monotonic() - self._last > FORCED_COLLECT_S):
            return False
        log.debug("timed collect skipped: no source changed since the last one")
        return True

    def done(self, result: dict[str, Any]) -> None:
        # A failed source (or one waiting out its back-off) is tried again by the next timed collect.
        self._seen = None if result.get("failed") or any(r.get("skipped") for r in result["sources"]) \
            else self._pending
        self._last = time.monotonic()


def _fingerprint(source: SourceConfig) -> tuple[tuple[str, int, int], ...] | None:
    try:
        watches = COLLECTORS[source.kind].watch_paths(source.path) or [Watch(source.path, False, ())]
        files = []
        for watch in watches:
            if not watch.folder.is_dir():
                files.append((str(watch.folder), -1, -1))
                continue
            for path in _watched_files(watch):
                st = os.stat(path)
                files.append((path, st.st_size, st.st_mtime_ns))
        return tuple(sorted(files))
    except Exception:  # noqa: BLE001 - a source its collector cannot look at: the collect will say why
        return None


def _watched_files(watch: Watch) -> list[str]:
    """The files under `watch.folder` (all the way down when recursive) whose names end in its suffixes."""
    if watch.recursive:
        found = [os.path.join(folder, name) for folder, _, names in os.walk(watch.folder) for name in names]
    else:
        found = [e.path for e in os.scandir(watch.folder) if e.is_file()]
    return [f for f in found if not watch.suffixes or f.endswith(watch.suffixes)]


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
