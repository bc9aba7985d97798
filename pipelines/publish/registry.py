"""Immutable adapter versions and the atomic switch of what is served.

    registry/<scope>/<version>/   adapter files + lineage.json (+ exports/); written beside, renamed into
                                  place, read-only
    registry/<scope>/history.jsonl   every promotion and rollback, appended
    served/<scope> -> ../registry/<scope>/<version>   a symlink replaced with rename(2), never edited

Scopes are team:<name> and dev:<id>. A developer's editor uses served/dev:<id> when it exists and their
team's served/team:<name> otherwise (`adapter_for`); rolling a developer's adapter back past its first
version removes the link, which is that fallback. Continued pretraining (pipelines/pretrain/) registers
cpt:<team> (the adapter a team's adapter starts from) or base:<team> (a whole model directory, its merged base,
with the adapter it was merged from in adapter/); neither is what an editor is pointed at.

A server reading served/<scope> sees the old adapter or the new one, never a mix: a version directory is
complete before its name exists, and the symlink swap is a single rename. A version's exports (vLLM folder,
GGUF, Modelfile: pipelines/publish/publish.py) are written inside the hidden staging folder too, so a
kill at any point leaves only a `.incoming-*` folder that no link points at (removed by a later register).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipelines.files import now, read_json, write_json_atomic

_VERSION = re.compile(r"^v(\d{4,})$")
_SCOPE = re.compile(r"^(team|dev|cpt|base):[A-Za-z0-9@._+-]+$")


class RegistryError(Exception):
    """A registry operation that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class Served:
    scope: str
    version: str
    path: Path
    lineage: dict[str, Any]


def check_scope(scope: str) -> str:
    if not _SCOPE.match(scope):
        raise RegistryError(f"scope {scope!r} is not team:NAME, dev:ID, cpt:TEAM or base:TEAM (letters, digits, "
                            "@ . _ + -)")
    return scope


def versions(state_dir: Path, scope: str) -> list[str]:
    d = state_dir / "registry" / check_scope(scope)
    if not d.is_dir():
        return []
    return sorted((p.name for p in d.iterdir() if _VERSION.match(p.name)), key=lambda v: int(v[1:]))


# Writes a version's extra files into its staging folder, knowing the version name it will get; returns what
# to record in lineage.json under "exports" (pipelines/publish/publish.py writes the exports this way).
Prepare = Callable[[Path, str], dict[str, Any]]


def register(state_dir: Path, scope: str, adapter_dir: Path, lineage: dict[str, Any],
             prepare: Prepare | None = None) -> str:
    """Copy a finished adapter into the next version of `scope`; returns the version name.

    `prepare(staging_dir, version)` runs before the version's name exists; its result is recorded in
    lineage.json as "exports". If another registration takes the number first, it runs again for the next."""
    if not _complete(adapter_dir):
        raise RegistryError(f"{adapter_dir} holds no adapter_config.json (or config.json, for a base model): the "
                            "training run did not finish")
    scope_dir = state_dir / "registry" / check_scope(scope)
    scope_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_incoming(scope_dir)
    tmp = scope_dir / f".incoming-{os.getpid()}-{adapter_dir.parent.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(adapter_dir, tmp)
    existing = versions(state_dir, scope)
    n = int(existing[-1][1:]) + 1 if existing else 1
    try:
        while True:
            version = f"v{n:04d}"
            extra = {"exports": prepare(tmp, version)} if prepare is not None else {}
            (tmp / "lineage.json").write_text(json.dumps({**lineage, **extra, "scope": scope, "version": version,
                                                          "registered_at": now().isoformat()}, indent=2) + "\n")
            _fsync_tree(tmp)
            try:
                os.rename(tmp, scope_dir / version)  # fails if another registration took this number
                break
            except OSError:
                if not (scope_dir / version).exists():
                    raise
                n += 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a failure leaves nothing behind
    _make_read_only(scope_dir / version)
    return version


def _remove_stale_incoming(scope_dir: Path) -> None:
    """Staging folders of registrations whose process is gone (killed mid-copy or mid-export)."""
    for tmp in scope_dir.glob(".incoming-*"):
        pid = tmp.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            _make_writable(tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _make_writable(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(0o755)


def promote(state_dir: Path, scope: str, version: str, reason: str = "") -> Path:
    """Point served/<scope> at `version` atomically; returns the served path."""
    target = state_dir / "registry" / check_scope(scope) / version
    if not _complete(target):
        raise RegistryError(f"{scope} has no version {version}: known versions are "
                            f"{', '.join(versions(state_dir, scope)) or 'none'}")
    with _scope_lock(state_dir, scope):
        previous = served_version(state_dir, scope)
        link = _point(state_dir, scope, target)
        _record(state_dir, scope, {"action": "promote", "version": version, "previous": previous, "reason": reason})
    return link


def rollback(state_dir: Path, scope: str, reason: str = "") -> str | None:
    """Serve again what was served before the current version was promoted; returns that version, or None
    when nothing was (the link is removed: a developer then gets their team's adapter, a team the base)."""
    with _scope_lock(state_dir, check_scope(scope)):
        current = served_version(state_dir, scope)
        if current is None:
            raise RegistryError(f"{scope} serves nothing, so there is nothing to roll back; versions are "
                                f"{', '.join(versions(state_dir, scope)) or 'none'} (devtune promote VERSION)")
        previous = _promoted_over(state_dir, scope, current)
        if previous is not None:
            _point(state_dir, scope, state_dir / "registry" / scope / previous)
        else:
            (state_dir / "served" / scope).unlink()
            _fsync_dir(state_dir / "served")
        _record(state_dir, scope, {"action": "rollback", "version": previous, "previous": current, "reason": reason})
    return previous


def history(state_dir: Path, scope: str) -> list[dict[str, Any]]:
    path = state_dir / "registry" / check_scope(scope) / "history.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def adapter_for(state_dir: Path, developer: str, team: str) -> Served | None:
    """What a developer's editor should use: their own adapter, else their team's (its canary when they are in
    its arm), else None (the base)."""
    return served_scope(state_dir, f"dev:{developer}") or served_for(state_dir, f"team:{team}", developer)


def served_for(state_dir: Path, scope: str, developer: str) -> Served | None:
    """The version of `scope` that `developer` gets now: the running canary's when they are in its arm."""
    running = canary(state_dir, scope)
    if running is not None and in_canary(developer, running.version, running.share):
        target = state_dir / "registry" / scope / running.version
        return Served(scope=scope, version=running.version, path=target,
                      lineage=read_json(target / "lineage.json") or {})
    return served_scope(state_dir, scope)


# -- canary rollout: a new version is served to a share of a scope's developers first ---------------------------

@dataclass(frozen=True)
class Canary:
    version: str  # served to the developers in its arm (`in_canary`)
    previous: str | None  # served to everyone else
    share: float
    started_at: str


def in_canary(developer: str, version: str, share: float) -> bool:
    """Whether a developer is in a canary's arm: a hash of both, so the arm is stable while one version runs
    and differs from one version to the next (not always the same developers try first)."""
    digest = hashlib.sha256(f"{developer.lower()}\0{version}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def canary(state_dir: Path, scope: str) -> Canary | None:
    """The scope's running canary, or None."""
    data = read_json(state_dir / "registry" / scope / "canary.json") if _SCOPE.match(scope) else None
    return Canary(**data) if isinstance(data, dict) else None


def start_canary(state_dir: Path, scope: str, version: str, share: float, reason: str = "") -> None:
    """Serve `version` to `share` of the scope's developers and keep what is served for the others, until
    `end_canary` decides. A canary still running is ended first, rolled back: the newer version replaces it."""
    if not (state_dir / "registry" / check_scope(scope) / version / "adapter_config.json").is_file():
        raise RegistryError(f"{scope} has no version {version}")
    with _scope_lock(state_dir, scope):
        running = canary(state_dir, scope)
        if running is not None:
            _end(state_dir, scope, running, promote=False, reason=f"replaced by {version}", verdict=None)
        started = Canary(version=version, previous=served_version(state_dir, scope), share=share,
                         started_at=now().isoformat())
        write_json_atomic(state_dir / "registry" / scope / "canary.json", asdict(started))
        _record(state_dir, scope, {"action": "canary", "version": version, "previous": started.previous,
                                   "share": share, "reason": reason})


def end_canary(state_dir: Path, scope: str, promote: bool, reason: str,
               verdict: dict[str, Any] | None = None) -> str | None:
    """End the scope's canary: serve its version to everyone (`promote`) or to no one. Returns its version."""
    with _scope_lock(state_dir, check_scope(scope)):
        running = canary(state_dir, scope)
        if running is None:
            return None
        _end(state_dir, scope, running, promote, reason, verdict)
        return running.version


def _end(state_dir: Path, scope: str, running: Canary, promote: bool, reason: str,
         verdict: dict[str, Any] | None) -> None:
    if promote:
        previous = served_version(state_dir, scope)
        _point(state_dir, scope, state_dir / "registry" / scope / running.version)
        _record(state_dir, scope, {"action": "promote", "version": running.version, "previous": previous,
                                   "reason": f"canary: {reason}"})
    _record(state_dir, scope, {"action": "canary_end", "version": running.version,
                               "outcome": "promoted" if promote else "rolled_back", "reason": reason,
                               **({"verdict": verdict} if verdict else {})})
    (state_dir / "registry" / scope / "canary.json").unlink()


def record(state_dir: Path, scope: str, entry: dict[str, Any]) -> None:
    """Append an entry (e.g. a field verdict) to a scope's history, under its lock."""
    with _scope_lock(state_dir, check_scope(scope)):
        _record(state_dir, scope, entry)


def served_scope(state_dir: Path, scope: str) -> Served | None:
    """What one scope serves now (one link and its lineage read), or None (also for a name no scope can have)."""
    if not _SCOPE.match(scope):
        return None
    link = state_dir / "served" / scope
    try:
        target = (link.parent / os.readlink(link)).resolve()
    except OSError:  # no link (nothing served), or not a link
        return None
    return Served(scope=scope, version=target.name, path=target, lineage=read_json(target / "lineage.json") or {})


def _promoted_over(state_dir: Path, scope: str, version: str) -> str | None:
    for entry in reversed(history(state_dir, scope)):
        if entry.get("action") == "promote" and entry.get("version") == version:
            previous: str | None = entry.get("previous")
            return previous
    raise RegistryError(f"{scope}'s history.jsonl does not say what {version} replaced: promote the version "
                        f"to serve by hand (devtune promote VERSION --scope {scope})")


def _point(state_dir: Path, scope: str, target: Path) -> Path:
    served_dir = state_dir / "served"
    served_dir.mkdir(parents=True, exist_ok=True)
    link = served_dir / scope
    tmp = served_dir / f".{scope}.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, served_dir), tmp)
    os.replace(tmp, link)
    _fsync_dir(served_dir)
    return link


def _record(state_dir: Path, scope: str, entry: dict[str, Any]) -> None:
    with (state_dir / "registry" / scope / "history.jsonl").open("a") as f:
        f.write(json.dumps({"at": now().isoformat(), **entry}) + "\n")


@contextlib.contextmanager
def _scope_lock(state_dir: Path, scope: str) -> Iterator[None]:
    """One promotion or rollback of a scope at a time (the cycle and `devtune promote` may race), across
    processes: read what is served, swap the link and append the history as one step."""
    d = state_dir / "registry" / scope
    d.mkdir(parents=True, exist_ok=True)
    with (d / ".lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _complete(folder: Path) -> bool:
    """An adapter, or (base:<team>) a model directory."""
    return (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file()


def served_version(state_dir: Path, scope: str) -> str | None:
    link = state_dir / "served" / scope
    if not link.is_symlink():
        return None
    return Path(os.readlink(link)).name


def served(state_dir: Path) -> dict[str, Served]:
    """Every served scope with its version, path and lineage."""
    out: dict[str, Served] = {}
    served_dir = state_dir / "served"
    if not served_dir.is_dir():
        return out
    for link in sorted(served_dir.iterdir()):
        if link.name.startswith(".") or not link.is_symlink():
            continue
        target = link.resolve()
        out[link.name] = Served(scope=link.name, version=target.name, path=target,
                                lineage=read_json(target / "lineage.json") or {})
    return out


def _make_read_only(root: Path) -> None:
    # 0444/0555 rather than "clear the write bits": peft writes its weights 0600, and an inference server
    # usually runs as another user. Who may read them at all is set on the state directory (systemd's
    # StateDirectoryMode=0750 and the devtune group).
    for p in [*root.rglob("*"), root]:
        p.chmod(0o555 if p.is_dir() else 0o444)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            _fsync_dir(p)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
