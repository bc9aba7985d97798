"""What one dataset build of a scope computed that the next build would compute again, the same.

Every night rebuilds each scope's datasets from its whole history, so the build's cost grew with the history
while the night's new data stayed the same (bench/nightly_growth.py: 3.1 s at 10k stored suggestions, 24.7 s
at 100k, for 1,000 new ones each night). Two of its stages depend only on rows that never change:
  - the FIM middles cut from committed files (4.5 s of a 22 s 100k build): a (commit, path)'s content is
    fixed, and its spans are drawn from a generator seeded by them;
  - the near-duplicate sketches (6.4 s): a function of a row's texts, and a row is named by the digest of its
    texts (quality.exact_key) that the exact-duplicate stage computes anyway.
So the build keeps both per scope under `state_dir/cache/datasets/<scope>/` and computes only what it does
not find there. A file holds only what its last build used: a commit or a row gone from the store is gone
from the cache after the next build. Forgetting a developer removes the whole folder (pipelines/forget.py):
the cached middles are their code.

A cache is valid for one fingerprint: the [datasets] settings, the FIM layout, and the source of the code that
makes its contents (sft.py, quality.py, outcomes.py, this file). Any change drops it, so a build with a cache
writes the same bytes as one without (tests/test_dataset_cache.py checks the digests). Each file starts with
the fingerprint, so a file written by another version is never half-trusted; files are replaced atomically.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import marshal
import mmap
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pipelines.config import DatasetsConfig
from pipelines.datasets import outcomes, quality, sft
from pipelines.datasets.context import TextContext
from pipelines.datasets.quality import BINS, FitMemo, RowTexts, sketch
from pipelines.datasets.sft import FimExample, committed_examples
from pipelines.store.records import CommittedFile
from pipelines.tokens import FimTokens

log = logging.getLogger("devtune.datasets")

T = TypeVar("T")
FileKey = tuple[str, str]  # (sha, path)
# A cached (commit, path): its developer (a key too: forgetting or re-attributing changes it), its FIM rows as
# (id, prefix, suffix, middle, order), and what was dropped from it, by reason.
Entry = tuple[str, list[tuple[str, str, str, str, str]], dict[str, int]]
KEY_BYTES = 17  # a one-byte tag (which text of the row) and the row's 16-byte exact_key
COPY_BLOCK = 65_536  # stored signatures gathered at once (16 MB), the pages they were read from let go after


def cache_dir(state_dir: Path) -> Path:
    """Where builds keep their caches, a folder per scope."""
    return state_dir / "cache" / "datasets"


def fingerprint(cfg: DatasetsConfig, fim: FimTokens, tokenizer: str) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{cfg!r}|{fim.family}|{fim.spm_supported}|{tokenizer}".encode())
    for module in (sft, quality, outcomes):
        h.update(Path(module.__file__ or "").read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.digest()


class BuildCache:
    """One scope's cache folder; `folder` None caches nothing (every row computed, nothing written)."""

    def __init__(self, folder: Path | None, cfg: DatasetsConfig, fim: FimTokens, tokenizer: str) -> None:
        self.folder = folder
        self.fingerprint = fingerprint(cfg, fim, tokenizer)
        self.kept_files: dict[FileKey, Entry] = {}
        self.file_hits = 0
        if folder is not None:
            _remove_dead_spools(folder)
        self.sketches = Sketches(self._path("sketches.bin"), None if folder is None else
                                 folder / f".sketches.{os.getpid()}.{threading.get_ident()}.spool")
        self.files: dict[FileKey, Entry] = self._load("committed.marshal")
        self._fits: FitMemo | None = None

    @property
    def fits(self) -> FitMemo:
        """The last build's fit traces, read when the token stage first asks for them: at 1M suggestions they
        are 1.1M traces, 149 MiB as a dict, which the stages before it have no use for."""
        if self._fits is None:
            self._fits = FitMemo(self._load("fits.marshal"))
        return self._fits

    def _load(self, name: str) -> dict[Any, Any]:
        """A file `_dumped` wrote: its dicts, read one at a time and joined."""
        path = self._path(name)
        if path is None:
            return {}
        loaded: dict[Any, Any] = {}
        try:
            with path.open("rb") as f:
                f.seek(len(self.fingerprint.hex()) + 1)
                while f.peek(1):
                    part = marshal.load(f)
                    if not isinstance(part, dict):
                        raise TypeError(f"a {type(part).__name__}, not a dict")
                    loaded.update(part)
        except (EOFError, ValueError, TypeError) as e:
            log.warning("dataset cache %s: %s unreadable (%s); computing it again", self.folder, name, e)
            return {}
        return loaded

    def _path(self, name: str) -> Path | None:
        """The file, when it exists and starts with this build's fingerprint line."""
        if self.folder is None or not (self.folder / name).is_file():
            return None
        head = self.fingerprint.hex().encode() + b"\n"
        with (self.folder / name).open("rb") as f:
            return self.folder / name if f.read(len(head)) == head else None

    def _write(self, name: str, parts: Iterable[bytes]) -> None:
        assert self.folder is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.{os.getpid()}.tmp"
        with tmp.open("wb") as f:
            f.write(self.fingerprint.hex().encode() + b"\n")
            for part in parts:
                f.write(part)
        os.replace(tmp, self.folder / name)

    def committed_examples(self, keys: Sequence[tuple[str, str, datetime, str]],
                           read: Callable[[set[str]], Iterable[CommittedFile]], cfg: DatasetsConfig, fim: FimTokens,
                           dropped: Counter[str]) -> list[FimExample]:
        """`sft.committed_examples` of the files named by `keys` ((sha, developer, committed_at, path), in the
        order `Store.committed_files` gives), reading (`read(shas)`) only the commits with a file not cached."""
        missing = {sha for sha, developer, _, path in keys
                   if (entry := self.files.get((sha, path))) is None or entry[0] != developer}
        for f in read(missing) if missing else ():
            lost: Counter[str] = Counter()
            rows = [(e.id, *e.context.texts(), e.middle, e.order) for e in committed_examples([f], cfg, fim, lost)]
            self.files[(f.sha, f.path)] = (f.developer, rows, dict(lost))
        self.file_hits = len(keys) - sum(1 for sha, _, _, _ in keys if sha in missing)
        out = []
        for sha, developer, at, path in keys:
            entry = self.files[(sha, path)]
            self.kept_files[(sha, path)] = entry
            dropped.update(entry[2])
            out += [FimExample(id=i, signal="committed", developer=developer, ts=at, path=path,
                               context=TextContext(p, s), middle=m, order=o) for i, p, s, m, o in entry[1]]
        self.files = {}  # what is still wanted is in kept_files: the files of commits gone go now
        return out

    def stats(self) -> dict[str, int]:
        """What this build found in the cache (the manifest's `build_cache`)."""
        return {"committed_files_reused": self.file_hits, "sketches_reused": self.sketches.hits,
                "sketched": self.sketches.computed, "fits_replayed": self.fits.replayed}

    def save(self) -> None:
        """Write what this build used, and only that; then let the committed rows and fit traces go (the write
        stage that follows has no use for them: ~150 MiB of traces at 1M suggestions)."""
        if self.folder is None:
            return
        self._write("committed.marshal", _dumped(self.kept_files))
        self._write("fits.marshal", _dumped(self.fits.kept))
        # Chained, not unpacked into a list: that read every spooled chunk at once (680 MB of keys and signatures
        # at 1M suggestions, the build's peak) before the first was written
        self._write("sketches.bin", itertools.chain([self.sketches.spooled_rows.to_bytes(8, "little")],
                                                    self.sketches.spooled()))
        self.kept_files = {}
        self.fits.known, self.fits.kept = {}, {}


def _dumped(entries: dict[Any, Any], per_part: int = 4096) -> Iterator[bytes]:
    """`entries` as marshalled dicts of `per_part` entries each, back to back: one dump of a 1M-suggestion
    build's committed rows and fit traces added their whole size (~150 MB) to the build's peak at once."""
    part: dict[Any, Any] = {}
    for k, v in entries.items():
        part[k] = v
        if len(part) == per_part:
            yield marshal.dumps(part)
            part = {}
    if part or not entries:
        yield marshal.dumps(part)


class Sketches:
    """Near-duplicate sketches by row: `sketch` of the texts not found, the stored signature of the rest.

    What a build asks for is written to two spool files as it is asked for (the keys to `spool`.keys, the
    signatures to `spool`), and `spooled` reads them back for the next build's file. Keeping every set's
    signatures until the build saved them, then joining them, held them three times over (256 bytes a row:
    ~0.6 GB per copy at 1M suggestions) through the token stage, and 2.5M keys as Python objects. A build asks
    for each (tag, row) once; a key spooled twice would only be stored twice, with the same signature.
    """

    def __init__(self, path: Path | None, spool: Path | None) -> None:
        self.index = KeyIndex(b"")
        self.sigs: np.ndarray = np.zeros((0, BINS), dtype=np.uint32)
        self.spooled_rows = 0
        self._map: mmap.mmap | None = None
        self.spool = spool
        if spool is not None:  # an earlier build in this thread that stopped half-way
            spool.unlink(missing_ok=True)
            _keys(spool).unlink(missing_ok=True)
        self.hits = self.computed = 0
        if path is None:
            return
        # The signatures are mapped, not read: 256 bytes a row (80 MB at 100k stored suggestions, 650 MB at 1M),
        # of which a build touches each row once. The pages a call touched are let go after it (`_release`):
        # mapped pages count in the process's resident memory until then, 650 MB at the 1M build's peak.
        size = path.stat().st_size
        with path.open("rb") as f:
            start = len(f.readline())  # the fingerprint line
            n = int.from_bytes(f.read(8), "little")
            keys = f.read(n * KEY_BYTES)
            offset = start + 8 + n * KEY_BYTES
            if len(keys) == n * KEY_BYTES and size == offset + n * BINS * 4 and n:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                self.index = KeyIndex(keys)
                self.sigs = np.frombuffer(self._map, dtype=np.uint32, count=n * BINS, offset=offset).reshape(n, BINS)

    def __call__(self, tag: int, rows: Sequence[tuple[T, bytes]], text: Callable[[T], str]) -> np.ndarray:
        """The sketches of `text(row)` for (row, exact key) `rows`; `tag` tells the texts of one row apart."""
        prefix = bytes([tag])
        # The tag joins the keys instead of being added to each (a new bytes object a row: 0.14 s of a warm
        # 100k-suggestion build's 9.3 s)
        keys = prefix + prefix.join(map(itemgetter(1), rows)) if rows else b""
        at = self.index.find(keys)
        out = np.empty((len(rows), BINS), dtype=np.uint32)
        found = np.flatnonzero(at >= 0)
        # A block at a time, its mapped pages let go after it: gathered at once, a 600k-row KTO label's stored
        # signatures were three copies of 154 MB (the mapped pages, the gathered rows, `out`), a later night's peak.
        for lo in range(0, len(found), COPY_BLOCK):
            where = found[lo:lo + COPY_BLOCK]
            out[where] = self.sigs[at[where]]
            self._release()
        todo = np.flatnonzero(at < 0)
        if len(todo) == len(rows):  # none stored (a first build): sketched straight into the result, not copied
            out = sketch(RowTexts(rows, text))  # (`out`'s pages were never touched: they cost nothing)
        elif len(todo):
            out[todo] = sketch(RowTexts([rows[i] for i in todo.tolist()], text))
        self.hits += len(found)
        self.computed += len(todo)
        if self.spool is not None and rows:
            self.spool.parent.mkdir(parents=True, exist_ok=True)
            with _keys(self.spool).open("ab") as f:
                f.write(keys)
            with self.spool.open("ab") as f:
                f.write(out.data)
            self.spooled_rows += len(rows)
        return out

    def _release(self) -> None:
        """Let the mapped pages go from this process (they stay in the page cache while memory allows)."""
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):  # Linux and the BSDs
            self._map.madvise(mmap.MADV_DONTNEED)

    def spooled(self) -> Iterator[bytes]:
        """The spooled keys, then the spooled signatures, a chunk at a time; then the spool files are removed."""
        if self.spool is None:
            return
        try:
            for path in (_keys(self.spool), self.spool):
                if path.exists():
                    with path.open("rb") as f:
                        while chunk := f.read(16 << 20):
                            yield chunk
        finally:
            self.spool.unlink(missing_ok=True)
            _keys(self.spool).unlink(missing_ok=True)


class KeyIndex:
    """Where each of the stored keys (KEY_BYTES each, back to back) is, looked up many at a time.

    Sorted 64-bit prefixes of the keys and searchsorted, each hit then checked against the whole key: a dict
    of the 2.5M keys of a 1M-suggestion build took 344 MB (bytes objects and the table), this ~80 MB."""

    def __init__(self, keys: bytes) -> None:
        self.keys = np.frombuffer(keys, dtype=np.uint8).reshape(-1, KEY_BYTES)
        prefixes = _prefixes(self.keys)
        self.order = np.argsort(prefixes, kind="stable")
        self.sorted = prefixes[self.order]

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, keys: bytes) -> np.ndarray:
        """Each key's row among the stored ones, or -1."""
        wanted = np.frombuffer(keys, dtype=np.uint8).reshape(-1, KEY_BYTES)
        at = np.full(len(wanted), -1, dtype=np.int64)
        if not len(self.keys) or not len(wanted):
            return at
        prefixes = _prefixes(wanted)
        pos = np.searchsorted(self.sorted, prefixes)
        # Keys sharing a prefix sit side by side: walk each run until the whole key matches (a 64-bit prefix is
        # shared by two of 2.5M keys with odds of ~1e-7, so the runs are one long).
        todo = np.flatnonzero(pos < len(self.sorted))
        while len(todo):
            p = pos[todo]
            same = self.sorted[p] == prefixes[todo]
            todo, p = todo[same], p[same]
            rows = self.order[p]
            hit = (self.keys[rows] == wanted[todo]).all(axis=1)
            at[todo[hit]] = rows[hit]
            todo = todo[~hit]
            pos[todo] += 1
            todo = todo[pos[todo] < len(self.sorted)]
        return at


def _prefixes(keys: np.ndarray) -> np.ndarray:
    """A 64-bit number per key: its tag byte and the first 7 bytes of its digest, big-endian, so that keys
    that differ only after them share it."""
    return np.ascontiguousarray(keys[:, :8]).view(">u8").ravel().astype(np.uint64)


def _keys(spool: Path) -> Path:
    return spool.with_name(spool.name + ".keys")


def _remove_dead_spools(folder: Path) -> None:
    """Spools left by builds whose process is gone (killed half-way): ~80 MB at 100k stored suggestions."""
    for spool in folder.glob(".sketches.*.spool*"):
        try:
            os.kill(int(spool.name.split(".")[2]), 0)
        except (ValueError, IndexError, ProcessLookupError):
            spool.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, another user's
