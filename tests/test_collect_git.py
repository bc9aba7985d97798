"""Git history into a real DuckDB store, from real repositories built in the test."""

from __future__ import annotations

import io
import random
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from collectors.gitlog import BATCH_COMMITS, ObjectReader, _records
from pipelines.store.db import Rows, Store
from support import T0, CommitSpec, collect_site, commit, days, make_repo, merge, table_rows, write_config

BOB = ("Bob", "bob@example.com")


def collect(tmp_path: Path, repo: Path, **collect_overrides: Any) -> tuple[dict[str, Any], Path]:
    return collect_site(write_config(tmp_path / "site", [{"kind": "git", "path": str(repo), "name": "repo"}],
                                     teams=[{"name": "payments", "members": ["bob@example.com"]}],
                                     overrides={"collect": collect_overrides} if collect_overrides else None).config)


def history(repo_dir: Path) -> Any:
    repo = make_repo(repo_dir, [
        CommitSpec({"app/a.py": "def a():\n    return 1\n", "logo.png": b"\x89PNG\x00\x01\x02"}, when=T0,
                   message="first"),
        CommitSpec({"app/a.py": "def a():\n    return 2\n\n\ndef b():\n    return 3\n"}, author=BOB,
                   when=T0 + days(1), message="second"),
    ])
    repo.git.checkout("-q", "-b", "feature")
    commit(repo, CommitSpec({"app/c.py": "C = 1\n"}, when=T0 + days(2), message="feature work"))
    repo.git.checkout("-q", "main")
    commit(repo, CommitSpec({"app/d.py": "D = 1\n"}, when=T0 + days(3), message="main work"))
    merge(repo, "feature", T0 + days(4))
    return repo


def test_every_reachable_commit_is_stored_once_with_merges(tmp_path: Path) -> None:
    repo = history(tmp_path / "repo")
    reachable = set(repo.git.rev_list("HEAD").split())
    assert len(reachable) == 5
    result, db = collect(tmp_path, tmp_path / "repo")
    assert result["status"]["commits"]["total"] == 5
    commits = {r[0]: r for r in table_rows(db, "commits")}
    assert set(commits) == reachable
    merge_row = commits[repo.head.commit.hexsha]
    assert len(merge_row[3]) == 2  # both parents kept
    assert {r[1] for r in commits.values()} == {"acme/payments"}  # repo name from the origin remote
    assert commits[repo.head.commit.parents[0].parents[0].hexsha][7] == "payments"  # bob's team


def test_files_added_lines_and_contents(tmp_path: Path) -> None:
    repo = history(tmp_path / "repo")
    _, db = collect(tmp_path, tmp_path / "repo")
    second = next(c for c in repo.iter_commits() if c.message.strip() == "second").hexsha
    files = {(r[0], r[1]): r for r in table_rows(db, "commit_files")}
    status, blob, added = files[(second, "app/a.py")][2:5]
    assert status == "M" and added == [[2, 6]]  # line 2 changed, lines 3-6 new
    blobs = dict(table_rows(db, "blobs"))
    assert blobs[blob] == "def a():\n    return 2\n\n\ndef b():\n    return 3\n"
    first = next(c for c in repo.iter_commits() if c.message.strip() == "first").hexsha
    assert files[(first, "logo.png")][3] is None  # binary: listed, no content kept
    merged = repo.head.commit.hexsha
    assert not any(sha == merged for sha, _ in files)  # a merge's changes belong to the merged commits


def test_incremental_harvest_and_second_run_is_a_no_op(tmp_path: Path) -> None:
    repo = history(tmp_path / "repo")
    collect(tmp_path, tmp_path / "repo")
    commit(repo, CommitSpec({"app/e.py": "E = 1\n"}, when=T0 + days(5), message="later"))
    result, db = collect(tmp_path, tmp_path / "repo")
    assert result["sources"][0]["stored"]["commits"] == 1
    assert result["sources"][0]["seen"] == 1  # only the new commit was walked
    before = {t: table_rows(db, t) for t in ("commits", "commit_files", "blobs")}
    again, _ = collect(tmp_path, tmp_path / "repo")
    assert again["sources"][0]["seen"] == 0
    assert {t: table_rows(db, t) for t in before} == before


def test_force_push_harvests_the_new_history(tmp_path: Path) -> None:
    repo = history(tmp_path / "repo")
    collect(tmp_path, tmp_path / "repo")
    repo.git.reset("--hard", "-q", "HEAD~2")
    new = commit(repo, CommitSpec({"app/f.py": "F = 1\n"}, when=T0 + days(6), message="rewritten"))
    result, db = collect(tmp_path, tmp_path / "repo")
    assert result["sources"][0]["stored"]["commits"] == 1
    assert any("without fast-forward" in n for n in result["sources"][0]["notes"])
    assert new in {r[0] for r in table_rows(db, "commits")}


def test_opted_out_author_keeps_only_sha_and_time(tmp_path: Path) -> None:
    make_repo(tmp_path / "repo", [
        CommitSpec({"a.py": "A = 1\n"}, when=T0, message="alice"),
        CommitSpec({"b.py": "SECRET_SAUCE = 42\n"}, author=BOB, when=T0 + days(1), message="bob's private work"),
    ])
    result, db = collect(tmp_path, tmp_path / "repo", opt_out=["Bob@Example.com"])
    assert result["status"]["commits"]["total"] == 2  # history counts stay whole
    text = " ".join(str(v) for t in ("commits", "commit_files", "blobs") for r in table_rows(db, t) for v in r)
    assert "bob" not in text.lower() and "SECRET_SAUCE" not in text
    assert result["status"]["dropped"] == {"opted_out_commit": 1}


def test_excluded_paths_are_never_stored(tmp_path: Path) -> None:
    make_repo(tmp_path / "repo", [CommitSpec({
        "app/main.py": "print('hi')\n", ".env.production": "DB_URL=postgres://u:hunter2@db/app\n",
        "deploy/server.pem": "-----BEGIN CERTIFICATE-----\nabc\n", "config/secrets/prod.yaml": "k: v\n"},
        when=T0)])
    result, db = collect(tmp_path, tmp_path / "repo")
    paths = {r[1] for r in table_rows(db, "commit_files")}
    assert paths == {"app/main.py"}
    assert result["status"]["dropped"]["excluded_path"] == 3
    assert "hunter2" not in " ".join(str(v) for r in table_rows(db, "blobs") for v in r)


def test_a_path_that_is_not_a_repository_fails_with_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    result, _ = collect(tmp_path, tmp_path / "plain")
    assert result["error"] is not None
    assert "is not a git repository: point [[sources]] path at one" in result["error"]


def test_objects_asked_ahead_come_back_in_order_whatever_their_size(tmp_path: Path) -> None:
    # A 3 MB file spans several of the drain's 1 MiB chunks; a 2 MB one is cut at max_bytes; one sha is missing.
    rng = random.Random(3)
    texts = {"small.py": "X = 1\n", "big.txt": "".join(f"{rng.random()}\n" for _ in range(150_000)),
             "cut.txt": "y" * (2 << 20)}
    repo = make_repo(tmp_path / "repo", [CommitSpec(texts, when=T0)])  # type: ignore[arg-type]
    sha = {path: repo.git.rev_parse(f"HEAD:{path}") for path in texts}
    missing = "0" * 40
    reader = ObjectReader(Path(repo.git_dir))
    try:
        first = [sha["small.py"], sha["big.txt"], missing, sha["small.py"]]
        reader.ask(first)
        reader.ask([sha["cut.txt"], sha["big.txt"]])
        got = reader.take(first, 4 << 20)
        assert got[missing] is None
        assert got[sha["small.py"]] == (6, b"X = 1\n")
        assert got[sha["big.txt"]] == (len(texts["big.txt"]), texts["big.txt"].encode())
        cut = reader.take([sha["cut.txt"], sha["big.txt"]], 1000)
        assert cut[sha["cut.txt"]] == (2 << 20, b"y" * 1000)
        assert cut[sha["big.txt"]] == (len(texts["big.txt"]), texts["big.txt"][:1000].encode())
        # after objects asked ahead, a plain read still pairs each answer with its question
        assert reader.read([sha["small.py"], missing], 100) == {sha["small.py"]: (6, b"X = 1\n"), missing: None}
        reader.ask([sha["big.txt"]] * 8)  # 24 MB asked and never taken: closing must not wait for a reader
    finally:
        closing = threading.Thread(target=reader.close)
        closing.start()
        closing.join(30)
    assert not closing.is_alive()
    assert reader.proc.returncode is not None


def fast_import(repo_dir: Path, n: int, rng: random.Random) -> None:
    """`n` commits into `repo_dir`, each adding a line to 4 of 12 files."""
    stream = []
    contents: dict[str, list[str]] = {f"m{k}.py": [f"def f{k}():\n", "    return 0\n"] for k in range(12)}
    for i in range(n):
        files = []
        for path in rng.sample(sorted(contents), 4):
            lines = contents[path]
            lines.insert(rng.randrange(len(lines) + 1), f"V{i} = {rng.random()!r}\n")
            data = "".join(lines).encode()
            files.append(f"M 100644 inline {path}\ndata {len(data)}\n".encode() + data + b"\n")
        message = f"change {i}\n".encode()
        stream.append(b"commit refs/heads/main\n"
                      + f"author Alice <alice@example.com> {1_700_000_000 + i * 60} +0000\n".encode()
                      + f"committer Alice <alice@example.com> {1_700_000_000 + i * 60} +0000\n".encode()
                      + f"data {len(message)}\n".encode() + message + b"".join(files))
    subprocess.run(["git", "fast-import", "--quiet"], cwd=repo_dir, input=b"".join(stream), check=True)


def test_a_history_longer_than_a_batch_and_the_objects_asked_ahead_is_stored_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 300 commits of 4 files each: more than git's parts of a batch and more objects than are asked for ahead,
    # so parts end and groups of objects wait while others are read.
    n = BATCH_COMMITS + 44
    assert n * 4 > ObjectReader.AHEAD
    repo_dir = tmp_path / "repo"
    make_repo(repo_dir, [])
    fast_import(repo_dir, n, random.Random(5))
    stored = []  # the events of each transaction
    apply_batch = Store.apply_batch

    def observed(self: Store, source: str, rows: Rows, *args: Any, **kwargs: Any) -> Any:
        stored.append(sum(len(batch) for table, batch in rows.tables.items() if table.name == "commits"))
        return apply_batch(self, source, rows, *args, **kwargs)

    monkeypatch.setattr(Store, "apply_batch", observed)
    result, db = collect(tmp_path, repo_dir)
    assert result["error"] is None and result["status"]["commits"]["total"] == n
    assert stored == [n]  # git's parts of 256 and 44 commits, stored batch_events (2,000) at a time
    stored.clear()
    _, small = collect(tmp_path / "small", repo_dir, batch_events=100)
    assert stored == [100, 100, 100, 0]  # each part a whole batch; the last moves the cursor to the head
    assert all(table_rows(small, t) == table_rows(db, t) for t in ("commits", "commit_files", "blobs"))
    assert_blobs_as_git_has_them(repo_dir, db, 4 * n)


def test_a_sha256_repository_is_harvested_whole(tmp_path: Path) -> None:
    # 64-character names: longer requests to cat-file, asked ahead just the same.
    repo_dir = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", "--object-format=sha256", "-b", "main", str(repo_dir)], check=True)
    fast_import(repo_dir, 300, random.Random(6))
    result, db = collect(tmp_path, repo_dir)
    assert result["error"] is None and result["status"]["commits"]["total"] == 300
    assert {len(sha) for sha, *_ in table_rows(db, "commits")} == {64}
    assert_blobs_as_git_has_them(repo_dir, db, 4 * 300)


def assert_blobs_as_git_has_them(repo_dir: Path, db: Path, n_files: int) -> None:
    blobs = dict(table_rows(db, "blobs"))
    files = table_rows(db, "commit_files")
    assert len(files) == n_files
    wanted = "\n".join(blob for _, _, _, blob, *_ in files) + "\n"
    out = subprocess.run(["git", "cat-file", "--batch"], cwd=repo_dir, input=wanted.encode(), capture_output=True,
                         check=True).stdout
    at = 0
    for _, path, _, blob, *_ in files:
        header_end = out.index(b"\n", at)
        size = int(out[at:header_end].split()[2])
        assert blobs[blob] == out[header_end + 1:header_end + 1 + size].decode(), path
        at = header_end + 1 + size + 1


class Trickle(io.RawIOBase):
    """A pipe that hands over at most `n` bytes per read, as git's output arrives."""

    def __init__(self, data: bytes, n: int):
        self.data, self.n = data, n

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk, self.data = self.data[:min(self.n, len(buffer))], self.data[min(self.n, len(buffer)):]
        buffer[:len(chunk)] = chunk
        return len(chunk)


def test_log_records_are_whole_however_the_output_is_cut() -> None:
    # As git frames them: each commit starts with a NUL at the start of a line, and ends with a newline; inside,
    # NULs, newlines and record separators anywhere but a NUL right after a newline.
    records = [b"a" * 5, b"b\x00\x1e\x1f\n+\x00\n" * 300, b"c", b"\n\n", b"d\x00" * 70_000, b"e\n\x1e"]
    data = b"".join(b"\0" + r + b"\n" for r in records)
    for n in (1, 2, 7, 4096, 1 << 20):
        assert list(_records(io.BufferedReader(Trickle(data, n)))) == records
