"""One failing source stays local: it is reported, retried with back-off, and every other source is collected."""

from __future__ import annotations

import json
from pathlib import Path

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
