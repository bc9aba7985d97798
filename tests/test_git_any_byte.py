"""A history whose diffs, paths, names and messages hold every byte, harvested whole by the real `devtune collect`
into a real DuckDB file; commits git cannot show are quarantined or stored without what is missing."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import git
import pytest

from collectors.base import Commit, Reject
from collectors.gitlog import DIFF_OPTIONS, MAX_RESTARTS, _git_records, iter_commits
from support import run_devtune, write_config

EVERY_BYTE = bytes(range(256))
NAME_BYTES = bytes(b for b in range(1, 256) if b != 0x2F)  # git allows every byte in a name but NUL and "/"
T = 1_790_000_000  # 2026-09-21, unix seconds


@dataclass
class Spec:
    """One commit for `git fast-import`: its files (path -> content, None deletes; a str content is a link)."""

    message: bytes
    files: dict[bytes, bytes | str | None] = field(default_factory=dict)
    author: bytes = b"Alice <alice@example.com>"
    encoding: bytes = b""


def _quote(path: bytes) -> bytes:
    """A path as fast-import reads it: C-quoted, every byte outside printable ASCII in octal."""
    out = b"".join(bytes([c]) if 0x20 <= c < 0x7F and c not in b'"\\' else b"\\" + bytes([c]) if c in b'"\\'
                   else b"\\%03o" % c for c in path)
    return b'"' + out + b'"'


def fast_import(repo: Path, specs: list[Spec]) -> list[str]:
    """Write `specs` as the history of main (in one `git fast-import`); returns their shas, oldest first."""
    stream = []
    for i, spec in enumerate(specs, start=1):
        stream.append(b"commit refs/heads/main\nmark :%d\nauthor %s %d +0000\ncommitter Alice <alice@example.com> "
                      b"%d +0000\n" % (i, spec.author, T + i * 3600, T + i * 3600))
        if spec.encoding:
            stream.append(b"encoding %s\n" % spec.encoding)
        stream.append(b"data %d\n%s\n" % (len(spec.message), spec.message))
        for path, content in spec.files.items():
            if content is None:
                stream.append(b"D %s\n" % _quote(path))
            else:
                data = content.encode() if isinstance(content, str) else content
                mode = b"120000" if isinstance(content, str) else b"100644"
                stream.append(b"M %s inline %s\ndata %d\n%s\n" % (mode, _quote(path), len(data), data))
    marks = repo / "marks"
    subprocess.run(["git", "fast-import", "--quiet", f"--export-marks={marks}"], input=b"".join(stream),
                   cwd=repo, check=True)
    found = dict(line.split() for line in marks.read_text().splitlines())
    marks.unlink()
    return [found[f":{i}"] for i in range(1, len(specs) + 1)]


def git_out(repo: Path, *args: str, stdin: bytes | None = None) -> str:
    out = subprocess.run(["git", *args], cwd=repo, input=stdin, capture_output=True, check=True)
    return out.stdout.decode().strip()


def plumbing_commit(repo: Path, parent: str, entries: list[tuple[str, str, str]], message: str,
                    author: str = f"Alice <alice@example.com> {T + 99 * 3600} +0000") -> str:
    """A commit written object by object (`mktree`, `hash-object`): parent's root entries plus `entries`
    (mode, sha, name), so it may point at objects that are deleted later or carry a header git would refuse."""
    rows = git_out(repo, "ls-tree", parent).splitlines()
    by_name = {row.split("\t", 1)[1]: row for row in rows}
    for mode, sha, name in entries:
        kind = "tree" if mode == "040000" else "blob"
        by_name[name] = f"{mode} {kind} {sha}\t{name}"
    tree = git_out(repo, "mktree", "--missing", stdin="".join(r + "\n" for r in by_name.values()).encode())
    body = f"tree {tree}\nparent {parent}\nauthor {author}\ncommitter {author}\n\n{message}\n"
    return git_out(repo, "hash-object", "-t", "commit", "-w", "--literally", "--stdin", stdin=body.encode())


def loose_blob(repo: Path, data: bytes) -> str:
    return git_out(repo, "hash-object", "-w", "--stdin", stdin=data)


def delete_loose(repo: Path, sha: str) -> None:
    (repo / ".git" / "objects" / sha[:2] / sha[2:]).unlink()


# Content that would end a commit early for a parser framed on a separator: NUL, 0x1e and 0x1f after a newline, a
# line that looks like a file header, a hunk header and a commit header.
TRAPS = b"\n\0" + b"0" * 40 + b"\n\x1e\x1f\ndiff --git a/x b/x\n@@ -1 +1 @@\n\0\n"
LATE = b"%!PS-Adobe-3.0 text before the bytes\n" * 250 + EVERY_BYTE + TRAPS  # git's binary check reads 8,000 bytes
PER_LINE = b"".join(bytes([b]) + b"\n" for b in EVERY_BYTE) + TRAPS
NAMES = [b"names/" + NAME_BYTES[i:i + 64] for i in range(0, len(NAME_BYTES), 64)]
ODD_NAMES = [b'app/we"ird\tna\nme\\.py', b"app/\xff.py", b"app/\xfe.py", b"\x1e/\x1f\n/\x01.py"]


@dataclass
class Hostile:
    repo: Path
    shas: dict[str, str]  # what each commit is for -> its sha
    missing_blob: str
    messages: dict[str, bytes]


def hostile_history(repo: Path) -> Hostile:
    git.Repo.init(repo, initial_branch="main")
    messages = {
        "root": b"root",
        "every byte in diffs": b"".join(bytes([b]) + b"\n" for b in EVERY_BYTE) + TRAPS,
        "names": b"odd names\n\n\x1e\x1f\0 in the body",
        "latin-1 declared": "café naïve: ISO-8859-1 declared".encode("latin-1"),
        "latin-1 undeclared": "café: ISO-8859-1 without a header".encode("latin-1"),
        "type change": b"a link becomes a file",
    }
    specs = [
        Spec(messages["root"], {b".gitattributes": b"*.dat diff\n", b"app/main.py": b"def f():\n    return 1\n",
                                b"logo.png": b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + EVERY_BYTE, b"app/link": "main.py"}),
        Spec(messages["every byte in diffs"], {b"every.dat": PER_LINE, b"late.ai": LATE},
             author=b"Mall\xf6ry \x1e\x1f <MALLORY@Example.com>"),
        Spec(messages["names"], {**{name: b"x\n" for name in NAMES}, **{name: b"y\n" for name in ODD_NAMES}}),
        Spec(messages["latin-1 declared"], {b"every.dat": PER_LINE.replace(b"\0\n", b"\0changed\n"),
                                            b"app/main.py": b"def f():\n    return 2\n\n\ndef g():\n    return 3\n",
                                            b"late.ai": LATE + EVERY_BYTE[::-1]},
             author="Zoë <zoe@example.com>".encode("latin-1"), encoding=b"ISO-8859-1"),
        Spec(messages["latin-1 undeclared"], {b"late.ai": None, ODD_NAMES[0]: b"y\nz\n"}),
        Spec(messages["type change"], {b"app/link": b"LINK = 1\n"}),
    ]
    shas = dict(zip(messages, fast_import(repo, specs), strict=True))
    subprocess.run(["git", "reset", "-q", "--hard", "main"], cwd=repo, check=True)
    # Written object by object: an author date git cannot parse (fsck: badDate), a blob and a tree deleted after.
    shas["bad date"] = plumbing_commit(repo, shas["type change"], [("100644", loose_blob(repo, b"B = 1\n"), "bad.py")],
                                       "bad date", author="Bad <bad@example.com> notatime +0000")
    missing_blob = loose_blob(repo, b"\0big binary, absent from this snapshot")
    ok = loose_blob(repo, b"OK = 1\n")
    shas["missing blob"] = plumbing_commit(repo, shas["bad date"], [("100644", missing_blob, "big.bin"),
                                                                     ("100644", ok, "ok.py")], "a blob is missing")
    g = loose_blob(repo, b"G = 1\n")
    subtree = git_out(repo, "mktree", stdin=f"100644 blob {g}\tg.py\n".encode())
    shas["missing tree"] = plumbing_commit(repo, shas["missing blob"], [("040000", subtree, "gone")],
                                           "a tree is missing")
    shas["after"] = plumbing_commit(repo, shas["missing tree"], [("100644", loose_blob(repo, b"A = 1\n"), "after.py")],
                                    "after the unreadable ones")
    subprocess.run(["git", "update-ref", "refs/heads/main", shas["after"]], cwd=repo, check=True)
    delete_loose(repo, missing_blob)
    delete_loose(repo, subtree)
    # Settings a user may have that change what git prints; the harvest must read the same either way.
    for key, value in (("diff.noprefix", "true"), ("diff.mnemonicPrefix", "true"), ("diff.interHunkContext", "10"),
                       ("core.quotePath", "true"), ("log.showSignature", "true"), ("log.showRoot", "false"),
                       ("diff.suppressBlankEmpty", "true"), ("color.ui", "always")):
        subprocess.run(["git", "config", key, value], cwd=repo, check=True)
    return Hostile(repo, shas, missing_blob, messages)


def rows(db: Path, sql: str) -> list[dict[str, Any]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        cur = con.execute(sql)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    finally:
        con.close()


def patch(repo: Path, sha: str, path: bytes) -> str:
    """The patch git prints for one file of a commit, as the harvest should store it."""
    out = subprocess.run(["git", "-c", "core.quotePath=false", "diff-tree", "--root", "-r", "--no-commit-id",
                          "--no-color", "-p", "--unified=0", "--inter-hunk-context=0", "--full-index", "--no-renames",
                          "--src-prefix=a/", "--dst-prefix=b/", sha, "--", b":(literal)" + path],
                         cwd=repo, capture_output=True, check=True, env={"PATH": "/usr/bin:/bin", "HOME": str(repo)})
    return out.stdout.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def harvested(tmp_path_factory: pytest.TempPathFactory) -> tuple[Hostile, Path, subprocess.CompletedProcess[str]]:
    tmp = tmp_path_factory.mktemp("any-byte")
    hostile = hostile_history(tmp / "repo")
    site = write_config(tmp / "site", [{"kind": "git", "path": str(hostile.repo), "name": "hostile"}],
                        overrides={"collect": {"batch_events": 3}})
    # GIT_DIFF_OPTS beats --unified on git's command line; the harvest must not let it in.
    result = run_devtune("--config", str(site.config), "collect", env={"GIT_DIFF_OPTS": "--unified=5"})
    return hostile, site.state_dir / "store.duckdb", result


def test_every_readable_commit_is_stored_and_the_others_are_quarantined(harvested: Any) -> None:
    hostile, db, result = harvested
    assert result.returncode == 0, result.stderr
    stored = {r["sha"] for r in rows(db, "SELECT sha FROM commits")}
    assert stored == set(hostile.shas.values()) - {hostile.shas["bad date"], hostile.shas["missing tree"]}
    quarantined = {r["line_sha1"]: r for r in rows(db, "SELECT * FROM quarantine")}
    assert set(quarantined) == {hostile.shas["bad date"], hostile.shas["missing tree"]}
    assert all(r["stream"] == "HEAD" and r["source"] == "hostile" for r in quarantined.values())
    assert "author date" in quarantined[hostile.shas["bad date"]]["reason"]
    assert "unable to read tree" in quarantined[hostile.shas["missing tree"]]["reason"]
    assert "bad@example.com" not in str(quarantined)  # a reject names the commit, not its author
    cursor = rows(db, "SELECT sha FROM cursors WHERE source = 'hostile'")
    assert cursor == [{"sha": hostile.shas["after"]}]


def test_diffs_holding_every_byte_are_stored_as_git_prints_them(harvested: Any) -> None:
    hostile, db, _ = harvested
    files = {(r["sha"], r["path"]): r for r in rows(db, "SELECT * FROM commit_files")}
    for what, path in (("every byte in diffs", b"every.dat"), ("every byte in diffs", b"late.ai"),
                       ("latin-1 declared", b"every.dat"), ("latin-1 declared", b"late.ai"),
                       ("latin-1 declared", b"app/main.py"), ("latin-1 undeclared", b"late.ai")):
        sha = hostile.shas[what]
        stored = files[(sha, path.decode())]
        assert stored["diff"] == patch(hostile.repo, sha, path), (what, path)
    every = files[(hostile.shas["every byte in diffs"], "every.dat")]["diff"]
    assert all(chr(b) in every for b in range(0x80))  # NUL, 0x1e, 0x1f, "\n" and the rest, inside one patch
    main = files[(hostile.shas["latin-1 declared"], "app/main.py")]
    assert main["status"] == "M" and main["added"] == [[2, 6]]  # zero context, whatever the user's config says
    late = files[(hostile.shas["latin-1 declared"], "late.ai")]
    assert late["added"] and late["blob"] is None  # diffed as text, kept as no content: not UTF-8
    png = files[(hostile.shas["root"], "logo.png")]
    assert png["blob"] is None and "Binary files" in png["diff"]
    blobs = {r["blob"]: r["content"] for r in rows(db, "SELECT * FROM blobs")}
    assert blobs[main["blob"]] == "def f():\n    return 2\n\n\ndef g():\n    return 3\n"


def test_paths_holding_every_byte_are_each_a_file(harvested: Any) -> None:
    hostile, db, _ = harvested
    paths = {r["path"] for r in rows(db, f"SELECT path FROM commit_files WHERE sha = '{hostile.shas['names']}'")}
    # Names that are not UTF-8 keep their bytes as \xNN, so \xff.py and \xfe.py stay two files.
    assert paths == {p.decode("utf-8", "backslashreplace") for p in NAMES + ODD_NAMES}
    changed = rows(db, f"SELECT * FROM commit_files WHERE sha = '{hostile.shas['latin-1 undeclared']}'")
    weird = next(r for r in changed if r["path"] == ODD_NAMES[0].decode())
    assert weird["added"] == [[2, 2]] and weird["diff"] == patch(hostile.repo, hostile.shas["latin-1 undeclared"],
                                                                 ODD_NAMES[0])


def test_messages_and_names_are_read_whole_and_decoded_as_git_would(harvested: Any) -> None:
    hostile, db, _ = harvested
    commits = {r["sha"]: r for r in rows(db, "SELECT * FROM commits")}
    for what, raw in hostile.messages.items():
        expected = raw.decode("latin-1" if what == "latin-1 declared" else "utf-8", "replace").strip()
        assert commits[hostile.shas[what]]["message"] == expected, what
    assert commits[hostile.shas["latin-1 declared"]]["message"] == "café naïve: ISO-8859-1 declared"
    assert commits[hostile.shas["latin-1 declared"]]["author_name"] == "Zoë"  # git re-encodes the whole header
    assert commits[hostile.shas["latin-1 undeclared"]]["message"] == "caf\ufffd: ISO-8859-1 without a header"
    mallory = commits[hostile.shas["every byte in diffs"]]
    assert mallory["author_name"] == "Mall\ufffdry \x1e\x1f" and mallory["author_email"] == "mallory@example.com"


def test_a_type_change_and_a_missing_blob(harvested: Any) -> None:
    hostile, db, _ = harvested
    link = rows(db, f"SELECT * FROM commit_files WHERE sha = '{hostile.shas['type change']}'")
    assert [(r["path"], r["status"], r["added"]) for r in link] == [("app/link", "T", [[1, 1]])]
    assert link[0]["diff"].count("diff --git ") == 2  # the link's removal and the file's addition
    files = {r["path"]: r for r in rows(db, f"SELECT * FROM commit_files WHERE sha = '{hostile.shas['missing blob']}'")}
    assert set(files) == {"big.bin", "ok.py"}  # the rest of the commit is stored
    assert files["big.bin"]["blob"] is None and "missing from the repository" in files["big.bin"]["diff"]
    assert files["ok.py"]["added"] == [[1, 1]] and files["ok.py"]["blob"] is not None


def test_a_second_collect_walks_nothing_and_a_new_commit_alone(tmp_path: Path) -> None:
    hostile = hostile_history(tmp_path / "repo")
    site = write_config(tmp_path / "site", [{"kind": "git", "path": str(hostile.repo), "name": "hostile"}]).config
    db = tmp_path / "site" / "state" / "store.duckdb"
    for _ in range(2):
        again = run_devtune("--config", str(site), "collect")
        assert again.returncode == 0, again.stderr
    before = rows(db, "SELECT count(*) AS n FROM commits")[0]["n"]
    assert before == len(hostile.shas) - 2
    new = plumbing_commit(hostile.repo, hostile.shas["after"], [("100644", loose_blob(hostile.repo, b"N = 1\n"),
                                                                 "new.py")], "new")
    subprocess.run(["git", "update-ref", "refs/heads/main", new], cwd=hostile.repo, check=True)
    third = run_devtune("--config", str(site), "collect")
    assert third.returncode == 0, third.stderr
    assert rows(db, "SELECT count(*) AS n FROM commits")[0]["n"] == before + 1
    assert rows(db, "SELECT count(*) AS n FROM quarantine")[0]["n"] == 2  # not read again


def test_an_error_in_the_consumer_is_the_error_seen_not_gits_sigpipe(tmp_path: Path) -> None:
    hostile = hostile_history(tmp_path / "repo")
    repo = git.Repo(hostile.repo)
    with pytest.raises(KeyError, match="stop here"):
        for _ in iter_commits(repo, [hostile.shas["names"]], 1 << 20):
            raise KeyError("stop here")
    records = _git_records(hostile.repo, ["log", *DIFF_OPTIONS, hostile.shas["names"], "--"])
    next(records)
    records.close()  # git is stopped quietly


def test_a_history_git_cannot_walk_fails_naming_gits_reason(tmp_path: Path) -> None:
    hostile = hostile_history(tmp_path / "repo")
    items = list(iter_commits(git.Repo(hostile.repo), [hostile.shas["after"]], 1 << 20))
    assert [isinstance(i, Reject) for i in items].count(True) == 2
    assert all(isinstance(i, Commit | Reject) for i in items)
    # A commit object itself gone: nothing can be walked, and the error says so.
    gone = plumbing_commit(hostile.repo, hostile.shas["after"], [], "will be deleted")
    top = plumbing_commit(hostile.repo, gone, [], "on top")
    subprocess.run(["git", "update-ref", "refs/heads/main", top], cwd=hostile.repo, check=True)
    delete_loose(hostile.repo, gone)
    site = write_config(tmp_path / "site", [{"kind": "git", "path": str(hostile.repo), "name": "hostile"}])
    result = run_devtune("--config", str(site.config), "collect")
    assert result.returncode != 0
    assert gone in result.stderr and "exit code(-13)" not in result.stderr  # the real cause, not SIGPIPE


def test_a_history_where_every_commit_lacks_a_blob_is_read_whole(tmp_path: Path) -> None:
    # More failures than MAX_RESTARTS: past it, the rest is read one commit at a time instead of a walk each.
    repo = tmp_path / "repo"
    head = fast_import(_init(repo), [Spec(b"root", {b"README": b"r\n"})])[0]
    gone, wanted = [], []
    for i in range(MAX_RESTARTS + 4):
        gone.append(loose_blob(repo, b"\0lost %d" % i))
        head = plumbing_commit(repo, head, [("100644", gone[-1], f"lost{i}.bin"),
                                            ("100644", loose_blob(repo, b"K = %d\n" % i), f"kept{i}.py")], f"c{i}")
        wanted.append(head)
    subprocess.run(["git", "update-ref", "refs/heads/main", head], cwd=repo, check=True)
    for sha in gone:
        delete_loose(repo, sha)
    items = list(iter_commits(git.Repo(repo), [head], 1 << 20))
    commits = [i for i in items if isinstance(i, Commit)]
    assert len(commits) == len(items) == len(wanted) + 1
    assert [c.sha for c in commits[1:]] == wanted  # parents before children, each once
    for i, c in enumerate(commits[1:]):
        files = {f.path: f for f in c.files}
        assert files[f"kept{i}.py"].content == f"K = {i}\n" and files[f"lost{i}.bin"].content is None


def _init(repo: Path) -> Path:
    git.Repo.init(repo, initial_branch="main")
    return repo
