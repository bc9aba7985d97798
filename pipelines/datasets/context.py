"""A row's context, the prefix and suffix around its cursor, kept on disk while a build runs.

A 1M-suggestion build held every usable suggestion's clipped prefix and suffix from the rows stage to the
write stage: 1.9 GB of the 4.75 GB peak (bench/README.md, "Memory, fifth round"). Between those stages the
build needs each context whole only a few times (the exact-duplicate key, the rows it tokenizes, the line it
writes) and otherwise only its ends (the near-duplicate window, the DPO context key) and its lengths (the token
bound). So `outcomes` writes each context once to a `Spool`, an unlinked file beside the datasets, and the rows
hold a `SpooledContext`: where its bytes are, and how much of each end a token cut kept. Reading one back is
a slice of a mapping of the file, served by the page cache (~2 KB, ~1 µs read in order); for ASCII text the
ends are read alone (300 bytes). The file is as large as the contexts (2 GB at 1M suggestions), beside the
datasets the build writes (2.5 GB).

`TextContext` is the same interface over two strings held in memory: what tests and the build cache's
committed rows (already in memory) use.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import queue
import tempfile
import threading
from array import array
from collections.abc import Callable
from pathlib import Path

from pipelines.datasets.quality import exact_key, text_size

Match = tuple[int, int, int, int]

FLUSH_BYTES = 1 << 20
WRITE_AHEAD = 8  # chunks of FLUSH_BYTES waiting for the spool's writing thread, at most
# The mapping's pages a build has read are let go (MADV_DONTNEED: the page cache keeps them) after this many bytes
# of reads, counting each read as at least the 64 KB the kernel maps around a fault: what reading the contexts
# adds to the build's resident memory stays under ~64 MB instead of growing to the spool's size (2 GB at 1M).
RELEASE_BYTES = 64 << 20
FAULT_AROUND_BYTES = 64 << 10


class ByteSpool:
    """Bytes appended to an unlinked temporary file and read back by offset. The file has no name from the moment
    it is made, so a killed build leaves nothing behind; what goes in is scrubbed store rows, the same that the
    build writes into its datasets. The link pass keeps its suggestions' texts and file versions in one
    (link.py), the build its rows' contexts (`Spool`).

    The bytes are written to the file by a thread of the spool's own, a FLUSH_BYTES chunk at a time, so that
    the build goes on while the kernel takes them: 2 GB written at 1M suggestions go at the disk's pace once the
    page cache holds its share of dirty pages (2 GB of 1 MB pwrites took 2.5-4.1 s here on a quiet machine, 9.5 s
    beside another job), and a write waits for that.
    One thread writes, any may read: a read of bytes not yet in the file waits for them."""

    def __init__(self, folder: Path | None = None, name: str = ".spool-") -> None:
        self._folder = folder or Path(tempfile.gettempdir())
        self._file = tempfile.TemporaryFile(dir=folder, prefix=name)  # noqa: SIM115 (closed by close())
        self._fd = self._file.fileno()
        self._pending = bytearray()
        self._queued = 0  # bytes handed to the writing thread: where `_pending` starts
        self._flushed = 0  # bytes in the file
        self._written = threading.Condition()  # `_flushed` moved, a write failed, or the writing thread ended
        self._chunks: queue.Queue[tuple[int, bytes] | None] = queue.Queue(WRITE_AHEAD)
        self._writer: threading.Thread | None = None
        self._failed: OSError | None = None
        self._stopped = False  # the writing thread ended: closed, or an error that was not the disk's
        self._lock = threading.Lock()  # near-duplicate sketches read from two threads
        # Read through a mapping, not os.pread: a pread cost 3.8 µs a call here (a 100k-suggestion build makes
        # 350k reads), a slice of the mapping a fraction of that.
        self._map: mmap.mmap | None = None
        self._read_since_release = 0

    def write(self, data: bytes) -> int:
        """Append `data`; where it starts."""
        at = self._queued + len(self._pending)
        self._pending += data
        if len(self._pending) >= FLUSH_BYTES:
            with self._lock:
                self._hand_over()
        return at

    def read(self, offset: int, size: int) -> bytes:
        mapped = self._map
        if mapped is None or offset + size > len(mapped):
            if size == 0:
                return b""
            mapped = self._remap(offset + size)
        data = mapped[offset:offset + size]
        self._read_since_release += size + FAULT_AROUND_BYTES
        if self._read_since_release >= RELEASE_BYTES and hasattr(mmap, "MADV_DONTNEED"):  # Linux and the BSDs
            self._read_since_release = 0
            mapped.madvise(mmap.MADV_DONTNEED)
        return data

    def _hand_over(self) -> None:
        """Give the pending bytes to the writing thread (started on the first call), under `_lock`. At most
        WRITE_AHEAD chunks wait for it: a writer that cannot keep up slows `write` down instead of holding more
        memory."""
        self._raise_failure()
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_chunks, name="spool-writer", daemon=True)
            self._writer.start()
        chunk, self._pending = bytes(self._pending), bytearray()
        while True:  # a full queue waits for the thread, unless the thread has stopped
            try:
                self._chunks.put((self._queued, chunk), timeout=1.0)
                break
            except queue.Full:
                self._raise_failure()
        self._queued += len(chunk)

    def _write_chunks(self) -> None:
        try:
            while (item := self._chunks.get()) is not None:
                if self._failed is not None:
                    continue  # what comes after a failed write is only taken off the queue
                at, chunk = item
                try:
                    done = 0
                    while done < len(chunk):
                        done += os.pwrite(self._fd, memoryview(chunk)[done:], at + done)
                except OSError as e:  # a full disk: the next write or read raises it
                    failed: OSError | None = e
                else:
                    failed = None
                with self._written:
                    if failed is None:
                        self._flushed = at + len(chunk)
                    else:
                        self._failed = failed
                    self._written.notify_all()
        finally:  # however it stops, nobody waits for it any longer
            with self._written:
                self._stopped = True
                self._written.notify_all()

    def _raise_failure(self) -> None:
        if self._writer is not None and (self._failed is not None or self._stopped):
            raise OSError(f"spool: writing the build's temporary file in {self._folder} failed ({self._failed}); "
                          "it needs about as much free space as the datasets it builds") from self._failed

    def _remap(self, end: int) -> mmap.mmap:
        """A mapping of everything written so far, which must reach `end`. An older mapping is not closed: a
        thread may be reading through it; it goes when the last reference does."""
        if end > self._queued + len(self._pending):
            raise ValueError(f"spool: {end} bytes asked for, {self._queued + len(self._pending)} written")
        with self._lock:  # two threads may ask at once
            if end > self._queued:  # the bytes asked for are still pending: reads after the last write
                self._hand_over()
        with self._written:
            self._written.wait_for(lambda: self._flushed >= end or self._failed is not None or self._stopped)
            flushed = self._flushed
        if flushed < end:
            self._raise_failure()
        with self._lock:
            if self._map is None or end > len(self._map):
                self._map = mmap.mmap(self._fd, flushed, prot=mmap.PROT_READ)
            return self._map

    @property
    def size(self) -> int:
        return self._queued + len(self._pending)

    def close(self) -> None:
        if self._writer is not None:
            while True:  # what waits to be written is not needed: the file goes with this spool
                try:
                    self._chunks.get_nowait()
                except queue.Empty:
                    break
            self._chunks.put(None)
            self._writer.join()
            self._writer = None
        self._map = None
        self._file.close()


class Spool(ByteSpool):
    """Contexts in a `ByteSpool`, read back by number."""

    def __init__(self, folder: Path | None = None, match: Callable[[str, str], Match] | None = None) -> None:
        """`match(prefix, suffix)`, when given, is computed as each context is written and kept (32 bytes a
        context): dpo.match_key, which groups the sides of a million suggestions and would otherwise read every
        context back once more."""
        super().__init__(folder, ".contexts-")
        # Per context: where its bytes start, then the prefix's and the suffix's length in bytes and in characters.
        # Arrays, not tuples: 24 bytes a context instead of ~200 for a tuple of five ints.
        self.offsets = array("q")
        self.prefix_bytes = array("i")
        self.suffix_bytes = array("i")
        self.prefix_chars = array("i")
        self.suffix_chars = array("i")
        self._match = match
        self.matches = array("q")  # four per context

    def put(self, prefix: str, suffix: str) -> SpooledContext:
        p = prefix.encode("utf-8", "surrogatepass")
        s = suffix.encode("utf-8", "surrogatepass")
        n = len(self.offsets)
        self.offsets.append(self.write(p))
        self.write(s)
        self.prefix_bytes.append(len(p))
        self.suffix_bytes.append(len(s))
        self.prefix_chars.append(len(prefix))
        self.suffix_chars.append(len(suffix))
        if self._match is not None:
            self.matches.extend(self._match(prefix, suffix))
        return SpooledContext(self, n)


class _Texts:
    """What both kinds of context share: they are equal when their texts are."""

    __slots__ = ()

    def texts(self) -> tuple[str, str]:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Texts) and self.texts() == other.texts()

    def __hash__(self) -> int:
        return hash(self.texts())


class TextContext(_Texts):
    """A prefix and suffix held as strings."""

    __slots__ = ("_prefix", "_suffix")

    def __init__(self, prefix: str, suffix: str) -> None:
        self._prefix = prefix
        self._suffix = suffix

    def texts(self) -> tuple[str, str]:
        return self._prefix, self._suffix

    def key(self, *more: str) -> bytes:
        """quality.exact_key(prefix, suffix, *more)."""
        return exact_key(self._prefix, self._suffix, *more)

    def match(self) -> Match | None:
        """The match key kept when the context was written; None: not kept."""
        return None

    def lengths(self) -> tuple[int, int]:
        return len(self._prefix), len(self._suffix)

    def ends(self, prefix_chars: int, suffix_chars: int) -> tuple[str, str]:
        """The last `prefix_chars` of the prefix and the first `suffix_chars` of the suffix."""
        return self._prefix[len(self._prefix) - min(prefix_chars, len(self._prefix)):], self._suffix[:suffix_chars]

    def size(self) -> tuple[int, int]:
        """(UTF-8 bytes, of which bytes beyond one a character) of prefix and suffix together."""
        return text_size(self._prefix, self._suffix)

    def cut(self, prefix_chars: int, suffix_chars: int) -> TextContext:
        """The last `prefix_chars` of the prefix and the first `suffix_chars` of the suffix, as a context."""
        return TextContext(*self.ends(prefix_chars, suffix_chars))

    def __repr__(self) -> str:
        return f"TextContext({self._prefix!r}, {self._suffix!r})"


class SpooledContext(_Texts):
    """A context in a `Spool`: number `at`, of which the last `keep_prefix` characters of the prefix and the first
    `keep_suffix` of the suffix (-1: all of it; clip_prefix and clip_suffix, which token cuts use, keep an end)."""

    __slots__ = ("at", "keep_prefix", "keep_suffix", "spool")

    def __init__(self, spool: Spool, at: int, keep_prefix: int = -1, keep_suffix: int = -1) -> None:
        self.spool = spool
        self.at = at
        self.keep_prefix = keep_prefix
        self.keep_suffix = keep_suffix

    def _stored(self) -> tuple[bytes, int]:
        """The whole context's bytes as written, and where its suffix starts in them."""
        sp, at = self.spool, self.at
        pb = sp.prefix_bytes[at]
        return sp.read(sp.offsets[at], pb + sp.suffix_bytes[at]), pb

    def texts(self) -> tuple[str, str]:
        sp, at = self.spool, self.at
        data, pb = self._stored()
        if len(data) == sp.prefix_chars[at] + sp.suffix_chars[at]:  # ASCII: one decode, cut where the bytes are
            text = data.decode("ascii")
            prefix, suffix = text[:pb], text[pb:]
        else:
            prefix = data[:pb].decode("utf-8", "surrogatepass")
            suffix = data[pb:].decode("utf-8", "surrogatepass")
        if self.keep_prefix >= 0:
            prefix = prefix[len(prefix) - self.keep_prefix:]
        if self.keep_suffix >= 0:
            suffix = suffix[:self.keep_suffix]
        return prefix, suffix

    def key(self, *more: str) -> bytes:
        """quality.exact_key(prefix, suffix, *more), hashed from the spool's bytes when the context is whole: they
        are the UTF-8 bytes exact_key would encode (an update per part gives the digest of one update)."""
        if self.keep_prefix >= 0 or self.keep_suffix >= 0:
            return exact_key(*self.texts(), *more)
        data, pb = self._stored()
        h = hashlib.blake2b(digest_size=16)
        h.update(data[:pb])
        h.update(b"\x00")
        h.update(data[pb:])
        h.update(("\x00" + "\x00".join(more) + "\x00").encode("utf-8", "surrogatepass") if more else b"\x00")
        return h.digest()

    def match(self) -> Match | None:
        """The match key kept when the context was written; None: not kept."""
        m = self.spool.matches
        if not m:
            return None
        i = 4 * self.at
        return m[i], m[i + 1], m[i + 2], m[i + 3]

    def lengths(self) -> tuple[int, int]:
        sp, at = self.spool, self.at
        return (sp.prefix_chars[at] if self.keep_prefix < 0 else self.keep_prefix,
                sp.suffix_chars[at] if self.keep_suffix < 0 else self.keep_suffix)

    def _ascii(self) -> bool:
        sp, at = self.spool, self.at
        return sp.prefix_bytes[at] == sp.prefix_chars[at] and sp.suffix_bytes[at] == sp.suffix_chars[at]

    def ends(self, prefix_chars: int, suffix_chars: int) -> tuple[str, str]:
        """The last `prefix_chars` of the prefix and the first `suffix_chars` of the suffix."""
        sp, at = self.spool, self.at
        pb, pc = sp.prefix_bytes[at], sp.prefix_chars[at]
        sb, sc = sp.suffix_bytes[at], sp.suffix_chars[at]
        if pb != pc or sb != sc:
            return TextContext(*self.texts()).ends(prefix_chars, suffix_chars)
        # One character a byte: read only the bytes on either side of the cursor
        a = min(prefix_chars, pc if self.keep_prefix < 0 else self.keep_prefix)
        b = min(suffix_chars, sc if self.keep_suffix < 0 else self.keep_suffix)
        text = sp.read(sp.offsets[at] + pb - a, a + b).decode("ascii")
        return text[:a], text[a:]

    def size(self) -> tuple[int, int]:
        """(UTF-8 bytes, of which bytes beyond one a character) of prefix and suffix together."""
        if self._ascii():
            return sum(self.lengths()), 0
        return text_size(*self.texts())

    def cut(self, prefix_chars: int, suffix_chars: int) -> SpooledContext:
        """The last `prefix_chars` of the prefix and the first `suffix_chars` of the suffix, as a context."""
        plen, slen = self.lengths()
        return SpooledContext(self.spool, self.at, min(prefix_chars, plen), min(suffix_chars, slen))

    def __repr__(self) -> str:
        return f"SpooledContext(#{self.at}, {self.lengths()})"


Context = TextContext | SpooledContext


class WithContext:
    """A row whose `context` holds its prefix and suffix: both read as properties (each reads the context; the
    build's stages ask the context for only what they need).

    The rows are frozen dataclasses with slots, and this base has none of its own: a row then holds its fields
    in 112 bytes instead of 160 with a `__dict__` (336 once the dict is made: a cut row, before), and a
    1M-suggestion build holds over a million of them from the rows stage to the write stage."""

    __slots__ = ()
    context: Context

    @property
    def prefix(self) -> str:
        return self.context.texts()[0]

    @property
    def suffix(self) -> str:
        return self.context.texts()[1]


def spool_or_text(spool: Spool | None, prefix: str, suffix: str) -> Context:
    """The context in `spool`, or held as text when there is none."""
    return TextContext(prefix, suffix) if spool is None else spool.put(prefix, suffix)
