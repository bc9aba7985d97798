"""Exactly-once under SIGKILL: an ingest killed at 22 random points and restarted ends with the same tables as
one clean run (every column but the wall-clock ones), with real subprocesses, files, git and DuckDB.

Each kill is timed from that run's first committed batch (the runner prints a line after each commit), so
every kill lands after some of the ingest is stored and the next run has a saved cursor to resume from: the
killed store's rows are counted after each kill and must grow."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import duckdb

from collectors.continue_http import append_to_inbox
from support import (
    ROOT,
    T0,
    CommitSpec,
    autocomplete_event,
    continue_event,
    continue_log,
    day_ms,
    days,
    make_repo,
    tabby_action,
    tabby_completion,
    table_rows,
    write_config,
    write_lines,
)

KILLS = 22
# The real collect, with a line printed after each batch's transaction commits: an observer around the real
# method, so the test can time its kill from a commit (nothing about what is stored changes).
RUNNER = """
import sys
from daemon import jobs
from daemon.config import load_config
from pipelines.store.db import Store

apply_batch = Store.apply_batch

def observed(self, *args, **kwargs):
    applied = apply_batch(self, *args, **kwargs)
    print("committed", flush=True)
    return applied

Store.apply_batch = observed
cfg = load_config(sys.argv[1])
store = Store.open(cfg.state_dir / "store.duckdb")
result = jobs.collect(store, cfg)
store.close()
sys.exit(1 if result["error"] else 0)
"""


def make_sources(root: Path) -> list[dict[str, str]]:
    rng = random.Random(3)
    code = (ROOT / "pipelines" / "store" / "db.py").read_text()
    events: list[dict[str, object] | str] = []
    for i in range(1500):
        cut = rng.randrange(500, len(code) - 500)
        events.append(autocomplete_event(completionId=f"c{i}", accepted=rng.random() < 0.3,
                                         prefix=code[cut - rng.randint(200, 1200):cut],
                                         completion=code[cut:cut + rng.randint(10, 120)],
                                         timestamp=f"2026-10-01T09:{i // 60 % 60:02d}:{i % 60:02d}.000Z"))
        if i % 250 == 7:
            events.append('{"completionId": "cut-short", "accepted": tr')  # quarantined
        if i % 300 == 11:
            events.append(autocomplete_event(completionId=f"s{i}", prefix='API_KEY = "ghp_' + "a1B2" * 9 + '"\n'))
    continue_log(root / "alice", events)
    write_lines(root / "alice" / "dev_data" / "0.2.0" / "editOutcome.jsonl",
                [continue_event("editOutcome", prompt=f"edit {i}", accepted=i % 2 == 0) for i in range(150)])
    write_lines(root / "alice" / "dev_data" / "0.2.0" / "chatFeedback.jsonl",
                [continue_event("chatFeedback", prompt=f"q{i}", feedback=i % 3 == 0) for i in range(150)])
    lines: dict[str, list[dict[str, object]]] = {"2026-10-01": [], "2026-10-02": []}
    for i in range(400):
        day = "2026-10-01"
        t = 60.0 * i
        lines[day].append(tabby_completion(f"cmpl-{i}", day_ms(day, t), user=f"tabby-{i % 3}"))
        if i % 5:
            lines[day].append(tabby_action("view", f"cmpl-{i}", day_ms(day, t + 1), user=f"tabby-{i % 3}"))
        if i % 5 == 1:
            late = i % 10 == 1  # a select in the next day's file
            lines["2026-10-02" if late else day].append(tabby_action(
                "select", f"cmpl-{i}", day_ms("2026-10-02" if late else day, t + 2), line=i % 20 == 1))
    for day, day_lines in lines.items():
        write_lines(root / "tabby" / "events" / f"{day}.json", list(day_lines))
    repo = make_repo(root / "repo", [CommitSpec({f"app/m{i % 7}.py": code[: 400 + 97 * i]},
                                                author=("Bob", "bob@example.com") if i % 3 else ("Al", "al@x.org"),
                                                when=T0 + days(i / 4), message=f"change {i}") for i in range(40)])
    assert repo.head.commit
    return [{"kind": "continue", "path": str(root / "alice"), "name": "alice", "developer": "alice@example.com"},
            {"kind": "tabby", "path": str(root / "tabby"), "name": "tabby"},
            {"kind": "git", "path": str(root / "repo"), "name": "repo"}]


def run(config: Path, kill_after_s: float | None) -> tuple[bool, float]:
    """One ingest, SIGKILLed `kill_after_s` after its first batch committed: (killed before it finished, seconds
    from that commit to its end)."""
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(config)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline().strip()  # blocks until the first commit (or the end, with nothing left)
    started = time.monotonic()
    if kill_after_s is None or first != "committed":
        assert proc.wait(timeout=300) == 0
        return False, time.monotonic() - started
    time.sleep(kill_after_s)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)  # a no-op on a child that has already been reaped
    proc.wait()
    return killed, time.monotonic() - started


def stored_rows(db: Path) -> int:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return sum(con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # type: ignore[index]
                   for t in ("suggestions", "commits", "edit_outcomes", "interactions", "tabby_actions"))
    finally:
        con.close()


def tables(db: Path) -> dict[str, list[tuple[object, ...]]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        names = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables ORDER BY 1").fetchall()]
    finally:
        con.close()
    return {t: table_rows(db, t) for t in names if t != "schema_migrations"}


def test_kill_9_at_random_points_neither_loses_nor_duplicates(tmp_path: Path) -> None:
    sources = make_sources(tmp_path / "data")
    overrides = {"collect": {"batch_events": 60}, "continue_http": {"enabled": True}}
    clean = write_config(tmp_path / "clean", sources, overrides=overrides)
    killed = write_config(tmp_path / "killed", sources, overrides=overrides)
    for setup in (clean, killed):  # the same events waiting in both HTTP inboxes
        inbox = setup.state_dir / "inbox" / "continue"
        inbox.mkdir(parents=True)
        for i in range(40):
            append_to_inbox(inbox, {"name": "autocomplete", "data": autocomplete_event(completionId=f"h{i % 30}"),
                                    "schema": "0.2.0", "level": "all"}, "alice@example.com", datetime(2026, 10, 3))

    _, ingest_s = run(clean.config, None)
    expected = tables(clean.state_dir / "store.duckdb")
    assert len(expected["suggestions"]) > 1500 and len(expected["commits"]) == 40 and expected["quarantine"]

    rng = random.Random(11)
    interrupted, grew, before = 0, 0, 0
    for _ in range(KILLS):
        # Up to 1/20 of the whole ingest after a run's first commit: mid-batch, between batches, mid-harvest.
        # (1/12 let 12 of 22 runs finish first at a load of 10: each run has less left than the one before.)
        killed_early = run(killed.config, rng.uniform(0.0, max(0.05, ingest_s / 20)))[0]
        interrupted += killed_early
        rows = stored_rows(killed.state_dir / "store.duckdb")
        assert rows >= before, f"a kill lost stored rows: {before} -> {rows}"
        grew += rows > before
        before = rows
    assert interrupted >= KILLS // 2, f"only {interrupted} of {KILLS} runs were killed before finishing"
    # Each killed run committed at least one batch first, so the next one resumed from a saved cursor.
    assert grew >= interrupted * 3 // 4, f"rows grew after only {grew} of {interrupted} kills"
    run(killed.config, None)
    assert tables(killed.state_dir / "store.duckdb") == expected
