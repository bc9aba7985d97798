"""How the service reaches its store worker (daemon/worker.py): start it when something needs the store, send
it the requests the service does not answer itself, and stop it when it has been idle.

An idle service used to keep DuckDB and pyarrow resident for hours (bench/idle_service.py: 173 MB, of which
~55 MB were their libraries' pages and most of the rest their heaps); the service process alone is ~41 MB.
Starting a worker costs 0.5-0.6 s (Python, DuckDB, opening the store), paid by the first request after a
quiet spell: `devtune status` then answers in 1.2-1.4 s instead of 0.7-0.8 s (the demo's store).

Idle means: no request in flight or answered for [api] worker_idle_s, and the worker reports no work of its
own (a cycle, a pretraining run, a re-attached Ray job: GET /api/worker/busy). The decision and the stop
happen under the same lock that starts the worker for a request, so a request never reaches a worker that is
stopping. Prometheus scrapes often (every 15-60 s): the last /metrics the worker answered before it stopped
is kept and answered while it is down (the store cannot change without it), with each source's collect lag
moved on by the time since, so a scraper does not keep the store open.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from daemon.api import MAX_BODY_BYTES, bearer_ok, reply, send

log = logging.getLogger("devtune.front")

START_TIMEOUT_S = 120.0  # opening a large store after a crash replays its WAL: seconds, rarely more
STOP_TIMEOUT_S = 100.0  # the worker gives its jobs 60 s, then closes the store; systemd's TimeoutStopSec is 120 s
REQUEST_TIMEOUT_S = 3600.0  # a collect of a new repository's whole history is the longest request
# Hop-by-hop headers (RFC 9110 7.6.1) are the connection's, not the message's: never passed on.
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
              "host", "content-length"}
LAG_LINE = re.compile(rb"^(devtune_collect_lag_seconds(?:\{[^}]*\})?) (\S+)$", re.M)


class WorkerError(Exception):
    """The store worker could not be started or reached."""


class StoreWorker:
    """The one store worker of a running service: started on demand, stopped when idle."""

    def __init__(self, config_path: Path, token: str, idle_s: float, log_level: str | None = None):
        self.config_path, self.token, self.idle_s = config_path.resolve(), token, idle_s
        self.log_level = log_level
        self._lock = threading.Lock()  # held while starting or stopping; a request takes it to find the worker
        self._proc: subprocess.Popen[bytes] | None = None
        self._host, self._port = "", 0
        self._in_flight = 0
        self._last_used = time.monotonic()
        self._metrics: tuple[bytes, str, float] | None = None  # body, content type, when (wall clock)
        self._stopping = False
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-spawn")

    # -- lifetime ---------------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def ensure(self) -> None:
        """Start the worker unless it runs; WorkerError when it cannot start (the store held elsewhere, say)."""
        with self._lock:
            self._ensure_locked()

    def _ensure_locked(self) -> None:
        if self._stopping:
            raise WorkerError("the service is stopping")
        if self.running:
            return
        if self._proc is not None:  # it died on its own: say so once, start a new one
            log.error("store worker pid=%d exited with status %s; starting a new one (its log lines above say why)",
                      self._proc.pid, self._proc.returncode)
            self._proc = None
        read_fd, write_fd = os.pipe()
        cmd = [sys.executable, "-m", "daemon.worker", str(self.config_path), "--ready-fd", str(write_fd),
               "--parent", str(os.getpid())]
        if self.log_level:
            cmd += ["--log-level", self.log_level]
        # systemd's notify socket and watchdog are the service's: a worker sending READY or WATCHDOG would be
        # ignored at best (NotifyAccess=main), misread at worst.
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        started = time.monotonic()
        # The kernel's parent-death signal (daemon/worker.py) fires when the *thread* that forked the worker ends,
        # not the process: a request's thread ends with the request. One long-lived thread starts every worker.
        try:
            proc = self._spawner.submit(subprocess.Popen, cmd, pass_fds=[write_fd], env=env).result()
        except OSError as e:
            os.close(read_fd)
            raise WorkerError(f"cannot start the store worker: {e}") from None
        finally:
            os.close(write_fd)
        try:
            url = _read_line(read_fd, proc, START_TIMEOUT_S)
        finally:
            os.close(read_fd)
        if url is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            raise WorkerError(f"the store worker did not start (exit status {proc.returncode}): the service log has "
                              "its error; the store may be held by another process")
        host, _, port = url.removeprefix("http://").rpartition(":")
        self._proc, self._host, self._port = proc, host, int(port)
        self._last_used = time.monotonic()
        log.info("store worker started: pid=%d in %.1fs", proc.pid, time.monotonic() - started)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop the worker for good (the service is stopping); running training children go with it."""
        with self._lock:
            self._stopping = True
            self._stop_locked(timeout_s, "the service is stopping")
        self._spawner.shutdown(wait=False)

    def _stop_locked(self, timeout_s: float, why: str) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._proc = None
            return
        log.info("stopping the store worker pid=%d: %s", proc.pid, why)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.error("store worker pid=%d still running %.0fs after SIGTERM: killing it", proc.pid, timeout_s)
            proc.kill()
            proc.wait()
        self._proc = None

    def stop_if_idle(self) -> bool:
        """Stop the worker when nothing has used it for idle_s and it has no work of its own; True if stopped."""
        if not self.running or self._in_flight or time.monotonic() - self._last_used < self.idle_s:
            return False
        with self._lock:
            if not self.running or self._in_flight or time.monotonic() - self._last_used < self.idle_s:
                return False
            try:
                busy = self._call("GET", "/api/worker/busy")["busy"]
                status, ctype, body = self._request("GET", "/metrics", {"Authorization": f"Bearer {self.token}"})
            except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
                log.warning("store worker did not answer whether it is idle (%s): leaving it running", e)
                return False
            if busy:
                self._last_used = time.monotonic()  # asked again in idle_s, not every tick
                return False
            self._metrics = (body, ctype, time.time()) if status == HTTPStatus.OK else None
            self._stop_locked(STOP_TIMEOUT_S, f"idle for {self.idle_s:.0f}s")
            return True

    def watch_idle(self, stop: threading.Event) -> threading.Thread:
        """A thread that stops the worker once it is idle, checking every few seconds until `stop` is set."""
        tick = max(0.5, min(10.0, self.idle_s / 4))

        def loop() -> None:
            while not stop.wait(tick):
                try:
                    self.stop_if_idle()
                except Exception:  # the check must never end: log and look again next tick
                    log.exception("checking whether the store worker is idle failed")

        thread = threading.Thread(target=loop, name="worker-idle", daemon=True)
        thread.start()
        return thread

    # -- requests ---------------------------------------------------------------------------------------------

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """An API call of the service's own (a timed collect, a cron cycle); starts the worker if needed."""
        try:
            with self._using():
                status, _, data = self._request(method, path, {"Authorization": f"Bearer {self.token}",
                                                               "Content-Type": "application/json"},
                                                json.dumps(body).encode() if body is not None else None)
        except (OSError, http.client.HTTPException) as e:
            raise WorkerError(f"{method} {path}: the store worker stopped while answering ({e}); the service log "
                              "says why, and a new one starts with the next request") from None
        payload = json.loads(data) if data else None
        if status >= 400:
            error = payload.get("error") if isinstance(payload, dict) else data[:200].decode("utf-8", "replace")
            raise WorkerError(f"{method} {path}: {status} {error}")
        return payload

    def forward(self, req: BaseHTTPRequestHandler, method: str) -> None:
        """Answer an API, dashboard or /metrics request with the worker's answer."""
        length_header = req.headers.get("Content-Length") or "0"
        length = int(length_header) if length_header.isdigit() else -1
        if length < 0 or length > MAX_BODY_BYTES:
            req.close_connection = True
            return reply(req, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body over {MAX_BODY_BYTES} bytes"})
        body = req.rfile.read(length) if length else None
        path = req.path.split("?", 1)[0]
        if path == "/metrics" and method == "GET" and (kept := self._kept_metrics(req)) is not None:
            return send(req, HTTPStatus.OK, [("Content-Type", kept[1])], kept[0])
        headers = {k: v for k, v in req.headers.items() if k.lower() not in HOP_BY_HOP | {"x-forwarded-for"}}
        headers["X-Forwarded-For"] = req.client_address[0]
        try:
            with self._using():
                status, response_headers, data = self._request_full(method, req.path, headers, body)
        except WorkerError as e:
            return reply(req, HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(e)})
        except (OSError, http.client.HTTPException) as e:
            log.error("store worker failed while answering %s %s: %s", method, path, e)
            return reply(req, HTTPStatus.BAD_GATEWAY, {"error": f"the store worker stopped while answering ({e}); "
                                                                "the service log says why, and a new one starts "
                                                                "with the next request"})
        # The service's own Server and Date headers stand; the worker's would come twice.
        return send(req, status, [(k, v) for k, v in response_headers if k.lower() not in ("server", "date")], data)

    @contextlib.contextmanager
    def _using(self) -> Any:
        with self._lock:
            self._ensure_locked()
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._last_used = time.monotonic()

    def _kept_metrics(self, req: BaseHTTPRequestHandler) -> tuple[bytes, str] | None:
        """The /metrics the worker last answered, when it is down and the scraper sends the API token."""
        kept = self._metrics
        if self.running or kept is None:
            return None
        if not bearer_ok(req, self.token):
            return None  # the worker's own check answers (401, or a browser's session cookie)
        body, ctype, at = kept
        waited = time.time() - at
        return LAG_LINE.sub(lambda m: m[1] + b" " + repr(float(m[2]) + waited).encode(), body), ctype

    def _call(self, method: str, path: str) -> Any:
        status, _, data = self._request(method, path, {"Authorization": f"Bearer {self.token}"})
        if status != HTTPStatus.OK:
            raise ValueError(f"{method} {path} answered {status}")
        return json.loads(data)

    def _request(self, method: str, path: str, headers: dict[str, str], body: bytes | None = None
                 ) -> tuple[int, str, bytes]:
        status, response_headers, data = self._request_full(method, path, headers, body)
        ctype = next((v for k, v in response_headers if k.lower() == "content-type"), "")
        return status, ctype, data

    def _request_full(self, method: str, path: str, headers: dict[str, str], body: bytes | None
                      ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=REQUEST_TIMEOUT_S)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            kept = [(k, v) for k, v in resp.getheaders() if k.lower() not in HOP_BY_HOP]
            return resp.status, kept, data
        finally:
            conn.close()


def _read_line(fd: int, proc: subprocess.Popen[bytes], timeout_s: float) -> str | None:
    """The line the worker writes when it serves; None when it exits (or the pipe closes) first."""
    deadline = time.monotonic() + timeout_s
    data = b""
    while b"\n" not in data and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            data += chunk
        elif proc.poll() is not None:
            return None
    return data.split(b"\n", 1)[0].decode() if b"\n" in data else None
