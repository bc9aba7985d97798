r"""Git history reachable from a repository's HEAD, streamed from one `git log` process.

One `git log --raw -p --unified=0` process walks the whole history (a process per commit costs ~5 ms each,
50 s for a 10k-commit repository); commit messages and file contents come from one `git cat-file --batch`
process, asked for a commit's objects together (GitPython's info + stream took two round trips per blob: 6.6 s
of a 27 s harvest of 5,000 commits, bench/README.md).
The walk is oldest first in topological order (`--reverse --topo-order`): when a batch ends at commit C,
every ancestor of C is stored, so C is a valid cursor and a harvest killed half-way resumes there
(`HEAD ^C`) instead of walking the whole history again.
Merge commits are stored without files (`--diff-merges=off`): their changes are already in the commits
they merge. The zero-context patch gives the exact line ranges each commit added, which is what the
FIM builder cuts its middles from.

No content can cut a commit short or run two together. Every byte can appear in a patch (psf/requests'
ext/requests-logo.ai is diffed as text and holds NUL, 0x1e and 0x1f, which stopped the harvest of its 6,489
commits when commits were framed by a 0x1e record separator), so a commit is framed by the one thing only git
writes: a line that starts with NUL. Every other line of `git log` output starts with a byte git chose
(":" for a --raw line; "+", "-", " ", "\" or "@" in a hunk; a file header's word), a path that holds a
newline is C-quoted on every line, and the header below starts its free-text lines with a letter; so
"\n\0" appears only before a commit. The commit message, the one field that may hold anything, is read from
the commit object, whose size `cat-file` gives.
When git stops on a commit, that commit is read on its own: a file whose blob is missing (8 blobs of
python-pillow/Pillow's snapshot are absent) is listed without its patch and content and the rest of the commit
is stored; a commit git cannot show at all (a missing tree) or that does not parse (an author date that is not
a number) is handed back as a `Reject` with its sha and the reason. Either way the walk goes on after it.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import dataclasses
import fcntl
import os
import re
import subprocess
import tempfile
import threading
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import git

from collectors.base import Batch, Commit, Cursor, FileChange, Found, Limits, LineParser, RawEvent, Reject, Watch

RECORD = b"\n\0"  # what starts every commit but the first in `git log` output (see the module docstring)
# "\0<sha> <parents>", "<author time> <commit time>", "e<email>", "n<name>": one line each (an ident can hold no
# newline). A letter starts the free-text lines, so not even a name that begins with NUL starts a line with one.
LOG_FORMAT = "%x00%H %P%n%at %ct%n%x65%aE%n%x6e%an"
# Options that fix every part of the output this parser reads, whatever the user's git config says:
# explicit prefixes beat diff.noprefix / diff.mnemonicPrefix, --inter-hunk-context=0 beats
# diff.interHunkContext (which would merge nearby hunks and their context into the added ranges).
DIFF_OPTIONS = ("--no-color", "--no-ext-diff", "--no-textconv", "--no-renames", "--no-abbrev", "--full-index",
                "--src-prefix=a/", "--dst-prefix=b/", "--inter-hunk-context=0", "--raw", "-p", "--unified=0",
                "--diff-merges=off", f"--format={LOG_FORMAT}")
GIT_CONFIG = ("-c", "core.quotePath=false", "-c", "log.showRoot=true", "-c", "log.showSignature=false")
# A hunk header, after the line break before it (a file's patch starts with its "diff --git" line, so none
# starts the text): a pattern that starts with a literal is searched for it in C, 0.045 s over the generated
# history's 29 MB of patches against 0.145 s for the same headers matched as `^@@` in multi-line mode.
_HUNK = re.compile(rb"\n@@ -\d+(?:,\d+)? \+(\d+)(?:,(\d+))? @@")
# "<sha> <parents>" (sha-1 or sha-256); a root commit's line ends in the space before its empty %P.
_HEAD = re.compile(rb"[0-9a-f]{40}(?:[0-9a-f]{24})?(?: [0-9a-f]{40}(?:[0-9a-f]{24})?)* ?")
_TEXT_MODES = {"100644", "100755"}  # regular files; 120000 links and 160000 submodules carry no code
_STDERR_CHARS = 2000  # what an error or a reject quotes of git's stderr (its last lines say why)
# Restarting the walk after a failure walks what is left twice (`rev-list`, then `log --reverse`, which lists it
# all before its first commit): ~0.1 s of CPU each for Pillow's 21k commits, 0.55 s for git/git's 82k. After
# this many, the rest goes one commit at a time (~5 ms each), so a history where most commits lack a blob (a
# partial clone that cannot fetch) costs linear time, not a walk per commit.
MAX_RESTARTS = 16
READ_AHEAD = 64  # commits without text files that wait at most for the next one's round trip
# A batch of commits is read whole, then scrubbed (pipelines/ingest). While it is scrubbed git inflates the next
# commits' objects asked for ahead (ObjectReader.AHEAD): 256 commits are ~900 objects in the generated history
# (3.5 a commit: the commit and its files), ~690 in flask's, ~580 in requests', so the next part is asked for
# whole while this one is scrubbed. With [collect] batch_events' 2,000 git sat idle through most of the scrub.
# The parts are stored batch_events at a time (Batch.partial).
BATCH_COMMITS = 256


class GitError(Exception):
    """A git source that cannot be read; the message says what to fix."""


class Unreadable(ValueError):
    """One commit that cannot be read; the message is the reason its reject gives."""


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
        head = _head(repo)
        if head is None:
            return  # no commits yet
        if cursor is not None and cursor.sha == head:
            return
        revs = [head]
        note = ""
        if cursor is not None and cursor.sha:
            if _is_commit(repo, cursor.sha):
                revs.append(f"^{cursor.sha}")
                if not _is_ancestor(repo, cursor.sha, head):
                    note = f"{stream} moved from {cursor.sha[:12]} to {head[:12]} without fast-forward " \
                           "(force-push or reset): harvesting the new history"
            else:
                note = f"last harvested commit {cursor.sha[:12]} is gone: re-walking the whole history"
        events: list[RawEvent] = []
        rejects: list[Reject] = []
        last = ""
        try:
            for item in iter_commits(repo, revs, limits.max_file_bytes, stream):
                if isinstance(item, Reject):
                    rejects.append(item)
                    last = item.line_sha1
                else:
                    events.append(item)
                    last = item.sha
                if len(events) + len(rejects) >= min(limits.batch_events, BATCH_COMMITS):
                    # Parents come before children, so all of `last`'s history is in this batch or earlier ones
                    # (stored, or quarantined: a retry does not read a quarantined commit again).
                    yield Batch(tuple(events), tuple(rejects), Cursor(stream=stream, sha=last), note,
                                read=len(events) + len(rejects), partial=True)
                    events, rejects, note = [], [], ""
        except GitError:
            if events or rejects:  # what was read before git failed is stored, and a retry starts after it
                yield Batch(tuple(events), tuple(rejects), Cursor(stream=stream, sha=last), note,
                            read=len(events) + len(rejects))
            raise
        yield Batch(tuple(events), tuple(rejects), Cursor(stream=stream, sha=head), note,
                    read=len(events) + len(rejects))

    def line_parser(self, root: Path, stream: str) -> LineParser | None:
        return None  # git output is read whole; a quarantined commit is not a line to re-parse


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
    head = _head(repo)
    if head is None:
        return 0
    revs = [head]
    if cursor is not None and cursor.sha and _is_commit(repo, cursor.sha):
        revs.append(f"^{cursor.sha}")
    return int(_git(_cwd(repo), "rev-list", "--count", *revs, "--"))


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


# Commits are resolved by git itself: GitPython cannot parse a SHA-256 repository's references ("Failed to parse
# reference information"), which read as "no commits yet", so such a repository was never harvested.
def _head(repo: git.Repo) -> str | None:
    """The commit HEAD names, or None when there is none yet (an empty repository)."""
    return _commit_of(repo, "HEAD")


def _is_commit(repo: git.Repo, sha: str) -> bool:
    return _commit_of(repo, sha) is not None


def _commit_of(repo: git.Repo, rev: str) -> str | None:
    out = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"],
                         cwd=_cwd(repo), capture_output=True, env=_git_env())
    sha = out.stdout.decode().strip()
    return sha if out.returncode == 0 and sha else None


def iter_commits(repo: git.Repo, revs: list[str], max_file_bytes: int,
                 stream: str = "HEAD") -> Iterator[Commit | Reject]:
    """Every commit in `revs` (git rev-list syntax), oldest first (parents before children), with files,
    diffs and contents; a commit that cannot be read comes as a `Reject` (its sha and why) in its place."""
    cwd = _cwd(repo)
    objects = ObjectReader(Path(repo.git_dir))
    # Commits read so far that no commit read after them names as a parent. Read in topological order, what
    # has been read is all of their ancestors inside `revs`, so a walk restarted with them excluded goes on
    # exactly after it.
    tips: set[str] = set()
    walk = list(revs)
    restarts = 0
    done: set[str] = set()  # commits of the current walk read so far

    def emit(waiting: list[tuple[bytes, _Record | Reject]],
             objs: _Objects | None = None) -> Iterator[Commit | Reject]:
        for record, item in _complete(objects, waiting, max_file_bytes, stream, objs):
            yield item
            if isinstance(item, Commit):
                _advance(tips, done, item.sha, item.parents)
            else:
                sha, _, parents = record.partition(b"\n")[0].partition(b" ")
                _advance(tips, done, sha.decode(), parents.decode().split())

    # Commits parsed and their objects asked for, not read yet, oldest first: git inflates them while the
    # commits before them are scrubbed and stored (ObjectReader).
    asked: collections.deque[tuple[list[tuple[bytes, _Record | Reject]], list[str]]] = collections.deque()

    def emit_asked(room: int | None = None) -> Iterator[Commit | Reject]:
        """Read and hand on the oldest groups asked for until `room` more objects may be asked (None: all of
        them, those with no object to read too)."""
        while asked and (room is None or objects.asked + room > ObjectReader.AHEAD):
            group, shas = asked.popleft()
            yield from emit(group, objects.take(shas, max_file_bytes))

    def emit_ahead(waiting: list[tuple[bytes, _Record | Reject]]) -> Iterator[Commit | Reject]:
        shas = _objects_of(waiting)
        if len(shas) > ObjectReader.AHEAD:  # a commit of very many files: read in its own round trips
            yield from emit_asked()
            yield from emit(waiting)
            return
        yield from emit_asked(len(shas))
        objects.ask(shas)
        asked.append((waiting, shas))

    try:
        while True:
            done.clear()
            waiting: list[tuple[bytes, _Record | Reject]] = []  # parsed, their objects not asked for yet
            try:
                for record in _git_records(cwd, ["log", *DIFF_OPTIONS, "--topo-order", "--reverse", *walk, "--"]):
                    parsed = _parse(record, max_file_bytes, stream, objects.seen)
                    waiting.append((record, parsed))
                    # A commit with no text file to read (a merge: 31% of flask's commits, 30% of Pillow's) waits
                    # for the next one that has, and their objects come in one round trip: a round trip per commit
                    # made the collector alone 12% slower on flask (0.71 -> 0.81 s, after 4 alternating runs).
                    if (isinstance(parsed, _Record) and len(parsed.objects) > 1) or len(waiting) >= READ_AHEAD:
                        yield from emit_ahead(waiting)
                        waiting = []
                yield from emit_asked()
                yield from emit(waiting)
                return
            except _GitFailed as failure:
                # whole records: the failure is handled from the commit after them
                yield from emit_asked()
                yield from emit(waiting)
                # Git stops at the first commit it cannot show ("fatal: unable to read <blob>"). The record it was
                # writing is held back, so that commit is the first one of this walk not read yet, or the next
                # one when git had finished writing it (it reads a commit's trees before writing its header).
                # Each is shown alone, up to the one git fails on again; then the walk restarts after them.
                # Every failure uses up at least one commit, so this ends.
                left = [(sha, parents) for sha, parents in _rev_list(cwd, walk) if sha not in done]
                if not left:
                    raise GitError(f"git log failed after the last commit: {failure}") from None
                restarts += 1
                one_by_one = restarts > MAX_RESTARTS
                for sha, parents in left if one_by_one else left[:2]:
                    item, failed = _show_one(cwd, objects, sha, max_file_bytes, stream)
                    yield item
                    _advance(tips, done, sha, parents)
                    if failed and not one_by_one:
                        break
                if one_by_one:
                    return
                walk = [*revs, *(f"^{t}" for t in sorted(tips))]
    finally:
        objects.close()


def _advance(tips: set[str], done: set[str], sha: str, parents: Iterable[str]) -> None:
    tips.difference_update(parents)
    tips.add(sha)
    done.add(sha)


def _show_one(cwd: Path, objects: ObjectReader, sha: str, max_file_bytes: int,
              stream: str) -> tuple[Commit | Reject, bool]:
    """One commit read on its own (`git diff-tree`: the same output as `git log`, for one commit), and whether
    git failed on it. A file whose blob is missing from the repository (a snapshot or a partial clone without
    its largest files) is listed without its patch and content, so the rest of the commit is still stored;
    anything else git cannot show makes a reject that quotes git."""
    missing: dict[bytes, bytes] = {}  # path -> its --raw line, for the files left out
    while True:
        excluded = [b":(exclude,literal)" + path for path in missing]
        try:
            records = list(_git_records(cwd, ["diff-tree", "--root", "--always", "-r", *DIFF_OPTIONS, sha, "--",
                                              *excluded]))
        except _GitFailed as failure:
            found = re.search(r"unable to read ([0-9a-f]{40,64})", str(failure))
            lost = {path: raw for path, raw in _raw_lines(cwd, sha).items()
                    if found.group(1).encode() in raw.partition(b"\t")[0].split()} if found else {}
            if not lost or lost.keys() <= missing.keys():
                return _reject(stream, sha, f"git cannot show this commit: {failure}"), True
            missing.update(lost)
            continue
        if len(records) != 1:
            return _reject(stream, sha, f"git diff-tree printed {len(records)} commits for this one"), True
        item = _read(objects, records[0], max_file_bytes, stream)
        if isinstance(item, Reject) or not missing:
            return item, bool(missing)
        absent = (change for raw in missing.values() if (change := _file_change(raw, {}, max_file_bytes)))
        return dataclasses.replace(item, files=item.files + tuple(
            dataclasses.replace(change, diff="[devtune: a blob of this file is missing from the repository]\n")
            for change, _ in absent)), True


def _raw_lines(cwd: Path, sha: str) -> dict[bytes, bytes]:
    """A commit's --raw lines by path (git reads no blob for them)."""
    out = subprocess.run(["git", *GIT_CONFIG, "diff-tree", "--root", "-r", "--no-renames", "--no-abbrev",
                          "--no-commit-id", "--raw", sha], cwd=cwd, capture_output=True, env=_git_env())
    lines = [line for line in out.stdout.split(b"\n") if line.startswith(b":")]
    return {_unquote_path(line.partition(b"\t")[2]): line for line in lines}


def _reject(stream: str, sha: str, reason: str, length: int = 0) -> Reject:
    # The excerpt names the commit only: a name or a message may belong to someone who opted out.
    return Reject(stream=stream, offset=0, length=length, line_sha1=sha, reason=reason, excerpt=f"commit {sha}")


class _GitFailed(Exception):
    """Git exited non-zero; the message is the end of what it wrote to stderr and its exit status."""


def _git_env() -> dict[str, str]:
    # GIT_DIFF_OPTS takes precedence over --unified on the command line (git-diff docs), and would put context
    # lines into the added ranges; GIT_EXTERNAL_DIFF is already off through --no-ext-diff.
    return {k: v for k, v in os.environ.items() if k != "GIT_DIFF_OPTS"}


def _git_records(cwd: Path, args: list[str | bytes]) -> Generator[bytes, None, None]:
    """The commits one `git log` or `git diff-tree` writes, each once the next has begun and the last once git
    exited 0."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(["git", *GIT_CONFIG, *args], cwd=cwd,
                                stdout=subprocess.PIPE, stderr=err, env=_git_env())
        assert proc.stdout is not None
        # git writes on while the commits before are scrubbed, until the pipe is full: 1 MiB (the most an
        # unprivileged process may set, /proc/sys/fs/pipe-max-size) holds ~170 commits of the generated history
        # against ~10 in Linux's default 64 KiB (harvest 7.7-8.1 against 8.2-8.6 s, alternating).
        _widen(proc.stdout.fileno())
        try:
            held = None
            for record in _records(proc.stdout):
                if held is not None:
                    yield held
                held = record
            code = proc.wait()
            if code != 0:
                raise _GitFailed(_failure(code, err))
            if held is not None:
                yield held
        finally:
            # Reached early only when the consumer stopped (its own error, or a kill): git is stopped quietly,
            # so that error, not git's SIGPIPE, is what the caller sees.
            if proc.poll() is None:
                proc.kill()
            proc.stdout.close()
            proc.wait()


def _widen(fd: int) -> None:
    with contextlib.suppress(OSError):  # a lower pipe-max-size: git waits for each read, as with the default
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)


class _Drain:
    """A pipe read in a thread as git writes it, up to `max_bytes` ahead of the reader (`read1`): `git cat-file`
    answers all it was asked (ObjectReader) while the harvest scrubs, not only what fits the pipe.

    The thread holds the GIL only to take a chunk (up to 1 MiB) of what git wrote. Tried for `git log` too: slower
    than its plain pipe (7.4-7.8 against 7.2-7.6 s, 3 alternating pairs), with more system time; a 1 MiB pipe is
    what helped there (`_widen`).
    """

    CHUNK = 1 << 20

    def __init__(self, fd: int, max_bytes: int = 64 << 20):
        self.fd = fd
        # How far git may run ahead of what is read. The objects asked ahead bound it first (ObjectReader.AHEAD:
        # ~28 MB of the generated history's file versions); this bounds a run of large files.
        self.max_bytes = max_bytes
        self.chunks: collections.deque[bytes] = collections.deque()
        self.held = 0
        self.ended = False
        self.error: OSError | None = None
        self.stopped = False
        self.cond = threading.Condition()
        _widen(fd)  # each read takes what git wrote since the last one, up to CHUNK
        self.thread = threading.Thread(target=self._run, name="git-output", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        chunk = b"-"
        try:
            while chunk:
                with self.cond:
                    while self.held >= self.max_bytes and not self.stopped:
                        self.cond.wait()
                    if self.stopped:
                        return
                chunk = os.read(self.fd, self.CHUNK)
                with self.cond:
                    if chunk:
                        self.chunks.append(chunk)
                        self.held += len(chunk)
                    self.cond.notify_all()
        except OSError as e:
            with self.cond:
                self.error = e
        finally:
            with self.cond:
                self.ended = True
                self.cond.notify_all()

    def read1(self) -> bytes:
        """The next chunk git wrote, or b"" once git closed its end."""
        with self.cond:
            while not self.chunks and not self.ended:
                self.cond.wait()
            if not self.chunks:
                if self.error is not None:
                    raise self.error
                return b""
            chunk = self.chunks.popleft()
            self.held -= len(chunk)
            self.cond.notify_all()
            return chunk

    def close(self) -> None:
        """Stop reading; git must have exited or been killed (the thread may be in a read until it has)."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join()


def _failure(code: int, err: IO[bytes]) -> str:
    err.seek(0)
    text = err.read().decode("utf-8", "replace").strip()[-_STDERR_CHARS:]
    how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    return f"{text} ({how})" if text else how


def _rev_list(cwd: Path, walk: list[str]) -> list[tuple[str, list[str]]]:
    """The commits of `walk` with their parents, in the order `git log --reverse --topo-order` shows them."""
    out = _git(cwd, "rev-list", "--reverse", "--topo-order", "--parents", *walk, "--")
    return [(line.split()[0], line.split()[1:]) for line in out.splitlines()]


def _git(cwd: Path, *args: str) -> str:
    """What a short git command prints; a failure is a GitError that quotes git (a history missing a commit
    object cannot be walked at all: "error: Could not read <sha>")."""
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, env=_git_env())
    if out.returncode != 0:
        why = out.stderr.decode("utf-8", "replace").strip()[-_STDERR_CHARS:]
        raise GitError(f"git {args[0]} failed in {cwd}: {why} (exit status {out.returncode}); "
                       "`git fsck` lists what the repository is missing")
    return out.stdout.decode()


def _is_ancestor(repo: git.Repo, ancestor: str, sha: str) -> bool:
    out = subprocess.run(["git", "merge-base", "--is-ancestor", ancestor, sha], cwd=_cwd(repo), capture_output=True)
    if out.returncode > 1:  # 1: not an ancestor
        raise GitError(f"git merge-base failed in {_cwd(repo)}: {out.stderr.decode('utf-8', 'replace').strip()}")
    return out.returncode == 0


def _cwd(repo: git.Repo) -> Path:
    # .mailmap (which %aE follows) is read from the work tree, so git runs there rather than on --git-dir.
    return Path(repo.working_tree_dir or repo.git_dir)


def _records(stdout: Any) -> Iterator[bytes]:
    """`git log` records (one per commit, without the NUL that starts it) as the output arrives."""
    # read1 takes what the pipe holds instead of waiting for a full 1 MiB, so git goes on writing while the
    # records already here are parsed, scrubbed and stored: harvest 9.9 -> 7.9 s and 11.1 -> 10.1 s (means of
    # alternating runs, the second with the machine busier; bench/README.md). Only the new chunk is split, so
    # a commit larger than a chunk costs linear time.
    parts: list[bytes] = []
    last = b"\n"  # the byte before this chunk; the output's first NUL starts a line too
    while chunk := stdout.read1(1 << 20):
        after = chunk[-1:]
        if last == b"\n" and chunk[:1] == b"\0":  # the "\n\0" is cut between two reads
            if parts:
                yield b"".join(parts)[:-1]
            parts, chunk = [], chunk[1:]
        last = after
        records = chunk.split(RECORD)
        if len(records) > 1:
            parts.append(records[0])
            yield b"".join(parts)
            yield from records[1:-1]
            parts = []
        parts.append(records[-1])
    if record := b"".join(parts):
        yield record[:-1] if record.endswith(b"\n") else record


class ObjectReader:
    """One `git cat-file --batch` process; objects are asked for ahead (`ask`) and read back in order (`take`).

    Its output is drained by a thread (`_Drain`), so git inflates what was asked while the harvest scrubs and
    stores what it read before: answered one round trip at a time, git sat idle through every batch's scrub and
    the harvest waited on it through every batch's reading (answering from memory instead took the generated
    5,000-commit history from 8.1-8.9 s to 7.1-7.6 s; bench/git_harvest.py).
    """

    GROUP = 64  # `read`: requests written before reading
    # Objects asked for and not taken, at most. Their requests must fit the 64 KiB pipe git reads them from: when
    # the drain is full (64 MB of answers: large files) git stops reading requests until we take answers, and a
    # request written into a full pipe would wait for ever. 960 names of a SHA-256 repository are 62,400 bytes
    # (SHA-1: 39,360). Their answers are ~28 MB of the generated history's file versions.
    AHEAD = 960

    def __init__(self, git_dir: Path):
        self.err = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process; closed in close()
        self.proc = subprocess.Popen(["git", "--git-dir", str(git_dir), "cat-file", "--batch"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err)
        assert self.proc.stdout is not None
        self.out = _Buffered(_Drain(self.proc.stdout.fileno()))
        self.seen: set[str] = set()  # every blob asked for so far (40-char shas: ~100 bytes each)
        self.asked = 0  # objects asked for and not taken yet

    def read(self, shas: list[str], max_bytes: int) -> dict[str, tuple[int, bytes] | None]:
        """Each object's size and bytes (only the first `max_bytes` of a larger one), or None when missing."""
        assert not self.asked, "objects asked for ahead are taken first"
        out: dict[str, tuple[int, bytes] | None] = {}
        for i in range(0, len(shas), self.GROUP):
            group = shas[i:i + self.GROUP]
            self.ask(group)
            out.update(self.take(group, max_bytes))
        return out

    def ask(self, shas: list[str]) -> None:
        """Ask for objects without reading them; `take` reads them, in the order asked."""
        assert self.proc.stdin is not None and self.asked + len(shas) <= max(self.AHEAD, self.GROUP)
        self.seen.update(shas)
        self.asked += len(shas)
        try:
            self.proc.stdin.write(b"".join(sha.encode() + b"\n" for sha in shas))
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._died() from None

    def take(self, shas: list[str], max_bytes: int) -> dict[str, tuple[int, bytes] | None]:
        """The answers to the first objects asked for and not taken yet: `shas`, as they were asked."""
        assert len(shas) <= self.asked
        self.asked -= len(shas)
        out: dict[str, tuple[int, bytes] | None] = {}
        for sha in shas:
            line = self.out.readline()  # "<sha> <type> <size>" or "<sha> missing"
            if not line.endswith(b"\n"):
                raise self._died()
            header = line.split()
            if len(header) != 3:
                out[sha] = None
                continue
            size = int(header[2])
            wanted = min(size + 1, max_bytes)  # the object, then "\n"; or its first max_bytes
            data = self.out.read(wanted)
            if len(data) < wanted:
                raise self._died()
            if size < max_bytes:
                out[sha] = (size, data[:-1])
                continue
            out[sha] = (size, data[:max_bytes])
            _skip(self.out, size - max_bytes + 1)
        return out

    def _died(self) -> GitError:
        try:
            code = self.proc.wait(timeout=10)  # its output ended or broke off: it is exiting
        except subprocess.TimeoutExpired:  # it answered what it was not asked: never wait on it
            self.proc.kill()
            code = self.proc.wait()
        return GitError(f"git cat-file stopped: {_failure(code, self.err)}")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # git answers what it was asked, then exits
        self.out.source.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()  # a git still writing answers nobody reads gets EPIPE
        self.proc.wait()
        self.err.close()


class _Buffered:
    """`readline` and `read` over a `_Drain`'s chunks."""

    def __init__(self, source: _Drain):
        self.source = source
        self.buf = b""
        self.pos = 0

    def readline(self) -> bytes:
        """The next line with its "\n", or what is left (no "\n") once the output ended."""
        while (end := self.buf.find(b"\n", self.pos)) < 0:
            if not self._more():
                return self.read(len(self.buf) - self.pos)
        line = self.buf[self.pos:end + 1]
        self.pos = end + 1
        return line

    def read(self, n: int) -> bytes:
        """The next `n` bytes, or fewer once the output ended."""
        if len(self.buf) - self.pos >= n:
            out = self.buf[self.pos:self.pos + n]
            self.pos += n
            return out
        parts = [self.buf[self.pos:]]  # a large object: its chunks joined once, not the buffer grown each time
        need = n - len(parts[0])
        self.buf, self.pos = b"", 0
        while need > 0 and (chunk := self.source.read1()):
            if len(chunk) > need:
                self.buf, self.pos = chunk, need
                chunk = chunk[:need]
            parts.append(chunk)
            need -= len(chunk)
        return b"".join(parts)

    def _more(self) -> bool:
        chunk = self.source.read1()
        if not chunk:
            return False
        self.buf = self.buf[self.pos:] + chunk if self.pos < len(self.buf) else chunk
        self.pos = 0
        return True


def _skip(stream: Any, n: int) -> None:
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            return
        n -= len(chunk)


def _text(found: tuple[int, bytes] | None, max_file_bytes: int) -> str | None:
    """A blob's text, or None when it is binary, not UTF-8, missing or larger than `max_file_bytes`."""
    if found is None or found[0] > max_file_bytes:
        return None
    data = found[1]
    if b"\0" in data[:8000]:  # git's own binary heuristic
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


@dataclass(frozen=True)
class _Record:
    """A commit as `git log` describes it: all but its message and the contents of its files."""

    sha: str
    parents: tuple[str, ...]
    author_name: str
    author_email: str
    authored_at: datetime
    committed_at: datetime
    changes: tuple[tuple[FileChange, bool], ...]  # each file, and whether its content is worth reading
    olds: tuple[str, ...]  # old versions to read too (see _parse)

    @property
    def objects(self) -> list[str]:
        """What to ask `cat-file` for: the commit (its message), the new versions to keep, the old ones."""
        return [self.sha, *(change.blob for change, text in self.changes if text), *self.olds]


def _read(objects: ObjectReader, record: bytes, max_file_bytes: int, stream: str) -> Commit | Reject:
    """The commit one record describes, or a reject that says why it cannot be read."""
    return _complete(objects, [(record, _parse(record, max_file_bytes, stream, objects.seen))], max_file_bytes,
                     stream)[0][1]


def _complete(objects: ObjectReader, parsed: list[tuple[bytes, _Record | Reject]], max_file_bytes: int,
              stream: str, objs: _Objects | None = None) -> list[tuple[bytes, Commit | Reject]]:
    """Parsed commits with their messages and contents, in their order: `objs` when they were read already,
    else read in one round trip."""
    if objs is None:
        objs = objects.read(_objects_of(parsed), max_file_bytes)
    return [(record, one if isinstance(one, Reject) else _commit(one, objs, max_file_bytes, stream))
            for record, one in parsed]


_Objects = dict[str, tuple[int, bytes] | None]  # sha -> (size, bytes), None when missing


def _objects_of(parsed: list[tuple[bytes, _Record | Reject]]) -> list[str]:
    return [sha for _, one in parsed if isinstance(one, _Record) for sha in one.objects]


def _commit(record: _Record, objs: dict[str, tuple[int, bytes] | None], max_file_bytes: int,
            stream: str) -> Commit | Reject:
    try:
        message = _message(objs[record.sha], max_file_bytes)
    except Unreadable as e:
        return _reject(stream, record.sha, str(e))
    files = tuple(dataclasses.replace(change, content=_text(objs.get(change.blob), max_file_bytes),
                                      old_content=_text(objs.get(change.old_blob), max_file_bytes)
                                      if change.old_blob in record.olds else None)
                  if text else change for change, text in record.changes)
    return Commit(sha=record.sha, parents=record.parents, author_name=record.author_name,
                  author_email=record.author_email, authored_at=record.authored_at,
                  committed_at=record.committed_at, message=message, files=files)


def _parse(record: bytes, max_file_bytes: int, stream: str, seen: set[str]) -> _Record | Reject:
    """What one record says of its commit, or a reject that says why it cannot be read. `seen`: the blobs
    read already."""
    if not _HEAD.fullmatch(record.partition(b"\n")[0]):
        # Not a commit header, which the framing rules out: a parser bug, not data to quarantine.
        raise GitError(f"git log wrote {record[:80]!r} where a commit should start")
    try:
        return _parse_record(record, max_file_bytes, seen)
    except Unreadable as e:
        return _reject(stream, record.partition(b" ")[0].partition(b"\n")[0].decode(), str(e), len(record))


def _parse_record(record: bytes, max_file_bytes: int, seen: set[str]) -> _Record:
    lines = record.split(b"\n", 4)
    if len(lines) < 4 or lines[2][:1] != b"e" or lines[3][:1] != b"n":
        raise Unreadable(f"git log printed an incomplete header: {b' / '.join(lines[1:4])[:200]!r}")
    shas, times, email, name = lines[:4]
    rest = lines[4] if len(lines) == 5 else b""
    sha, _, parents = shas.partition(b" ")
    authored, _, committed = times.partition(b" ")
    authored_at, committed_at = _time(authored, "author"), _time(committed, "committer")
    # Split on the file headers rather than line by line: a patch line starts with "+", "-", " " or "\\", so
    # "\ndiff --git " only ever starts a file (0.05 s for the 5,000 commits of bench/git_harvest.py, where a
    # per-line loop took 0.56 s).
    head, found, patches = rest.partition(b"\ndiff --git ")
    diffs: dict[bytes, list[bytes]] = {}
    for patch in patches.split(b"\ndiff --git ") if found else []:
        # A type change (a link that became a file) has two patches, one per side, under the same path.
        diffs.setdefault(_diff_path(patch.partition(b"\n")[0]), []).append(b"diff --git " + patch + b"\n")
    changes = []
    for raw in head.split(b"\n"):
        if raw.startswith(b":"):
            change = _file_change(raw, diffs, max_file_bytes)
            if change is not None:
                changes.append(change)
    if diffs:
        raise Unreadable(f"patches without a --raw line: {sorted(diffs)[:3]!r}")
    # A history read from its root has read every old version already, as an earlier commit's new one; an
    # incremental harvest reads the old version of each file it modifies first (one blob per file, once).
    olds = tuple(change.old_blob for change, text in changes
                 if text and change.status == "M" and change.old_blob not in seen)
    return _Record(sha=sha.decode(), parents=tuple(parents.decode().split()),
                   author_name=name[1:].decode("utf-8", "replace"),
                   author_email=email[1:].decode("utf-8", "replace").strip().lower(),
                   authored_at=authored_at, committed_at=committed_at, changes=tuple(changes), olds=olds)


def _time(raw: bytes, who: str) -> datetime:
    # git prints an empty %at for a date it cannot parse ("author A <a@b> notatime +0000"; fsck: badDate).
    text = raw[:40].decode("ascii", "replace")
    try:
        return datetime.fromtimestamp(int(raw), UTC).replace(tzinfo=None)
    except ValueError:
        raise Unreadable(f"{who} date {text!r} is not a unix time (`git fsck` reports it as badDate)") from None
    except (OverflowError, OSError):
        raise Unreadable(f"{who} date {text!r} is out of range") from None


def _message(found: tuple[int, bytes] | None, max_bytes: int) -> str:
    """A commit object's message as `git log` prints it: re-encoded from its `encoding` header, if any."""
    if found is None:
        raise Unreadable("the commit object is missing")
    size, data = found
    headers, sep, body = data.partition(b"\n\n")
    if not sep:
        return ""
    encoding = next((line[9:].decode("ascii", "replace").strip() for line in headers.split(b"\n")
                     if line.startswith(b"encoding ")), "utf-8")
    try:
        message = body.decode(encoding, "replace")
    except (LookupError, ValueError):
        # A name Python does not know as a text encoding ("base64" is a codec, not one): read as UTF-8, as
        # git prints the message as it is when iconv fails.
        message = body.decode("utf-8", "replace")
    message = message.strip()
    if size > len(data):
        message += f"\n[devtune: message cut at {max_bytes} bytes]"
    return message


def _file_change(raw: bytes, diffs: dict[bytes, list[bytes]],
                 max_file_bytes: int) -> tuple[FileChange, bool] | None:
    """The change one --raw line describes (content not read yet), and whether its content is worth reading;
    its patches are taken out of `diffs`."""
    # ":100644 100644 <old sha> <new sha> M\tpath"
    meta, _, path_bytes = raw.partition(b"\t")
    fields = meta[1:].decode("ascii", "replace").split(" ")
    if len(fields) != 5 or not path_bytes:
        raise Unreadable(f"unexpected --raw line {raw[:200]!r}")
    _, new_mode, old_blob, new_blob, status = fields
    path = _unquote_path(path_bytes)
    diff = b"".join(diffs.pop(path, ()))
    status = status[:1]
    if status != "D" and new_mode not in _TEXT_MODES:
        return None
    added = tuple((int(m.group(1)), int(m.group(1)) + int(m.group(2) or 1) - 1)
                  for m in _HUNK.finditer(diff) if m.group(2) != b"0")
    wants_content = status != "D" and b"\nBinary files " not in diff
    diff_text = diff.decode("utf-8", "replace")
    if len(diff) > max_file_bytes:
        diff_text = diff_text[:max_file_bytes] + f"\n[devtune: diff cut at {max_file_bytes} bytes]\n"
    # A name that is not UTF-8 keeps its bytes as \xNN: two such names in one commit stay two files.
    return FileChange(path=path.decode("utf-8", "backslashreplace"), status=status,
                      blob="" if status == "D" else new_blob, added=added, diff=diff_text, content=None,
                      old_blob="" if status == "A" else old_blob), wants_content


def _diff_path(header: bytes) -> bytes:
    """The path of a patch from the rest of its "diff --git " line: `a/P b/P`, or `"a/Q" "b/Q"` when quoted."""
    # Without renames both sides name the same path, so the line is two equal halves around the middle space.
    half = (len(header) - 1) // 2
    left, right = header[:half], header[half + 1:]
    quoted = left.startswith(b'"')
    if header[half:half + 1] != b" " or len(left) != len(right) \
            or left[quoted:quoted + 2] != b"a/" or right[quoted:quoted + 2] != b"b/" \
            or left[quoted + 2:] != right[quoted + 2:]:
        raise Unreadable(f"unexpected patch header {header[:200]!r}")
    return _unquote_path(left[:1] + left[3:] if quoted else left[2:])


def _unquote_path(raw: bytes) -> bytes:
    # Even with core.quotePath=false git C-quotes names holding '"', '\\' or control characters.
    if raw.startswith(b'"') and raw.endswith(b'"') and len(raw) >= 2:
        try:
            return codecs.escape_decode(raw[1:-1])[0]
        except ValueError:
            raise Unreadable(f"unexpected quoting in path {raw[:200]!r}") from None
    return raw
