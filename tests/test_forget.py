"""`devtune forget`: everything stored of a developer goes (every table's text and every file under the state
directory is searched for them afterwards), later collects store nothing of theirs, a kill -9 at any point
ends in the old state or the forgotten one, and `opt_out` is retroactive."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from collectors.continue_http import append_to_inbox
from daemon import auth
from daemon.config import inbox_dir, load_config
from daemon.sample import DEVELOPERS, make_sample
from pipelines.cycle import plan_start
from pipelines.scope import Scope
from pipelines.store.db import Store
from support import (
    ROOT,
    CommitSpec,
    Setup,
    all_text,
    autocomplete_event,
    commit,
    continue_log,
    days,
    run_devtune,
    utc_now,
    write_config,
)

ALICE = "alice@example.com"
MARKER = "ALICE_ONLY_MARKER_7f3a"  # text only alice's events hold


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[Setup, str]:
    """A site where alice has IDE rows (files and HTTP inbox), commits, a token, a personal adapter and rows in
    the team adapter, and bob's commit names her as co-author. Returned untouched: tests copy it."""
    tmp = tmp_path_factory.mktemp("forget")
    sample = make_sample(tmp / "sample", n_commits=24, n_events=200)
    import git

    repo = git.Repo(sample.repo)
    commit(repo, CommitSpec({"ledger/notes.py": f"# {MARKER}: settlement notes\nNOTE = 1\n"},
                            author=DEVELOPERS[0], when=utc_now() - days(3), message=f"{MARKER} notes"))
    commit(repo, CommitSpec({"ledger/pair.py": "PAIRED = True\n"}, author=DEVELOPERS[1], when=utc_now() - days(2),
                            message="pair on settlement\n\nCo-authored-by: Alice Moreau <alice@example.com>"))
    now = utc_now()
    continue_log(sample.continue_dirs[ALICE], [autocomplete_event(
        completionId=f"marker-{i}", accepted=True, timestamp=(now - days(1 + i / 10)).isoformat() + "Z",
        prefix=f"# {MARKER}\ndef fee_{i}(amount):\n", completion=f"    return amount  # {MARKER}\n")
        for i in range(5)], append=True)
    sources = sample.sources()
    setup = write_config(tmp / "site", sources, teams=[{"name": "payments", "members": [e for _, e in DEVELOPERS]}],
                         overrides={
        "": {"base_model": str(tiny_model)},
        "continue_http": {"enabled": True},
        "datasets": {"max_row_tokens": 256, "max_prefix_chars": 600, "max_suffix_chars": 200,
                     "heldout_fraction": 0.15, "min_train_rows": 16, "min_heldout_rows": 4, "min_dev_examples": 16},
        "train": {"max_steps": 20, "batch_size": 8, "learning_rate": 5e-3, "logging_steps": 10},
        "evaluate": {"max_rows": 24, "batch_size": 8, "generate_rows": 4, "max_new_tokens": 8},
        "gate": {"primary_metric": "heldout_loss", "min_improvement": -1.0, "edit_similarity_tolerance": 1.0,
                 "exact_match_tolerance": 1.0, "preference_accuracy_tolerance": 1.0,
                 "generated_length_tolerance": 10.0},  # promote whatever trains: this file tests forgetting
    }, developers=[{"id": ALICE, "aliases": ["alice-laptop-9c1e"]}])
    token, _ = auth.issue(setup.state_dir, ALICE)
    inbox_dir(setup.state_dir).mkdir(parents=True)  # as the service makes it
    append_to_inbox(inbox_dir(setup.state_dir), {"name": "autocomplete", "schema": "0.2.0", "level": "all",
                    "data": autocomplete_event(completionId="http-1", prefix=f"# {MARKER} over http\n")},
                    ALICE, datetime.now(UTC).replace(tzinfo=None))
    cycle = run_devtune("--config", str(setup.config), "cycle", "--team", "payments")
    assert cycle.returncode == 0, cycle.stdout + cycle.stderr
    assert (setup.state_dir / "registry" / f"dev:{ALICE}").is_dir(), cycle.stdout  # her personal adapter
    assert (setup.state_dir / "registry" / "team:payments").is_dir(), cycle.stdout
    return setup, token


def copy_site(pristine: tuple[Setup, str], dest: Path) -> tuple[Path, Path, str]:
    """A copy of the whole site, its sample logs and repository included (tests append to the logs)."""
    setup, token = pristine
    root = setup.config.parent.parent
    shutil.copytree(root, dest, symlinks=True)
    config = dest / setup.config.relative_to(root)
    config.write_text(config.read_text().replace(str(root), str(dest)))
    return config, config.parent / "state", token


def traces(state: Path, token: str) -> list[str]:
    """Where anything of alice's is still found: a table's text, or any file under the state directory."""
    needles = [ALICE, "Alice Moreau", MARKER, "alice-laptop-9c1e", token]
    found = []
    db = state / "store.duckdb"
    text = all_text(db).lower()
    found += [f"store: {n}" for n in needles if n.lower() in text]
    for path in state.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes().lower()
            found += [f"{path.relative_to(state)}: {n}" for n in needles if n.lower().encode() in data]
        if ALICE in path.name:
            found.append(f"a path names her: {path.relative_to(state)}")
    return found


def test_forget_removes_everything_of_theirs_and_keeps_them_out(pristine: tuple[Setup, str], tmp_path: Path) -> None:
    config, state, token = copy_site(pristine, tmp_path / "site")
    assert traces(state, token), "the fixture must hold alice's data for this test to mean anything"
    assert (state / "scores" / f"dev-{ALICE}").is_dir()  # her adapter's evaluation remembered its rows
    assert (state / "cache" / "datasets" / f"dev-{ALICE}").is_dir()  # and her dataset build its rows

    asked = run_devtune("--config", str(config), "forget", ALICE)  # not a terminal, no --yes: nothing changes
    assert asked.returncode == 1 and "pass --yes" in asked.stderr and "would remove" in asked.stdout
    assert traces(state, token)

    done = run_devtune("--config", str(config), "forget", "alice-laptop-9c1e", "--yes", "--json")  # an alias
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["developer"] == ALICE and plan["counts"]["suggestions"] > 0 and plan["counts"]["commits"] > 0
    assert plan["counts"]["named_in_other_rows"] > 0  # bob's co-authored commit
    assert traces(state, token) == []
    cfg = load_config(config)
    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        bob = store.con.execute("SELECT message FROM commits WHERE message LIKE 'pair on settlement%'").fetchone()
        assert bob is not None and "<forgotten>" in bob[0]  # bob's commit stays, without her
        assert store.con.execute("SELECT count(*) FROM commits").fetchone()[0] == 26  # history counts stay whole
        marks = store.retrain_marks()
        assert ("team:payments", "v0001") in marks
        # The next team run retrains from the base model and is judged against the base; developers wait.
        assert plan_start(cfg, Scope("team", "payments"), "payments", marks.keys()).init is None
        assert "waits for its retrain" in plan_start(cfg, Scope("dev", "bob@example.com"), "payments", marks.keys()).why
    finally:
        store.close()
    status = json.loads(run_devtune("--config", str(config), "status", "--json").stdout)
    assert status["retrain_required"]["team:payments"]["version"] == "v0001"
    assert status["forgotten"] == {"forgotten": 1, "tombstones": len(plan["identities"])}
    assert ALICE not in json.dumps(status)
    assert not (state / "served" / f"dev:{ALICE}").exists()
    assert not (state / "scores").exists() and not (state / "cache").exists()

    # Later collects of the same logs, the inbox and a new HTTP post store nothing of hers...
    her_logs = next(s.path for s in load_config(config).sources if s.developer == ALICE)
    continue_log(her_logs, [autocomplete_event(completionId="after", prefix=MARKER)], append=True)
    append_to_inbox(inbox_dir(state), {"name": "autocomplete", "schema": "0.2.0", "level": "all",
                                       "data": autocomplete_event(completionId="http-2", prefix=MARKER)},
                    ALICE, datetime.now(UTC).replace(tzinfo=None))
    collected = run_devtune("--config", str(config), "collect", "--json")
    assert collected.returncode == 0, collected.stderr
    assert json.loads(run_devtune("--config", str(config), "status", "--json").stdout)["dropped"]["forgotten"] == 2
    assert [t for t in traces(state, token) if "store:" in t] == []
    # ...until the tombstone is lifted.
    undo = run_devtune("--config", str(config), "forget", "--undo", ALICE)
    assert undo.returncode == 0 and "tombstone(s) lifted" in undo.stdout
    continue_log(her_logs, [autocomplete_event(completionId="welcome-back")], append=True)
    assert run_devtune("--config", str(config), "collect").returncode == 0
    db = state / "store.duckdb"
    con = duckdb.connect(str(db), read_only=True)
    try:
        assert con.execute("SELECT developer FROM suggestions WHERE id = 'welcome-back'").fetchone() == (ALICE,)
    finally:
        con.close()


def test_a_kill_at_any_point_leaves_the_old_state_or_the_forgotten_one(pristine: tuple[Setup, str],
                                                                      tmp_path: Path) -> None:
    def start(config: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "daemon.cli", "--config", str(config), "forget", ALICE,
                                 "--yes"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    # How long a whole forget takes here (interpreter start included), to spread the kills over it.
    config, _, _ = copy_site(pristine, tmp_path / "timing")
    began = time.monotonic()
    assert start(config).wait() == 0
    whole = time.monotonic() - began
    rng = random.Random(11)
    landed = {"before": 0, "after": 0, "finished": 0}
    attempt = 0
    # Until kills have landed on both sides of the commit (at most 20 tries: a loaded machine stretches runs).
    while (landed["before"] < 1 or landed["after"] < 2) and attempt < 20:
        attempt += 1
        config, state, token = copy_site(pristine, tmp_path / f"site{attempt}")
        proc = start(config)
        if attempt % 3 == 0:  # kill as soon as the file work has begun (her registry folder starts to go)
            deadline = time.monotonic() + 60
            while (state / "registry" / f"dev:{ALICE}").exists() and proc.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.001)
        else:  # anywhere in the run: interpreter start, plan, transaction, files, rewrite
            time.sleep(rng.uniform(0.05, 0.95) * whole)
        proc.send_signal(signal.SIGKILL)
        if proc.wait() != -signal.SIGKILL:
            landed["finished"] += 1  # it ended first: aim earlier from now on
            whole *= 0.8
        con = duckdb.connect(str(state / "store.duckdb"))
        try:
            tombstones = con.execute("SELECT count(*) FROM tombstones").fetchone()[0]
            hers = con.execute("SELECT count(*) FROM suggestions WHERE developer = ?", [ALICE]).fetchone()[0]
        finally:
            con.close()
        # Either nothing happened, or her rows are gone and her tombstones are in: never half of it.
        assert (tombstones == 0 and hers > 0) or (tombstones > 0 and hers == 0), (attempt, tombstones, hers)
        if proc.returncode == -signal.SIGKILL:
            landed["after" if tombstones else "before"] += 1
        if not tombstones:  # killed before the commit: aim a little later next time
            whole *= 1.1
        again = run_devtune("--config", str(config), "forget", ALICE, "--yes")
        assert again.returncode == 0, again.stderr
        left = traces(state, token)
        assert left == [], (attempt, left)
    assert landed["before"] >= 1 and landed["after"] >= 2, landed  # kills landed on both sides of the commit


def test_a_forget_killed_right_after_its_commit_is_finished_by_the_next_one(pristine: tuple[Setup, str],
                                                                            tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The narrowest window of the kill test above, every time: the rows and tombstones are committed and the
    process dies before any file work. Only the pending job still knows her teams' runs (her rows are gone,
    so a new plan finds none of them), so the next `devtune forget` must finish that job too."""
    from pipelines import forget as forgetting

    config, state, token = copy_site(pristine, tmp_path / "site")

    class Killed(BaseException):
        pass

    def die(*_: object) -> None:
        raise Killed

    monkeypatch.setattr(forgetting, "_finish", die)
    cfg = load_config(config)
    store = Store.open(state / "store.duckdb")
    try:
        with pytest.raises(Killed):
            forgetting.forget(store, cfg, ALICE)
        assert store.con.execute("SELECT count(*) FROM suggestions WHERE developer = ?", [ALICE]).fetchone()[0] == 0
        assert len(store.pending_forgets()) == 1
    finally:
        store.close()
    assert any("/data/" in t for t in traces(state, token))  # her rows are still in the team run's datasets
    again = run_devtune("--config", str(config), "forget", ALICE, "--yes")
    assert again.returncode == 0, again.stderr
    assert traces(state, token) == []


def test_opt_out_is_retroactive(pristine: tuple[Setup, str], tmp_path: Path) -> None:
    config, state, token = copy_site(pristine, tmp_path / "site")
    text = config.read_text().replace("opt_out = []", f'opt_out = ["{ALICE}"]')
    assert text != config.read_text()
    config.write_text(text)
    collected = run_devtune("--config", str(config), "collect")
    assert collected.returncode == 0, collected.stderr
    Store.open(state / "store.duckdb").close()  # the next open rewrites the file without her bytes
    assert traces(state, token) == []
    con = duckdb.connect(str(state / "store.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM suggestions WHERE developer = ?", [ALICE]).fetchone()[0] == 0
        assert con.execute("SELECT count(*) FROM tombstones").fetchone()[0] == 0  # the config keeps her out
    finally:
        con.close()
    assert not (state / "registry" / f"dev:{ALICE}").exists()
