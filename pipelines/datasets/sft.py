"""FIM SFT rows for one scope: what developers kept, plus middles cut from the scope's committed code.

A FIM row is a prompt in the base tokenizer's own FIM tokens and the middle the model should write, ended
with its end token. Its `signal` says where the middle comes from:
  - "kept": an accepted suggestion found in its developer's next commits (pipelines.datasets.link);
  - "rewritten": the committed text that replaced an accepted suggestion (the developer's version wins);
  - "accepted": an accepted suggestion with no commit to check it against (link unknown) - still the
    developer's choice at the time;
  - "committed": a span of lines a commit added, with the file around it as context, so a team with few
    IDE events still gets its own code and conventions. Middles are 1..max_middle_lines lines, or (a
    `block_fraction` share) the body of an indented block whose header stays in the prefix; a
    `spm_fraction` share is laid out suffix-first (SPM) when the base model's family was trained on it.
Accepted suggestions that were later deleted, and the suggested text of rewritten ones, are never SFT
targets: they become DPO rejections or KTO undesirable rows (pipelines.datasets.dpo, pipelines.datasets.kto).

Continue Edit-mode and Next Edit outcomes that were accepted become chat rows (signal "edit"): the
instruction and the code before as the user turn, the code after as the assistant turn.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipelines.config import DatasetsConfig
from pipelines.datasets.context import Context, Spool, WithContext, spool_or_text
from pipelines.datasets.outcomes import Outcome, clip_prefix, clip_suffix
from pipelines.datasets.paths import path_parts
from pipelines.datasets.quality import file_problem
from pipelines.store.records import CommittedFile, EditRecord
from pipelines.tokens import FimTokens

NEXT_EDIT_INSTRUCTION = "Make the next edit to this code."


@dataclass(frozen=True, slots=True)
class FimExample(WithContext):
    id: str
    signal: str  # "kept" | "rewritten" | "accepted" | "committed"
    developer: str
    ts: datetime
    path: str
    context: Context
    middle: str
    order: str = "psm"  # "psm" | "spm"


@dataclass(frozen=True, slots=True)
class ChatExample:
    id: str
    signal: str  # "edit"
    developer: str
    ts: datetime
    path: str
    user: str
    assistant: str


def accepted_examples(items: Iterable[Outcome], dropped: Counter[str]) -> Iterator[FimExample]:
    """FIM rows whose middle is what the developer kept."""
    for o in items:
        if not o.accepted or o.link == "deleted":
            continue
        if o.link == "rewritten":
            if o.committed_text is None:
                dropped["rewrite_not_aligned"] += 1
                continue
            signal, middle = "rewritten", o.committed_text
        else:
            signal, middle = ("kept" if o.link == "kept" else "accepted"), o.text
        yield FimExample(id=o.id, signal=signal, developer=o.developer, ts=o.ts, path=o.path, context=o.context,
                         middle=middle)


def committed_examples(files: Iterable[CommittedFile], cfg: DatasetsConfig, fim: FimTokens,
                       dropped: Counter[str], spool: Spool | None = None) -> Iterator[FimExample]:
    """Up to `fim_spans_per_file` middles per (commit, file), cut from the lines that commit added; their
    contexts are written to `spool` when there is one."""
    for f in files:
        lines = f.content.splitlines(keepends=True)
        ranges = [(a, min(b, len(lines))) for a, b in f.added if a <= len(lines)]
        if not ranges:
            continue
        rng = random.Random(f"{cfg.seed}:{f.sha}:{f.path}")
        spans = _spans(lines, ranges, cfg, rng)
        problem = file_problem(f.path, f.content)
        if problem is not None:
            dropped[problem] += len(spans)
            continue
        for start, end in spans:  # 1-based, inclusive: the middle is lines[start-1:end]
            middle = "".join(lines[start - 1: end])
            if not middle.strip():
                dropped["empty_middle"] += 1
                continue
            order = "spm" if fim.spm_supported and rng.random() < cfg.spm_fraction else "psm"
            yield FimExample(
                id=f"{f.sha}:{f.path}:{start}-{end}", signal="committed", developer=f.developer,
                ts=f.committed_at, path=f.path,
                context=spool_or_text(spool, clip_prefix("".join(lines[: start - 1]), cfg.max_prefix_chars),
                                      clip_suffix("".join(lines[end:]), cfg.max_suffix_chars)),
                middle=middle, order=order,
            )


def _spans(lines: list[str], ranges: list[tuple[int, int]], cfg: DatasetsConfig,
           rng: random.Random) -> list[tuple[int, int]]:
    """Distinct (start, end) line spans inside the added ranges: blocks for a `block_fraction` share of the
    draws (when the file has any), else 1..max_middle_lines lines."""
    blocks: list[tuple[int, int]] | None = None
    out: list[tuple[int, int]] = []
    for _ in range(cfg.fim_spans_per_file):
        span = None
        if rng.random() < cfg.block_fraction:
            if blocks is None:
                blocks = block_bodies(lines, ranges, cfg.max_block_lines)
            if blocks:
                span = rng.choice(blocks)
        if span is None:
            first, last = rng.choices(ranges, weights=[b - a + 1 for a, b in ranges])[0]
            start = rng.randint(first, last)
            span = (start, min(last, start + rng.randint(1, cfg.max_middle_lines) - 1))
        if span not in out:
            out.append(span)
    return out


def block_bodies(lines: list[str], ranges: list[tuple[int, int]], max_lines: int) -> list[tuple[int, int]]:
    """(first, last) 1-based lines of each indented block body lying inside one added range: the lines
    after a header line that are indented deeper than it (blank lines inside included), at most `max_lines`.
    Indentation, not syntax, so it works for Python and for brace languages written with indentation."""
    out = []
    for first, last in ranges:
        for h in range(first, last):  # h: 1-based header line; its body starts at h+1
            header = lines[h - 1]
            if not header.strip():
                continue
            depth = _indent(header)
            end = h
            for j in range(h + 1, last + 1):
                line = lines[j - 1]
                if line.strip() and _indent(line) <= depth:
                    break
                end = j
            while end > h and not lines[end - 1].strip():
                end -= 1
            if end > h and end - h <= max_lines and any(_indent(lines[j - 1]) > depth for j in range(h + 1, end + 1)
                                                        if lines[j - 1].strip()):
                out.append((h + 1, end))
    return out


def _indent(line: str) -> int:
    return len(line.expandtabs(4)) - len(line.expandtabs(4).lstrip())


def edit_examples(rows: Iterable[EditRecord], dropped: Counter[str]) -> Iterator[ChatExample]:
    """Chat rows from accepted Continue edit outcomes (`Store.scope_edit_outcomes`)."""
    for r in rows:
        if not r.accepted:
            continue
        before, after = r.before_text, r.after_text
        if before is None or after is None:
            dropped["edit_without_code"] += 1
            continue
        if before == after:
            dropped["edit_without_change"] += 1
            continue
        parts = path_parts(r.filepath)
        problem = file_problem("/".join(parts), after)
        if problem is not None:
            dropped[problem] += 1
            continue
        instruction = (r.instruction or "").strip() or NEXT_EDIT_INSTRUCTION
        shown = "/".join(parts[-2:])
        yield ChatExample(
            id=r.id, signal="edit", developer=r.developer, ts=r.decided_at, path=shown,
            user=f"{instruction}\n\n{shown}:\n```\n{before}\n```", assistant=f"```\n{after}\n```")


def fim_prompt(e: FimExample, fim: FimTokens) -> str:
    prefix, suffix = e.context.texts()
    return fim.spm(prefix, suffix) if e.order == "spm" else fim.psm(prefix, suffix)


def fim_row(e: FimExample, fim: FimTokens) -> dict[str, Any]:
    return {"kind": "fim", "id": e.id, "signal": e.signal, "developer": e.developer, "ts": e.ts.isoformat(),
            "path": e.path, "order": e.order, "prompt": fim_prompt(e, fim), "completion": e.middle + fim.eos}


def chat_row(e: ChatExample) -> dict[str, Any]:
    return {"id": e.id, "signal": e.signal, "developer": e.developer, "ts": e.ts.isoformat(), "path": e.path,
            "prompt": [{"role": "user", "content": e.user}],
            "completion": [{"role": "assistant", "content": e.assistant}]}
