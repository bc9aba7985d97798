"""The builtin backend, gateway side: runs the worker child (pipelines/serve/worker.py) and talks JSON lines.

The gateway never imports torch: generation happens in the worker, a child process started here. Each
request is a line on the worker's stdin; the worker's events come back on its stdout, read by one thread
that hands each to the queue of the request it belongs to. A request closed early (the editor moved on:
Continue aborts most requests while the developer types) sends a cancel, so the worker stops generating
for it at its next step.

If the worker dies, its requests fail (BackendError: 503) and the next request starts a new one; the
reason is the end of the worker's log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pipelines.child import child_env, tail
from pipelines.config import ServeConfig
from pipelines.serve.backend import BackendError, Delta, Event, Finished, Job, Started

log = logging.getLogger("devtune.serve.builtin")

RESTART_DELAY_S = 5.0  # a worker that keeps dying is not restarted in a tight loop
STOP_GRACE_S = 10.0


class BuiltinBackend:
    name = "builtin"

    def __init__(self, base_model: str, cfg: ServeConfig, log_path: Path):
        self.base_model, self.cfg, self.log_path = base_model, cfg, log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdin: IO[bytes] | None = None
        self._pending: dict[str, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()  # the process, its stdin and the pending table
        self._ready = threading.Event()
        self._started_at = 0.0
        self._closed = False
        self.info: dict[str, Any] = {}  # the worker's "ready" message: device, load time

    def start(self) -> BuiltinBackend:
        """Start the worker now (loading the base model takes seconds to minutes), not at the first request."""
        with self._lock:
            self._spawn()
        return self

    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout_s: float) -> bool:
        return self._ready.wait(timeout_s)

    def complete(self, job: Job) -> Iterator[Event]:
        self._ensure_running()
        self._wait_ready()
        inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        request = {"op": "complete", "id": job.id, "prompt": job.prompt, "max_tokens": job.max_tokens,
                   "temperature": job.temperature, "top_p": job.top_p, "stop": list(job.stop),
                   "adapter": {"name": job.adapter.name, "path": str(job.adapter.path)} if job.adapter else None}
        with self._lock:
            self._pending[job.id] = inbox
        finished = False
        try:
            self._send(request)
            deadline = time.monotonic() + self.cfg.request_timeout_s
            while True:
                try:
                    message = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise BackendError(f"no answer within [serve] request_timeout_s = "
                                       f"{self.cfg.request_timeout_s:.0f}s") from None
                kind = message["event"]
                if kind == "delta":
                    yield Delta(message["text"])
                elif kind == "started":
                    answered = job.adapter if job.adapter and message["adapter"] == job.adapter.name else None
                    yield Started(answered, message.get("note") or "")
                elif kind == "finished":
                    finished = True
                    yield Finished(message["finish_reason"], message["prompt_tokens"], message["completion_tokens"])
                    return
                else:
                    finished = True
                    raise BackendError(f"the builtin backend failed: {message.get('error', message)}")
        finally:
            with self._lock:
                self._pending.pop(job.id, None)
            if not finished:
                with contextlib.suppress(BackendError):
                    self._send({"op": "cancel", "id": job.id})

    def close(self) -> None:
        """Stop the worker: stdin closes (it exits after its batch), then SIGTERM, then SIGKILL."""
        with self._lock:
            self._closed = True
            proc, stdin = self._proc, self._stdin
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if stdin is not None:
                stdin.close()
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    # -- the worker process ---------------------------------------------------------------------------------

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while not self._ready.wait(0.2):
            with self._lock:
                proc = self._proc
            if proc is None or proc.poll() is not None:
                raise BackendError(f"the builtin backend's worker exited while loading {self.base_model}; last "
                                   f"lines of {self.log_path}:\n{tail(self.log_path, 5)}")
            if time.monotonic() > deadline:
                raise BackendError(f"the builtin backend is still loading {self.base_model} after "
                                   f"[serve] start_timeout_s = {self.cfg.start_timeout_s:.0f}s; see {self.log_path}")

    def _ensure_running(self) -> None:
        with self._lock:
            if self._closed:
                raise BackendError("the gateway is stopping")
            if self._proc is not None and self._proc.poll() is None:
                return
            if time.monotonic() - self._started_at < RESTART_DELAY_S:
                raise BackendError(f"the builtin backend's worker exited and restarts shortly; see {self.log_path}")
            self._spawn()

    def _spawn(self) -> None:
        """Start a worker (the caller holds the lock)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._ready.clear()
        self._started_at = time.monotonic()
        c = self.cfg
        args = [sys.executable, "-m", "pipelines.serve.worker", "--base-model", self.base_model, "--device", c.device,
                "--max-batch-size", str(c.max_batch_size), "--batch-window-ms", str(c.batch_window_ms),
                "--max-adapters", str(c.max_loaded_adapters), "--cpu-threads", str(c.cpu_threads)]
        with self.log_path.open("ab") as log_file:
            proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file,
                                    env=child_env(), start_new_session=True)
        assert proc.stdin is not None and proc.stdout is not None
        self._proc, self._stdin = proc, proc.stdin
        threading.Thread(target=self._read, args=(proc,), name="builtin-worker", daemon=True).start()
        log.info("builtin backend: started worker pid %d for %s (log %s)", proc.pid, self.base_model, self.log_path)

    def _send(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message, ensure_ascii=False) + "\n").encode()
        with self._lock:
            stdin = self._stdin
            try:
                if stdin is None:
                    raise BrokenPipeError
                stdin.write(data)
                stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                raise BackendError(f"the builtin backend's worker is not running; see {self.log_path}") from None

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            try:
                message = json.loads(raw)
            except json.JSONDecodeError:
                log.warning("builtin worker wrote a line that is not JSON: %r", raw[:200])
                continue
            if message.get("event") == "ready":
                self.info = message
                self._ready.set()
                log.info("builtin backend ready on %s (base model loaded in %.1fs)", message.get("device"),
                         message.get("load_s", 0))
                continue
            with self._lock:
                inbox = self._pending.get(message.get("id", ""))
            if inbox is not None:
                inbox.put(message)
        status = proc.wait()
        with self._lock:
            current = proc is self._proc
            if current:
                self._ready.clear()
                self._stdin = None
            waiting = list(self._pending.values())
            closed = self._closed
        if current and not closed:
            log.error("builtin backend: worker pid %d exited with status %s; last lines of %s:\n%s", proc.pid, status,
                      self.log_path, tail(self.log_path, 10))
        for inbox in waiting if current else []:
            inbox.put({"event": "error", "error": f"the worker exited with status {status}; see {self.log_path}"})
