"""Where jobs run: the only broad `except` in devtune; and which training may use the GPUs now.

A job is one call into `pipelines`. If it raises, the error is logged with the run id, the run is marked
failed in the store, and the exception stops here: the scheduler, the watcher and the API keep going.

Cycles of different scopes run at the same time (collecting and building datasets are cheap), but their
training and evaluation children wait in one first-come queue for a GPU slot: one run per GPU (or per
`[train] gpus_per_run` GPUs), one at a time on a machine without GPUs. With `[train] backend = "ray"` the
slots are `[ray] max_jobs` jobs on the cluster, which places each one. `devtune status` shows the queue.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

from pipelines.config import RayConfig, TrainConfig
from pipelines.store.db import Store

log = logging.getLogger("devtune.runner")
T = TypeVar("T")


@dataclass(frozen=True)
class Outcome(Generic[T]):
    value: T | None
    error: str | None  # one line: what failed and why


# One cycle per scope at a time: a second request for a scope whose cycle is running is refused, not queued
# (the running one already trains on the newest data it could see).
_cycles_running: set[str] = set()
_cycles_lock = threading.Lock()


def claim_cycle(scope: str) -> bool:
    with _cycles_lock:
        if scope in _cycles_running:
            return False
        _cycles_running.add(scope)
        return True


def release_cycle(scope: str) -> None:
    with _cycles_lock:
        _cycles_running.discard(scope)


def running_cycles() -> list[str]:
    with _cycles_lock:
        return sorted(_cycles_running)


def run_job(name: str, fn: Callable[[], T], store: Store | None = None, run_id: str | None = None) -> Outcome[T]:
    """Run `fn`; on any exception log it (with the run id), mark the run failed, and return the error."""
    try:
        return Outcome(fn(), None)
    except Exception as e:  # noqa: BLE001 - the one place a job's failure is contained
        error = f"{type(e).__name__}: {e}"
        log.error("job=%s run=%s failed: %s\n%s", name, run_id or "-", error, traceback.format_exc().rstrip())
        if store is not None and run_id is not None:
            store.update_run(run_id, status="failed", error=error)
        return Outcome(None, error)


class QueueClosed(Exception):
    """The service is stopping: a run still waiting for a GPU slot will not get one."""


class TrainingQueue:
    """First come, first served GPU slots for training + evaluation children."""

    def __init__(self, slots: list[tuple[str, ...]], backend: str = "local"):
        self.slots = slots  # each a tuple of GPU ids for CUDA_VISIBLE_DEVICES; () = this machine's CPU, or Ray's
        self.backend = backend
        self._free = list(range(len(slots)))
        self._waiting: list[dict[str, Any]] = []
        self._running: list[dict[str, Any]] = []
        self._closed = False
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def turn(self, run_id: str, scope: str) -> Iterator[tuple[str, ...]]:
        """Wait for a free slot (in arrival order), hold it for the block, yield its GPU ids."""
        entry: dict[str, Any] = {"run_id": run_id, "scope": scope, "state": "waiting", "gpus": [], "since": _now(),
                                 "backend": self.backend}
        with self._cond:
            self._waiting.append(entry)
            while not self._closed and not (self._free and self._waiting[0] is entry):
                self._cond.wait()
            self._waiting.remove(entry)
            if self._closed:
                self._cond.notify_all()
                raise QueueClosed(f"run {run_id} was waiting for a GPU slot when the service stopped")
            slot = self._free.pop(0)
            entry.update(state="running", gpus=list(self.slots[slot]), since=_now())
            self._running.append(entry)
        try:
            yield self.slots[slot]
        finally:
            with self._cond:
                self._running.remove(entry)
                self._free = sorted([*self._free, slot])
                self._cond.notify_all()

    def snapshot(self) -> list[dict[str, Any]]:
        """Running runs, then waiting ones in the order they will start."""
        with self._cond:
            return [dict(e) for e in self._running + self._waiting]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def gpu_slots(gpus_per_run: int) -> list[tuple[str, ...]]:
    """This machine's GPUs in groups of `gpus_per_run`, found without torch (the service never imports it):
    CUDA_VISIBLE_DEVICES when set, else the /dev/nvidiaN device files. No GPU: one CPU slot."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [x.strip() for x in visible.split(",") if x.strip() and x.strip() != "-1"]
    else:
        ids = sorted((p.name[len("nvidia"):] for p in Path("/dev").glob("nvidia[0-9]*")), key=int)
    if not ids:
        return [()]
    n = max(1, gpus_per_run)
    return [tuple(ids[i:i + n]) for i in range(0, len(ids) - n + 1, n)] or [tuple(ids)]


_queue: dict[str, TrainingQueue] = {}
_queue_lock = threading.Lock()


def training_queue(train: TrainConfig, ray: RayConfig) -> TrainingQueue:
    """The process's one training queue (created on first use): this machine's GPU slots, or `[ray] max_jobs`
    slots on a cluster, which picks each job's GPUs itself."""
    with _queue_lock:
        if "q" not in _queue:
            _queue["q"] = (TrainingQueue([()] * ray.max_jobs, "ray") if train.backend == "ray"
                           else TrainingQueue(gpu_slots(train.gpus_per_run)))
        return _queue["q"]


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()
