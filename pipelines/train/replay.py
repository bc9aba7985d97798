"""Which rows a warm-started run trains on: every row newer than its starting adapter, plus a replay sample.

A nightly run that continues from the served adapter only needs what that adapter has not seen; training it
on new rows alone would let it drift away from the older code it was good at (catastrophic forgetting), so a
`replay_share` of the rows comes from the older ones, sampled with a fixed seed so a resumed run sees the
same rows. A full retrain (`[train] warm_start = false`) trains on every row.

No torch here: the cycle (inside the service) uses `new_rows` to skip a run with nothing new to learn.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Selection:
    rows: list[dict[str, Any]]  # oldest first, as in the file
    new: int  # rows newer than the starting adapter's data
    replayed: int  # older rows sampled back in


def new_rows(rows: list[dict[str, Any]], data_until: str | None) -> int:
    """Rows with `ts` after `data_until` (ISO-8601 strings compare in time order); all rows when it is None."""
    return newer([str(r["ts"]) for r in rows], data_until)


def newer(stamps: Sequence[str], data_until: str | None) -> int:
    """How many of the `ts` values `stamps` are after `data_until`; all of them when it is None."""
    if data_until is None:
        return len(stamps)
    return sum(1 for t in stamps if t > data_until)


def select_rows(rows: list[dict[str, Any]], data_until: str | None, replay_share: float, seed: int) -> Selection:
    """New rows plus `replay_share` of the result drawn from the older rows; every row when `data_until` is None."""
    if data_until is None:
        return Selection(rows=list(rows), new=len(rows), replayed=0)
    keep, new, replayed = select_indices([str(r["ts"]) for r in rows], data_until, replay_share, seed)
    return Selection(rows=[rows[i] for i in keep], new=new, replayed=replayed)


def select_indices(stamps: Sequence[str], data_until: str, replay_share: float,
                   seed: int) -> tuple[list[int], int, int]:
    """`select_rows` on the rows' `ts` values alone: (indices kept in file order, new, replayed)."""
    new = [i for i, t in enumerate(stamps) if t > data_until]
    old = [i for i, t in enumerate(stamps) if t <= data_until]
    # new / (new + replay) = 1 - share  =>  replay = new * share / (1 - share)
    want = round(len(new) * replay_share / (1.0 - replay_share)) if replay_share < 1 else len(old)
    replay = sorted(random.Random(seed).sample(old, min(want, len(old))))
    return sorted(new + replay), len(new), len(replay)


def latest_ts(*row_lists: list[dict[str, Any]]) -> str | None:
    """The newest `ts` over all rows: what an adapter trained on them has seen up to."""
    stamps = [str(r["ts"]) for rows in row_lists for r in rows if r.get("ts")]
    return max(stamps) if stamps else None
