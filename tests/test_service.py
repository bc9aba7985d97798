"""`devtune run` as systemd runs it: READY/STOPPING over a real notify socket, the API, file watching."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon import auth
from support import (
    ROOT,
    T0,
    CommitSpec,
    autocomplete_event,
    big_backlog,
    commit,
    continue_log,
    day_ms,
    devtune_json,
    make_repo,
    process_running,
    run_devtune,
    tabby_action,
    tabby_completion,
    wait_until,
    write_config,
    write_lines,
)


class Service:
    def __init__(self, proc: subprocess.Popen[str], notify: socket.socket, config: Path, state_dir: Path):
        self.proc, self.notify, self.config, self.state_dir = proc, notify, config, state_dir
        self.messages: list[str] = []

    def wait_for(self, message: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while message not in self.messages:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                out = self.proc.stdout.read() if self.proc.poll() is not None and self.proc.stdout else ""
                raise AssertionError(f"no {message!r} from the service; got {self.messages}; output:\n{out}")
            self.notify.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.notify.recv(4096).decode())

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = devtune_json("--config", str(self.config), "status", "--json")
        return result


@pytest.fixture
def service(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Service]:
    """The real service on three sources; a test may add config overrides (indirect parametrization)."""
    extra: dict[str, dict[str, Any]] = getattr(request, "param", {})
    continue_log(tmp_path / "alice", [autocomplete_event(completionId=f"start-{i}") for i in range(3)])
    make_repo(tmp_path / "repo", [CommitSpec({"a.py": "A = 1\n"}, when=T0)])
    (tmp_path / "tabby" / "events").mkdir(parents=True)
    setup = write_config(tmp_path / "site", [
        {"kind": "continue", "path": str(tmp_path / "alice"), "name": "alice", "developer": "alice@example.com"},
        {"kind": "tabby", "path": str(tmp_path / "tabby"), "name": "tabby"},
        {"kind": "git", "path": str(tmp_path / "repo"), "name": "repo"}],
        # a base model that is not there: nothing is downloaded, whatever the machine's network or cache
        overrides={"": {"base_model": str(tmp_path / "no-model")},
                   "collect": {"interval_s": 3600.0, "debounce_s": 0.3, **extra.get("collect", {})},
                   "schedule": {"cycle_cron": "0 3 1 1 *"}, "continue_http": {"enabled": True},
                   **{k: v for k, v in extra.items() if k not in ("", "collect")}})
    # AF_UNIX paths are limited to 108 bytes: keep the socket out of pytest's long tmp paths.
    sock_dir = tempfile.mkdtemp(prefix="dt-", dir="/tmp")
    sock_path = os.path.join(sock_dir, "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(sock_path)
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(setup.config), "run"], cwd=ROOT,
                            env={**os.environ, "NOTIFY_SOCKET": sock_path}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    svc = Service(proc, notify, setup.config, setup.state_dir)
    try:
        yield svc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        os.unlink(sock_path)
        os.rmdir(sock_dir)


def test_service_lifecycle(service: Service, tmp_path: Path) -> None:
    service.wait_for("READY=1")
    info = json.loads((service.state_dir / "service.json").read_text())
    assert info["pid"] == service.proc.pid and info["url"].startswith("http://127.0.0.1:")

    # The first collect runs at start; CLI reads go through the API while the service holds the store.
    wait_until(lambda: service.status()["suggestions"]["total"] == 3)
    human = run_devtune("--config", str(service.config), "status")
    assert human.returncode == 0 and "(service running)" in human.stdout
    report = service.status()
    assert report["commits"]["total"] == 1
    # the service's training queue is in its status (empty: no cycle has run), as are the gate decisions
    assert report["training_queue"] == [] and report["gate"] == {} and report["served"] == {}

    # A new line in a watched log is collected without waiting for the hourly interval.
    continue_log(tmp_path / "alice", [autocomplete_event(completionId="live-1")], append=True)
    wait_until(lambda: service.status()["suggestions"]["total"] == 4)

    # A new Tabby day file is picked up too (a completion and its view: one shown suggestion).
    day = "2026-10-01"
    write_lines(tmp_path / "tabby" / "events" / f"{day}.json",
                [tabby_completion("cmpl-live", day_ms(day, 1)), tabby_action("view", "cmpl-live", day_ms(day, 2))])
    wait_until(lambda: service.status()["suggestions"]["total"] == 5)

    collect = run_devtune("--config", str(service.config), "collect")
    assert collect.returncode == 0 and "nothing new" in collect.stdout

    # Real HTTP on 127.0.0.1: the API refuses requests without the token.
    with pytest.raises(urllib.error.HTTPError) as info_401:
        urllib.request.urlopen(info["url"] + "/api/status", timeout=5)
    assert info_401.value.code == 401
    with urllib.request.urlopen(info["url"] + "/healthz", timeout=5) as resp:
        assert json.loads(resp.read()) == {"ok": True}
    # The dashboard and /metrics share the port and the token (tests/test_dashboard.py has the rest).
    token = (service.state_dir / "api.token").read_text().strip()
    scrape = urllib.request.Request(info["url"] + "/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(scrape, timeout=30) as resp:
        text = resp.read().decode()
    assert 'devtune_events_ingested_total{kind="suggestion",source="alice"} 4.0' in text
    with pytest.raises(urllib.error.HTTPError) as metrics_401:
        urllib.request.urlopen(info["url"] + "/metrics", timeout=5)
    assert metrics_401.value.code == 401
    with urllib.request.urlopen(info["url"] + "/dashboard", timeout=5) as resp:  # sent on to the login page
        assert resp.url.startswith(info["url"] + "/login") and "api.token" in resp.read().decode()

    service.proc.send_signal(signal.SIGTERM)
    service.wait_for("STOPPING=1")
    assert service.proc.wait(timeout=60) == 0
    assert not (service.state_dir / "service.json").exists()
    # the store was closed cleanly: this process can open it now
    from pipelines.store.db import Store

    Store.open(service.state_dir / "store.duckdb").close()


def test_an_event_posted_by_continue_survives_a_kill_right_after_the_answer(service: Service) -> None:
    service.wait_for("READY=1")
    url = json.loads((service.state_dir / "service.json").read_text())["url"]
    token, _ = auth.issue(service.state_dir, "alice@example.com")  # read by the running service at the POST
    body = {"name": "autocomplete", "data": autocomplete_event(completionId="posted-then-killed"),
            "schema": "0.2.0", "level": "all", "profileId": "local"}
    req = urllib.request.Request(url + "/continue/devdata", data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    worker = worker_pids(service)
    assert len(worker) == 1  # its store worker: started before READY, idle for worker_idle_s (300 s) first
    service.proc.kill()  # SIGKILL at once: no debounced collect can have run (debounce_s = 0.3)
    service.proc.wait()
    # The worker goes with it (the kernel kills it): it must not keep the store from the next one.
    wait_until(lambda: not process_running(worker[0]), timeout=30)
    collect = run_devtune("--config", str(service.config), "collect", "--json")
    assert collect.returncode == 0, collect.stderr
    from pipelines.store.db import Store

    store = Store.open(service.state_dir / "store.duckdb")
    try:
        ids = {r[0] for r in store.con.execute("SELECT id FROM suggestions").fetchall()}
    finally:
        store.close()
    assert "posted-then-killed" in ids


def test_cycle_and_pretrain_asked_of_the_running_service(service: Service) -> None:
    # `devtune cycle` and `devtune pretrain` find the running service and ask it (POST /api/cycle, /api/pretrain):
    # the run happens in the service, and the CLI follows it to its end and reports its outcome.
    service.wait_for("READY=1")
    for command, scope in (("cycle", "team:default"), ("pretrain", "cpt:default")):
        result = run_devtune("--config", str(service.config), command, "--json")
        runs = json.loads(result.stdout)
        assert len(runs) == 1 and runs[0]["scope"] == scope, result.stdout + result.stderr
        assert runs[0]["run_id"] in {r["run_id"] for r in service.status()["runs"]}  # the service's own record
        assert f"run={runs[0]['run_id']} started by the service" in result.stderr
        # The fixture's base_model is missing: the run fails in the service, and the CLI says why and exits 1.
        assert runs[0]["outcome"] == "failed" and result.returncode == 1
        assert "cannot load the tokenizer of base_model" in runs[0]["error"] and "no-model" in runs[0]["error"]
    unknown = run_devtune("--config", str(service.config), "pretrain", "--team", "nosuch")
    assert unknown.returncode == 2 and "nosuch" in unknown.stderr


def test_a_command_run_while_the_service_starts_waits_for_its_api(service: Service) -> None:
    # A starting service holds the store some seconds before it writes service.json (a restarted service took
    # over 2 s under load). A command run in that window waits on the busy store while looking for the service
    # again, and asks the service once it is there, instead of failing when the store's lock wait runs out.
    service.wait_for("READY=1")
    info = service.state_dir / "service.json"
    hidden = info.with_name("service.json.hidden")
    config = service.config.with_name("config-wait.toml")
    config.write_text(service.config.read_text().replace("lock_timeout_s = 2.0", "lock_timeout_s = 30.0"))
    info.rename(hidden)
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(config), "status", "--json"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(4.0)
        assert proc.poll() is None, proc.communicate()  # the store is busy and no service is known: waiting
        hidden.rename(info)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert time.monotonic() - started < 20  # answered by the service, not after the 30 s lock wait ran out
    assert json.loads(out)["suggestions"]["total"] >= 3


def worker_pids(service: Service) -> list[int]:
    """The service's children: its store worker when it is up (the fixture starts no gateway)."""
    found = []
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, IndexError):
            if entry.isdigit() and int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) \
                    == service.proc.pid:
                found.append(int(entry))
    return found


def rss_mb(pid: int) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.parametrize("service", [{"api": {"worker_idle_s": 1.0}}], indirect=True)
def test_the_store_worker_stops_when_idle_and_starts_when_needed(service: Service, tmp_path: Path) -> None:
    service.wait_for("READY=1")
    wait_until(lambda: service.status()["suggestions"]["total"] == 3)
    # Idle for worker_idle_s: the worker is stopped, the store is closed, and the service holds no DuckDB.
    wait_until(lambda: not worker_pids(service), timeout=30)
    assert rss_mb(service.proc.pid) < 100  # ~41 MB (bench/idle_service.py); the worker alone is ~200 MB
    maps = Path(f"/proc/{service.proc.pid}/maps").read_text()
    assert "duckdb" not in maps and "libarrow" not in maps

    # Prometheus while the worker is down: the kept scrape answers, and the worker stays down.
    url = json.loads((service.state_dir / "service.json").read_text())["url"]
    token = (service.state_dir / "api.token").read_text().strip()
    scrape = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(scrape, timeout=30) as resp:
        text = resp.read().decode()
    assert 'devtune_events_ingested_total{kind="suggestion",source="alice"} 3.0' in text
    lag = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
           if line.startswith('devtune_collect_lag_seconds{source="alice"}')]
    assert len(lag) == 1 and lag[0] > 0
    assert worker_pids(service) == []
    with pytest.raises(urllib.error.HTTPError) as refused:  # no token, no metrics, kept or not
        urllib.request.urlopen(url + "/metrics", timeout=30)
    assert refused.value.code == 401

    # A watched file changes: the collect it causes starts a worker again, and the CLI reads through it.
    continue_log(tmp_path / "alice", [autocomplete_event(completionId="after-idle")], append=True)
    wait_until(lambda: service.status()["suggestions"]["total"] == 4, timeout=60)
    wait_until(lambda: not worker_pids(service), timeout=30)
    assert service.status()["suggestions"]["total"] == 4  # a command alone starts one too


def test_a_timed_collect_starts_no_worker_while_nothing_changed(tmp_path: Path) -> None:
    from daemon.config import load_config
    from daemon.service import TimedCollect

    continue_log(tmp_path / "alice", [autocomplete_event(completionId="one")])
    make_repo(tmp_path / "repo", [CommitSpec({"a.py": "A = 1\n"}, when=T0)])
    (tmp_path / "tabby" / "events").mkdir(parents=True)
    setup = write_config(tmp_path / "site", [
        {"kind": "continue", "path": str(tmp_path / "alice"), "name": "alice", "developer": "alice@example.com"},
        {"kind": "tabby", "path": str(tmp_path / "tabby"), "name": "tabby"},
        {"kind": "git", "path": str(tmp_path / "repo"), "name": "repo"}])
    timer = TimedCollect(load_config(setup.config))
    ok = {"sources": [{"source": "alice"}], "failed": []}
    assert not timer.skip()  # never collected
    timer.done(ok)
    assert timer.skip()
    continue_log(tmp_path / "alice", [autocomplete_event(completionId="two")], append=True)
    assert not timer.skip()
    timer.done(ok)
    assert timer.skip()
    import git

    commit(git.Repo(tmp_path / "repo"), CommitSpec({"b.py": "B = 2\n"}, when=T0))  # a new commit: a ref moves
    assert not timer.skip()
    timer.done(ok)
    write_lines(tmp_path / "tabby" / "events" / "2026-10-01.json", [tabby_completion("c1", day_ms("2026-10-01", 1))])
    assert not timer.skip()
    # A source that failed, or waits out its back-off, is tried by the next timed collect, changed or not.
    timer.done({"sources": [{"source": "repo"}], "failed": ["repo"]})
    assert not timer.skip()
    timer.done({"sources": [{"source": "repo", "skipped": "failed 1 time(s); next try in 300s"}], "failed": []})
    assert not timer.skip()
    timer.done(ok)
    assert timer.skip()


def test_a_store_worker_that_dies_is_replaced_by_the_next_request(service: Service) -> None:
    service.wait_for("READY=1")
    wait_until(lambda: service.status()["suggestions"]["total"] == 3)
    [first] = worker_pids(service)
    os.kill(first, signal.SIGKILL)  # out of memory, say: the store is left as a kill leaves it
    assert service.status()["suggestions"]["total"] == 3  # a new worker answers; nothing was lost
    [second] = worker_pids(service)
    assert second != first and service.proc.poll() is None
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(timeout=60) == 0
    out = service.proc.stdout.read() if service.proc.stdout else ""
    assert f"store worker pid={first} exited with status -9; starting a new one" in out


@pytest.mark.parametrize("service", [{"collect": {"scrub_workers": 2}}], indirect=True)
def test_a_large_backlog_is_scrubbed_by_workers_under_the_service(service: Service, tmp_path: Path) -> None:
    """The store worker (`python -m daemon.worker`) starts the scrub workers: spawned, each imports that module
    again, which must not start a service of its own."""
    service.wait_for("READY=1")
    continue_log(tmp_path / "alice", big_backlog(15_500), append=True)  # 69 MB: over parallel.MIN_BYTES
    result = devtune_json("--config", str(service.config), "collect", "--json")
    assert result["error"] is None, result
    assert service.status()["suggestions"]["total"] == 3 + 15_500
    service.proc.terminate()
    out, _ = service.proc.communicate(timeout=60)
    assert "parsed and scrubbed by 2 worker processes" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
