"""Every dataset of one scope, written into one folder: the files a run directory's data/ holds.

This is the single entry point the cycle and `devtune dataset build` call. In order:
  1. link       accepted suggestions to their developer's commits (link.py; stored, incremental)
  2. rows       each suggestion's outcome (outcomes.py), then FIM rows (sft.py), DPO pairs (dpo.py), KTO rows
                (kto.py), chat rows from edit outcomes (sft.py); rows from vendored/generated/lock/minified/
                binary files dropped (quality.py)
  3. dedup      exact duplicates within each set
  4. split      one time cutoff for the scope (split.py): FIM rows and pairs at or after it are the
                held-out set (FIM rows in PSM, the layout editors send); KTO and chat rows after it are
                not trained on
  5. near-dup   near duplicates within each set and split, then every training row near a held-out row
  6. tokens     rows fitted into max_row_tokens of the base tokenizer (context cut, middle kept)
  7. write      sft/dpo/kto/chat/heldout.jsonl and manifest.json (formats: pipelines/train/rundir.py)

Scopes: a team scope reads its members' suggestions and edits and its commits (the `team` columns); a
developer scope reads rows whose `developer` is that developer and nothing else, and links a suggestion
only to its own developer's commits, so no row of one developer reaches another developer's dataset.
Every dropped row is counted by reason in `dropped`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import orjson

from pipelines.config import DatasetsConfig
from pipelines.datasets.cache import BuildCache
from pipelines.datasets.context import Spool
from pipelines.datasets.dpo import PairExample, match_key, pair_examples, pair_row
from pipelines.datasets.kto import kto_row, kto_weights
from pipelines.datasets.link import link_suggestions
from pipelines.datasets.outcomes import Outcome, Side, clip_prefix, clip_suffix, outcomes, sides
from pipelines.datasets.paths import PathIndex
from pipelines.datasets.quality import (
    NEAR_PREFIX_CHARS,
    NEAR_SUFFIX_CHARS,
    RowTexts,
    TokenCounts,
    calibrate,
    drop_exact_duplicates,
    exact_key,
    fit_tokens,
    keyed_unique,
    near_duplicates,
    near_duplicates_of,
    near_text,
    sketch,
    text_size,
)
from pipelines.datasets.sft import (
    ChatExample,
    FimExample,
    accepted_examples,
    chat_row,
    committed_examples,
    edit_examples,
    fim_prompt,
    fim_row,
)
from pipelines.datasets.split import heldout_cutoff, split_at
from pipelines.progress import Progress, format_seconds, peak_rss_mb
from pipelines.scope import Scope
from pipelines.store.db import Store, now
from pipelines.tokens import BaseTokenizer, FimTokens
from pipelines.train.rundir import Lines, new_lines, write_line_index

log = logging.getLogger("devtune.datasets")

T = TypeVar("T")
Ctx = TypeVar("Ctx", FimExample, PairExample, Side)  # rows with a prefix and suffix to cut
# A chat template wraps the two turns in role markers (Qwen2.5's adds ~20 tokens with its default system
# turn): rows are fitted into max_row_tokens minus this.
CHAT_TEMPLATE_TOKENS = 32
# What a row's fit trace is remembered under, besides its exact_key: its kind, and a FIM row's layout.
_FIT_TAGS = {("FimExample", "psm"): b"\x00", ("FimExample", "spm"): b"\x01", ("PairExample", ""): b"\x02",
             ("Side", ""): b"\x03"}
FILES = ("sft.jsonl", "dpo.jsonl", "kto.jsonl", "chat.jsonl", "heldout.jsonl")


@dataclass(frozen=True)
class DatasetReport:
    """What a dataset build wrote, or why the scope was skipped."""

    scope: str
    out_dir: str
    train_rows: int  # sft.jsonl rows
    heldout_rows: int  # heldout.jsonl rows (FIM rows and pairs)
    counts: dict[str, dict[str, int]]  # split -> signal -> rows: "train" = sft.jsonl, "heldout" (pairs: "pair")
    dropped: dict[str, int]  # reason -> rows
    sha256: str
    skipped: str  # "" when the dataset is usable, else why it is not
    files: dict[str, dict[str, int]]  # file -> signal -> rows, for every file written
    kto: dict[str, float]  # desirable_weight, undesirable_weight (TRL KTOConfig)
    links: dict[str, int]  # the scope's accepted suggestions by link status
    seconds: dict[str, float]  # stage -> seconds
    # The `ts` of every training row written (sft, dpo, kto, chat), for the cycle's count of rows newer than
    # the served adapter's: reading the files back for it took 0.84 s at 100k stored suggestions
    # (bench/nightly_growth.py). Not part of as_dict (the run summary, the manifest).
    train_ts: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        # Not asdict(self): it deep-copies train_ts too (51k stamps at 100k stored suggestions, 0.26 s)
        return {k: v for k, v in asdict(replace(self, train_ts=())).items() if k != "train_ts"}


def build_datasets(store: Store, scope: Scope, cfg: DatasetsConfig, tokenizer: BaseTokenizer,
                   out_dir: Path, cache_dir: Path | None = None) -> DatasetReport:
    """Write the scope's datasets and manifest.json into `out_dir`; `report.skipped` says why not, if not.
    `cache_dir` (state_dir/cache/datasets) keeps what the next build of the scope can reuse
    (pipelines.datasets.cache); the rows are the same with it or without."""
    # A build makes millions of small acyclic records; the cyclic collector would rescan them all again and
    # again as they pile up (creating 1M records plus 1M dicts took 3.5 s with it, 2.6 s without).
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    spool = Spool(out_dir.parent, match_key)  # the rows' contexts, on disk while the build runs (context.py)
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _build(store, scope, cfg, tokenizer, out_dir, cache_dir, spool)
    finally:
        spool.close()
        if collecting:
            gc.enable()


def _build(store: Store, scope: Scope, cfg: DatasetsConfig, tokenizer: BaseTokenizer, out_dir: Path,
           cache_dir: Path | None, spool: Spool) -> DatasetReport:
    seconds: dict[str, float] = {}
    clock = _Clock(seconds, str(scope))
    fim_tokens = tokenizer.fim
    link = link_suggestions(store, cfg, out_dir.parent)  # its spool beside the contexts'
    store.release_cache()  # the link pass's reads (600 MB of cached blocks at 1M suggestions) are not read again
    clock.lap("link")
    cache = BuildCache(None if cache_dir is None else cache_dir / str(scope).replace(":", "-"), cfg, fim_tokens,
                       tokenizer.fingerprint())

    dropped: Counter[str] = Counter()
    index = PathIndex.build(store.repo_paths())
    progress = Progress(log, f"dataset {scope}: read suggestions", store.count_scope_suggestions(scope), "rows")
    suggestions = _advancing(store.scope_suggestions(scope, cfg.max_prefix_chars, cfg.max_suffix_chars), progress)
    items = list(outcomes(suggestions, index, cfg, dropped, spool))
    items.sort(key=_shown)  # the store streams them unsorted (Store.scope_suggestions); every set is oldest first
    progress.finish()
    fim = list(accepted_examples(items, dropped))
    if cache.folder is None:
        fim += committed_examples(store.committed_files(scope), cfg, fim_tokens, dropped, spool)
    else:
        fim += cache.committed_examples(store.committed_file_keys(scope),
                                        lambda shas: store.committed_files(scope, shas), cfg, fim_tokens, dropped)
    pairs, kto = pair_examples(sides(items), cfg.max_pairs_per_context, dropped)  # the unpaired sides: KTO
    chat = list(edit_examples(store.scope_edit_outcomes(scope), dropped))
    links = dict(Counter(o.link for o in items if o.accepted))
    shown = len(items)
    accept_rate = sum(o.accepted for o in items) / shown if shown else 0.0
    del items
    store.release_cache()  # every suggestion was read: their blocks stay cached otherwise (420 MB at 1M)
    clock.lap("rows")

    fim_k = keyed_unique(fim, lambda e: e.context.key(e.middle), dropped)
    pairs_k = keyed_unique(pairs, lambda p: p.context.key(p.chosen, p.rejected), dropped)
    kto_k = keyed_unique(kto, lambda k: k.context.key(k.text, str(k.desirable)), dropped)
    chat = drop_exact_duplicates(chat, lambda c: exact_key(c.user, c.assistant), dropped)
    del fim, pairs, kto
    clock.lap("dedup")

    cutoff = heldout_cutoff([e.ts for e, _ in fim_k] + [p.ts for p, _ in pairs_k] + [k.ts for k, _ in kto_k],
                            cfg.heldout_fraction, cfg.heldout_days)
    fim_train_k, fim_held_k = split_at(fim_k, _keyed_ts, cutoff)
    pair_train_k, pair_held_k = split_at(pairs_k, _keyed_ts, cutoff)
    kto_train_k, kto_late = split_at(kto_k, _keyed_ts, cutoff)
    chat_train, chat_late = split_at(chat, _ts, cutoff)
    dropped["after_heldout_cutoff"] += len(kto_late) + len(chat_late)
    del fim_k, pairs_k, kto_k, chat
    clock.lap("split")

    fim_train_k, fim_held_k, pair_train_k, pair_held_k, kto_train_k = drop_near_duplicates(
        fim_train_k, fim_held_k, pair_train_k, pair_held_k, kto_train_k, cfg.near_dup_threshold, dropped,
        sketch_all if cache.folder is None else cache.sketches)
    fim_held_k = [(replace(e, order="psm"), k) if e.order != "psm" else (e, k) for e, k in fim_held_k]
    clock.lap("near_dup")

    counted: Counter[str] = Counter()
    fingerprint = tokenizer.fingerprint()
    counts = TokenCounts(tokenizer, lambda hashes: store.token_counts(fingerprint, hashes))
    ratio = None if cfg.exact_token_counts else calibrate(
        [_fim_text(e, fim_tokens.psm(*e.context.texts()), fim_tokens.eos)
         for e, _ in _spread(fim_train_k + fim_held_k)]
        + [kto_text(k, fim_tokens) for k, _ in _spread(kto_train_k)], counts)

    def fit(rows: Keyed[Ctx], middle: Callable[[Ctx], str], render: Callable[[Ctx], str], cap: int) -> list[Ctx]:
        plain = [r for r, _ in rows]

        def size(row: Ctx) -> tuple[int, int]:  # the context's size without reading it, when it is ASCII
            n, extra = row.context.size()
            more, more_extra = text_size(middle(row), sentinels)
            return n + more, extra + more_extra

        if cache.folder is None:
            return fit_tokens(plain, size, render, _shrink, counts, cap, ratio, dropped, counted)
        # A FIM row's layout is part of what is tokenized, and not of its exact_key
        keys = [_FIT_TAGS[type(r).__name__, getattr(r, "order", "")] + k for r, k in rows]
        return fit_tokens(plain, size, render, _shrink, counts, cap, ratio, dropped, counted, cache.fits, keys,
                          _cut)

    cap = cfg.max_row_tokens
    sentinels = fim_tokens.psm("", "") + fim_tokens.eos  # the same characters in either layout

    def fim_render(e: FimExample) -> str:
        return _fim_text(e, fim_prompt(e, fim_tokens), fim_tokens.eos)

    fim_train = fit(fim_train_k, _middle, fim_render, cap)
    fim_held = fit(fim_held_k, _middle, fim_render, cap)
    pair_train = fit(pair_train_k, _longer_side, lambda p: pair_text(p, fim_tokens), cap)
    pair_held = fit(pair_held_k, _longer_side, lambda p: pair_text(p, fim_tokens), cap)
    kto_train = fit(kto_train_k, _kto_middle, lambda k: kto_text(k, fim_tokens), cap)
    del fim_train_k, fim_held_k, pair_train_k, pair_held_k, kto_train_k
    chat_train = fit_tokens(chat_train, lambda c: text_size(c.user, "\n", c.assistant),
                            lambda c: c.user + "\n" + c.assistant, _no_shrink, counts, cap - CHAT_TEMPLATE_TOKENS,
                            ratio, dropped, counted)
    store.save_token_counts(fingerprint, counts.new)
    clock.lap("tokens")
    cache.save()

    desirable = sum(k.desirable for k in kto_train)
    weights = kto_weights(desirable, len(kto_train) - desirable)
    heldout_rows = len(fim_held) + len(pair_held)
    train_total = len(fim_train) + len(pair_train) + len(kto_train) + len(chat_train)
    skipped = ""
    if scope.kind == "dev" and train_total < cfg.min_dev_examples:
        skipped = (f"{train_total} training rows of {scope.name} (SFT, DPO, KTO and chat together), fewer than "
                   f"[datasets] min_dev_examples = {cfg.min_dev_examples}")
    elif len(fim_train) < cfg.min_train_rows:
        skipped = f"{len(fim_train)} training rows, fewer than [datasets] min_train_rows = {cfg.min_train_rows}"
    elif heldout_rows < cfg.min_heldout_rows:
        skipped = f"{heldout_rows} held-out rows, fewer than [datasets] min_heldout_rows = {cfg.min_heldout_rows}"

    heldout = sorted([(e.ts, e.id, e) for e in fim_held] + [(p.ts, p.id, p) for p in pair_held],
                     key=lambda t: (t[0], t[1]))
    rows: dict[str, Iterable[dict[str, Any]]] = {
        "sft.jsonl": (fim_row(e, fim_tokens) for e in fim_train),
        "dpo.jsonl": (pair_row(p, fim_tokens) for p in pair_train),
        "kto.jsonl": (kto_row(k, fim_tokens) for k in kto_train),
        "chat.jsonl": (chat_row(c) for c in chat_train),
        "heldout.jsonl": (fim_row(r, fim_tokens) if isinstance(r, FimExample) else pair_row(r, fim_tokens, kind="pair")
                          for _, _, r in heldout),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    files: dict[str, dict[str, int]] = {}
    lines: dict[str, Lines] = {}  # each training file's lines (pipelines.train.rundir.LINE_INDEX)
    for name in FILES:
        if name != "heldout.jsonl":
            lines[name] = new_lines()
        files[name] = write_jsonl(out_dir / name, rows[name], digest, lines.get(name))
    write_line_index(out_dir, lines)
    train_ts = [t for _, _, stamps in lines.values() for t in stamps]
    clock.lap("write")

    held_counts = Counter(e.signal for e in fim_held)
    if pair_held:
        held_counts["pair"] = len(pair_held)
    report = DatasetReport(
        scope=str(scope), out_dir=str(out_dir), train_rows=len(fim_train), heldout_rows=heldout_rows,
        counts={"train": dict(sorted(Counter(e.signal for e in fim_train).items())),
                "heldout": dict(sorted(held_counts.items()))},
        dropped={k: n for k, n in sorted(dropped.items()) if n}, sha256=digest.hexdigest(), skipped=skipped,
        files=files,
        kto={"desirable_weight": weights[0], "undesirable_weight": weights[1]}, links=dict(sorted(links.items())),
        seconds=seconds, train_ts=tuple(train_ts),
    )
    manifest = {
        **report.as_dict(), "base_model": tokenizer.name, "fim_family": fim_tokens.family,
        "spm": fim_tokens.spm_supported, "max_row_tokens": cfg.max_row_tokens, "created_at": now().isoformat(),
        "heldout_cutoff": cutoff.isoformat() if cutoff else None, "accept_rate": round(accept_rate, 4),
        "suggestions": shown, "link_pass": link.as_dict(), "token_counts": dict(counted),
        "token_count_cache": {"known": counts.hits, "tokenized": len(counts.new)}, "build_cache": cache.stats(),
        "served_by": store.served_for_scope(scope),
        "kto": {**report.kto, "desirable": desirable, "undesirable": len(kto_train) - desirable},
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("dataset %s: %d SFT, %d DPO, %d KTO, %d chat training rows, %d held out%s (%s)", scope,
             len(fim_train), len(pair_train), len(kto_train), len(chat_train), heldout_rows,
             f"; skipped: {skipped}" if skipped else "", format_seconds(sum(seconds.values())))
    return report


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]], digest: Any, lines: Lines | None = None) -> dict[str, int]:
    """Write rows one per line, streaming (a million rows of 2 KB would otherwise sit in memory twice), adding
    the bytes to `digest` and each line's offset, length and `ts` to `lines`; returns the rows written per signal.

    Lines are orjson's compact JSON (UTF-8, keys in the order built): `json.dumps` took 16 of the 31 s this
    stage took for 2.5 GB. Hashing and writing a batch (both release the GIL) run in a second thread while
    the next batch is serialised; one batch in flight keeps the order and bounds the memory.
    """
    counts: Counter[str] = Counter()
    tmp = path.with_name(f".{path.name}.tmp")

    def put(data: bytes) -> None:
        digest.update(data)
        f.write(data)

    with tmp.open("wb") as f, ThreadPoolExecutor(1) as writer:
        pending: Future[None] | None = None
        batch: list[bytes] = []
        at = 0
        for r in rows:
            counts[r["signal"]] += 1
            line = orjson.dumps(r)
            if lines is not None:
                lines[0].append(at)
                lines[1].append(len(line))
                lines[2].append(r["ts"])
                at += len(line) + 1
            batch.append(line)
            if len(batch) >= 1000:
                batch.append(b"")  # the last line's end
                if pending is not None:
                    pending.result()
                pending = writer.submit(put, b"\n".join(batch))
                batch = []
        if pending is not None:
            pending.result()
        if batch:
            batch.append(b"")
            put(b"\n".join(batch))
    tmp.replace(path)
    return dict(sorted(counts.items()))


Keyed = list[tuple[T, bytes]]  # rows with their exact_key (quality.keyed_unique)


class Sketcher(Protocol):
    """The near-duplicate sketches of `text(row)` for keyed rows; `tag` tells a row's texts apart (a cache)."""

    def __call__(self, tag: int, rows: Sequence[tuple[T, bytes]], text: Callable[[T], str]) -> np.ndarray: ...


def sketch_all(tag: int, rows: Sequence[tuple[T, bytes]], text: Callable[[T], str]) -> np.ndarray:
    return sketch(RowTexts(rows, text))


def drop_near_duplicates(fim_train: Keyed[FimExample], fim_held: Keyed[FimExample], pair_train: Keyed[PairExample],
                         pair_held: Keyed[PairExample], kto_train: Keyed[Side], threshold: float,
                         dropped: Counter[str], sketches: Sketcher = sketch_all) -> tuple[
                             Keyed[FimExample], Keyed[FimExample], Keyed[PairExample], Keyed[PairExample],
                             Keyed[Side]]:
    """Near duplicates within each set and split (the earliest row stays), then every training row that is a
    near duplicate of a held-out FIM row or of either side of a held-out pair (pipelines.datasets.quality).

    The held-out rows are sketched first, into the reference every training row is checked against; then each
    training set (KTO one label at a time) is sketched, checked and let go before the next. Sketching every set
    at once, then copying KTO's per label, held ~1 GB of signatures at a 1M-suggestion build's peak."""
    near = 0
    held_sig, held_mid = sketches(0, fim_held, _fim_near), sketches(1, fim_held, _middle)
    keep_held = ~near_duplicates(held_sig, held_mid, threshold)
    keep_pair_held = ~near_duplicates(sketches(2, pair_held, _pair_near), sketches(3, pair_held, _pair_middle),
                                      threshold)
    near += int((~keep_held).sum() + (~keep_pair_held).sum())
    held = [r for r, k in zip(pair_held, keep_pair_held.tolist(), strict=True) if k]
    ref = np.concatenate([held_sig[keep_held], sketches(4, held, _chosen_near), sketches(6, held, _rejected_near)])
    ref_mid = np.concatenate([held_mid[keep_held], sketches(5, held, _chosen), sketches(7, held, _rejected)])
    del held_sig, held_mid

    def leaks(rows: Keyed[T], text: Callable[[T], str], middle: Callable[[T], str], tag: int) -> np.ndarray:
        return near_duplicates_of(sketches(tag, rows, text), sketches(tag + 1, rows, middle), ref, ref_mid, threshold)

    sig, mid = sketches(0, fim_train, _fim_near), sketches(1, fim_train, _middle)
    keep_train = ~near_duplicates(sig, mid, threshold)
    leak_fim = keep_train & near_duplicates_of(sig, mid, ref, ref_mid, threshold)
    del sig, mid
    keep_pair_train = ~near_duplicates(sketches(2, pair_train, _pair_near), sketches(3, pair_train, _pair_middle),
                                       threshold)
    leak_pair = keep_pair_train & (leaks(pair_train, _chosen_near, _chosen, 4)
                                   | leaks(pair_train, _rejected_near, _rejected, 6))
    near += int((~keep_train).sum() + (~keep_pair_train).sum())

    keep_kto = np.ones(len(kto_train), dtype=bool)
    leak_kto = np.zeros(len(kto_train), dtype=bool)
    labels = np.array([k.desirable for k, _ in kto_train], dtype=bool)
    for label in (True, False):  # a desirable and an undesirable row may share text: that is not a repeat
        at = np.flatnonzero(labels == label)
        rows = [kto_train[i] for i in at.tolist()]
        sig, mid = sketches(8, rows, _kto_near), sketches(9, rows, _kto_middle)
        dup = near_duplicates(sig, mid, threshold)
        keep_kto[at[dup]] = False
        leak_kto[at] = ~dup & near_duplicates_of(sig, mid, ref, ref_mid, threshold)
        del sig, mid
    near += int((~keep_kto).sum())
    dropped["near_duplicate"] += near
    dropped["near_duplicate_of_heldout"] += int(leak_fim.sum() + leak_pair.sum() + leak_kto.sum())
    return (_take(fim_train, keep_train & ~leak_fim), _take(fim_held, keep_held),
            _take(pair_train, keep_pair_train & ~leak_pair), _take(pair_held, keep_pair_held),
            _take(kto_train, keep_kto & ~leak_kto))


# The texts near-duplicates are found in: a row's window (prefix, middle, suffix) and its middle alone.
def _fim_near(e: FimExample) -> str:
    prefix, suffix = e.context.ends(NEAR_PREFIX_CHARS, NEAR_SUFFIX_CHARS)
    return near_text(prefix, e.middle, suffix)


def _middle(e: FimExample) -> str:
    return e.middle


def _pair_near(p: PairExample) -> str:
    prefix, suffix = p.context.ends(NEAR_PREFIX_CHARS, NEAR_SUFFIX_CHARS)
    return near_text(prefix, _pair_middle(p), suffix)


def _pair_middle(p: PairExample) -> str:
    return p.chosen + "\x02" + p.rejected


def _chosen_near(p: PairExample) -> str:
    prefix, suffix = p.context.ends(NEAR_PREFIX_CHARS, NEAR_SUFFIX_CHARS)
    return near_text(prefix, p.chosen, suffix)


def _rejected_near(p: PairExample) -> str:
    prefix, suffix = p.context.ends(NEAR_PREFIX_CHARS, NEAR_SUFFIX_CHARS)
    return near_text(prefix, p.rejected, suffix)


def _chosen(p: PairExample) -> str:
    return p.chosen


def _rejected(p: PairExample) -> str:
    return p.rejected


def _kto_near(k: Side) -> str:
    prefix, suffix = k.context.ends(NEAR_PREFIX_CHARS, NEAR_SUFFIX_CHARS)
    return near_text(prefix, k.text, suffix)


def _kto_middle(k: Side) -> str:
    return k.text


def _longer_side(p: PairExample) -> str:
    """The longer of a pair's two completions: the one its row's size is bounded by."""
    return max(p.chosen, p.rejected, key=len)


def _advancing(rows: Iterable[T], progress: Progress) -> Iterator[T]:
    """`rows`, advancing `progress` as they are read (it logs rate and ETA every few seconds)."""
    for i, r in enumerate(rows, 1):
        if i % 10_000 == 0:
            progress.advance(10_000)
        yield r
    progress.advance(progress.total - progress.done if progress.total else 0)


def _take(rows: Keyed[T], keep: np.ndarray) -> Keyed[T]:
    return [r for r, k in zip(rows, keep.tolist(), strict=True) if k]


def _shown(o: Outcome) -> tuple[datetime, str]:
    return o.ts, o.id


def _ts(row: FimExample | PairExample | Side | ChatExample) -> Any:
    return row.ts


def _keyed_ts(row: tuple[FimExample | PairExample | Side, bytes]) -> Any:
    return row[0].ts


def _spread(rows: list[T], k: int = 500) -> list[T]:
    if len(rows) <= k:
        return rows
    step = len(rows) / k
    return [rows[int(i * step)] for i in range(k)]


def _fim_text(e: FimExample, prompt: str, eos: str) -> str:
    return prompt + e.middle + eos


def pair_text(p: PairExample, fim: FimTokens) -> str:
    """The longer of a pair's two rows: the one the cap must hold."""
    return fim.psm(*p.context.texts()) + _longer_side(p) + fim.eos


def kto_text(k: Side, fim: FimTokens) -> str:
    return fim.psm(*k.context.texts()) + k.text + fim.eos


def _shrink(row: Ctx) -> Ctx | None:
    """The row with 3/4 of its context, or None when it has none left to cut."""
    if row.context.lengths() == (0, 0):
        return None
    prefix, suffix = row.context.texts()
    return _cut(row, len(clip_prefix(prefix, len(prefix) * 3 // 4)), len(clip_suffix(suffix, len(suffix) * 3 // 4)))


def _cut(row: Ctx, prefix_len: int, suffix_len: int) -> Ctx:
    """The row with the last `prefix_len` characters of its prefix and the first `suffix_len` of its suffix: where
    `_shrink` rounds leave it (clip_prefix and clip_suffix keep an end of the text).

    `dataclasses.replace(row, context=...)` for these frozen dataclasses (no __post_init__) without going through
    `replace`'s checks: 1.4 against 3.6 µs, and a 100k-suggestion build cuts 137k rows."""
    new = object.__new__(type(row))
    for name in row.__slots__:
        object.__setattr__(new, name, getattr(row, name))
    object.__setattr__(new, "context", row.context.cut(prefix_len, suffix_len))
    return new


def _no_shrink(row: ChatExample) -> None:
    return None


class _Clock:
    """Seconds per stage, logged as they finish."""

    def __init__(self, seconds: dict[str, float], scope: str):
        self.seconds, self.scope, self.last = seconds, scope, time.monotonic()

    def lap(self, stage: str) -> None:
        t = time.monotonic()
        self.seconds[stage] = round(t - self.last, 3)
        self.last = t
        # The memory as each stage ends says which one holds it (a 1M-suggestion build peaks at several GB).
        peak = peak_rss_mb()
        log.info("dataset %s: %s done in %s (resident %s MB, peak %.0f MB)", self.scope, stage,
                 format_seconds(self.seconds[stage]), _resident_mb(), peak)


def _resident_mb() -> str:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return "?"  # not Linux
    return f"{pages * os.sysconf('SC_PAGE_SIZE') / 2**20:.0f}"
