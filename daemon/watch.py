"""File events that trigger a collect, debounced per source; each collector says what to watch (`watch_paths`:
Continue's dev_data, Tabby's events folder, a repository's refs).

Continue appends one line per event, often several a second while someone types; collecting on each
write would re-open the store dozens of times a minute. A per-source timer restarted by every event
collects once the folder has been quiet for `debounce_s`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from collectors import COLLECTORS
from pipelines.config import SourceConfig

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


def start_watching(sources: tuple[SourceConfig, ...], debouncer: Debouncer) -> Observer:
    """Start an observer on every source folder that exists (one that does not is left to the timer)."""
    observer = Observer()
    for source in sources:
        for watch in COLLECTORS[source.kind].watch_paths(source.path):
            if watch.folder.is_dir():
                observer.schedule(_Handler(source.name, debouncer, watch.suffixes), str(watch.folder),
                                  recursive=watch.recursive)
                log.info("watching %s for source=%s", watch.folder, source.name)
            else:
                log.info("not watching %s for source=%s: it does not exist yet (collected every interval)",
                         watch.folder, source.name)
    observer.daemon = True
    observer.start()
    return observer
