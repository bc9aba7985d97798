"""A new source is one module and one entry in `COLLECTORS`: config, collect, watch and status follow."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from collectors import COLLECTORS
from collectors.base import Batch, Cursor, Found, Limits, LineParser, RawEvent, Suggestion, Watch
from collectors.jsonl import collect_lines, pending_bytes
from daemon import jobs
from daemon.config import ConfigError, load_config
from daemon.watch import Debouncer, start_watching
from pipelines.store.db import Store
from support import write_config


class ToyCollector:
    """A made-up assistant that logs `id|accepted|prefix|completion` lines into <root>/log/*.log."""

    kind = "toy"
    unit = "bytes"

    def streams(self, root: Path) -> list[str]:
        return sorted(f"log/{p.name}" for p in (root / "log").glob("*.log"))

    def collect(self, root: Path, stream: str, cursor: Cursor | None, limits: Limits) -> Iterator[Batch]:
        yield from collect_lines(root / stream, stream, cursor, limits, parse)

    def line_parser(self, root: Path, stream: str) -> LineParser:
        return parse

    def pending(self, root: Path, stream: str, cursor: Cursor | None) -> int:
        return pending_bytes(root / stream, cursor)

    def repo(self, root: Path) -> str | None:
        return None

    def watch_paths(self, root: Path) -> list[Watch]:
        return [Watch(root / "log", recursive=False, suffixes=(".log",))]

    def discover(self) -> list[Found]:
        return []


def parse(raw: bytes) -> tuple[RawEvent, ...] | str:
    parts = raw.decode().split("|")
    if len(parts) != 4:
        return f"expected 4 fields, got {len(parts)}"
    key, accepted, prefix, completion = parts
    return (Suggestion(key=key, source_kind="toy", event_kind="inline", shown_at=datetime(2026, 10, 1, 9),
                       accepted=accepted == "1", partial=False, filepath="app/x.py", prefix=prefix,
                       prefix_compiled=prefix, prefix_recovery="raw", suffix="", completion=completion, repo=None,
                       model="toy-1", user_ids=("alice@example.com",)),)


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(COLLECTORS, "toy", ToyCollector())


def test_an_unknown_kind_is_refused_until_its_collector_is_in_the_table(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path, sources=[{"kind": "toy", "path": str(tmp_path / "toy")}]).config
    with pytest.raises(ConfigError, match='kind = "toy": use one of continue, tabby, git'):
        load_config(config)
    monkeypatch.setitem(COLLECTORS, "toy", ToyCollector())
    assert [s.kind for s in load_config(config).sources] == ["toy"]


def test_a_registered_collector_is_collected_watched_and_shown_in_status(tmp_path: Path, toy: None) -> None:
    root = tmp_path / "toy"
    (root / "log").mkdir(parents=True)
    (root / "log" / "a.log").write_text("t1|1|def f(|x):\nt2|0|def g(|y):\nbroken line\n")
    cfg = load_config(write_config(tmp_path, sources=[{"kind": "toy", "path": str(root), "name": "toy-log"}]).config)

    store = Store.open(cfg.state_dir / "store.duckdb")
    result = jobs.collect(store, cfg)
    assert result["error"] is None
    stored = result["sources"][0]["stored"]
    assert (stored["suggestions"], stored["quarantined"]) == (2, 1)
    status = jobs.status(store, cfg)
    assert status["suggestions"]["by_source"]["toy-log"] == {"total": 2, "accepted": 1}
    assert status["sources"]["toy-log"]["kind"] == "toy"
    assert status["sources"]["toy-log"]["streams"] == 1 and status["sources"]["toy-log"]["quarantined"] == 1

    fired: list[str] = []
    seen = threading.Event()
    debouncer = Debouncer(0.1, lambda name: (fired.append(name), seen.set()))
    observer = start_watching(cfg.sources, debouncer)
    try:
        time.sleep(0.3)  # the observer's inotify watches are in place
        with (root / "log" / "a.log").open("a") as f:
            f.write("t3|1|def h(|z):\n")
        assert seen.wait(10), "the folder the collector named was not watched"
    finally:
        observer.stop()
        debouncer.cancel()
    assert fired == ["toy-log"]
    again = jobs.collect(store, cfg)
    assert again["sources"][0]["stored"]["suggestions"] == 1
    store.close()
