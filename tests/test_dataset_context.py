"""Contexts kept on disk during a build (pipelines.datasets.context) read back as the strings they were."""

from __future__ import annotations

import os
import random
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from pipelines.datasets import context as context_module
from pipelines.datasets.build import _cut, _shrink
from pipelines.datasets.context import Spool, SpooledContext, TextContext
from pipelines.datasets.dpo import context_key, match_key
from pipelines.datasets.outcomes import Side, clip_prefix, clip_suffix
from pipelines.datasets.quality import exact_key
from support import T0

# ASCII code, then what is not: two-byte and three-byte characters, an astral one, a lone surrogate (git can
# hand one over through surrogateescape), line breaks of every kind
PIECES = ["def f(x):\n", "    return x\n", "\n", "  ", "é", "γάμμα", "→", "😀", "\udcff", "\r\n", "\t", "x" * 70]


def random_texts(rng: random.Random, n: int, ascii_only: bool) -> list[tuple[str, str]]:
    pieces = PIECES[:4] + PIECES[-1:] if ascii_only else PIECES
    return [("".join(rng.choices(pieces, k=rng.randint(0, 60))), "".join(rng.choices(pieces, k=rng.randint(0, 30))))
            for _ in range(n)]


@pytest.mark.parametrize("ascii_only", [True, False])
def test_a_spooled_context_reads_as_its_text_through_every_accessor(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path, ascii_only: bool) -> None:
    monkeypatch.setattr(context_module, "FLUSH_BYTES", 97)  # many flushes, each cutting some context in two
    rng = random.Random(3)
    texts = random_texts(rng, 400, ascii_only)
    spool = Spool(tmp_path, match_key)
    spooled = []
    for i, (p, s) in enumerate(texts):
        spooled.append(spool.put(p, s))
        if i % 37 == 0:  # read while later contexts are still only in memory
            j = rng.randrange(len(spooled))
            assert spooled[j].texts() == texts[j]
    assert spool.size == sum(len(p.encode("utf-8", "surrogatepass")) + len(s.encode("utf-8", "surrogatepass"))
                             for p, s in texts)
    assert os.listdir(tmp_path) == []  # the spool has no name: a killed build leaves nothing behind
    for (p, s), got in zip(texts, spooled, strict=True):
        held = TextContext(p, s)
        for ctx in (held, got):
            assert ctx.texts() == (p, s) and ctx.lengths() == (len(p), len(s))
            assert ctx.size() == (len((p + s).encode("utf-8", "surrogatepass")),
                                  len((p + s).encode("utf-8", "surrogatepass")) - len(p + s))
            for a, b in ((0, 0), (1, 1), (5, 3), (200, 100), (10_000, 10_000)):
                assert ctx.ends(a, b) == (p[len(p) - min(a, len(p)):], s[:b])
        assert got == held and hash(got) == hash(held)
        assert got.match() == match_key(p, s) and held.match() is None
        for more in ((), ("x",), ("  return 1\n", "é\udcff"), ("", "", "True")):
            assert got.key(*more) == held.key(*more) == exact_key(p, s, *more)
        # a token cut keeps an end of each, and a cut of a cut keeps an end of that
        a, b = rng.randint(0, len(p)), rng.randint(0, len(s))
        for ctx in (held, got):
            once = ctx.cut(a, b)
            assert once.texts() == (p[len(p) - a:], s[:b]) and once.lengths() == (a, b)
            twice = once.cut(a // 2, b // 2)
            assert twice.texts() == (p[len(p) - a // 2:], s[:b // 2])
            assert twice.key("m") == exact_key(p[len(p) - a // 2:], s[:b // 2], "m")
            assert twice.ends(3, 2) == (p[len(p) - min(3, a // 2):], s[:min(2, b // 2)])
        assert type(got.cut(a, b)) is SpooledContext  # the cut stays on disk
    spool.close()


def test_rows_cut_and_keyed_from_the_spool_are_those_cut_and_keyed_from_text(tmp_path: Path) -> None:
    rng = random.Random(5)
    spool, unmatched = Spool(tmp_path, match_key), Spool(tmp_path)
    for p, s in random_texts(rng, 300, ascii_only=False) + random_texts(rng, 300, ascii_only=True):
        p, s = p * rng.randint(1, 40), s * rng.randint(1, 40)  # past the DPO key's 1,000 and 500 characters
        held = Side("s", "rejected", False, "alice", T0, "a.py", TextContext(p, s), "x")
        spooled = Side("s", "rejected", False, "alice", T0, "a.py", spool.put(p, s), "x")
        assert context_key(spooled) == context_key(held)  # kept as the context was written
        assert context_key(replace(spooled, context=unmatched.put(p, s))) == context_key(held)  # read back
        for _ in range(3):
            held_cut, spooled_cut = _shrink(held), _shrink(spooled)
            if held_cut is None:
                assert spooled_cut is None and held.context.lengths() == (0, 0)
                break
            assert spooled_cut is not None
            assert held_cut.context.texts() == spooled_cut.context.texts()
            assert held_cut.context.texts() == (clip_prefix(held.prefix, len(held.prefix) * 3 // 4),
                                                clip_suffix(held.suffix, len(held.suffix) * 3 // 4))
            held, spooled = held_cut, spooled_cut
        n, m = held.context.lengths()
        assert _cut(spooled, n // 2, m).context.texts() == (held.prefix[n - n // 2:], held.suffix)
    spool.close()
    unmatched.close()


def test_two_threads_read_a_spool_while_it_is_flushed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The near-duplicate stage sketches from two threads; a read of text still in memory flushes it first."""
    monkeypatch.setattr(context_module, "FLUSH_BYTES", 1 << 30)  # nothing flushed until a read asks
    rng = random.Random(9)
    texts = random_texts(rng, 2_000, ascii_only=False)
    spool = Spool(tmp_path)
    spooled = [spool.put(p, s) for p, s in texts]
    wrong: list[int] = []

    def read(order: list[int]) -> None:
        wrong.extend(i for i in order if spooled[i].texts() != texts[i])

    orders = [rng.sample(range(len(texts)), len(texts)) for _ in range(2)]
    threads = [threading.Thread(target=read, args=(o,)) for o in orders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    spool.close()


def test_a_spool_that_cannot_write_its_file_says_so_and_nothing_waits_forever(tmp_path: Path) -> None:
    """The spool's file is written by a thread of its own. When that write fails (here the file size limit, as a
    full disk would), the next read or write raises an error that names the folder, instead of waiting for bytes
    that will never come, and the spool still closes."""
    import subprocess
    import sys

    script = f"""
import resource, signal, sys
from pathlib import Path
from pipelines.datasets import context
from pipelines.datasets.context import ByteSpool
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
context.FLUSH_BYTES = 64 << 10
spool = ByteSpool(Path({str(tmp_path)!r}))
try:
    at = [spool.write(bytes([i % 251]) * 1000) for i in range(3000)]  # 3 MB: past the limit
    spool.read(at[-1], 1000)
except OSError as e:
    print("raised:", e)
spool.close()
print("closed")
"""
    root = Path(__file__).resolve().parent.parent
    got = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=root)
    assert got.returncode == 0, got.stderr
    assert f"raised: spool: writing the build's temporary file in {tmp_path} failed" in got.stdout, got.stdout
    assert "free space" in got.stdout and got.stdout.rstrip().endswith("closed")
