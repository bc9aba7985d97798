"""Run a stage as a child process (`python -m pipelines.train RUN_DIR`) with a timeout and a log file.

The child gets its own process group so a timeout or a service shutdown stops it and anything it started
(dataloader workers, torchrun ranks). Running children are tracked so the service can stop them all on
SIGTERM instead of leaving a GPU busy after it exits.

A stage's child can be started early (`Primed`): it imports its module (torch, transformers and peft: 4.8-6.5 s
on a 2-core machine, most of a small run's stage) while this process still collects and builds the run's
datasets, then waits on its stdin until `run_child` hands it the environment it runs under, or is discarded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pipelines
from pipelines.primed import PRIMED_UNUSABLE

PROJECT_ROOT = Path(pipelines.__file__).resolve().parent.parent
STOP_GRACE_S = 30.0  # SIGTERM, then SIGKILL this much later: enough for a trainer to finish a checkpoint

_running: set[subprocess.Popen[bytes]] = set()
_running_lock = threading.Lock()


# How a stage's exit status reads in a run's error (pipelines/train/train.py defines 75 and 3).
EXIT_MEANINGS = {
    -9: " (killed: the next cycle resumes training from its last checkpoint)",
    -15: " (terminated: the next cycle resumes training from its last checkpoint)",
    75: " (stopped after saving a checkpoint: the next cycle resumes from it)",
    3: " (out of memory even at one row per micro-batch: see the advice in the log)",
}


class ChildFailed(Exception):
    """A stage's child process failed; the message holds the end of its log."""


def child_command(module: str, args: list[str], processes: int = 1) -> list[str]:
    """`python -m <module> <args>`, or the same module under `accelerate launch` with one process per GPU."""
    if processes <= 1:
        return [sys.executable, "-m", module, *args]
    # Mixed precision is the module's own business (bf16 autocast), so accelerate is told "no". Each launch
    # gets its own rendezvous port: two runs on two GPU slots would otherwise both take 29500.
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
            "--num_processes", str(processes), "--main_process_port", str(free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no", "--module", module, *args]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Primed:
    """`python -m <module> <args>` started before its inputs exist (pipelines/primed.py): it imports `preload`
    now and runs the module when `run_child` hands it over, or exits when discarded (its stdin closes). It
    appends to `log_path` from the start and is stopped like any running child (service shutdown, cancel)."""

    def __init__(self, module: str, args: list[str], log_path: Path, preload: str) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = _spawn(
            [sys.executable, "-m", "pipelines.primed", preload, module, *args], log_path, child_env(), subprocess.PIPE)

    def take(self, env: dict[str, str]) -> subprocess.Popen[bytes] | None:
        """The child, told to run now with `env` added; None when it is gone (stopped, or its import failed:
        a fresh child then runs the stage and its log says why). Once only."""
        proc, self.proc = self.proc, None
        if proc is None or proc.stdin is None:
            return None
        try:
            proc.stdin.write(json.dumps({"env": env}).encode() + b"\n")
            proc.stdin.close()
        except OSError:  # it exited: the pipe is broken
            pass
        if proc.poll() is not None:
            _forget(proc)
            return None
        return proc

    def discard(self) -> None:
        """Not needed after all (the run was skipped or failed before its stage): the child exits without
        running anything. A no-op once taken."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()  # EOF: it exits 0 as soon as its import is done
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:  # still importing: no need to wait for that
            stop(proc)
        _forget(proc)
        with contextlib.suppress(OSError):
            if self.log_path.stat().st_size == 0:  # it ran nothing and said nothing
                self.log_path.unlink()


def run_child(module: str, args: list[str], log_path: Path, timeout_s: float,
              on_tick: Callable[[], None] | None = None, tick_s: float = 30.0, processes: int = 1,
              env: dict[str, str] | None = None, primed: Primed | None = None) -> float:
    """Run `python -m <module> <args>` (under `accelerate launch` when `processes` > 1) with `env` added to
    this process's environment, appending its output to `log_path`; returns seconds taken. `primed`, the same
    child started early, runs it when it is still there (else a fresh child does)."""
    started = time.monotonic()
    proc = primed.take(env or {}) if primed is not None else None
    if proc is not None:
        if _wait(proc, module, log_path, timeout_s, started, on_tick, tick_s) != PRIMED_UNUSABLE:
            return _checked(proc, module, log_path, started)
        started = time.monotonic()
    proc = _spawn(child_command(module, args, processes), log_path, child_env(env), subprocess.DEVNULL)
    _wait(proc, module, log_path, timeout_s, started, on_tick, tick_s)
    return _checked(proc, module, log_path, started)


def _spawn(command: list[str], log_path: Path, env: dict[str, str], stdin: int) -> subprocess.Popen[bytes]:
    """Start a child in its own process group, appending its output to `log_path`, and track it as running."""
    with log_path.open("ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=stdin, env=env,
                                start_new_session=True)
    with _running_lock:
        _running.add(proc)
    return proc


def _wait(proc: subprocess.Popen[bytes], module: str, log_path: Path, timeout_s: float, started: float,
          on_tick: Callable[[], None] | None, tick_s: float) -> int:
    """Wait for a running child (ticking, stopped at the timeout); returns its exit status."""
    try:
        while True:
            try:
                return proc.wait(timeout=min(tick_s, max(0.1, timeout_s - (time.monotonic() - started))))
            except subprocess.TimeoutExpired:
                if on_tick is not None:
                    on_tick()
                if time.monotonic() - started >= timeout_s:
                    stop(proc)
                    raise ChildFailed(f"{module} ran past its {timeout_s:.0f}s timeout and was stopped; "
                                      f"raise the timeout in the config or see {log_path}") from None
    finally:
        _forget(proc)
        if proc.poll() is None:
            stop(proc)


def _checked(proc: subprocess.Popen[bytes], module: str, log_path: Path, started: float) -> float:
    if proc.returncode != 0:
        meaning = EXIT_MEANINGS.get(proc.returncode, "")
        raise ChildFailed(f"{module} exited with status {proc.returncode}{meaning}; last lines of {log_path}:\n"
                          + tail(log_path, 20))
    return time.monotonic() - started


def _forget(proc: subprocess.Popen[bytes]) -> None:
    with _running_lock:
        _running.discard(proc)


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus `env`, as every child of devtune gets it."""
    full_env = {**os.environ, **(env or {})}
    # The children must import this checkout's packages even when devtune runs from a source tree.
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), full_env.get("PYTHONPATH", "")) if p)
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A training child stops (with a checkpoint) when this process is gone: if the service is killed, its
    # orphan must not go on writing into a run directory the restarted service resumes.
    full_env["DEVTUNE_SUPERVISOR_PID"] = str(os.getpid())
    return full_env


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, then SIGKILL it after STOP_GRACE_S."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stop_all() -> int:
    """Stop every running child (service shutdown); returns how many there were."""
    with _running_lock:
        procs = list(_running)
    for proc in procs:
        stop(proc)
    return len(procs)


def stop_matching(arg: str) -> int:
    """Stop the running children whose command line has `arg` (a run directory: `devtune cancel`)."""
    with _running_lock:
        procs = [p for p in _running if isinstance(p.args, list) and arg in p.args]
    for proc in procs:
        stop(proc)
    return len(procs)


def tail(path: Path, lines: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
