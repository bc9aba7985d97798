"""DPO pairs: two completions of one context, the one the developer wanted and one they did not.

The context. Two suggestions share a context when they have the same developer, the same file (its
repository path when it maps onto one, else the path as logged) and, after normalisation, the same text
around the cursor: the last `PREFIX_MATCH_CHARS` of the prefix and the first `SUFFIX_MATCH_CHARS` of the
suffix, each cut at a line boundary, with trailing whitespace removed from every line but the cursor's
own (where the cursor sits after "    " decides whether the completion indents) and trailing line
breaks removed from the suffix (Continue logs "\\n" for an empty one). Only the text near the cursor
counts: Continue prunes the prefix from the top to fit its token budget, with retrieved snippets taking a
varying share, so two visits to one spot rarely log the same far prefix. The pair's prompt is the chosen
side's own prefix and suffix.

The sides. Chosen: an accepted suggestion that was kept, or accepted with no commit to check (link unknown),
or the committed text that replaced an accepted one (signals "kept", "accepted", "rewritten"). Rejected: a
suggestion shown and not accepted ("rejected"), or an accepted suggestion that was rewritten before commit
("replaced"). A replaced suggestion is paired with its own replacement first; every other rejected side
takes the chosen side nearest in time. Sides equal once whitespace is ignored never make a pair, and a
rejected suggestion equal to an accepted one in its context is dropped (the same text both accepted and
rejected says nothing). At most `max_pairs_per_context` pairs come from one context, so a spot where the
model kept missing cannot outweigh the rest.

What is left unpaired (and accepted-then-deleted suggestions, which were accepted and so are no clean
"rejected" side) goes to KTO as single desirable/undesirable rows (pipelines.datasets.kto).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipelines.datasets.context import Context, WithContext
from pipelines.datasets.outcomes import Side, clip_prefix, clip_suffix
from pipelines.tokens import FimTokens

PREFIX_MATCH_CHARS = 1000  # ~25 lines: enough to pin a spot in a file, short enough to survive pruning
SUFFIX_MATCH_CHARS = 500
_TRAILING_SPACE = re.compile(r"[ \t]+\n")


@dataclass(frozen=True, slots=True)
class PairExample(WithContext):
    id: str  # "<chosen id>><rejected id>"
    signal: str  # the rejected side's signal: "rejected" | "replaced"
    chosen_signal: str
    developer: str
    ts: datetime  # the later of the two sides
    path: str
    context: Context
    chosen: str
    rejected: str


def context_key(s: Side) -> tuple[str, str, int, int, int, int]:
    """The context two sides must share to be paired (see the module docstring), as a key for this process's
    grouping only: the developer, the file, and `match_key` of the texts near the cursor."""
    known = s.context.match()
    if known is None:
        # clip_prefix(tail, n) of a tail one character longer than n is clip_prefix(prefix, n); so at the suffix
        known = match_key(*s.context.ends(PREFIX_MATCH_CHARS + 1, SUFFIX_MATCH_CHARS + 1))
    return s.developer, s.path, *known


def match_key(prefix: str, suffix: str) -> tuple[int, int, int, int]:
    """The texts near the cursor, normalised, by length and Python's 64-bit string hash: not kept (a copy of
    every normalised context would add ~1 KB a side to the build's peak) and not hashed by exact_key (2.1
    against 0.5 us a side, joining and encoding them first). Two contexts of one developer and file would
    have to agree in both lengths and collide in the hash to be taken for one."""
    prefix = _strip_line_ends(clip_prefix(prefix, PREFIX_MATCH_CHARS))
    suffix = _strip_line_ends(clip_suffix(suffix, SUFFIX_MATCH_CHARS) + "\n").rstrip("\n")
    return len(prefix), hash(prefix), len(suffix), hash(suffix)


def _strip_line_ends(text: str) -> str:
    """Trailing spaces and tabs removed from every line but the last (the checks skip the regex for the
    common text that has none: a third of this module's time went there). A tab is looked for alone first: a
    one-character search is a memchr (0.2 against 1.1 us over a bench context's 900 characters), and most code
    holds no tab at all."""
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    if " \n" in text or ("\t" in text and "\t\n" in text):
        text = _TRAILING_SPACE.sub("\n", text)
    return text


def same_text(a: str, b: str) -> bool:
    """Equal once whitespace is ignored: a pair differing only in spacing teaches formatting noise."""
    return "".join(a.split()) == "".join(b.split())


def pair_examples(all_sides: list[Side], max_pairs_per_context: int,
                  dropped: Counter[str]) -> tuple[list[PairExample], list[Side]]:
    """(pairs, the sides left unpaired for KTO), following the rules in the module docstring."""
    groups: dict[tuple[str, str, int, int, int, int], list[Side]] = defaultdict(list)
    for s in all_sides:
        groups[context_key(s)].append(s)
    pairs: list[PairExample] = []
    unpaired: list[Side] = []
    for group in groups.values():
        if len(group) == 1:
            unpaired.extend(group)
            continue
        group_pairs, left = _pair_group(sorted(group, key=lambda s: (s.ts, s.id)), max_pairs_per_context, dropped)
        pairs.extend(group_pairs)
        unpaired.extend(left)
    pairs.sort(key=lambda p: (p.ts, p.id))
    unpaired.sort(key=lambda s: (s.ts, s.id))
    return pairs, unpaired


def _pair_group(group: list[Side], cap: int, dropped: Counter[str]) -> tuple[list[PairExample], list[Side]]:
    chosen = [s for s in group if s.desirable]
    rejected = [s for s in group if s.signal in ("rejected", "replaced")]
    others = [s for s in group if not s.desirable and s.signal not in ("rejected", "replaced")]
    used: set[str] = set()
    pairs: list[PairExample] = []
    left: list[Side] = list(others)
    # A replaced suggestion's own replacement is its truest counterpart: pair those first.
    order = sorted(rejected, key=lambda r: r.signal != "replaced")
    for r in order:
        if r.signal == "rejected" and any(same_text(c.text, r.text) for c in chosen):
            dropped["rejected_equals_accepted"] += 1
            continue
        if len(pairs) >= cap:
            left.append(r)
            continue
        own = [c for c in chosen if c.id == f"{r.id}:committed"]
        candidates = own or sorted(chosen, key=lambda c: abs((c.ts - r.ts).total_seconds()))
        match = next((c for c in candidates if not same_text(c.text, r.text)), None)
        if match is None:
            if candidates:
                dropped["pair_sides_equal"] += 1
            left.append(r)
            continue
        used.add(match.id)
        pairs.append(PairExample(
            id=f"{match.id}>{r.id}", signal=r.signal, chosen_signal=match.signal, developer=match.developer,
            ts=max(match.ts, r.ts), path=match.path, context=match.context,
            chosen=match.text, rejected=r.text))
    left.extend(c for c in chosen if c.id not in used)
    return pairs, left


def pair_row(p: PairExample, fim: FimTokens, kind: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"kind": kind} if kind else {}
    row.update({"id": p.id, "signal": p.signal, "chosen_signal": p.chosen_signal, "developer": p.developer,
                "ts": p.ts.isoformat(), "path": p.path, "prompt": fim.psm(*p.context.texts()),
                "chosen": p.chosen + fim.eos, "rejected": p.rejected + fim.eos})
    return row
