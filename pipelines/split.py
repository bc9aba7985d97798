"""Time-based held-out split: the most recent rows of a scope are held out for the gate.

A random split would let the gate score an adapter on code written in the same week as its training rows,
often the same function edited twice; holding out the most recent slice asks the question that matters
(does it help with tomorrow's code?) and mirrors how the adapter is used.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from datetime import datetime
from typing import TypeVar

T = TypeVar("T")


def time_split(rows: Sequence[T], ts: Callable[[T], datetime], fraction: float) -> tuple[list[T], list[T]]:
    """(train, held-out): rows at or after the cutoff time are held out, the cutoff chosen so that about
    `fraction` of the rows fall after it. Rows sharing the cutoff's timestamp all go to held-out, so a
    commit's rows never straddle the split."""
    if not rows:
        return [], []
    ordered = sorted(rows, key=ts)
    n_held = max(1, round(len(ordered) * fraction))
    cutoff = ts(ordered[len(ordered) - n_held])
    return [r for r in ordered if ts(r) < cutoff], [r for r in ordered if ts(r) >= cutoff]


def drop_leaks(train: list[T], heldout: list[T], key: Callable[[T], Hashable]) -> tuple[list[T], int]:
    """Train rows that exactly repeat a held-out row would let the adapter be scored on what it memorised."""
    held = {key(r) for r in heldout}
    kept = [r for r in train if key(r) not in held]
    return kept, len(train) - len(kept)
