"""Per-developer tokens: who is calling, for everything a developer's editor sends (events, completions).

`devtune token issue DEVELOPER` prints a token once; only its sha256 is kept, in <state_dir>/tokens.json
(mode 0600, replaced atomically under a lock, so the CLI can issue while the service reads). The service
re-reads the file when it changes, so a new or revoked token counts at the next request. A caller is the
developer its token was issued to: no header can claim another identity.

A token is "dt_" + 32 random bytes (urlsafe base64); the 8 characters after "dt_" are its public id, the
one `token list` shows and `token revoke` takes, so a token can be named without being shown.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

PREFIX = "dt_"
ID_CHARS = 8


class TokenError(Exception):
    """A token operation that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class TokenRecord:
    id: str  # the first ID_CHARS characters after the prefix: names the token without revealing it
    sha256: str  # of the whole token
    developer: str
    issued_at: str
    revoked_at: str | None = None


def tokens_file(state_dir: Path) -> Path:
    return state_dir / "tokens.json"


def issue(state_dir: Path, developer: str) -> tuple[str, TokenRecord]:
    """A new token for `developer` (a canonical id): the token itself, shown once, and its record."""
    if not developer.strip():
        raise TokenError("give the developer's id, e.g. devtune token issue alice@example.com")
    token = PREFIX + secrets.token_urlsafe(32)
    record = TokenRecord(id=token[len(PREFIX):len(PREFIX) + ID_CHARS], sha256=_digest(token),
                         developer=developer, issued_at=_now())
    with _locked(state_dir) as records:
        records.append(record)
    return token, record


def revoke(state_dir: Path, token_id: str | None = None, developer: str | None = None) -> list[TokenRecord]:
    """Revoke one token (by id) or every token of a developer; returns what was revoked."""
    done = []
    with _locked(state_dir) as records:
        for i, r in enumerate(records):
            if r.revoked_at is None and (r.id == token_id or (developer is not None and r.developer == developer)):
                records[i] = TokenRecord(**{**asdict(r), "revoked_at": _now()})
                done.append(records[i])
    if token_id is not None and not done:
        raise TokenError(f"no live token {token_id!r}: `devtune token list` shows the ids")
    return done


def list_tokens(state_dir: Path) -> list[TokenRecord]:
    return _read(tokens_file(state_dir))


class TokenBook:
    """The live tokens of a state directory, re-read when the file changes (checked at most once a second
    per thread of requests would be enough, but a stat is ~2 us, so every call checks)."""

    def __init__(self, state_dir: Path):
        self.path = tokens_file(state_dir)
        self._stamp: tuple[int, int] | None = None
        self._by_digest: dict[str, str] = {}
        self._lock = threading.Lock()

    def developer(self, token: str) -> str | None:
        """The developer `token` was issued to, or None for an unknown or revoked token."""
        if not token.startswith(PREFIX):
            return None
        self._refresh()
        return self._by_digest.get(_digest(token))

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = (0, 0)
        with self._lock:
            if stamp != self._stamp:
                self._by_digest = {r.sha256: r.developer for r in _read(self.path) if r.revoked_at is None}
                self._stamp = stamp


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def _read(path: Path) -> list[TokenRecord]:
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        return [TokenRecord(**r) for r in data["tokens"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise TokenError(f"{path} is not a devtune token file ({e}): restore it from a backup, or move it away "
                         "and issue new tokens") from None


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[list[TokenRecord]]:
    """The records, to change in place; written back atomically (temp file, fsync, rename) on exit."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = tokens_file(state_dir)
    with (state_dir / ".tokens.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        records = _read(path)
        yield records
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"tokens": [asdict(r) for r in records]}, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
