"""Linking accepted suggestions to what their developer committed, in a real repository and store.

One repository, one editing session: Continue and Tabby events at T0+1h, then alice's commit at T0+3h
keeps one suggestion (reformatted), rewrites one, deletes one and keeps the accepted line of a Tabby
partial accept; other suggestions have no commit of theirs in the window, or a file in no repository.
"""

from __future__ import annotations

import os
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import git
import pytest

from daemon import jobs
from daemon.config import load_config
from pipelines.config import DatasetsConfig
from pipelines.datasets.build import build_datasets
from pipelines.datasets.context import ByteSpool
from pipelines.datasets.link import accepted_part, by_file, link_suggestions
from pipelines.datasets.paths import PathIndex
from pipelines.scope import team
from pipelines.store.db import VECTOR_ROWS, Store
from pipelines.store.records import LinkCandidate
from pipelines.tokens import load_base_tokenizer
from support import (
    QWEN,
    T0,
    CommitSpec,
    autocomplete_event,
    commit,
    continue_log,
    day_ms,
    days,
    family_tokenizer,
    make_repo,
    read_jsonl,
    tabby_action,
    tabby_completion,
    write_config,
    write_lines,
)

ALICE, BOB = ("Alice", "alice@example.com"), ("Bob", "bob@example.com")
BASE = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"
MUL = "\n\ndef mul(a, b):\n"
DIV = "\n\ndef div(a, b):\n"
POW = "\n\ndef pow(a, b):\n"
FINAL = (BASE + MUL + "    return a  *  b\n" + DIV + "    return a // b if b else 0\n" + POW
         + "    return a ** b\n")


def hours(n: float) -> timedelta:
    return timedelta(hours=n)


def event(minute: int, prefix: str, suffix: str, completion: str, **kw: Any) -> dict[str, Any]:
    return autocomplete_event(timestamp=(T0 + hours(1) + timedelta(minutes=minute)).isoformat() + "Z",
                              prefix=prefix, suffix=suffix, completion=completion, accepted=True, **kw)


@pytest.fixture
def linked(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Store, dict[str, dict[str, Any]], Path]:
    """The suggestions collected and linked; with `request.param` unrelated files stored before the repository's
    (vectors of them: then the repository's are few and close, and are read apart, Store._blob_contents)."""
    make_repo(tmp_path / "repo", [
        CommitSpec({"ledger/math.py": BASE}, author=ALICE, when=T0, message="math"),
        CommitSpec({"ledger/shared.py": "def shared():\n    return 2\n"}, author=BOB, when=T0 + hours(2)),
        CommitSpec({"ledger/math.py": FINAL}, author=ALICE, when=T0 + hours(3), message="mul, div, pow"),
        CommitSpec({"ledger/late.py": "def late():\n    return 'late'\n"}, author=ALICE, when=T0 + days(5)),
    ])
    after_mul = BASE + MUL + "    return a * b\n"
    events = {
        # a debug line accepted inside add(), gone from the commit
        "deleted": event(0, "def add(a, b):\n", BASE[len("def add(a, b):\n"):], "    print(a, b)\n"),
        # kept, reformatted by the commit; the editor's path is a percent-encoded URI
        "kept": event(1, BASE + MUL, "\n", "    return a * b\n",
                      filepath="file:///home/alice/src/pay%20ments/ledger/math.py"),
        "rewritten": event(2, after_mul + DIV, "\n", "    return a / b\n"),
        "other_dev": event(3, "def shared():\n", "\n", "    return 1\n",
                           filepath="file:///home/alice/src/payments/ledger/shared.py"),
        "late": event(4, "def late():\n", "\n", "    return 'late'\n",
                      filepath="file:///home/alice/src/payments/ledger/late.py"),
        "no_repo_file": event(5, "def note():\n", "\n", "    pass\n", filepath="file:///home/alice/scratch/notes.py"),
    }
    continue_log(tmp_path / "alice", list(events.values()))
    # Tabby accept-line, through the real Tabby collector: only the first line was taken (a select of kind
    # "line"); the second line never reached the commit. Its user id maps to alice through [[developers]].
    partial = "cmpl-7d1c2a84-0f1e-4b7e-9d8a-2f6c1b3e5a90"
    shown = day_ms("2026-10-01", (T0 + hours(1) + timedelta(minutes=6) - T0.replace(hour=0)).total_seconds())
    write_lines(tmp_path / "tabby" / "events" / "2026-10-01.json", [
        tabby_completion(partial, shown, user="tabby-alice", filepath="ledger/math.py",
                         prefix=after_mul + DIV + "    return a // b if b else 0\n" + POW,
                         text="    return a ** b\n    # power of\n"),
        tabby_action("view", partial, shown + 50, user="tabby-alice"),
        tabby_action("select", partial, shown + 900, user="tabby-alice", line=True)])
    setup = write_config(tmp_path / "site", [
        {"kind": "git", "path": str(tmp_path / "repo"), "name": "repo"},
        {"kind": "continue", "path": str(tmp_path / "alice"), "name": "alice", "developer": ALICE[1]},
        {"kind": "tabby", "path": str(tmp_path / "tabby"), "name": "tabby"}],
        teams=[{"name": "payments", "members": [ALICE[1], BOB[1]]}],
        developers=[{"id": ALICE[1], "aliases": ["tabby-alice"]}])
    cfg = load_config(setup.config)
    store = Store.open(cfg.state_dir / "store.duckdb")
    store.con.execute("INSERT INTO blobs SELECT 'pad' || i, 'x = ' || i FROM range(?) t(i)",
                      [getattr(request, "param", 0)])
    assert jobs.collect(store, cfg)["error"] is None
    stored = store.con.execute("SELECT developer, partial, accepted FROM suggestions WHERE id = ?",
                               [partial]).fetchone()
    assert stored == (ALICE[1], True, True)
    report = link_suggestions(store, DatasetsConfig())
    assert report.linked == 7
    ids = {name: e["completionId"] for name, e in events.items()} | {"partial": partial}
    cur = store.con.execute("SELECT suggestion_id, status, reason, repo, path, sha, similarity, committed_text "
                            "FROM suggestion_links")
    by_id = {r[0]: dict(zip([d[0] for d in cur.description], r, strict=True)) for r in cur.fetchall()}
    return store, {name: by_id[i] for name, i in ids.items()}, tmp_path


@pytest.mark.parametrize("linked", [0, 3 * VECTOR_ROWS], indirect=True, ids=["joined", "read-apart"])
def test_each_accepted_suggestion_gets_a_verdict_with_its_evidence(linked: Any) -> None:
    store, links, _ = linked
    padded = store.con.execute("SELECT count(*) FROM blobs WHERE blob LIKE 'pad%'").fetchone()[0] > 0
    files = {b for (b,) in store.con.execute("SELECT blob FROM blobs WHERE blob NOT LIKE 'pad%'").fetchall()}
    assert (store._blob_contents(files) is not None) == padded  # which way blob_contents read them
    payments = team("payments")
    shas = {sha for (sha,) in store.con.execute("SELECT sha FROM commits WHERE author_name = 'Alice'").fetchall()}
    assert list(store.committed_files(payments, shas)) == [f for f in store.committed_files(payments)
                                                           if f.sha in shas]
    head = store.con.execute("SELECT sha FROM commits WHERE message = 'mul, div, pow'").fetchone()[0]
    kept = links["kept"]
    assert (kept["status"], kept["reason"], kept["repo"], kept["path"], kept["sha"], kept["similarity"]) == \
           ("kept", "exact", "acme/payments", "ledger/math.py", head, 1.0)
    rewritten = links["rewritten"]
    assert rewritten["status"] == "rewritten" and rewritten["sha"] == head
    assert rewritten["committed_text"] == "    return a // b if b else 0\n"  # what replaced it, as a middle
    assert rewritten["similarity"] < 0.8
    assert (links["deleted"]["status"], links["deleted"]["reason"]) == ("deleted", "nothing_at_its_place")
    assert (links["partial"]["status"], links["partial"]["reason"]) == ("kept", "exact")
    # Bob's commit touched shared.py in the window: it is no evidence about alice's suggestion.
    assert (links["other_dev"]["status"], links["other_dev"]["reason"]) == ("unknown", "no_commit_in_window")
    assert (links["late"]["status"], links["late"]["reason"]) == ("unknown", "no_commit_in_window")  # 5 days > 72 h
    assert (links["no_repo_file"]["status"], links["no_repo_file"]["reason"]) == ("unknown", "file_not_in_repo")
    store.close()


def test_linked_outcomes_become_sft_dpo_and_kto_rows(linked: Any) -> None:
    store, links, tmp_path = linked
    tokenizer = load_base_tokenizer(str(family_tokenizer(tmp_path / "tok", *QWEN)))
    cfg = DatasetsConfig(min_train_rows=1, min_heldout_rows=1, heldout_fraction=0.05, fim_spans_per_file=0)
    build_datasets(store, team("payments"), cfg, tokenizer, tmp_path / "data")
    store.close()
    data = tmp_path / "data"
    fim = {r["id"]: r for r in read_jsonl(data / "sft.jsonl") + read_jsonl(data / "heldout.jsonl")
           if r.get("kind") == "fim"}
    ids = {name: link_row["suggestion_id"] for name, link_row in links.items()}
    eos = "<|endoftext|>"
    assert fim[ids["kept"]]["signal"] == "kept" and fim[ids["kept"]]["completion"] == "    return a * b\n" + eos
    # the developer's version is the SFT target of a rewritten suggestion
    assert fim[ids["rewritten"]]["signal"] == "rewritten"
    assert fim[ids["rewritten"]]["completion"] == "    return a // b if b else 0\n" + eos
    assert fim[ids["partial"]]["completion"] == "    return a ** b\n" + eos  # the accepted line only
    assert fim[ids["late"]]["signal"] == "accepted"  # accepted, nothing to check it against
    assert ids["deleted"] not in fim
    kto = {r["id"]: r for r in read_jsonl(data / "kto.jsonl")}
    assert kto[ids["deleted"]]["label"] is False and kto[ids["deleted"]]["signal"] == "deleted"
    pairs = read_jsonl(data / "dpo.jsonl") + [r for r in read_jsonl(data / "heldout.jsonl") if r["kind"] == "pair"]
    rewrite = next(p for p in pairs if p["id"] == f"{ids['rewritten']}:committed>{ids['rewritten']}")
    assert rewrite["chosen"] == "    return a // b if b else 0\n" + eos
    assert rewrite["rejected"] == "    return a / b\n" + eos and rewrite["signal"] == "replaced"
    assert rewrite["prompt"].endswith("def div(a, b):\n<|fim_suffix|>\n<|fim_middle|>")


def test_linking_is_incremental(linked: Any) -> None:
    store, _, _ = linked
    # Every window has closed (T0 is weeks ago) and nothing new was stored: nothing to relink.
    assert link_suggestions(store, DatasetsConfig()).linked == 0
    store.close()


def test_an_unknown_is_relinked_only_for_a_new_commit_inside_its_window(linked: Any) -> None:
    store, links, tmp_path = linked
    cfg = load_config(tmp_path / "site" / "config.toml")
    repo = git.Repo(tmp_path / "repo")
    # A commit of alice's days after every suggestion's 72 h window closed cannot change a verdict: relinking
    # each of her unknowns for it made the nightly link pass grow with the history.
    commit(repo, CommitSpec({"ledger/later.py": "x = 1\n"}, author=ALICE, when=T0 + days(9)))
    assert jobs.collect(store, cfg)["error"] is None
    assert link_suggestions(store, DatasetsConfig()).linked == 0
    # One stored late but dated inside the windows (a branch merged later): alice's three unknowns are relinked,
    # and the one whose text it holds is now kept.
    commit(repo, CommitSpec({"ledger/late.py": "def late():\n    return 'late'\n\n\nLATE = late()\n"}, author=ALICE,
                            when=T0 + hours(5)))
    assert jobs.collect(store, cfg)["error"] is None
    report = link_suggestions(store, DatasetsConfig())
    assert report.linked == 3
    status = store.con.execute("SELECT status FROM suggestion_links WHERE suggestion_id = ?",
                               [links["late"]["suggestion_id"]]).fetchone()
    assert status == ("kept",)
    store.close()


def test_paths_map_onto_the_longest_stored_suffix() -> None:
    index = PathIndex.build({"acme/payments": ["ledger/math.py", "math.py", "docs/Guide.md"],
                             "acme/tools": ["ledger/math.py"], "acme/web": ["app/main.ts"]})
    pay = "acme/payments"
    assert index.map(pay, "file:///home/a/src/payments/ledger/math.py") == (pay, "ledger/math.py")
    assert index.map(pay, "file:///home/a/src/payments/math.py") == (pay, "math.py")
    assert index.map(pay, "ledger/math.py") == (pay, "ledger/math.py")  # Tabby: relative to the git root
    # a Windows URI with an encoded drive letter and other letter case
    assert index.map(pay, "file:///c%3A/Users/a/payments/DOCS/guide.md") == (pay, "docs/Guide.md")
    assert index.map(None, "file:///srv/web/app/main.ts") == ("acme/web", "app/main.ts")  # one repository has it
    assert index.map(None, "file:///srv/x/ledger/math.py") is None  # two do: ambiguous
    assert index.map("acme/payments", "file:///srv/x/notes.txt") is None
    assert index.map("acme/unknown", "ledger/math.py") is None


def test_a_partial_accept_takes_the_first_line() -> None:
    assert accepted_part("    return a\n    b = 1\n") == "    return a\n"
    assert accepted_part("\n    return a\n    b\n") == "\n    return a\n"
    assert accepted_part("x + 1") == "x + 1"


def test_candidates_come_back_by_file_whole_from_their_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """by_file hands the link pass its suggestions in the order the store's ORDER BY did (repo, path, developer,
    shown_at, id), each with the texts it went in with: non-ASCII ones, an empty or missing suffix, partial."""
    from pipelines.datasets import context as context_module

    monkeypatch.setattr(context_module, "FLUSH_BYTES", 61)  # texts cut across many flushes
    rng = random.Random(7)
    pieces = ["def f(x):\n", "    return x\n", "\n", "é", "γάμμα", "→", "😀", "\r\n", "x" * 40]

    def text(k: int) -> str:
        return "".join(rng.choices(pieces, k=rng.randint(0, k)))

    candidates = [LinkCandidate(rng.choice(["acme/web", "acme/pay", "acme/pay-é"]),
                                rng.choice(["a.py", "b/c.py", "ä.py"]),
                                rng.choice(["alice@example.com", "bob@example.com"]), f"s{i:04d}",
                                T0 + hours(rng.randint(0, 5)), rng.random() < 0.3, text(30),
                                rng.choice([None, "", text(10)]), text(6))
                  for i in range(500)]
    spool = ByteSpool(tmp_path)
    try:
        got = list(by_file(iter(candidates), spool))
    finally:
        spool.close()
    assert got == sorted(candidates, key=lambda c: (c.repo, c.path, c.developer, c.shown_at, c.id))
    assert sum(c.suffix is None for c in got) > 100 and sum(c.partial for c in got) > 100
    assert os.listdir(tmp_path) == []  # the spool never had a name
