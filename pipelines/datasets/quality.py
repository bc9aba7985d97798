"""Quality filters shared by the dataset builders: file rules, exact and near duplicates, token caps.

Files. Rows from vendored code, lock files, generated files (a "generated"/"DO NOT EDIT" marker near the
top, or a generator's file name), minified files and binary content teach the adapter nothing about the
team's own code, so `file_problem` names the reason and the builders drop those rows, counted by reason.

Exact duplicates are found on a 16-byte digest of the row's parts, so a million rows cost 16 MB of keys.

Near duplicates. A row's near-duplicate text is its middle with the `NEAR_PREFIX_CHARS` characters before
and `NEAR_SUFFIX_CHARS` after it, whitespace runs collapsed: two rows are near-duplicates when they teach
nearly the same text at nearly the same place. (With whole-file context, two rows a few lines apart in the
same file would look alike; with 200 + 100 characters, one-line rows one line apart in the sample
repository measured Jaccard median 0.72, 90th percentile 0.77, 1% at 0.85 or more; two lines apart, median
0.59. The same middle cut again after an edit elsewhere in the file scores 1.0.) The similarity is the
Jaccard index of the rows' sets of byte 8-grams, estimated with one-permutation MinHash (`BINS` bins per
row, densified by rotation; standard error about 0.045 at 0.85) and found with LSH: `BANDS` bands of
`BINS // BANDS` bins, so a pair at Jaccard 0.85 shares a band with probability
1 - (1 - 0.85^4)^16 > 0.9999 and a pair at 0.3 with 0.12. Banding only picks the pairs to check: each is
then checked against the threshold on its full signature, and on a second signature of its middle alone,
because consecutive rows in a short file share most of their window while teaching different text (in the
tests, "return a // b if b else 0" and the next line's "return a ** b": window Jaccard 0.83, estimated
0.92). Everything is vectorised with numpy, one hash per byte of text and no Python loop per shingle,
which is where a plain MinHash library spends its time.

Token caps. Byte-level BPE (Qwen2.5-Coder, StarCoder, DeepSeek-Coder) and SentencePiece with byte fallback
(CodeLlama) never make more tokens than a text has UTF-8 bytes (+1 for a leading space marker), so a row
that short fits without tokenizing. Tokenizing the rest costs about 3 MB/s of text per core here, i.e.
minutes for a million rows, so unless `exact_token_counts` is set a row is counted only when
bytes x (the highest tokens-per-byte ratio of a sample of the same rows, plus 10%) could exceed the cap,
or when more than 2% of its bytes are non-ASCII (scripts whose density the sample may not show).
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar, overload

import numpy as np

from pipelines.tokens import BaseTokenizer

T = TypeVar("T")

NEAR_PREFIX_CHARS = 200
NEAR_SUFFIX_CHARS = 100
SHINGLE_BYTES = 8
BINS = 64
BANDS = 16
_BIN_SHIFT = np.uint32(26)  # 32-bit hashes: the top 6 bits pick one of 64 bins, the low 26 are the value
_VALUE_MASK = np.uint32((1 << 26) - 1)
EMPTY = np.uint32(0xFFFFFFFF)
_MAX_ROUNDS = 8  # each round keeps 3/4 of the context: 8 rounds reach 10%
SAMPLE_MARGIN = 1.10
NON_ASCII_SHARE = 0.02
SKETCH_THREADS = 2
SKETCH_CHUNK = 10_000  # ~3 MB of text per chunk keeps each thread's temporary arrays near 40 MB (100 MB at 25k)
SIMILAR_BLOCK = 65_536  # rows whose signatures _similar compares at once: 33 MB of gathered signatures a band thread

VENDORED_DIRS = frozenset({
    "vendor", "vendors", "third_party", "thirdparty", "third-party", "node_modules", "bower_components",
    "site-packages", ".venv", "venv", "pods", "carthage", "__pycache__", "dist", "build", ".yarn", ".git",
})
LOCK_FILES = frozenset({
    "package-lock.json", "npm-shrinkwrap.json", "yarn.lock", "pnpm-lock.yaml", "poetry.lock", "pipfile.lock",
    "cargo.lock", "gemfile.lock", "composer.lock", "go.sum", "uv.lock", "mix.lock", "pubspec.lock", "flake.lock",
    "packages.lock.json", "podfile.lock", "bun.lockb", "gradle.lockfile",
})
GENERATED_NAMES = re.compile(
    r"(_pb2(_grpc)?\.pyi?|\.pb\.(go|cc|h|swift)|\.g\.(dart|cs)|\.designer\.cs|\.generated\.\w+|_generated\.\w+"
    r"|\.gen\.go|\.min\.(js|css)|\.(js|css)\.map)$", re.IGNORECASE)
BINARY_EXTENSIONS = frozenset({
    "png", "jpg", "jpeg", "gif", "ico", "bmp", "webp", "pdf", "zip", "gz", "tgz", "bz2", "xz", "7z", "tar", "jar",
    "war", "class", "so", "dll", "dylib", "exe", "o", "a", "lib", "pyc", "pyo", "wasm", "woff", "woff2", "ttf",
    "otf", "eot", "mp3", "mp4", "wav", "ogg", "mov", "avi", "bin", "dat", "db", "sqlite", "parquet", "npy", "pt",
})
# Looked for in a file's first lines only: "DO NOT EDIT" is Go's convention ("Code generated ... DO NOT
# EDIT."), @generated Meta's and many generators'; the named generators write their own name there.
GENERATED_MARKERS = re.compile(
    r"@generated|do not edit|auto-?generated|automatically generated|this file (is|was) generated"
    r"|generated by (protoc|the protocol buffer|swagger|openapi|thrift|sqlc|mockgen|stringer|django)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x01-\x08\x0b\x0e-\x1f\x7f]")
# Minified: hand-written code keeps lines short (PEP 8: 79, most style guides 100-120); bundlers write
# whole files on a few lines. BigCode's The Stack filters used 100 (mean) and 1000 (max) characters.
MINIFIED_MEAN_LINE_CHARS = 120
MINIFIED_MAX_LINE_CHARS = 1000


def file_problem(path: str, content: str | None = None) -> str | None:
    """Why rows from this file should not train an adapter, or None: its path, then its content."""
    return path_problem(path) or (content_problem(content) if content is not None else None)


def path_problem(path: str) -> str | None:
    """Why a file should not train an adapter, judged by its path alone, or None."""
    parts = [p.lower() for p in path.replace("\\", "/").split("/") if p]
    if not parts:
        return None
    name = parts[-1]
    if any(p in VENDORED_DIRS for p in parts[:-1]):
        return "vendored"
    if name in LOCK_FILES or name.endswith(".lock"):
        return "lock_file"
    if GENERATED_NAMES.search(name):
        return "minified" if ".min." in name else "generated"
    if "." in name and name.rsplit(".", 1)[1] in BINARY_EXTENSIONS:
        return "binary"
    return None


def content_problem(content: str, starts_file: bool = True) -> str | None:
    """Why text should not train an adapter, or None. With `starts_file` false the text is part of a file
    (a suggestion's context) and need not hold its top, where generated-file markers and binary headers live."""
    head = content[:4000]
    if "\x00" in head or (starts_file and len(_CONTROL.findall(head)) > len(head) // 100 + 1):
        return "binary"  # a NUL, or more than 1% control characters at a file's start
    if starts_file and GENERATED_MARKERS.search("\n".join(content[:2000].splitlines()[:6])):
        return "generated"
    lines = content.count("\n") + 1
    if len(content) / lines > MINIFIED_MEAN_LINE_CHARS or _has_long_line(content):
        return "minified"
    return None


def _has_long_line(text: str) -> bool:
    """Whether a line of `text` is longer than MINIFIED_MAX_LINE_CHARS."""
    if len(text) <= MINIFIED_MAX_LINE_CHARS:
        return False
    # A line of more than 2b - 2 characters covers some whole aligned block of b characters, so when every such
    # block holds a line break no line is longer than 2b - 2: a few `find`s instead of splitting 2 KB of
    # context into lines (6.5 s of a profiled 1M-suggestion build; 4.6 s this way).
    block = MINIFIED_MAX_LINE_CHARS // 2
    for at in range(0, len(text) - block + 1, block):
        if text.find("\n", at, at + block) < 0:
            return max(map(len, text.split("\n"))) > MINIFIED_MAX_LINE_CHARS
    return False


def exact_key(*parts: str) -> bytes:
    """A 16-byte digest standing for the row's parts (NUL cannot occur in them as a separator would)."""
    # One update of the joined parts: the same bytes as one update per part and separator (2.3M keys in a
    # 1M-suggestion build: 14.4 s under cProfile with an update per part and separator, 9.9 s with one).
    return hashlib.blake2b(("\x00".join(parts) + "\x00").encode("utf-8", "surrogatepass"), digest_size=16).digest()


def drop_exact_duplicates(rows: list[T], key: Callable[[T], bytes], dropped: Counter[str],
                          reason: str = "duplicate") -> list[T]:
    """The first of each set of rows with the same key, in order."""
    return [r for r, _ in keyed_unique(rows, key, dropped, reason)]


def keyed_unique(rows: list[T], key: Callable[[T], bytes], dropped: Counter[str],
                 reason: str = "duplicate") -> list[tuple[T, bytes]]:
    """`drop_exact_duplicates` with each row's key beside it: what names the row to later stages' caches."""
    seen: set[bytes] = set()
    out = []
    for r in rows:
        k = key(r)
        if k in seen:
            dropped[reason] += 1
            continue
        seen.add(k)
        out.append((r, k))
    return out


# -- near duplicates -----------------------------------------------------------------------------------------

def near_text(prefix: str, middle: str, suffix: str) -> str:
    """The text two rows are compared on: the middle and a little context on each side, whitespace collapsed."""
    return " ".join(f"{prefix[-NEAR_PREFIX_CHARS:]}\x01{middle}\x01{suffix[:NEAR_SUFFIX_CHARS]}".split())


class RowTexts(Sequence[str]):
    """`text(row)` of each (row, key) in `rows`, made a slice at a time as `sketch` reads its chunks: a
    771k-row KTO set's near-texts at once were ~350 MB at the build's peak."""

    def __init__(self, rows: Sequence[tuple[T, bytes]], text: Callable[[T], str]):
        self.rows, self.text = rows, text

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self.text(r) for r, _ in self.rows[i]]
        return self.text(self.rows[i][0])


def sketch(texts: Sequence[str]) -> np.ndarray:
    """One-permutation MinHash signatures, (len(texts), BINS) uint32. A text shorter than one shingle is
    padded to one (so equal short texts match and different ones do not); an empty text is all EMPTY and
    never matches."""
    n = len(texts)
    flat = np.empty(n * BINS, dtype=np.uint32)
    chunk = SKETCH_CHUNK
    # Chunks write disjoint slices, so two threads can share the work: numpy releases the GIL in its
    # array loops (the hashing), which is most of a chunk's time. Each fills its own slice with EMPTY: filled
    # at once, a 771k-row set's 197 MB took 0.9 s of the main thread in a first night's build.
    def one(lo: int) -> None:
        part = flat[lo * BINS:(lo + chunk) * BINS]
        part.fill(EMPTY)
        _sketch_into(part, texts[lo:lo + chunk])
        _densify(part.reshape(-1, BINS))

    with ThreadPoolExecutor(SKETCH_THREADS) as pool:
        list(pool.map(one, range(0, n, chunk)))
    return flat.reshape(n, BINS)


def _sketch_into(sig: np.ndarray, texts: Sequence[str]) -> None:
    encoded = [e.ljust(SHINGLE_BYTES, b"\x00") if e else e for e in (t.encode("utf-8", "surrogatepass") for t in texts)]
    lens = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    total = int(lens.sum())
    if total < SHINGLE_BYTES:
        return
    buf = b"".join(encoded) + b"\x00" * 16
    ends = np.cumsum(lens)
    # row * BINS at every byte, the first bin of its row's signature: a running sum of BINS at each row's end
    # (an empty row ends where the row before it does, hence `add.at`). In uint32, since a chunk's signatures
    # are far fewer than 2**32 bins: an int64 `np.repeat` and the int64 sums made from it were 45 of a 10k-text
    # chunk's 85 ms.
    step = np.zeros(total + 1, dtype=np.uint32)
    np.add.at(step, ends, np.uint32(BINS))
    base = np.cumsum(step[:-1], dtype=np.uint32)
    # An 8-gram that runs past its row's end is not a shingle of that row: those start at a row's last 7 bytes
    # (every row with a byte has 8 or more). Marking those ~7 positions a row costs less than comparing every
    # position with its row's end (23 of a 10k-text chunk's 85 ms).
    past = (ends[:, None] - np.arange(1, SHINGLE_BYTES, dtype=np.int64)).ravel()
    past = past[past >= 0]
    # The 8-gram at byte i is the 32-bit words at i and i+4. Reading the buffer as 32-bit words from each
    # of the 4 byte offsets gives every position once without copying bytes around.
    for j in range(4):
        m = (total - j + 3) // 4
        words = np.frombuffer(buf, dtype="<u4", count=m + 1, offset=j)
        h = words[:-1] * np.uint32(0x9E3779B1)
        h ^= words[1:] * np.uint32(0x85EBCA77)
        h ^= h >> np.uint32(15)
        h *= np.uint32(0xC2B2AE3D)
        h ^= h >> np.uint32(13)
        vals = h & _VALUE_MASK
        at = past[(past - j) % 4 == 0]
        vals[(at - j) // 4] = EMPTY
        h >>= _BIN_SHIFT
        h += base[j::4][:m]
        np.minimum.at(sig, h, vals)


def _densify(sig: np.ndarray) -> None:
    """Fill empty bins from the next filled bin to the right (circularly), offset by the distance so two
    rows agree on a filled-in bin only when they agree on its source (rotation densification)."""
    has_any = (sig != EMPTY).any(axis=1)
    todo = np.flatnonzero(has_any & (sig == EMPTY).any(axis=1))
    if not len(todo):
        return
    # All rows at once: a row laid out twice (bins 0..127) holds every bin's circular successors to its right,
    # and a reversed running minimum of the filled bins' columns gives each bin its nearest one. (Trying the
    # distances 1..63 in turn with np.roll took 16 s of a 1M-row build, short middles leaving many bins empty.)
    for lo in range(0, len(todo), 50_000):  # ~50 MB of temporaries per chunk
        rows = todo[lo:lo + 50_000]
        twice = np.tile(sig[rows], 2)
        cols = np.where(twice != EMPTY, np.arange(2 * BINS, dtype=np.int16), np.int16(2 * BINS))
        nearest = np.minimum.accumulate(cols[:, ::-1], axis=1)[:, ::-1][:, :BINS]  # < 2 * BINS: the row has a bin
        # Every bin's filled-in value, then the empty ones taken from it: a filled bin is its own nearest, at
        # distance 0. Filling through boolean masks (three gathers and a scatter) was 7.7 of a 10k-middle
        # chunk's 18 ms.
        src = np.take_along_axis(twice, nearest.astype(np.intp), axis=1)
        src += (nearest - np.arange(BINS, dtype=np.int16)).astype(np.uint32) * np.uint32(0x9E3779B1)
        src &= _VALUE_MASK
        part = twice[:, :BINS]
        sig[rows] = np.where(part == EMPTY, src, part)


def band_keys(sig: np.ndarray) -> np.ndarray:
    """One 64-bit key per band of BINS // BANDS bins, (len(sig), BANDS)."""
    return np.stack([band_key(sig, b) for b in range(BANDS)], axis=1)


def band_key(sig: np.ndarray, band: int) -> np.ndarray:
    """The 64-bit key of one band: bins band * per ... band * per + per - 1, per = BINS // BANDS. One band at a
    time, as the near-duplicate passes use them: all 16 of a 600k-row KTO label were 77 MB beside its signatures
    at a later night's peak."""
    per = BINS // BANDS
    # The band's bins copied out first: read in place, each of its columns is one uint32 every 256 bytes, and a
    # 770k-row set's 16 bands took 445 ms that way against 270 ms.
    bins = np.ascontiguousarray(sig[:, band * per:(band + 1) * per])
    key = np.zeros(len(sig), dtype=np.uint64)
    for i in range(per):
        key *= np.uint64(0x100000001B3)
        key ^= bins[:, i]
    return key


def _any_band(found: Callable[[range], np.ndarray]) -> np.ndarray:
    """The rows `found` in any band, the bands split between SKETCH_THREADS threads. A row's verdict in one band
    does not depend on any other band's, so the split changes nothing but the time: numpy lets go of the GIL
    while it sorts, gathers and compares, and a 770k-row set took 3.8 s in one thread against 2.0 s in two."""
    with ThreadPoolExecutor(SKETCH_THREADS) as pool:
        parts = list(pool.map(found, [range(t, BANDS, SKETCH_THREADS) for t in range(SKETCH_THREADS)]))
    return np.logical_or.reduce(parts)


def near_duplicates(sig: np.ndarray, middle: np.ndarray, threshold: float) -> np.ndarray:
    """For rows in order (oldest first), True where a row is a near-duplicate of an earlier row: both its
    near-text signature (`sig`, from `near_text`) and its middle's (`middle`) are `threshold` similar. The
    middle must match on its own because two rows cut a line apart share most of their window but teach
    different text."""
    n = len(sig)
    if n < 2:
        return np.zeros(n, dtype=bool)
    usable = (sig != EMPTY).any(axis=1)

    def found(bands: range) -> np.ndarray:
        dup = np.zeros(n, dtype=bool)
        for b in bands:
            keys = band_key(sig, b)
            order = np.argsort(keys, kind="stable")  # equal keys stay in row order: the first is the earliest
            k = keys[order]
            first = np.empty(n, dtype=bool)
            first[0] = True
            first[1:] = k[1:] != k[:-1]
            head = order[np.maximum.accumulate(np.where(first, np.arange(n), 0))]
            rows, heads = order[~first], head[~first]
            ok = usable[rows] & usable[heads]
            ok &= ~dup[rows]  # a row found in an earlier band stays found: no need to check it again
            rows, heads = rows[ok], heads[ok]
            dup[rows[_similar(sig, middle, rows, sig, middle, heads, threshold)]] = True
        return dup

    return _any_band(found)


def near_duplicates_of(sig: np.ndarray, middle: np.ndarray, reference: np.ndarray, reference_middle: np.ndarray,
                       threshold: float) -> np.ndarray:
    """True where a row (`sig`, `middle`) is a near-duplicate of some reference row (as `near_duplicates`)."""
    if not len(sig) or not len(reference):
        return np.zeros(len(sig), dtype=bool)
    usable = (sig != EMPTY).any(axis=1)
    ref_usable = (reference != EMPTY).any(axis=1)

    def found(bands: range) -> np.ndarray:
        hit = np.zeros(len(sig), dtype=bool)
        for b in bands:
            keys = band_key(sig, b)
            ref_keys, ref_first = np.unique(band_key(reference, b), return_index=True)
            at = np.searchsorted(ref_keys, keys).clip(max=len(ref_keys) - 1)
            rows = np.flatnonzero((ref_keys[at] == keys) & usable)
            refs = ref_first[at[rows]]
            keep = ref_usable[refs] & ~hit[rows]
            rows, refs = rows[keep], refs[keep]
            hit[rows[_similar(sig, middle, rows, reference, reference_middle, refs, threshold)]] = True
        return hit

    return _any_band(found)


def _similar(sig: np.ndarray, middle: np.ndarray, rows: np.ndarray, other: np.ndarray, other_middle: np.ndarray,
             others: np.ndarray, threshold: float) -> np.ndarray:
    close = np.empty(len(rows), dtype=bool)
    # A band of a 600k-row KTO label has ~500k rows to compare: their signatures gathered at once were 256 MB
    # (two copies of 256 bytes a row), the build's peak; a block at a time (SIMILAR_BLOCK) holds 33 MB.
    for lo in range(0, len(rows), SIMILAR_BLOCK):
        r, o = rows[lo:lo + SIMILAR_BLOCK], others[lo:lo + SIMILAR_BLOCK]
        part = (sig[r] == other[o]).mean(axis=1) >= threshold
        at = np.flatnonzero(part)  # the middles only where the windows agree
        part[at] = (middle[r[at]] == other_middle[o[at]]).mean(axis=1) >= threshold
        close[lo:lo + SIMILAR_BLOCK] = part
    return close


# -- token caps ----------------------------------------------------------------------------------------------

class Counts(Protocol):
    """Token counts of texts: a BaseTokenizer, or TokenCounts in front of one."""

    def count(self, texts: list[str]) -> list[int]: ...


class TokenCounts:
    """Token counts remembered by text hash across builds (Store.token_counts), in front of a tokenizer.

    Every night's build fits the whole history's rows into max_row_tokens again; tokenizing them again made the
    build's cost grow with the history (27 of 30 s of a 10k-suggestion build with the demo's tiny tokenizer,
    bench/nightly_growth.py). A text counted by an earlier build of the same tokenizer (same fingerprint) is not
    tokenized again; the counts are the tokenizer's own, so the rows are the same.

    `stored(hashes)` gives the stored counts of the texts asked for. Asked for, not loaded:
    a warm build asks about the calibration sample and the rows no earlier build traced (1,000 texts in the
    100k-suggestion state of bench/nightly_growth.py, where every trace replayed), while loading every stored
    count took 0.15 s of that build (337k counts), growing with the history."""

    def __init__(self, tokenizer: BaseTokenizer, stored: Callable[[list[bytes]], dict[bytes, int]]) -> None:
        self.tokenizer = tokenizer
        self.stored = stored
        self.known: dict[bytes, int] = {}  # asked for or counted so far
        self.new: dict[bytes, int] = {}  # counted by this build: what to store
        self.hits = 0

    def count(self, texts: list[str]) -> list[int]:
        keys = [text_hash(t) for t in texts]
        asked = [k for k in keys if k not in self.known]
        if asked:
            self.known.update(self.stored(asked))
        out = [self.known.get(k, -1) for k in keys]
        missing = [i for i, n in enumerate(out) if n < 0]
        self.hits += len(texts) - len(missing)
        if missing:
            for i, n in zip(missing, self.tokenizer.count([texts[i] for i in missing]), strict=True):
                out[i] = self.known[keys[i]] = self.new[keys[i]] = n
        return out


def text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


# A row's way through fit_tokens: whether it was dropped after the last round (one byte), then per round (byte
# size, non-ASCII extra bytes, exact token count or -1 when not tokenized, prefix length, suffix length) as five
# little-endian int32. Packed, not tuples: 1.1M traces of a 1M-suggestion build took 352 MB as tuples.
Trace = bytes
_ROUND = struct.Struct("<5i")


def pack_trace(rounds: Sequence[tuple[int, int, int, int, int]], dropped: bool) -> Trace | None:
    """A trace's bytes; None for a row with a number past int32 (it is not remembered, only fitted again)."""
    packed: bytes | None = b""
    for r in rounds:
        packed = pack_round(packed, r)
    return None if packed is None else bytes([dropped]) + packed


def pack_round(rounds: bytes | None, values: tuple[int, int, int, int, int]) -> bytes | None:
    """Packed `rounds` with one more round; None once a number is past int32."""
    if rounds is None:
        return None
    try:
        return rounds + _ROUND.pack(*values)
    except struct.error:
        return None


class FitMemo:
    """Rows' traces through `fit_tokens` by row key, from the last build (pipelines.datasets.cache).

    Fitting the whole history again every night rendered, hashed and cut the same long rows again (5.4 of a
    15 s warm 100k-suggestion build). A trace holds what each round's decision was made from, so it can be
    replayed with tonight's tokens-per-byte bound (`calibrate` samples the rows, so it moves a little as they
    do): a decision that needs a count the trace does not have sends the row through the rounds again. The
    row comes out as its prefix and suffix cut to the traced lengths (clip_prefix and clip_suffix keep an end
    of the text), the same row the rounds would make."""

    def __init__(self, known: dict[bytes, Trace]) -> None:
        self.known = known  # a trace moves to `kept` when a row replays it: 1.1M traces held once, not twice
        self.kept: dict[bytes, Trace] = {}
        self.replayed = 0


def text_size(*texts: str) -> tuple[int, int]:
    """(UTF-8 bytes, of which bytes beyond one a character) of `texts` together, without encoding ASCII text
    (str.isascii is O(1) in CPython: a flag on the string)."""
    chars = sum(map(len, texts))
    extra = sum(len(t.encode("utf-8", "surrogatepass")) - len(t) for t in texts if not t.isascii())
    return chars + extra, extra


def fit_tokens(rows: list[T], size: Callable[[T], tuple[int, int]], render: Callable[[T], str],
               shrink: Callable[[T], T | None], tokenizer: Counts, max_tokens: int, ratio: float | None,
               dropped: Counter[str], counted: Counter[str], memo: FitMemo | None = None,
               keys: Sequence[bytes] = (), cut: Callable[[T, int, int], T] | None = None) -> list[T]:
    """Fit rows into `max_tokens` by cutting their context (`shrink` keeps 3/4 of it, None when there is
    nothing left to cut); drop a row only when it cannot fit. `size` gives a row's text's UTF-8 bytes and how
    many of them are beyond one a character (`text_size` of its parts: what bounds its length without building
    it), `render` the text itself, built only for rows that must be tokenized. `ratio` is the tokens-per-byte bound
    from `calibrate`, or None to tokenize every row longer in bytes than the cap. `counted` tallies how each row's
    length was established: "bytes" (short enough), "estimated" (under the bound) or "tokenized". With a `memo`,
    rows are named by `keys` and a row traced by an earlier build is replayed (FitMemo) and cut to its lengths by
    `cut(row, prefix_len, suffix_len)`."""
    out: list[T | None] = list(rows)
    todo = list(range(len(out)))
    # Each traced row's rounds, packed as they come (pack_round): 1.1M rows of a first 1M-suggestion build as
    # lists of tuples added ~200 MB to its peak. None: a number past int32, not remembered.
    traces: dict[int, bytes | None] = {}
    if memo is not None:
        assert cut is not None and len(keys) == len(rows)
        todo = []
        for i, k in enumerate(keys):
            known = memo.known.pop(k, None)
            verdict = None if known is None else _replay(known, ratio, max_tokens)
            if known is None or verdict is None:
                todo.append(i)
                traces[i] = b""
                continue
            memo.kept[k] = known
            at, fits, how = verdict
            counted[how] += 1
            if not fits:
                dropped["over_max_row_tokens"] += 1
                out[i] = None
                continue
            _, _, _, prefix_len, suffix_len = _ROUND.unpack_from(known, 1 + at * _ROUND.size)
            if at:
                out[i] = cut(rows[i], prefix_len, suffix_len)
        memo.replayed += len(rows) - len(todo)
    for round_ in range(_MAX_ROUNDS + 1):
        if not todo:
            break
        over = []
        for lo in range(0, len(todo), 10_000):  # rendered in chunks: a million rendered rows would be GBs
            chunk = todo[lo:lo + 10_000]
            bounds = _upper_bounds([out[i] for i in chunk], size, render, tokenizer, ratio, max_tokens, counted,
                                   round_ == 0)
            over += [i for i, (n, _, _, _) in zip(chunk, bounds, strict=True) if n > max_tokens]
            if memo is not None:
                for i, (_, n_bytes, extra, count) in zip(chunk, bounds, strict=True):
                    row: Any = out[i]
                    traces[i] = pack_round(traces[i], (n_bytes, extra, count, *row.context.lengths()))
        if round_ == _MAX_ROUNDS:
            dropped["over_max_row_tokens"] += len(over)
            for i in over:
                out[i] = None
            break
        for i in over:
            row = out[i]
            smaller = shrink(row) if row is not None else None
            if smaller is None:
                dropped["over_max_row_tokens"] += 1
            out[i] = smaller
        todo = [i for i in over if out[i] is not None]
    if memo is not None:
        for i, rounds in traces.items():
            if rounds is not None:
                memo.kept[keys[i]] = bytes([out[i] is None]) + rounds
    return [r for r in out if r is not None]


def _bound(size: int, extra: int, ratio: float | None, max_tokens: int) -> tuple[int, str] | None:
    """A row's token bound from its byte size and how it was found ("bytes" or "estimated"), or None when
    only tokenizing it can tell."""
    if size + 1 <= max_tokens:
        return size + 1, "bytes"
    if ratio is not None and extra <= NON_ASCII_SHARE * size and size * ratio <= max_tokens:
        return int(size * ratio) + 1, "estimated"
    return None


def _replay(trace: Trace, ratio: float | None, max_tokens: int) -> tuple[int, bool, str] | None:
    """(round, fits, how round 0 was sized) as `fit_tokens` would decide for the traced row, or None when a
    decision needs a count the trace lacks."""
    rounds = list(_ROUND.iter_unpack(memoryview(trace)[1:]))
    was_dropped = bool(trace[0])
    how = ""
    for at, (size, extra, count, _, _) in enumerate(rounds):
        found = _bound(size, extra, ratio, max_tokens)
        if found is None:
            if count < 0:
                return None
            found = count, "tokenized"
        if at == 0:
            how = found[1]
        if found[0] <= max_tokens:
            return at, True, how
    return (len(rounds) - 1, False, how) if was_dropped and rounds else None


def calibrate(sample: list[str], tokenizer: Counts) -> float | None:
    """The highest tokens-per-byte ratio in a sample of rows, plus a margin: the bound `fit_tokens` trusts
    instead of tokenizing (None: too small a sample to trust, so every long row is tokenized)."""
    sample = [t for t in sample if len(t) >= 64]
    if len(sample) < 20:
        return None
    sizes = [len(t.encode("utf-8", "surrogatepass")) for t in sample]
    counts = tokenizer.count(sample)
    return max(c / s for c, s in zip(counts, sizes, strict=True)) * SAMPLE_MARGIN


def _upper_bounds(rows: list[Any], size_of: Callable[[Any], tuple[int, int]], render: Callable[[Any], str],
                  tokenizer: Counts, ratio: float | None, max_tokens: int, counted: Counter[str],
                  first_round: bool) -> list[tuple[int, int, int, int]]:
    """Per row, its token count or an upper bound of it that is enough to compare with `max_tokens`, then what
    it was found from: byte size, non-ASCII extra bytes and the token count (-1 when not tokenized)."""
    out = [(0, 0, 0, -1)] * len(rows)
    exact_needed = []
    for i, r in enumerate(rows):
        size, extra = size_of(r)
        found = _bound(size, extra, ratio, max_tokens)
        if found is None:
            out[i] = (0, size, extra, -1)
            exact_needed.append(i)
            continue
        out[i] = (found[0], size, extra, -1)
        if first_round:
            counted[found[1]] += 1
    if exact_needed:
        for i, n in zip(exact_needed, tokenizer.count([render(rows[i]) for i in exact_needed]), strict=True):
            out[i] = (n, out[i][1], out[i][2], n)
        if first_round:
            counted["tokenized"] += len(exact_needed)
    return out
