"""Immutable adapter versions and the atomic switch of what is served.

    registry/<scope>/<version>/   adapter files + lineage.json; written beside, renamed into place, read-only
    registry/<scope>/history.jsonl   every promotion and rollback, appended
    served/<scope> -> ../registry/<scope>/<version>   a symlink replaced with rename(2), never edited

A server reading served/<scope> sees the old adapter or the new one, never a mix: a version directory is
complete before its name exists, and the symlink swap is a single rename.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.rundir import read_json
from pipelines.store import now

_VERSION = re.compile(r"^v(\d{4,})$")
_SCOPE = re.compile(r"^(team|dev):[A-Za-z0-9@._+-]+$")


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
        raise RegistryError(f"scope {scope!r} is not team:NAME or dev:ID (letters, digits, @ . _ + -)")
    return scope


def versions(state_dir: Path, scope: str) -> list[str]:
    d = state_dir / "registry" / check_scope(scope)
    if not d.is_dir():
        return []
    return sorted((p.name for p in d.iterdir() if _VERSION.match(p.name)), key=lambda v: int(v[1:]))


def register(state_dir: Path, scope: str, adapter_dir: Path, lineage: dict[str, Any]) -> str:
    """Copy a finished adapter into the next version of `scope`; returns the version name."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise RegistryError(f"{adapter_dir} holds no adapter_config.json: the training run did not finish")
    scope_dir = state_dir / "registry" / check_scope(scope)
    scope_dir.mkdir(parents=True, exist_ok=True)
    tmp = scope_dir / f".incoming-{os.getpid()}-{adapter_dir.parent.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(adapter_dir, tmp)
    existing = versions(state_dir, scope)
    n = int(existing[-1][1:]) + 1 if existing else 1
    while True:
        version = f"v{n:04d}"
        (tmp / "lineage.json").write_text(json.dumps({**lineage, "scope": scope, "version": version,
                                                      "registered_at": now().isoformat()}, indent=2) + "\n")
        _fsync_tree(tmp)
        try:
            os.rename(tmp, scope_dir / version)  # fails if another registration took this number
            break
        except OSError:
            if not (scope_dir / version).exists():
                raise
            n += 1
    _make_read_only(scope_dir / version)
    return version


def promote(state_dir: Path, scope: str, version: str, reason: str = "") -> Path:
    """Point served/<scope> at `version` atomically; returns the served path."""
    target = state_dir / "registry" / check_scope(scope) / version
    if not (target / "adapter_config.json").is_file():
        raise RegistryError(f"{scope} has no version {version}: known versions are "
                            f"{', '.join(versions(state_dir, scope)) or 'none'}")
    previous = served_version(state_dir, scope)
    served_dir = state_dir / "served"
    served_dir.mkdir(parents=True, exist_ok=True)
    link = served_dir / scope
    tmp = served_dir / f".{scope}.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, served_dir), tmp)
    os.replace(tmp, link)
    _fsync_dir(served_dir)
    with (state_dir / "registry" / scope / "history.jsonl").open("a") as f:
        f.write(json.dumps({"at": now().isoformat(), "action": "promote", "version": version,
                            "previous": previous, "reason": reason}) + "\n")
    return link


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
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
