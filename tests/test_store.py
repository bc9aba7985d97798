from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.store.db import MIGRATIONS, Store, StoreBusy


def test_migrations_are_recorded_and_applied_once(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.duckdb")
    assert store.migrations() == [name for name, _ in MIGRATIONS]
    store.close()
    store = Store.open(tmp_path / "s.duckdb")
    assert store.migrate() == []  # nothing new on reopen
    tables = {r[0] for r in store.con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert {"suggestions", "commits", "commit_files", "blobs", "cursors", "quarantine", "runs"} <= tables
    store.close()


def test_a_store_held_by_another_process_gives_a_clear_error_not_a_lock_trace(tmp_path: Path) -> None:
    db = tmp_path / "s.duckdb"
    Store.open(db).close()
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(db)!r}); "
                               "print('held', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(StoreBusy) as info:
            Store.open(db, lock_timeout_s=0.5)
        assert time.monotonic() - started >= 0.5  # it waited before giving up
        message = str(info.value)
        assert f"PID {holder.pid}" in message and "service.json" in message
    finally:
        holder.kill()
        holder.wait()


def test_store_waits_for_a_short_lived_holder(tmp_path: Path) -> None:
    db = tmp_path / "s.duckdb"
    Store.open(db).close()
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(db)!r}); "
                               "print('held', flush=True); time.sleep(1.0)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    store = Store.open(db, lock_timeout_s=20)  # succeeds once the holder exits
    store.close()
    holder.wait()
