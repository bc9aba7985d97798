"""One failing source stays local: it is reported, retried with back-off, and every other source is collected."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from daemon import jobs
from daemon.config import load_config
from pipelines.store.db import Store
from support import autocomplete_event, continue_log, run_devtune, write_config


def test_a_failing_source_beside_a_good_one(tmp_path: Path) -> None:
    broken = tmp_path / "not-a-repo"
    broken.mkdir()
    (broken / "README").write_text("a folder someone listed as a repository\n")
    continue_log(tmp_path / "alice", [autocomplete_event(completionId=f"c{i}") for i in range(5)])
    # The broken source comes first: before, its exception ended the collect and the folder after it waited.
    setup = write_config(tmp_path / "site", [
        {"kind": "git", "path": str(broken), "name": "broken-repo"},
        {"kind": "continue", "path": str(tmp_path / "alice"), "name": "alice", "developer": "alice@example.com"}])

    result = run_devtune("--config", str(setup.config), "collect", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["failed"] == ["broken-repo"]
    by_name = {r["source"]: r for r in report["sources"]}
    assert "not a git repository" in by_name["broken-repo"]["error"]
    assert by_name["alice"]["error"] is None and by_name["alice"]["stored"]["suggestions"] == 5

    plain = run_devtune("--config", str(setup.config), "collect")
    assert plain.returncode == 1 and "1 source(s) failed: broken-repo" in plain.stderr
    assert "FAILED: GitError" in plain.stdout

    status = json.loads(run_devtune("--config", str(setup.config), "status", "--json").stdout)
    assert status["suggestions"]["total"] == 5
    assert status["sources"]["broken-repo"]["failures"] == 2
    assert "not a git repository" in status["sources"]["broken-repo"]["error"]
    assert status["sources"]["alice"]["failures"] == 0


def test_the_timer_backs_off_a_failing_source_and_a_fix_resets_it(tmp_path: Path) -> None:
    from support import CommitSpec, make_repo

    repo = tmp_path / "repo"
    repo.mkdir()
    setup = write_config(tmp_path / "site", [{"kind": "git", "path": str(repo), "name": "repo"}],
                         overrides={"collect": {"interval_s": 600.0}})
    cfg = load_config(setup.config)
    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        first = jobs.collect(store, cfg, due_only=True)
        assert first["failed"] == ["repo"]
        # The timer waits interval_s before trying again; a collect asked for by hand tries at once.
        waiting = jobs.collect(store, cfg, due_only=True)
        assert waiting["failed"] == [] and "next try in" in waiting["sources"][0]["skipped"]
        assert store.source_health()["repo"]["failures"] == 1
        assert jobs.collect(store, cfg)["failed"] == ["repo"]
        assert store.source_health()["repo"]["failures"] == 2
        assert 1100 < jobs.retry_in(store.source_health()["repo"], 600.0) <= 1200  # doubled

        make_repo(repo, [CommitSpec({"a.py": "x = 1\n"})])  # fixed: now it is a repository
        fixed = jobs.collect(store, cfg)
        assert fixed["failed"] == [] and fixed["sources"][0]["stored"]["commits"] == 1
        assert store.source_health()["repo"]["failures"] == 0
    finally:
        store.close()


def test_a_batch_that_fails_to_store_ends_its_source_there_and_the_next_collect_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches are stored in a second thread while the next one is read: a failure storing the second batch (a
    full disk, say) must still end the source with the first batch and its cursor stored, and report it;
    the next collect resumes from that cursor, so every event is stored once."""
    continue_log(tmp_path / "alice", [autocomplete_event(completionId=f"c{i}") for i in range(25)])
    setup = write_config(tmp_path / "site", [
        {"kind": "continue", "path": str(tmp_path / "alice"), "name": "alice", "developer": "alice@example.com"}],
        overrides={"collect": {"batch_events": 10}})
    cfg = load_config(setup.config)
    apply_batch = Store.apply_batch
    calls = []

    def second_fails(self: Store, *args: Any, **kwargs: Any) -> Any:
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return apply_batch(self, *args, **kwargs)

    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        monkeypatch.setattr(Store, "apply_batch", second_fails)
        failed = jobs.collect(store, cfg)
        assert "No space left on device" in failed["sources"][0]["error"]
        assert calls[0] != threading.current_thread().name  # stored beside the reading, not in its thread
        assert store.con.execute("SELECT count(*) FROM suggestions").fetchone() == (10,)
        monkeypatch.setattr(Store, "apply_batch", apply_batch)
        again = jobs.collect(store, cfg)
        assert again["error"] is None, again
        ids = [r[0] for r in store.con.execute("SELECT id FROM suggestions").fetchall()]
    finally:
        store.close()
    assert len(ids) == len(set(ids)) == 25


def collect_twice_at_once(store: Store, cfg: Any) -> tuple[list[dict[str, Any]], list[BaseException]]:
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(jobs.collect(store.cursor(), cfg))
        except BaseException as e:  # noqa: BLE001 - the failure is what the test looks for
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def test_collects_asked_for_at_once_both_finish(tmp_path: Path) -> None:
    """The service's timer, a file event and `devtune collect` can ask at once. Two collects of a new source ending
    together both inserted its health row, and both attributed its new suggestions: one of them failed with a
    constraint error (17 of 20 such pairs here failed before the collects were serialised, 0 of 20 after)."""
    for attempt in range(8):
        folder = tmp_path / str(attempt)
        continue_log(folder / "logs", [autocomplete_event(completionId=f"c{attempt}-{i}") for i in range(5)])
        cfg = load_config(write_config(folder / "site", [{"kind": "continue", "path": str(folder / "logs"),
                                                          "name": "logs"}]).config)
        store = Store.open(cfg.state_dir / "store.duckdb")
        try:
            results, errors = collect_twice_at_once(store, cfg)
            assert errors == [] and [r["error"] for r in results] == [None, None], (errors, results)
            assert sorted(r["sources"][0]["seen"] for r in results) == [0, 5]  # the lines were read once
            assert store.source_health()["logs"]["failures"] == 0
            assert store.con.execute("SELECT count(*) FROM suggestion_served").fetchone() == (5,)
        finally:
            store.close()
