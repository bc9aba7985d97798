"""Time-based held-out split: the most recent rows of a scope are held out for the gate.

A random split would let the gate score an adapter on code written in the same week as its training rows,
often the same function edited twice; holding out the most recent slice asks the question that matters
(does it help with tomorrow's code?) and mirrors how the adapter is used. Training rows that repeat or
nearly repeat a held-out row are removed by the dataset build (pipelines.datasets.build, near-dup stage).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import TypeVar

T = TypeVar("T")


def heldout_cutoff(times: Sequence[datetime], fraction: float, days: float = 0.0) -> datetime | None:
    """The time from which rows are held out: `days` before the latest row when `days` > 0, else the time
    that leaves about `fraction` of the rows at or after it. None when there are no rows."""
    if not times:
        return None
    if days > 0:
        return max(times) - timedelta(days=days)
    ordered = sorted(times)
    n_held = max(1, round(len(ordered) * fraction))
    return ordered[len(ordered) - n_held]


def time_split(rows: Sequence[T], ts: Callable[[T], datetime], fraction: float,
               days: float = 0.0) -> tuple[list[T], list[T]]:
    """(train, held-out): rows at or after the cutoff time (`heldout_cutoff`) are held out. Rows sharing the
    cutoff's timestamp all go to held-out, so a commit's rows never straddle the split."""
    cutoff = heldout_cutoff([ts(r) for r in rows], fraction, days)
    if cutoff is None:
        return [], []
    return split_at(rows, ts, cutoff)


def split_at(rows: Sequence[T], ts: Callable[[T], datetime], cutoff: datetime | None) -> tuple[list[T], list[T]]:
    """(rows before `cutoff`, rows at or after it), each oldest first; no cutoff holds nothing out."""
    ordered = sorted(rows, key=ts)
    if cutoff is None:
        return ordered, []
    return [r for r in ordered if ts(r) < cutoff], [r for r in ordered if ts(r) >= cutoff]
