"""File events that trigger a collect: Continue dev_data and Tabby events folders and git refs, debounced per
source.

Continue appends one line per event, often several a second while someone types; collecting on each
write would re-open the store dozens of times a minute. A per-source timer restarted by every event
collects once the folder has been quiet for `debounce_s`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from daemon.config import SourceConfig

log = logging.getLogger("devtune.watch")


class Debouncer:
    """Calls `fn(key)` once `delay_s` has passed since the last `trigger(key)`."""

    def __init__(self, delay_s: float, fn: Callable[[str], object]):
        self.delay_s, self.fn = delay_s, fn
        self._timers: dict[str, threading.Timer] = {}
        self._lock = threading.Lock()

    def trigger(self, key: str) -> None:
        with self._lock:
            if key in self._timers:
                self._timers[key].cancel()
            timer = threading.Timer(self.delay_s, self._fire, args=(key,))
            timer.daemon = True
            self._timers[key] = timer
            timer.start()

    def _fire(self, key: str) -> None:
        with self._lock:
            self._timers.pop(key, None)
        self.fn(key)

    def cancel(self) -> None:
        with self._lock:
            for t in self._timers.values():
                t.cancel()
            self._timers.clear()


class _Handler(FileSystemEventHandler):
    def __init__(self, source: str, debouncer: Debouncer, suffixes: tuple[str, ...]):
        self.source, self.debouncer, self.suffixes = source, debouncer, suffixes

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in ("opened", "closed_no_write"):
            return
        path = str(event.src_path)
        if not self.suffixes or path.endswith(self.suffixes):
            self.debouncer.trigger(self.source)


def watch_paths(source: SourceConfig) -> list[tuple[Path, bool, tuple[str, ...]]]:
    """(folder, recursive, file suffixes that matter) to watch for one source."""
    if source.kind == "continue":
        return [(source.path / "dev_data", True, (".jsonl",))]
    if source.kind == "tabby":
        # A new day file is a "created" event in this folder, so it is picked up like an append.
        return [(source.path / "events", False, (".json",))]
    if source.kind == "git":
        git_dir, common_dir = git_dirs(source.path)
        # HEAD lives in the (worktree's) git dir; branch tips under refs/ and in packed-refs in the common dir.
        if git_dir == common_dir:
            return [(git_dir, False, ("HEAD", "packed-refs")), (git_dir / "refs", True, ())]
        return [(git_dir, False, ("HEAD",)), (common_dir, False, ("packed-refs",)), (common_dir / "refs", True, ())]
    return []  # continue_http: the route that appends to the inbox asks for a collect itself


def git_dirs(path: Path) -> tuple[Path, Path]:
    """A repository's git dir and common dir: `.git` itself, a linked worktree's, or a bare repository."""
    dot_git = path / ".git"
    if dot_git.is_file():  # a linked worktree or submodule: "gitdir: <path>"
        text = dot_git.read_text(encoding="utf-8", errors="replace").strip()
        git_dir = (path / text.removeprefix("gitdir:").strip()).resolve()
    elif dot_git.is_dir():
        git_dir = dot_git
    else:
        git_dir = path  # bare
    common = git_dir / "commondir"
    if common.is_file():
        return git_dir, (git_dir / common.read_text(encoding="utf-8").strip()).resolve()
    return git_dir, git_dir


def start_watching(sources: tuple[SourceConfig, ...], debouncer: Debouncer) -> Observer:
    """Start an observer on every source folder that exists (one that does not is left to the timer)."""
    observer = Observer()
    for source in sources:
        for folder, recursive, suffixes in watch_paths(source):
            if folder.is_dir():
                observer.schedule(_Handler(source.name, debouncer, suffixes), str(folder), recursive=recursive)
                log.info("watching %s for source=%s", folder, source.name)
            else:
                log.info("not watching %s for source=%s: it does not exist yet (collected every interval)",
                         folder, source.name)
    observer.daemon = True
    observer.start()
    return observer
