"""One person, one developer id across Continue, Tabby and git; unmapped identities listed; opt-out by alias."""

from __future__ import annotations

from pathlib import Path

from support import (
    T0,
    CommitSpec,
    autocomplete_event,
    collect_site,
    continue_log,
    day_ms,
    make_repo,
    tabby_action,
    tabby_completion,
    table_rows,
    write_config,
    write_lines,
)

MACHINE = "ab" * 32  # Continue's uniqueId (vscode.env.machineId)
DAY = "2026-10-01"


def test_identities_map_to_one_developer_and_the_rest_are_listed(tmp_path: Path) -> None:
    continue_log(tmp_path / "alice", [autocomplete_event(completionId="c1", uniqueId=MACHINE),
                                      autocomplete_event(completionId="c2", uniqueId="cd" * 32)])
    write_lines(tmp_path / "tabby" / "events" / f"{DAY}.json", [
        tabby_completion("cmpl-a", day_ms(DAY, 1), user="tabby-alice"), tabby_action("view", "cmpl-a", day_ms(DAY, 2)),
        tabby_completion("cmpl-z", day_ms(DAY, 3), user="tabby-zed"), tabby_action("view", "cmpl-z", day_ms(DAY, 4)),
        tabby_completion("cmpl-c", day_ms(DAY, 5), user="tabby-carol"),
        tabby_action("view", "cmpl-c", day_ms(DAY, 6), user="tabby-carol"),
    ])
    make_repo(tmp_path / "repo", [CommitSpec({"a.py": "A = 1\n"}, author=("Alice", "Alice@Old.org"), when=T0),
                                  CommitSpec({"b.py": "B = 1\n"}, author=("Bob", "bob@example.com"), when=T0)])
    setup = write_config(tmp_path / "site", [
        # no `developer` here: Continue's own ids decide, through [[developers]] aliases
        {"kind": "continue", "path": str(tmp_path / "alice"), "name": "alice-laptop"},
        {"kind": "tabby", "path": str(tmp_path / "tabby"), "name": "tabby"},
        {"kind": "git", "path": str(tmp_path / "repo"), "name": "repo"}],
        teams=[{"name": "payments", "members": ["alice@example.com"]}],
        developers=[{"id": "alice@example.com", "aliases": [MACHINE, "tabby-alice", "alice@old.org"]},
                    {"id": "carol@example.com", "aliases": ["tabby-carol"]}],
        overrides={"collect": {"opt_out": ["carol@example.com"]}})
    result, db = collect_site(setup.config)
    report = result["status"]
    assert result["error"] is None
    sug = {r[0]: (r[5], r[6]) for r in table_rows(db, "suggestions")}
    assert sug == {"c1": ("alice@example.com", "payments"), "cmpl-a": ("alice@example.com", "payments"),
                   "c2": ("cd" * 32, "default"), "cmpl-z": ("tabby-zed", "default")}
    commits = {r[5]: r[6] for r in table_rows(db, "commits")}  # author_email -> developer
    assert commits == {"alice@old.org": "alice@example.com", "bob@example.com": "bob@example.com"}
    # carol opted out by her canonical id: her alias's completion and actions are never stored
    assert report["dropped"] == {"opted_out": 2}
    assert "tabby-carol" not in str(table_rows(db, "tabby_completions") + table_rows(db, "tabby_actions"))
    unassigned = {(u["identity"], u["source_kind"]): (u["suggestions"], u["commits"]) for u in report["unassigned"]}
    assert unassigned == {("cd" * 32, "continue"): (1, 0), ("tabby-zed", "tabby"): (1, 0),
                          ("bob@example.com", "git"): (0, 1)}


def test_bots_are_not_developers(tmp_path: Path, tiny_model: Path) -> None:
    from daemon import jobs
    from daemon.config import load_config
    from pipelines.scope import Scope
    from pipelines.store.db import Store

    dependabot = ("dependabot[bot]", "49699333+dependabot[bot]@users.noreply.github.com")
    make_repo(tmp_path / "repo", [
        CommitSpec({"app.py": "".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(20))}, when=T0),
        CommitSpec({"requirements.txt": "requests==2.32.3\n", "bump.py": "VERSION = '2.32.3'\n"}, author=dependabot,
                   when=T0, message="Bump requests from 2.32.2 to 2.32.3"),
        CommitSpec({"style.py": "X = 1\n"}, author=("pre-commit-ci[bot]", "66853113+pre-commit-ci[bot]@users.noreply"
                                                    ".github.com"), when=T0, message="[pre-commit.ci] auto fixes"),
        CommitSpec({"ci.py": "Y = 2\n"}, author=("talbot", "talbot@example.com"), when=T0),  # a person, not a bot
    ])
    continue_log(tmp_path / "ci", [autocomplete_event(completionId="bot-1", userId="github-actions")])
    setup = write_config(tmp_path / "site", [{"kind": "git", "path": str(tmp_path / "repo"), "name": "repo"},
                                             {"kind": "continue", "path": str(tmp_path / "ci"), "name": "ci"}],
                         overrides={"": {"base_model": str(tiny_model)},
                                    "datasets": {"min_train_rows": 1, "min_heldout_rows": 1}})
    result, db = collect_site(setup.config)
    assert result["status"]["dropped"] == {"excluded_author_commit": 2, "excluded_author": 1}
    commits = {r[0]: r for r in table_rows(db, "commits")}
    kept = {r[5] for r in commits.values() if not r[11]}  # author_email of the commits that may be trained on
    assert kept == {"alice@example.com", "talbot@example.com"}
    assert len(commits) == 4  # the bots' commits keep their sha and time: history counts stay whole
    assert "dependabot" not in str(table_rows(db, "commits") + table_rows(db, "commit_files"))
    assert table_rows(db, "suggestions") == []

    cfg = load_config(setup.config)
    store = Store.open(cfg.state_dir / "store.duckdb")
    try:
        assert store.team_developers("default") == ["alice@example.com", "talbot@example.com"]
        report = jobs.build_dataset(store, cfg, Scope("team", "default"), tmp_path / "data")
        assert report["counts"]["train"] or report["counts"]["heldout"]
        rows = [line for name in ("sft.jsonl", "heldout.jsonl") for line in (tmp_path / "data" / name).read_text()
                .splitlines()]
        assert rows and not any("requests==" in r or "VERSION" in r or "X = 1" in r for r in rows)
    finally:
        store.close()
