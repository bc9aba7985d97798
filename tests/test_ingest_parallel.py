"""A large log backlog parsed and scrubbed by worker processes (pipelines/ingest/parallel.py) stores what the
serial collect stores: the same rows, quarantine, scrub counts, identities, drops and cursor, secrets included."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import signal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from pipelines.ingest import parallel
from pipelines.store.db import Store
from support import (
    BIG_BACKLOG_TOKEN,
    autocomplete_event,
    big_backlog,
    collect_site,
    continue_log,
    devtune_json,
    write_config,
)

TABLES = ("suggestions", "quarantine", "scrubs", "identities", "drops", "cursors", "suggestion_served")
WHEN_STORED = {"ingested_at", "quarantined_at", "updated_at", "attributed_at"}  # the clock, not the data
TOKEN = BIG_BACKLOG_TOKEN  # a GitHub token's shape, as big_backlog plants it


def backlog(n: int) -> list[Any]:
    """Continue lines of three developers (one opted out) with secrets in every place a line holds one, a
    secret split by the cursor, a file whose content is never stored, and lines that are quarantined."""
    lines: list[Any] = []
    for i in range(n):
        who = ("alice-id", "bob-id", "gone-id")[i % 3]
        event = autocomplete_event(
            completionId=f"c-{i:05d}", accepted=i % 4 != 0, uniqueId=who,
            timestamp=f"2026-10-{1 + i % 28:02d}T{i // 60 % 24:02d}:{i % 60:02d}:00.000Z",
            prefix=f"def handler_{i}(request):\n    value = {i}\n", suffix="\n    return value\n",
            filepath=f"file:///home/dev/src/payments/module_{i % 17}.py")
        if i % 50 == 7:
            event["completion"] = f'    API_TOKEN = "{TOKEN}"\n'
        if i % 50 == 19:  # the name before the cursor, the value after it
            event["prefix"] = 'DATABASE_PASSWORD = "'
            event["completion"] = 'Zq8#mV2!xR4@pL6$"\n'
        if i % 50 == 31:
            event["filepath"] = "file:///home/dev/src/payments/.env.local"
        lines.append(event)
        if i % 97 == 5:
            lines.append('{"completionId": "cut", "accepted": tr')
        if i % 101 == 9:
            lines.append("")
    lines.append(json.dumps(autocomplete_event(completionId="huge", prefix="x = 1\n" * 5000)))  # over the limit
    return lines


def collect(folder: Path, site: Path, workers: int, batch_events: int = 40) -> dict[str, Any]:
    config = write_config(site, [{"kind": "continue", "path": str(folder), "name": "logs"}],
                          overrides={"collect": {"scrub_workers": workers, "batch_events": batch_events,
                                                 "max_line_bytes": 20_000, "opt_out": ["gone-id"]}}).config
    result, _ = collect_site(config)
    assert result["error"] is None, result["error"]
    return result


def stored(site: Path, tables: tuple[str, ...] = TABLES) -> dict[str, list[tuple[Any, ...]]]:
    con = duckdb.connect(str(site / "state" / "store.duckdb"), read_only=True)
    try:
        out = {}
        for table in tables:
            cols = [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall() if r[0] not in WHEN_STORED]
            names = ", ".join(f'"{c}"' for c in cols)
            out[table] = sorted(con.execute(f"SELECT {names} FROM {table}").fetchall(), key=repr)
        return out
    finally:
        con.close()


@pytest.fixture
def small_backlogs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "MIN_BYTES", 0)  # the test's logs are small; the path is the same


def test_a_backlog_scrubbed_by_workers_is_stored_as_the_serial_collect_stores_it(
        tmp_path: Path, small_backlogs: None) -> None:
    continue_log(tmp_path / "logs", backlog(600))
    serial = collect(tmp_path / "logs", tmp_path / "serial", workers=1)
    pooled = collect(tmp_path / "logs", tmp_path / "pooled", workers=2)
    assert (serial["sources"][0]["workers"], pooled["sources"][0]["workers"]) == (0, 2)
    assert pooled["sources"][0]["seen"] == serial["sources"][0]["seen"] > 600
    assert pooled["sources"][0]["stored"] == serial["sources"][0]["stored"]
    a, b = stored(tmp_path / "serial"), stored(tmp_path / "pooled")
    assert {t: len(rows) for t, rows in b.items()} == {t: len(rows) for t, rows in a.items()}
    for table in TABLES:
        assert b[table] == a[table], table
    # what makes the comparison mean something: every kind of line was there to be handled
    assert len(a["suggestions"]) == 400 - 8  # bob and alice; the .env lines of theirs dropped
    assert len(a["quarantine"]) == 8 and len(a["drops"]) > 0 and len(a["scrubs"]) > 0
    con = duckdb.connect(str(tmp_path / "pooled" / "state" / "store.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM suggestions WHERE completion LIKE '%<SECRET:%'").fetchone() == (16,)
        leaked = "SELECT count(*) FROM suggestions WHERE concat(prefix, completion, suffix) LIKE ?"
        for secret in (TOKEN, "Zq8#mV2!xR4@pL6$", "gone-id"):
            assert con.execute(leaked, [f"%{secret}%"]).fetchone() == (0,), secret
        assert con.execute("SELECT count(*) FROM suggestions WHERE developer = 'gone-id'").fetchone() == (0,)
    finally:
        con.close()


def test_a_growing_log_resumes_from_the_workers_cursor(tmp_path: Path, small_backlogs: None) -> None:
    lines = backlog(300)
    continue_log(tmp_path / "logs", lines[:150])
    collect(tmp_path / "logs", tmp_path / "pooled", workers=2)
    continue_log(tmp_path / "logs", lines[150:], append=True)
    again = collect(tmp_path / "logs", tmp_path / "pooled", workers=2)
    assert again["sources"][0]["seen"] == len([x for x in lines[150:] if x != ""])
    collect(tmp_path / "logs", tmp_path / "serial", workers=1)
    assert stored(tmp_path / "pooled") == stored(tmp_path / "serial")


def test_a_killed_worker_fails_the_collect_after_the_batches_before_it_and_the_next_collect_finishes(
        tmp_path: Path, small_backlogs: None, monkeypatch: pytest.MonkeyPatch) -> None:
    continue_log(tmp_path / "logs", backlog(600))
    apply = Store.apply_tables
    calls: list[int] = []

    def kill_workers_after_the_first_batch(self: Store, *args: Any, **kwargs: Any) -> Any:
        applied = apply(self, *args, **kwargs)
        if not calls:
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGKILL)  # type: ignore[arg-type]
        calls.append(1)
        return applied

    monkeypatch.setattr(Store, "apply_tables", kill_workers_after_the_first_batch)
    config = write_config(tmp_path / "pooled", [{"kind": "continue", "path": str(tmp_path / "logs"), "name": "logs"}],
                          overrides={"collect": {"scrub_workers": 2, "batch_events": 40, "max_line_bytes": 20_000,
                                                 "opt_out": ["gone-id"]}}).config
    failed, _ = collect_site(config)
    assert failed["error"] is not None and "BrokenProcessPool" in failed["error"], failed["error"]
    kept = stored(tmp_path / "pooled")
    assert 0 < len(kept["suggestions"]) < 392 and len(kept["cursors"]) == 1  # a prefix, with its cursor
    monkeypatch.setattr(Store, "apply_tables", apply)
    collect(tmp_path / "logs", tmp_path / "pooled", workers=2)
    collect(tmp_path / "logs", tmp_path / "serial", workers=1)
    assert stored(tmp_path / "pooled") == stored(tmp_path / "serial")


def test_a_small_backlog_stays_in_the_collecting_process(tmp_path: Path) -> None:
    continue_log(tmp_path / "logs", backlog(30))
    result = collect(tmp_path / "logs", tmp_path / "site", workers=2)
    assert result["sources"][0]["workers"] == 0  # 30 lines, under MIN_BYTES


def test_devtune_collect_reads_a_64_mb_backlog_with_workers_from_its_own_entry_point(tmp_path: Path) -> None:
    """The real `devtune collect` process starts the workers (spawned: each imports the entry point's module
    again, which must not collect or start anything itself), over the real MIN_BYTES."""
    log = continue_log(tmp_path / "logs", big_backlog(15_500))
    assert log.stat().st_size > parallel.MIN_BYTES
    config = write_config(tmp_path / "pooled", [{"kind": "continue", "path": str(tmp_path / "logs"), "name": "logs"}],
                          overrides={"collect": {"scrub_workers": 2}}).config
    result = devtune_json("--config", str(config), "collect", "--json")
    (source,) = result["sources"]
    assert (source["workers"], source["error"], source["stored"]["suggestions"]) == (2, None, 15_500)
    collect(tmp_path / "logs", tmp_path / "serial", workers=1, batch_events=2000)
    a, b = stored(tmp_path / "serial"), stored(tmp_path / "pooled")
    assert b["suggestions"] == a["suggestions"] and b["scrubs"] == a["scrubs"] and len(a["scrubs"]) == 16


def test_line_ranges_hold_every_complete_line_once_across_read_chunks(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from collectors import jsonl

    monkeypatch.setattr(jsonl, "CHUNK_BYTES", 7)  # lines and ranges across many reads
    lines = [b"x" * (i * 5 % 23) for i in range(40)]  # blank ones among them
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n" + b'{"half": tr')  # a last line still being written
    whole = path.read_bytes()
    start = len(lines[0]) + 1 + len(lines[1]) + 1  # resuming at a cursor
    ranges = list(jsonl.line_ranges(path, start, 3))
    assert ranges[0][0] == start and ranges[-1][1] == whole.rindex(b"\n") + 1
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))  # contiguous
    assert [whole[a:b].count(b"\n") for a, b in ranges] == [3] * 12 + [2]
    got = [item.raw for a, b in ranges for item in jsonl.iter_lines(path, a, 1 << 20)
           if isinstance(item, jsonl.Line) and item.end <= b]
    assert got == lines[2:]


def test_tabby_days_together_over_the_threshold_go_to_workers_with_their_links(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tabby writes a file a day: a backlog of small day files takes the workers too, day after day, and a
    completion shown one day and selected the next is linked as in the serial collect."""
    from support import day_ms, tabby_action, tabby_completion, write_lines

    monkeypatch.setattr(parallel, "MIN_BYTES", 20_000)  # more than any one day file below, less than all of them
    days = [f"2026-10-{d:02d}" for d in range(1, 6)]
    for n, day in enumerate(days):
        lines: list[Any] = []
        for i in range(30):
            cid = f"cmpl-{n}-{i}"
            lines.append(tabby_completion(cid, day_ms(day, i), text=f'    token = "{TOKEN}"\n' if i == 3 else
                                          f"    return {i}\n"))
            if i % 3 == 0:
                lines.append(tabby_action("select", cid, day_ms(day, i + 1)))
            if i % 5 == 0 and n > 0:  # yesterday's completion, selected today
                lines.append(tabby_action("select", f"cmpl-{n - 1}-{i + 1}", day_ms(day, 100 + i)))
        write_lines(tmp_path / "tabby" / "events" / f"{day}.json", lines)
    assert all((tmp_path / "tabby" / "events" / f"{d}.json").stat().st_size < 20_000 for d in days)

    def collected(site: str, workers: int) -> dict[str, Any]:
        config = write_config(tmp_path / site, [{"kind": "tabby", "path": str(tmp_path / "tabby"), "name": "t"}],
                              overrides={"collect": {"scrub_workers": workers, "batch_events": 16}}).config
        result, _ = collect_site(config)
        assert result["error"] is None, result["error"]
        return result["sources"][0]

    assert collected("pooled", 2)["workers"] == 2
    assert collected("serial", 1)["workers"] == 0
    tables = ("tabby_completions", "tabby_actions", "suggestions", "scrubs", "cursors")
    a, b = stored(tmp_path / "serial", tables), stored(tmp_path / "pooled", tables)
    assert b == a and len(a["cursors"]) == 5 and len(a["scrubs"]) == 5
    # 10 selected the day they were shown, each day; 16 more the day after (6 a day on 4 days, 2 of them already);
    # a completion no one acted on derives no suggestion
    con = duckdb.connect(str(tmp_path / "pooled" / "state" / "store.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FILTER (accepted), count(*) FROM suggestions").fetchone() == (66, 66)
    finally:
        con.close()

