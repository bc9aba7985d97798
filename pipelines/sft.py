"""FIM SFT rows for one scope: accepted suggestions, plus middles cut from the scope's committed code.

A row is a prefix-suffix-middle prompt in the base tokenizer's own FIM tokens and the middle the model
should write, ended with its end token. Two signals feed it:
  - "accepted": a suggestion the developer accepted (its raw editor prefix, suffix and completion);
  - "committed": a span of lines a commit added, with the file around it as context, so a team with few
    IDE events still gets its own code and conventions.
The most recent rows are held out (pipelines.split) and the rest written as the training set.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.config import DatasetsConfig
from pipelines.scope import Scope
from pipelines.split import drop_leaks, time_split
from pipelines.store import Store, now
from pipelines.tokens import BaseTokenizer


@dataclass(frozen=True)
class FimExample:
    id: str
    signal: str  # "accepted" | "committed"
    developer: str
    ts: datetime
    path: str
    prefix: str
    suffix: str
    middle: str


@dataclass(frozen=True)
class DatasetReport:
    """What a dataset build wrote, or why the scope was skipped."""

    scope: str
    out_dir: str
    train_rows: int
    heldout_rows: int
    counts: dict[str, dict[str, int]]  # split -> signal -> rows
    dropped: dict[str, int]  # reason -> rows
    sha256: str
    skipped: str  # "" when the dataset is usable, else why it is not

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_sft(store: Store, scope: Scope, cfg: DatasetsConfig, tokenizer: BaseTokenizer,
              out_dir: Path) -> DatasetReport:
    """Write `sft.jsonl`, `heldout.jsonl` and `manifest.json` for `scope` into `out_dir`."""
    dropped: Counter[str] = Counter()
    examples = list(accepted_examples(store.accepted_suggestions(scope), cfg, dropped))
    examples += list(committed_examples(store.committed_files(scope), cfg, dropped))
    examples = _dedupe(examples, dropped)
    examples = _cap_tokens(examples, tokenizer, cfg.max_row_tokens, dropped)
    train, heldout = time_split(examples, lambda e: e.ts, cfg.heldout_fraction)
    train, leaks = drop_leaks(train, heldout, key=lambda e: (e.prefix[-500:], e.middle))
    dropped["duplicate_of_heldout"] += leaks

    skipped = ""
    if len(train) < cfg.min_train_rows:
        skipped = f"{len(train)} training rows, fewer than [datasets] min_train_rows = {cfg.min_train_rows}"
    elif len(heldout) < cfg.min_heldout_rows:
        skipped = f"{len(heldout)} held-out rows, fewer than [datasets] min_heldout_rows = {cfg.min_heldout_rows}"

    out_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    for name, rows in (("sft.jsonl", train), ("heldout.jsonl", heldout)):
        data = "".join(json.dumps(_row(e, tokenizer), ensure_ascii=False) + "\n" for e in rows).encode()
        digest.update(data)
        (out_dir / name).write_bytes(data)
    report = DatasetReport(
        scope=str(scope), out_dir=str(out_dir), train_rows=len(train), heldout_rows=len(heldout),
        counts={"train": dict(Counter(e.signal for e in train)), "heldout": dict(Counter(e.signal for e in heldout))},
        dropped=dict(dropped), sha256=digest.hexdigest(), skipped=skipped,
    )
    manifest = {**report.as_dict(), "base_model": tokenizer.name, "fim_family": tokenizer.fim.family,
                "max_row_tokens": cfg.max_row_tokens, "created_at": now().isoformat()}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return report


def _row(e: FimExample, tokenizer: BaseTokenizer) -> dict[str, Any]:
    return {"kind": "fim", "id": e.id, "signal": e.signal, "developer": e.developer, "ts": e.ts.isoformat(),
            "path": e.path, "prompt": tokenizer.fim.psm(e.prefix, e.suffix),
            "completion": e.middle + tokenizer.fim.eos}


def clip_prefix(text: str, max_chars: int) -> str:
    """The last `max_chars` of `text`, starting at a line start when the cut falls mid-line."""
    if len(text) <= max_chars:
        return text
    clipped = text[len(text) - max_chars:]
    nl = clipped.find("\n")
    return clipped[nl + 1:] if 0 <= nl < len(clipped) - 1 else clipped


def clip_suffix(text: str, max_chars: int) -> str:
    """The first `max_chars` of `text`, ending at a line end when the cut falls mid-line."""
    if len(text) <= max_chars:
        return text
    clipped = text[:max_chars]
    nl = clipped.rfind("\n")
    return clipped[: nl + 1] if nl > 0 else clipped


def accepted_examples(rows: Iterable[dict[str, Any]], cfg: DatasetsConfig,
                      dropped: Counter[str]) -> Iterator[FimExample]:
    for r in rows:
        if not r["completion"].strip():
            dropped["empty_middle"] += 1
            continue
        yield FimExample(
            id=r["id"], signal="accepted", developer=r["developer"], ts=r["shown_at"], path=r["filepath"],
            prefix=clip_prefix(r["prefix"], cfg.max_prefix_chars),
            # Continue logs "\n" for an empty suffix; the model saw "\n" too, so keep it as logged.
            suffix=clip_suffix(r["suffix"] or "", cfg.max_suffix_chars),
            middle=r["completion"],
        )


def committed_examples(files: Iterable[dict[str, Any]], cfg: DatasetsConfig,
                       dropped: Counter[str]) -> Iterator[FimExample]:
    """Up to `fim_spans_per_file` middles per (commit, file), cut from the lines that commit added."""
    for f in files:
        lines = f["content"].splitlines(keepends=True)
        ranges = [(a, min(b, len(lines))) for a, b in f["added"] if a <= len(lines)]
        if not ranges:
            continue
        rng = random.Random(f"{cfg.seed}:{f['sha']}:{f['path']}")
        taken: set[tuple[int, int]] = set()
        for _ in range(cfg.fim_spans_per_file):
            first, last = rng.choices(ranges, weights=[b - a + 1 for a, b in ranges])[0]
            start = rng.randint(first, last)
            end = min(last, start + rng.randint(1, cfg.max_middle_lines) - 1)
            if (start, end) in taken:
                continue
            taken.add((start, end))
            middle = "".join(lines[start - 1: end])
            if not middle.strip():
                dropped["empty_middle"] += 1
                continue
            yield FimExample(
                id=f"{f['sha']}:{f['path']}:{start}-{end}", signal="committed", developer=f["developer"],
                ts=f["committed_at"], path=f["path"],
                prefix=clip_prefix("".join(lines[: start - 1]), cfg.max_prefix_chars),
                suffix=clip_suffix("".join(lines[end:]), cfg.max_suffix_chars),
                middle=middle,
            )


def _dedupe(examples: list[FimExample], dropped: Counter[str]) -> list[FimExample]:
    seen: set[tuple[str, str, str]] = set()
    out = []
    for e in examples:
        key = (e.prefix, e.suffix, e.middle)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        out.append(e)
    return out


def _cap_tokens(examples: list[FimExample], tokenizer: BaseTokenizer, max_tokens: int,
                dropped: Counter[str]) -> list[FimExample]:
    """Fit rows into `max_tokens` by shortening their context; drop a row only when its middle cannot fit.

    Continue sends at most maxPromptTokens = 1024 prompt tokens by default, so longer training contexts
    would teach the model something it never sees at inference; the middle itself is never cut.
    """
    out = list(examples)
    todo = list(range(len(out)))
    for _ in range(8):  # each round keeps 3/4 of the context: 8 rounds reach 10%
        if not todo:
            break
        counts = tokenizer.count([_text(out[i], tokenizer) for i in todo])
        over = [i for i, n in zip(todo, counts, strict=True) if n > max_tokens]
        for i in over:
            e = out[i]
            out[i] = replace(e, prefix=clip_prefix(e.prefix, len(e.prefix) * 3 // 4),
                             suffix=clip_suffix(e.suffix, len(e.suffix) * 3 // 4))
        todo = over
    if todo:
        counts = tokenizer.count([_text(out[i], tokenizer) for i in todo])
        too_long = {i for i, n in zip(todo, counts, strict=True) if n > max_tokens}
        dropped["over_max_row_tokens"] += len(too_long)
        out = [e for i, e in enumerate(out) if i not in too_long]
    return out


def _text(e: FimExample, tokenizer: BaseTokenizer) -> str:
    return tokenizer.fim.psm(e.prefix, e.suffix) + e.middle + tokenizer.fim.eos
