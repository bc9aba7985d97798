"""The store worker: the process of the service that holds the DuckDB file and does what needs it.

`devtune run` (daemon/service.py) is two processes. The service decides when things happen and answers
what needs no store (Continue's events into the inbox, the gateway, health); this worker holds the store
(DuckDB allows one writer process) and answers the API, the dashboard and /metrics, runs collects and cycles,
and watches their training children. The service starts it when a request or a schedule needs the store
and stops it once it has been idle for [api] worker_idle_s (daemon/front.py): DuckDB and pyarrow are most of
a resting service's memory (bench/idle_service.py: their libraries' pages alone are ~55 MB, the whole
process ~175 MB), and nothing at rest needs them.

It serves on 127.0.0.1 at a port of its own and writes its URL to the pipe the service gave it. SIGTERM from
the service stops it as the service used to stop: running training children are stopped (they resume from
their checkpoint next time) and the store is closed. When the service dies outright, the kernel kills the
worker too (SIGKILL): what a killed service left behind is what it always left (Ray jobs to re-attach,
runs to mark failed), and no orphan keeps the store locked.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pyarrow as pa

from daemon import jobs
from daemon.api import ApiServer, ensure_token
from daemon.config import load_config
from daemon.logs import setup_logging
from daemon.runner import training_queue
from daemon.web.dashboard import build_dashboard
from pipelines.config import Config
from pipelines.pretrain.run import pretrain_scope
from pipelines.scope import Scope, ScopeError
from pipelines.store.db import Store
from pipelines.tokens import TokenizerError
from pipelines.train import backends

log = logging.getLogger("devtune.worker")

PR_SET_PDEATHSIG = 1


def run_worker(cfg: Config, ready_fd: int, parent_pid: int) -> int:
    """Serve until SIGTERM; returns the process exit status."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the terminal reaches the service, which stops us
    _die_with(parent_pid)

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

    def collect_now(only: str | None = None, due_only: bool = False) -> dict[str, Any]:
        """A collect asked for by the service (its timer: `due_only`, failed sources wait out their back-off;
        a file event: `only` that source) or by `devtune collect`."""
        result = jobs.collect(store.cursor(), cfg, only, due_only=due_only)
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

    token = ensure_token(cfg.state_dir / "api.token")
    api = ApiServer("127.0.0.1", 0, token, *_routes(cfg, store, collect_now),
                    web=build_dashboard(store, cfg, token) if cfg.api.dashboard else None).start()
    # Ray jobs a killed service left running are watched again, not resubmitted.
    threading.Thread(target=jobs.reattach, args=(store.cursor(), cfg, left_running), name="reattach",
                     daemon=True).start()
    os.write(ready_fd, (api.url + "\n").encode())
    os.close(ready_fd)
    log.info("store worker ready: pid=%d api=%s", os.getpid(), api.url)

    stop.wait()
    log.info("store worker stopping")
    training_queue(cfg.train, cfg.ray).close()  # runs still waiting for a GPU slot give up now
    stopped = backends.stop_all()
    if stopped:
        log.info("stopped %d training/evaluation process(es) or Ray job(s); they resume from their checkpoints "
                 "next cycle", stopped)
    api.stop()
    _wait_for_jobs(timeout_s=60)
    store.close()
    log.info("store worker stopped")
    return 0


def _die_with(parent_pid: int) -> None:
    """SIGKILL this process when the service dies, however it dies: an orphaned worker would keep the store
    locked against the next service and every CLI command."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the service's stop is the only way
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the service died before the line above ran
        os.kill(os.getpid(), signal.SIGKILL)


def give_back_memory() -> None:
    """Hand the heap a job freed back to the system: glibc keeps freed memory in its arenas, and the service
    then sits idle for hours at its busiest size (after a collect of 1,000 events, ~5-10 MB)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _routes(cfg: Config, store: Store, collect_now: Any) -> tuple[dict[Any, Any], dict[Any, Any]]:
    def status(_: dict[str, Any]) -> tuple[int, Any]:
        return HTTPStatus.OK, jobs.status(store.cursor(), cfg)

    def collect(body: dict[str, Any]) -> tuple[int, Any]:
        return HTTPStatus.OK, collect_now(body.get("source"), bool(body.get("due_only")))

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

    def busy(_: dict[str, Any]) -> tuple[int, Any]:
        """What keeps this worker up besides requests (the front stops an idle worker, daemon/front.py)."""
        work = {t.name for t in threading.enumerate() if t.is_alive() and t.name.startswith(("cycle-", "reattach"))}
        return HTTPStatus.OK, {"busy": sorted(work | set(jobs.running_cycles()))}

    routes = {("GET", "/api/status"): status, ("GET", "/api/worker/busy"): busy,
              ("POST", "/api/collect"): collect, ("POST", "/api/cycle"): cycle,
              ("POST", "/api/pretrain"): pretrain,
              ("POST", "/api/dataset"): dataset,
              ("POST", "/api/quarantine/list"): quarantine_list, ("POST", "/api/quarantine/retry"): quarantine_retry,
              ("POST", "/api/forget"): forget, ("POST", "/api/cancel"): cancel}
    return routes, {("GET", "/api/runs/"): run, ("GET", "/api/quarantine/"): quarantine_show}


def _wait_for_jobs(timeout_s: float) -> None:
    """Give running jobs (now without their children) a bounded time to record how they ended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = [t for t in threading.enumerate() if t.name.startswith(("cycle-", "reattach"))]
        if not any(t.is_alive() and not t.daemon for t in busy) and not jobs.running_cycles():
            return
        time.sleep(0.2)
    log.warning("jobs still running after %.0fs; exiting anyway", timeout_s)


def main() -> int:
    parser = argparse.ArgumentParser(description="devtune's store worker (started by `devtune run`, not by hand)")
    parser.add_argument("config", type=Path)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--log-level", default=None)
    args = parser.parse_args()
    cfg = load_config(args.config)
    setup_logging(args.log_level or cfg.log_level)
    return run_worker(cfg, args.ready_fd, args.parent)


if __name__ == "__main__":
    raise SystemExit(main())
