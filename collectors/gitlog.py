"""Git history reachable from a repository's HEAD, streamed from one `git log` process.

One `git log --raw -p --unified=0` process walks the whole history (a process per commit costs ~5 ms each,
50 s for a 10k-commit repository); file contents come from one `git cat-file --batch` process, asked for a
commit's blobs together (GitPython's info + stream took two round trips per blob: 6.6 s of a 27 s harvest
of 5,000 commits, bench/README.md).
The walk is oldest first in topological order (`--reverse --topo-order`): when a batch ends at commit C,
every ancestor of C is stored, so C is a valid cursor and a harvest killed half-way resumes there
(`HEAD ^C`) instead of walking the whole history again.
Merge commits are stored without files (`--diff-merges=off`): their changes are already in the commits
they merge. The zero-context patch gives the exact line ranges each commit added, which is what the
FIM builder cuts its middles from.
"""

from __future__ import annotations

import codecs
import dataclasses
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import git

from collectors.base import Batch, Commit, Cursor, FileChange, Found, Limits, LineParser, RawEvent, Watch

RECORD, FIELD = b"\x1e", b"\x1f"
LOG_FORMAT = "%x1e%H%x1f%P%x1f%an%x1f%aE%x1f%at%x1f%ct%x1f%B%x1f"
_HUNK = re.compile(rb"^@@ -\d+(?:,\d+)? \+(\d+)(?:,(\d+))? @@", re.M)
_TEXT_MODES = {"100644", "100755"}  # regular files; 120000 links and 160000 submodules carry no code


class GitError(Exception):
    """A git source that cannot be read; the message says what to fix."""


class GitCollector:
    kind = "git"
    unit = "commits"

    def streams(self, root: Path) -> list[str]:
        return ["HEAD"]

    def pending(self, root: Path, stream: str, cursor: Cursor | None) -> int:
        return count_commits(root, cursor)

    def repo(self, root: Path) -> str | None:
        return remote_name(root)  # commits do not name their repository; the source's remote does

    def watch_paths(self, root: Path) -> list[Watch]:
        git_dir, common_dir = git_dirs(root)
        # HEAD lives in the (worktree's) git dir; branch tips under refs/ and in packed-refs in the common dir.
        if git_dir == common_dir:
            return [Watch(git_dir, False, ("HEAD", "packed-refs")), Watch(git_dir / "refs", True, ())]
        return [Watch(git_dir, False, ("HEAD",)), Watch(common_dir, False, ("packed-refs",)),
                Watch(common_dir / "refs", True, ())]

    def discover(self) -> list[Found]:
        return []  # repositories live anywhere: list them in [[sources]]

    def collect(self, root: Path, stream: str, cursor: Cursor | None, limits: Limits) -> Iterator[Batch]:
        repo = open_repo(root)
        try:
            head = repo.head.commit.hexsha
        except ValueError:
            return  # no commits yet
        if cursor is not None and cursor.sha == head:
            return
        revs = [head]
        note = ""
        if cursor is not None and cursor.sha:
            if _is_commit(repo, cursor.sha):
                revs.append(f"^{cursor.sha}")
                if not repo.is_ancestor(cursor.sha, head):
                    note = f"{stream} moved from {cursor.sha[:12]} to {head[:12]} without fast-forward " \
                           "(force-push or reset): harvesting the new history"
            else:
                note = f"last harvested commit {cursor.sha[:12]} is gone: re-walking the whole history"
        batch: list[RawEvent] = []
        last = ""
        for commit in iter_commits(repo, revs, limits.max_file_bytes):
            batch.append(commit)
            last = commit.sha
            if len(batch) >= limits.batch_events:
                # Parents come before children, so all of `last`'s history is in this batch or earlier ones.
                yield Batch(tuple(batch), (), Cursor(stream=stream, sha=last), note, read=len(batch))
                batch, note = [], ""
        yield Batch(tuple(batch), (), Cursor(stream=stream, sha=head), note, read=len(batch))

    def line_parser(self, root: Path, stream: str) -> LineParser | None:
        return None  # git output is read whole; nothing is ever quarantined line by line


def open_repo(root: Path) -> git.Repo:
    try:
        return git.Repo(root)
    except git.NoSuchPathError as e:
        raise GitError(f"git source {root} does not exist: fix [[sources]] path") from e
    except git.InvalidGitRepositoryError as e:
        raise GitError(f"git source {root} is not a git repository: point [[sources]] path at one") from e


def git_dirs(path: Path) -> tuple[Path, Path]:
    """A repository's git dir and common dir: `.git` itself, a linked worktree's, or a bare repository."""
    dot_git = path / ".git"
    if dot_git.is_file():  # a linked worktree or submodule: "gitdir: <path>"
        text = dot_git.read_text(encoding="utf-8", errors="replace").strip()
        git_dir = (path / text.removeprefix("gitdir:").strip()).resolve()
    elif dot_git.is_dir():
        git_dir = dot_git
    else:
        git_dir = path  # bare
    common = git_dir / "commondir"
    if common.is_file():
        return git_dir, (git_dir / common.read_text(encoding="utf-8").strip()).resolve()
    return git_dir, git_dir


def count_commits(root: Path, cursor: Cursor | None) -> int:
    """How many commits a harvest from `cursor` will walk (for progress and ETA)."""
    repo = open_repo(root)
    try:
        revs = [repo.head.commit.hexsha]
    except ValueError:
        return 0
    if cursor is not None and cursor.sha and _is_commit(repo, cursor.sha):
        revs.append(f"^{cursor.sha}")
    return int(repo.git.rev_list("--count", *revs))


def remote_name(root: Path) -> str:
    """The repository's "owner/name" from its origin remote, or its folder name when it has none."""
    repo = open_repo(root)
    remotes = {r.name: r for r in repo.remotes}
    remote = remotes.get("origin") or next(iter(remotes.values()), None)
    if remote is not None:
        urls = list(remote.urls)
        if urls:
            from collectors.continue_dev import normalize_repo

            return normalize_repo(urls[0])
    return Path(repo.working_tree_dir or root).resolve().name.lower()


def _is_commit(repo: git.Repo, sha: str) -> bool:
    try:
        return repo.commit(sha).type == "commit"
    except (ValueError, git.BadName):
        return False


def iter_commits(repo: git.Repo, revs: list[str], max_file_bytes: int) -> Iterator[Commit]:
    """Every commit in `revs` (git rev-list syntax), oldest first (parents before children), with files,
    diffs and contents."""
    # `repo.git(c=...)` puts the option before the subcommand: `git -c core.quotePath=false log ...`.
    proc = repo.git(c="core.quotePath=false").log(
        "--no-color", "--no-ext-diff", "--no-textconv", "--no-renames", "--no-abbrev", "--full-index",
        "--raw", "-p", "--unified=0", "--diff-merges=off", "--reverse", "--topo-order", f"--format={LOG_FORMAT}",
        *revs, "--",
        as_process=True,
    )
    assert proc.stdout is not None
    blobs = BlobReader(Path(repo.git_dir))
    try:
        for record in _records(proc.stdout):
            yield _parse_record(blobs, record, max_file_bytes)
    finally:
        blobs.close()
        proc.stdout.close()
        proc.wait()


def _records(stdout: Any) -> Iterator[bytes]:
    """`git log` records (one per commit), split on the record separator as the output arrives."""
    # read1 takes what the pipe holds instead of waiting for a full 1 MiB, so git goes on writing while the
    # records already here are parsed, scrubbed and stored: harvest 9.9 -> 7.9 s and 11.1 -> 10.1 s (means of
    # alternating runs, the second with the machine busier; bench/README.md). Only the new chunk is split, so
    # a commit larger than a chunk costs linear time.
    parts: list[bytes] = []
    while chunk := stdout.read1(1 << 20):
        records = chunk.split(RECORD)
        if len(records) == 1:
            parts.append(chunk)
            continue
        first = b"".join([*parts, records[0]])
        if first:
            yield first
        yield from (r for r in records[1:-1] if r)
        parts = [records[-1]]
    if last := b"".join(parts):
        yield last


class BlobReader:
    """One `git cat-file --batch` process; blobs are asked for in groups and read back in order."""

    GROUP = 64  # requests written before reading: 64 x 41 bytes never fill the pipe git reads from

    def __init__(self, git_dir: Path):
        self.proc = subprocess.Popen(["git", "--git-dir", str(git_dir), "cat-file", "--batch"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.seen: set[str] = set()  # every blob asked for so far (40-char shas: ~100 bytes each)

    def read(self, shas: list[str], max_file_bytes: int) -> dict[str, str | None]:
        """Each blob's text, or None when it is binary, not UTF-8, missing or larger than `max_file_bytes`."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        out: dict[str, str | None] = {}
        self.seen.update(shas)
        for i in range(0, len(shas), self.GROUP):
            group = shas[i:i + self.GROUP]
            self.proc.stdin.write(b"".join(sha.encode() + b"\n" for sha in group))
            self.proc.stdin.flush()
            for sha in group:
                header = self.proc.stdout.readline().split()  # "<sha> blob <size>" or "<sha> missing"
                if len(header) != 3:
                    out[sha] = None
                    continue
                size = int(header[2])
                if size > max_file_bytes:
                    _skip(self.proc.stdout, size + 1)
                    out[sha] = None
                    continue
                out[sha] = _text(self.proc.stdout.read(size + 1)[:-1])  # the content, then "\n"
        return out

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc.wait()


def _skip(stream: Any, n: int) -> None:
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            return
        n -= len(chunk)


def _text(data: bytes) -> str | None:
    if b"\0" in data[:8000]:  # git's own binary heuristic
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _parse_record(blobs: BlobReader, record: bytes, max_file_bytes: int) -> Commit:
    sha, parents, name, email, at, ct, message, rest = record.split(FIELD, 7)
    # Split on the file headers rather than line by line: a patch line starts with "+", "-", " " or "\\", so
    # "\ndiff --git " only ever starts a file (0.05 s for the 5,000 commits of bench/git_harvest.py, where a
    # per-line loop took 0.56 s).
    head, found, patches = rest.partition(b"\ndiff --git ")
    raw_lines = [line for line in head.split(b"\n") if line.startswith(b":")]
    diffs = [b"diff --git " + patch + b"\n" for patch in patches.split(b"\ndiff --git ")] if found else []
    changes = [c for i, raw in enumerate(raw_lines)
               if (c := _file_change(raw, diffs[i] if i < len(diffs) else b"", max_file_bytes)) is not None]
    wanted = [change.blob for change, text in changes if text]
    # A history read from its root has read every old version already, as an earlier commit's new one; an
    # incremental harvest reads the old version of each file it modifies first (one blob per file, once).
    olds = [change.old_blob for change, text in changes
            if text and change.status == "M" and change.old_blob not in blobs.seen]
    texts = blobs.read(wanted + olds, max_file_bytes) if wanted else {}
    files = tuple(dataclasses.replace(change, content=texts.get(change.blob),
                                      old_content=texts.get(change.old_blob) if change.old_blob in olds else None)
                  if text else change for change, text in changes)
    return Commit(
        sha=sha.decode(),
        parents=tuple(parents.decode().split()),
        author_name=name.decode("utf-8", "replace"),
        author_email=email.decode("utf-8", "replace").strip().lower(),
        authored_at=datetime.fromtimestamp(int(at), UTC).replace(tzinfo=None),
        committed_at=datetime.fromtimestamp(int(ct), UTC).replace(tzinfo=None),
        message=message.decode("utf-8", "replace").strip(),
        files=files,
    )


def _file_change(raw: bytes, diff: bytes, max_file_bytes: int) -> tuple[FileChange, bool] | None:
    """The change one --raw line describes (content not read yet), and whether its content is worth reading."""
    # ":100644 100644 <old sha> <new sha> M\tpath"
    meta, _, path_bytes = raw.partition(b"\t")
    _, new_mode, old_blob, new_blob, status = meta[1:].decode().split(" ")
    path = _unquote_path(path_bytes)
    status = status[:1]
    if status != "D" and new_mode not in _TEXT_MODES:
        return None
    added = tuple((int(m.group(1)), int(m.group(1)) + int(m.group(2) or 1) - 1)
                  for m in _HUNK.finditer(diff) if m.group(2) != b"0")
    wants_content = status != "D" and b"\nBinary files " not in diff
    diff_text = diff.decode("utf-8", "replace")
    if len(diff) > max_file_bytes:
        diff_text = diff_text[:max_file_bytes] + f"\n[devtune: diff cut at {max_file_bytes} bytes]\n"
    return FileChange(path=path, status=status, blob="" if status == "D" else new_blob, added=added,
                      diff=diff_text, content=None, old_blob="" if status == "A" else old_blob), wants_content


def _unquote_path(raw: bytes) -> str:
    # Even with core.quotePath=false git C-quotes names holding '"', '\\' or control characters.
    if raw.startswith(b'"') and raw.endswith(b'"'):
        raw = codecs.escape_decode(raw[1:-1])[0]
    return raw.decode("utf-8", "replace")
