from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pytest

from pipelines.store import db
from pipelines.store.db import BLOB_READ_APART, VECTOR_ROWS, Store, StoreBusy
from pipelines.store.migrations import MIGRATIONS


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
    waited = time.monotonic()
    store = Store.open(db, lock_timeout_s=20)  # succeeds once the holder exits
    waited = time.monotonic() - waited
    # It waited out the holder's remaining second (it prints "held", then sleeps 1.0 s), then got in.
    assert 0.5 < waited < 20, waited
    store.con.execute("CREATE TABLE written_after_the_wait (x INTEGER)")  # read-write, not a read-only fallback
    store.close()
    holder.wait()


def test_every_row_class_matches_the_table_its_migrations_leave(tmp_path: Path) -> None:
    """schema.py declares each table's columns once; the migrations are history. They must agree: same
    columns in the same order, and each Arrow type the one DuckDB stores for the column's SQL type."""
    from pipelines.store.schema import TABLES

    duck = {"VARCHAR": pa.string(), "TIMESTAMP": pa.timestamp("us"), "BOOLEAN": pa.bool_(), "BIGINT": pa.int64(),
            "INTEGER": pa.int32(), "DOUBLE": pa.float64(), "VARCHAR[]": pa.list_(pa.string()),
            "INTEGER[][]": pa.list_(pa.list_(pa.int32()))}
    store = Store.open(tmp_path / "s.duckdb")
    checked = []
    for table in TABLES.values():
        described = store.con.execute(f"DESCRIBE {table.name}").fetchall()
        assert [c[0] for c in described] == list(table.columns), table.name
        assert [duck[c[1]] for c in described] == list(table.schema.types), table.name
        checked.append(table.name)
    store.close()
    assert {"suggestions", "commits", "commit_files", "suggestion_links", "tabby_actions"} <= set(checked)


def test_a_query_whose_columns_drift_from_its_record_fails_loudly(tmp_path: Path) -> None:
    from pipelines.store.db import _records
    from pipelines.store.records import ToLink

    store = Store.open(tmp_path / "s.duckdb")
    cur = store.con.execute("SELECT 'a' AS id, 'd' AS developer, now() AS shown_at, NULL AS repo, 'f' AS path")
    with pytest.raises(AssertionError, match="not ToLink's fields"):
        next(_records(cur, ToLink))
    store.close()


def test_a_collect_does_not_import_pandas_even_where_it_is_installed(tmp_path: Path) -> None:
    """pyarrow imports pandas (0.15-0.35 s) on its first conversion of a Python list when pandas is installed;
    devtune's conversions never need it (pipelines/store/schema.py `_pyarrow_without_pandas`). A collect of
    commits (list columns, timestamps) and editor events in a fresh process stores its rows without that
    import, and pandas still works afterwards for code that does want it."""
    pytest.importorskip("pandas")  # installed with the test extras (statsmodels); where it is not, no cost
    from daemon.sample import make_sample
    from support import write_config

    sample = make_sample(tmp_path / "sample", n_commits=12, n_events=60)
    setup = write_config(tmp_path / "site", sample.sources())
    script = f"""
import sys
from daemon import jobs
from daemon.config import load_config
from pipelines.store.db import Store
cfg = load_config({str(setup.config)!r})
store = Store.open(cfg.state_dir / "store.duckdb")
result = jobs.collect(store, cfg)
counts = store.counts()
print(result["error"], counts["commits"]["total"], counts["suggestions"]["total"], "pandas" in sys.modules)
import pyarrow as pa
from pipelines.store.schema import arrow_table
import pandas
print(arrow_table({{"n": [1, 2]}}, pa.schema([("n", pa.int64())])).to_pandas()["n"].sum())
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = run.stdout.split()
    assert out[:4] == ["None", str(sample.commits), str(sample.events - sample.malformed_lines), "False"], out
    assert out[4] == "3"


def test_a_store_from_before_the_prefix_header_keeps_its_rows_and_their_logged_prefix(tmp_path: Path) -> None:
    # A store made by the code before migration 0060 (each migration applied as that code did), holding a
    # suggestion with its logged prefix whole and one sent without code: upgraded, both read back as before,
    # and a copy of the second that has its text (stored the new way) fills it in.
    import duckdb

    from collectors.base import Cursor
    from pipelines.store.db import Rows
    from pipelines.store.schema import SuggestionRow
    from support import tabby_suggestion

    db = tmp_path / "s.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE schema_migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMP NOT NULL)")
    for name, sql in MIGRATIONS[:[n for n, _ in MIGRATIONS].index("0060_prefix_header")]:
        con.execute(sql)
        con.execute("INSERT INTO schema_migrations VALUES (?, now())", [name])
    old = tabby_suggestion(id="old", prefix="x = 1\n", prefix_compiled="# a.py\nx = 1\n",
                           prefix_recovery="comment_header")
    blank = tabby_suggestion(id="blank", prefix=None, prefix_compiled=None, prefix_recovery="no_code", suffix=None)
    for row in (old, blank):
        con.execute(f"INSERT INTO suggestions ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                    list(row.values()))
    con.close()

    store = Store.open(db)
    assert store.migrations()[-1] == "0060_prefix_header"
    batch = Rows()
    batch.add(SuggestionRow(**tabby_suggestion(id="blank", prefix="y = 2\n", prefix_compiled=None,
                                               prefix_header="# b.py\n", prefix_recovery="comment_header")))
    batch.add(SuggestionRow(**tabby_suggestion(id="old", prefix="z\n", prefix_compiled=None, prefix_header="",
                                               prefix_recovery="raw")))
    store.apply_batch("tabby", batch, Cursor(stream="events"))
    rows = dict(store.con.execute("SELECT id, [prefix, coalesce(prefix_compiled, prefix_header || prefix), "
                                  "prefix_recovery] FROM suggestions").fetchall())
    store.close()
    assert rows == {"old": ["x = 1\n", "# a.py\nx = 1\n", "comment_header"],  # had its text: left as it was
                    "blank": ["y = 2\n", "# b.py\ny = 2\n", "comment_header"]}  # had none: filled


def test_a_few_close_files_are_read_apart_and_many_or_spread_ones_are_not(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store.duckdb")
    n = 4 * VECTOR_ROWS
    store.con.execute("INSERT INTO blobs SELECT 'b' || i, 'content ' || i FROM range(?) t(i)", [n])
    late = {f"b{i}" for i in range(n - 300, n)}  # a night's: the last rows stored
    assert store._blob_contents(late | {"absent"}) == {b: f"content {b[1:]}" for b in late}
    assert store._blob_contents({f"b{v * VECTOR_ROWS}" for v in range(4)}) is None  # one in each vector
    assert store._blob_contents({f"b{i}" for i in range(BLOB_READ_APART + 1)}) is None
    assert store._blob_contents(set()) == {}
    store.close()


def test_release_cache_lets_go_of_cached_blocks_and_keeps_the_memory_limit(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # What this table caches (~20 MB) is under the 256 MB a release keeps: let go down to 4 MB here
    monkeypatch.setattr(db, "RELEASE_LIMIT", "4MB")
    store = Store.open(tmp_path / "store.duckdb")
    default = store.con.execute("SELECT current_setting('memory_limit')").fetchone()
    # ~40 MB of hex that compresses poorly, checkpointed so it is read back through the buffer pool
    store.con.execute("CREATE TABLE filler AS SELECT i, concat(md5(i::VARCHAR), md5((i * 7)::VARCHAR), "
                      "md5((i * 13)::VARCHAR), md5((i * 31)::VARCHAR)) AS s FROM range(300000) t(i)")
    store.con.execute("CHECKPOINT")
    store.close()
    store = Store.open(tmp_path / "store.duckdb")

    def cached() -> int:
        row = store.con.execute("SELECT memory_usage_bytes FROM duckdb_memory() WHERE tag = 'BASE_TABLE'").fetchone()
        return int(row[0]) if row else 0

    total = store.con.execute("SELECT sum(length(s)) FROM filler").fetchone()
    assert total == (300000 * 128,)
    before = cached()
    assert before > 8 << 20
    store.release_cache()
    assert cached() < before // 4
    assert store.con.execute("SELECT current_setting('memory_limit')").fetchone() == default
    assert store.con.execute("SELECT count(*) FROM filler WHERE s LIKE '%ab%'").fetchone()[0] > 0  # still readable
    store.close()


def test_a_long_read_lets_go_of_cached_blocks_as_it_streams(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """_records with `release` (how the link pass and the build read their suggestions) ends holding few cached
    blocks, where the same read without it holds every block it read; and every row still comes through."""
    monkeypatch.setattr(db, "RELEASE_LIMIT", "4MB")
    monkeypatch.setattr(db, "RELEASE_ROWS", 20_000)
    store = Store.open(tmp_path / "store.duckdb")
    store.con.execute("CREATE TABLE filler AS SELECT i, concat(md5(i::VARCHAR), md5((i * 7)::VARCHAR), "
                      "md5((i * 13)::VARCHAR), md5((i * 31)::VARCHAR)) AS s FROM range(300000) t(i)")
    store.con.execute("CHECKPOINT")
    store.close()

    class Filler(NamedTuple):
        i: int
        s: str

    def stream(release: bool) -> tuple[int, int, int]:
        store = Store.open(tmp_path / "store.duckdb")
        cur = store.con.cursor()
        cur.execute("SELECT i, s FROM filler")
        n = total = 0
        for row in db._records(cur, Filler, release=store.release_cache if release else None):
            n += 1
            total += row.i + len(row.s)
        found = store.con.execute("SELECT memory_usage_bytes FROM duckdb_memory() WHERE tag = 'BASE_TABLE'").fetchone()
        store.close()
        return n, total, int(found[0]) if found else 0

    rows, total, kept = stream(release=False)
    assert (rows, total) == (300000, sum(range(300000)) + 300000 * 128)
    assert kept > 16 << 20  # ~40 MB of text read
    released = stream(release=True)
    assert released[:2] == (rows, total)
    assert released[2] < kept // 4


def test_batches_stored_plainly_first_leave_what_key_lookups_leave(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # The same batches into two stores: one inserting fresh tables plainly first (falling back to ON CONFLICT
    # for a batch that meets a stored row, and for its next UPSERT_BATCHES batches), one always looking keys
    # up. After each batch both hold the same rows and cursor and report the same counts; a batch that failed
    # plainly leaves no part of itself behind.
    from dataclasses import replace

    from collectors.base import Cursor
    from pipelines.store.db import _TABLES_BY_NAME, Rows
    from pipelines.store.schema import ScrubRow, SuggestionRow
    from support import tabby_suggestion

    monkeypatch.setattr(db, "UPSERT_BATCHES", 2)
    plain, lookups = Store.open(tmp_path / "plain.duckdb"), Store.open(tmp_path / "lookups.duckdb")

    def batch(*ids: str, text: bool = True) -> Rows:
        rows = Rows()
        for i in ids:
            rows.add(SuggestionRow(**tabby_suggestion(id=i, **({} if text else {
                "prefix": None, "prefix_compiled": None, "prefix_recovery": "no_code", "suffix": None}))))
            rows.add(ScrubRow(target="suggestions", key=i, kind="github_token", count=1))
        return rows

    def contents(store: Store) -> list[Any]:
        return [store.con.execute(f"SELECT {cols} FROM {name} ORDER BY ALL").fetchall()
                for name, cols in (("suggestions", "*"), ("scrubs", "*"), ("cursors", 'source, stream, "offset"'))]

    steps = [batch("a", "b", text=False), batch("c"), batch("d", "b", "e"),  # b again, now with its text: filled
             batch("f"), batch("g", "a"), batch("h"), batch("c", "i"), batch("j")]
    upserting = []
    for n, rows in enumerate(steps):
        cursor = Cursor(stream="events", offset=n)
        done = plain.apply_batch("tabby", rows, cursor)
        with monkeypatch.context() as m:
            m.setattr(db, "_TABLES_BY_NAME", {k: replace(t, fresh=False) for k, t in _TABLES_BY_NAME.items()})
            assert done == lookups.apply_batch("tabby", rows, cursor), n
        assert contents(plain) == contents(lookups), n
        upserting.append(plain._upserting.get("suggestions", 0))
    # plain until "b" came again, then two batches with lookups (the second met "a" again), plain until "c" came
    # again, then lookups
    assert upserting == [0, 0, 2, 1, 0, 0, 2, 1]
    assert plain.con.execute("SELECT prefix FROM suggestions WHERE id = 'b'").fetchone() == ("def f(x):\n",)
    plain.close()
    lookups.close()
