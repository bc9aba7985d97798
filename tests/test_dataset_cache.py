"""The dataset build's cache (pipelines/datasets/cache.py): a build that reuses what the last one computed
writes the same bytes as a build from scratch, after new commits and suggestions arrive and when the settings
change; and fit_tokens' replayed traces give the same rows under any tokens-per-byte bound."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from daemon import jobs
from daemon.config import load_config
from pipelines.config import DatasetsConfig
from pipelines.datasets.build import FILES, _cut, _shrink, build_datasets
from pipelines.datasets.context import Spool, TextContext
from pipelines.datasets.quality import FitMemo, TokenCounts, exact_key, fit_tokens, text_size
from pipelines.datasets.sft import FimExample
from pipelines.scope import team
from pipelines.store.db import Store
from pipelines.tokens import load_base_tokenizer
from support import T0, CommitSpec, autocomplete_event, commit, continue_log, days, make_repo, write_config

# Small rows cap, so many rows are cut (fit_tokens' rounds) and some are dropped.
CFG = DatasetsConfig(heldout_fraction=0.2, min_train_rows=1, min_heldout_rows=1, max_row_tokens=160,
                     fim_spans_per_file=4)


def module(i: int, n: int) -> str:
    body = "".join(f"def op_{i}_{j}(x):\n    if x > {j}:\n        return x * {j}\n    return x - {i}\n\n"
                   for j in range(n))
    return f'"""Ledger module {i}."""\n\nimport math\n\n' + body


def events(lo: int, hi: int) -> list[dict[str, Any]]:
    out = []
    for i in range(lo, hi):
        prefix = module(i % 7, 3 + i % 5) + f"def total_{i % 9}(x):\n"
        for accepted in (True, False):  # a kept and a rejected completion of one context: a DPO pair
            out.append(autocomplete_event(timestamp=(T0 + days(i / 3)).isoformat() + "Z", accepted=accepted,
                                          prefix=prefix, suffix="\n\nprint(total(1))\n",
                                          completion=f"    return x + {i if accepted else -i}\n",
                                          filepath=f"file:///home/alice/src/payments/ledger/m{i % 7}.py"))
    return out


def site(tmp_path: Path) -> tuple[Store, Any, Path]:
    repo = make_repo(tmp_path / "repo", [
        CommitSpec({f"ledger/m{i}.py": module(i, 4 + i % 6)}, when=T0 + days(i / 2), message=f"m{i}",
                   author=("Bob", "bob@example.com") if i % 2 else ("Alice", "alice@example.com"))
        for i in range(12)])
    continue_log(tmp_path / "alice", events(0, 30))
    setup = write_config(tmp_path / "site", [
        {"kind": "git", "path": str(tmp_path / "repo"), "name": "repo"},
        {"kind": "continue", "path": str(tmp_path / "alice"), "name": "alice", "developer": "alice@example.com"}],
        teams=[{"name": "payments", "members": ["alice@example.com", "bob@example.com"]}])
    cfg = load_config(setup.config)
    store = Store.open(cfg.state_dir / "store.duckdb")
    assert jobs.collect(store, cfg)["error"] is None
    return store, (cfg, repo), tmp_path


def built(store: Store, tokenizer: Any, out: Path, cache: Path | None, cfg: DatasetsConfig = CFG) -> dict[str, Any]:
    report = build_datasets(store, team("payments"), cfg, tokenizer, out, cache)
    manifest = json.loads((out / "manifest.json").read_text())
    files = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in FILES}
    return {"sha": report.sha256, "files": files, "dropped": report.dropped, "cache": manifest["build_cache"],
            "counted": manifest["token_counts"], "tokens": manifest["token_count_cache"], "rows": report.train_rows}


def test_a_cached_build_writes_what_a_build_from_scratch_writes(tmp_path: Path, tiny_model: Path) -> None:
    store, (cfg, repo), root = site(tmp_path)
    tokenizer = load_base_tokenizer(str(tiny_model))
    cache = root / "cache"
    try:
        scratch = built(store, tokenizer, root / "scratch", None)
        assert scratch["rows"] > 50 and scratch["dropped"].get("near_duplicate", 0) >= 0
        assert scratch["counted"].get("tokenized", 0) > 0  # rows long enough to be cut: the rounds ran
        cold = built(store, tokenizer, root / "cold", cache)
        # The counts the first build stored are asked for by hash (Store.token_counts), not tokenized again
        assert scratch["tokens"]["tokenized"] > 0 and cold["tokens"] == {"known": cold["tokens"]["known"],
                                                                          "tokenized": 0}
        assert cold["tokens"]["known"] >= scratch["tokens"]["tokenized"]
        warm = built(store, tokenizer, root / "warm", cache)
        for b in (cold, warm):
            assert (b["sha"], b["files"], b["dropped"]) == (scratch["sha"], scratch["files"], scratch["dropped"])
        assert cold["cache"]["committed_files_reused"] == 0 and cold["cache"]["fits_replayed"] == 0
        assert warm["cache"]["sketched"] == 0 and warm["cache"]["committed_files_reused"] == 12
        assert warm["cache"]["fits_replayed"] > 50

        # A night later: new commits (one file changed again, one new) and new suggestions. The held-out cutoff
        # moves, so rows change split, and the ratio's sample moves.
        for i in range(12, 16):
            commit(repo, CommitSpec({f"ledger/m{i % 3}.py": module(i, 5), f"ledger/n{i}.py": module(i, 3)},
                                    when=T0 + days(10 + i / 4), message=f"n{i}"))
        continue_log(root / "alice", events(30, 45), append=True)
        assert jobs.collect(store, cfg)["error"] is None
        scratch2 = built(store, tokenizer, root / "scratch2", None)
        night2 = built(store, tokenizer, root / "night2", cache)
        assert scratch2["sha"] != scratch["sha"]
        assert (night2["sha"], night2["files"], night2["dropped"]) == (
            scratch2["sha"], scratch2["files"], scratch2["dropped"])
        assert night2["cache"]["committed_files_reused"] == 12 and night2["cache"]["sketched"] > 0

        # Other settings: nothing cached is trusted, and the rows are those of a build from scratch.
        other = DatasetsConfig(**{**CFG.__dict__, "max_row_tokens": 120})
        scratch3 = built(store, tokenizer, root / "scratch3", None, other)
        night3 = built(store, tokenizer, root / "night3", cache, other)
        assert night3["sha"] == scratch3["sha"] != scratch2["sha"]
        assert night3["cache"] == {"committed_files_reused": 0, "sketches_reused": 0,
                                   "sketched": night3["cache"]["sketched"], "fits_replayed": 0}

        # A damaged cache file is set aside, not believed.
        (cache / "team-payments" / "fits.marshal").write_bytes(b"garbage")
        assert built(store, tokenizer, root / "night4", cache, other)["sha"] == scratch3["sha"]
    finally:
        store.close()


def test_replayed_fits_are_the_rounds_own_under_any_bound(tiny_model: Path) -> None:
    tokenizer = load_base_tokenizer(str(tiny_model))
    rng = random.Random(7)
    words = ["alpha", "beta", "γάμμα", "delta_epsilon", "(x)", "\n", "    ", "return", "0xdeadbeef", "ünïcode"]
    spool = Spool()
    rows = [FimExample(id=str(i), signal="committed", developer="a", ts=T0 + days(i), path="a.py",
                       context=(TextContext if i % 2 else spool.put)(
                           "".join(rng.choices(words, k=rng.randint(0, 120 if i % 3 else 6))),
                           "".join(rng.choices(words, k=rng.randint(0, 60 if i % 3 else 200)))),
                       middle="".join(rng.choices(words, k=rng.randint(1, 30)))) for i in range(300)]
    keys = [exact_key(e.prefix, e.suffix, e.middle) for e in rows]

    def size(e: FimExample) -> tuple[int, int]:
        return text_size(e.prefix, e.suffix, e.middle, "<>")

    def render(e: FimExample) -> str:
        return e.prefix + "<" + e.suffix + ">" + e.middle

    def fit(ratio: float | None, memo: FitMemo | None) -> tuple[list[FimExample], Counter[str], Counter[str]]:
        dropped: Counter[str] = Counter()
        counted: Counter[str] = Counter()
        counts = TokenCounts(tokenizer, lambda hashes: {})  # nothing stored: every count is the tokenizer's
        out = fit_tokens(rows, size, render, _shrink, counts, 96, ratio, dropped, counted, memo,
                         keys if memo else (), _cut if memo else None)
        return out, dropped, counted

    memo = FitMemo({})
    first = fit(0.5, memo)
    assert first == fit(0.5, None) and first[1]["over_max_row_tokens"] > 0
    assert sum(1 for a, b in zip(rows, first[0], strict=False) if a != b) > 0  # some rows were cut
    for ratio in (0.5, 0.3, 0.45, 0.9, 2.0, None):
        replayed = FitMemo(dict(memo.kept))
        assert fit(ratio, replayed) == fit(ratio, None), ratio
        assert replayed.replayed > 0


def test_sketches_spooled_during_a_build_are_the_ones_the_next_build_reads(tmp_path: Path, tiny_model: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # The signatures go to a spool file as each set asks for them (not held until the build saves); the saved
    # file must give every key the sketch of its own text, each key once, and leave no spool behind.
    import subprocess
    import sys

    import numpy as np

    from pipelines.datasets import cache as cache_module
    from pipelines.datasets.cache import BuildCache
    from pipelines.datasets.quality import sketch

    monkeypatch.setattr(cache_module, "COPY_BLOCK", 7)  # stored signatures gathered in many blocks

    tokenizer = load_base_tokenizer(str(tiny_model))
    folder = tmp_path / "team-payments"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (folder / f".sketches.{dead}.1.spool").write_bytes(b"left by a killed build")
    texts = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" * (1 + i % 3) for i in range(40)]
    rows = [(t, exact_key(t)) for t in texts]
    first = BuildCache(folder, CFG, tokenizer.fim, tokenizer.fingerprint())
    assert not list(folder.glob(".sketches.*.spool"))  # the dead build's spool is gone
    a = first.sketches(0, rows[:30], lambda t: t)
    b = first.sketches(0, rows[20:], lambda t: t)  # 10 keys asked again
    c = first.sketches(1, rows[:5], lambda t: t[::-1])  # another text of the same rows
    assert list(folder.glob(".sketches.*.spool"))
    first.save()
    assert not list(folder.glob(".sketches.*.spool"))
    again = BuildCache(folder, CFG, tokenizer.fim, tokenizer.fingerprint())
    assert len(again.sketches.index) == 55  # spooled as asked: the 10 keys asked twice are stored twice
    for tag, part, text, got in ((0, rows[:30], texts[:30], a), (0, rows[20:], texts[20:], b),
                                 (1, rows[:5], [t[::-1] for t in texts[:5]], c)):
        assert np.array_equal(got, sketch(text))
        assert np.array_equal(again.sketches(tag, part, lambda t: t), got)  # the stored rows, not recomputed
    assert again.sketches.computed == 0 and again.sketches.hits == 30 + 20 + 5
    # Stored and new rows mixed: each gets its own text's sketch
    mixed = rows[33:] + [(t, exact_key(t)) for t in ("def g(): pass\n", "x = 1\n" * 9)] + rows[:12]
    assert np.array_equal(again.sketches(0, mixed, lambda t: t), sketch([t for t, _ in mixed]))
    assert again.sketches.computed == 2 and again.sketches.hits == 30 + 20 + 5 + 7 + 12


def test_the_sketch_key_index_finds_what_a_dict_finds() -> None:
    # Keys are looked up by their first 8 bytes, then checked whole: keys sharing those 8 bytes, keys present
    # twice, and keys absent must come out as a dict of the same keys gives them.
    from pipelines.datasets.cache import KEY_BYTES, KeyIndex

    rng = random.Random(7)
    stored = [bytes([rng.randrange(10)]) + rng.randbytes(KEY_BYTES - 1) for _ in range(2000)]
    stored += [stored[i][:8] + rng.randbytes(KEY_BYTES - 8) for i in range(0, 2000, 50)]  # a shared prefix
    stored += [stored[i] for i in range(3, 2000, 97)]  # present twice: the first one is found
    rng.shuffle(stored)
    first: dict[bytes, int] = {}
    for j, k in enumerate(stored):
        first.setdefault(k, j)
    asked = [rng.choice(stored) for _ in range(3000)]
    asked += [k[:8] + rng.randbytes(KEY_BYTES - 8) for k in asked[:300]]  # absent, a stored key's prefix
    asked += [rng.randbytes(KEY_BYTES) for _ in range(300)]  # absent
    found = KeyIndex(b"".join(stored)).find(b"".join(asked)).tolist()
    assert found == [first.get(k, -1) for k in asked]
    assert KeyIndex(b"").find(b"".join(asked[:3])).tolist() == [-1, -1, -1]


def test_a_fit_trace_past_int32_is_not_remembered() -> None:
    # Traces are packed as int32 (352 MB of tuples at 1M suggestions); a row too big to pack is fitted again
    # next time rather than stored wrong.
    from pipelines.datasets.quality import _replay, pack_trace

    trace = pack_trace([(5000, 10, 700, 3000, 900), (2500, 10, -1, 2250, 675)], False)
    assert trace is not None and _replay(trace, 0.2, 512) == (1, True, "tokenized")  # 700 tokens, then 2500 * 0.2
    assert pack_trace([(2**31, 0, -1, 0, 0)], False) is None


def test_a_cache_file_written_in_parts_reads_back_whole(tmp_path: Path) -> None:
    """Committed rows and fit traces are marshalled a part at a time (a single dump of a 1M-suggestion build's
    added ~150 MB to its peak); reading joins the parts, and a file cut short is not half-believed."""
    from pipelines.datasets.cache import BuildCache, _dumped
    from pipelines.tokens import FAMILIES, FimTokens

    family, _, (pre, suf, mid), eos, spm = FAMILIES[0]
    fim = FimTokens(family, pre, suf, mid, eos or "<|endoftext|>", spm_supported=spm)
    cache = BuildCache(tmp_path, CFG, fim, "tok")
    entries = {(f"{i:040x}", f"src/m{i}.py"): ("alice", [(f"r{i}", "p" * i, "s", "m", "psm")], {"dup": i % 3})
               for i in range(1000)}
    for per_part, parts in ((7, 143), (1000, 1), (4096, 1)):
        dumped = list(_dumped(entries, per_part))
        assert len(dumped) == parts
        cache._write("committed.marshal", dumped)
        assert cache._load("committed.marshal") == entries
    cache._write("fits.marshal", _dumped({}))
    assert cache._load("fits.marshal") == {}
    whole = (tmp_path / "committed.marshal").read_bytes()
    (tmp_path / "committed.marshal").write_bytes(whole[: len(whole) - 100])
    assert cache._load("committed.marshal") == {}
