"""Where jobs run: the only broad `except` in devtune.

A job is one call into `pipelines`. If it raises, the error is logged with the run id, the run is marked
failed in the store, and the exception stops here: the scheduler, the watcher and the API keep going.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from pipelines.store import Store

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
