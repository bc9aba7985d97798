"""The statistics of field measurement: a rate's 95% interval, and whether one version is worse than another.

Acceptance is a proportion of suggestions shown, persistence a proportion of accepted suggestions whose link
was decided (kept / kept + rewritten + deleted). Both get Wilson score intervals (they stay inside 0..1 and
keep their coverage at the 20-30% rates and few hundred events a day a team produces, where the normal
approximation does not), and a difference of two rates gets Newcombe's hybrid score interval built from the
two Wilson intervals (method 10 of Newcombe 1998; what statsmodels calls "newcomb").

A canary is judged by non-inferiority: it is *worse* when the whole 95% interval of (canary - control) lies
below -margin, *not worse* when the whole interval lies above -margin, and undecided otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054  # the two-sided 95% normal quantile


def wilson(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of successes/trials; (0, 1) when there are no trials."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe(s1: int, n1: int, s2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval of p1 - p2 (p1 = s1/n1, p2 = s2/n2)."""
    p1, p2 = s1 / n1, s2 / n2
    l1, u1 = wilson(s1, n1, z)
    l2, u2 = wilson(s2, n2, z)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return low, high


@dataclass(frozen=True)
class Arm:
    """What one version's suggestions did in the field."""

    shown: int
    accepted: int
    kept: int = 0  # accepted and still in the developer's later commits
    linked: int = 0  # accepted with a decided link: kept + rewritten + deleted


@dataclass(frozen=True)
class Verdict:
    outcome: str  # "worse" | "not_worse" | "wait"
    reason: str
    acceptance_diff: tuple[float, float] | None = None  # 95% interval of canary - control
    persistence_diff: tuple[float, float] | None = None


def judge(candidate: Arm, control: Arm, margin: float, persistence_margin: float, min_shown: int,
          min_linked: int) -> Verdict:
    """Non-inferiority of `candidate` against `control` on acceptance, then on persistence (when both arms
    have `min_linked` decided links: acceptance alone rewards short, timid suggestions)."""
    if candidate.shown < min_shown or control.shown < min_shown:
        return Verdict("wait", f"{candidate.shown} and {control.shown} suggestions shown; each arm needs "
                               f"[online] min_shown = {min_shown}")
    acc = newcombe(candidate.accepted, candidate.shown, control.accepted, control.shown)
    rates = (f"acceptance {candidate.accepted / candidate.shown:.1%} vs {control.accepted / control.shown:.1%} "
             f"(difference {acc[0]:+.1%} to {acc[1]:+.1%})")
    kept = None
    if candidate.linked >= min_linked and control.linked >= min_linked:
        kept = newcombe(candidate.kept, candidate.linked, control.kept, control.linked)
        rates += (f", kept {candidate.kept / candidate.linked:.1%} vs {control.kept / control.linked:.1%} "
                  f"(difference {kept[0]:+.1%} to {kept[1]:+.1%})")
    if acc[1] < -margin:
        return Verdict("worse", f"{rates}: acceptance is worse by more than {margin:.0%}", acc, kept)
    if kept is not None and kept[1] < -persistence_margin:
        return Verdict("worse", f"{rates}: fewer accepted suggestions are kept (by more than "
                                f"{persistence_margin:.0%})", acc, kept)
    persistence_ok = kept is None or kept[0] > -persistence_margin
    if acc[0] > -margin and persistence_ok:
        return Verdict("not_worse", f"{rates}: not worse", acc, kept)
    return Verdict("wait", f"{rates}: not yet clear", acc, kept)
