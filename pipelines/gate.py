"""The promotion gate: a pure function of an evaluation report and the `[gate]` config section.

The champion is the adapter being served for the scope, or the base model when none is. A candidate is
promoted only when its held-out loss is at least `min_improvement` (relative) below the champion's and
below the base model's: an adapter that is worse than no adapter is never served, whatever it replaces.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from daemon.config import GateConfig


@dataclass(frozen=True)
class ModelScore:
    heldout_loss: float  # mean cross-entropy per middle token (nats)


@dataclass(frozen=True)
class EvalReport:
    """Scores of base, served (if any) and candidate on the same held-out rows."""

    rows: int
    tokens: int
    base: ModelScore
    candidate: ModelScore
    served: ModelScore | None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        served = data.get("served")
        return cls(rows=data["rows"], tokens=data["tokens"], base=ModelScore(**data["base"]),
                   candidate=ModelScore(**data["candidate"]),
                   served=ModelScore(**served) if served else None, seconds=data.get("seconds", 0.0))

    @classmethod
    def load(cls, path: Path) -> EvalReport:
        return cls.from_dict(json.loads(path.read_text()))


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    champion: str  # "served" or "base"
    improvement: float  # relative held-out loss reduction against the champion (0.05 = 5% lower)
    reasons: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate(report: EvalReport, cfg: GateConfig) -> GateDecision:
    """Decide whether the candidate replaces the champion, with the reasons either way."""
    champion_name = "served" if report.served is not None else "base"
    champion = report.served if report.served is not None else report.base
    cand, champ, base = report.candidate.heldout_loss, champion.heldout_loss, report.base.heldout_loss
    if report.rows == 0:
        return GateDecision(False, champion_name, 0.0, ("no held-out rows were scored",))
    if not all(math.isfinite(x) for x in (cand, champ, base)):
        return GateDecision(False, champion_name, 0.0,
                            (f"non-finite held-out loss (candidate {cand}, {champion_name} {champ}, base {base})",))
    improvement = (champ - cand) / champ if champ > 0 else 0.0
    reasons = []
    if improvement < cfg.min_improvement:
        reasons.append(f"held-out loss {cand:.4f} is {improvement:+.2%} against the {champion_name}'s "
                       f"{champ:.4f}; [gate] min_improvement is {cfg.min_improvement:.2%}")
    if cand >= base:
        reasons.append(f"held-out loss {cand:.4f} is not below the base model's {base:.4f}")
    if reasons:
        return GateDecision(False, champion_name, improvement, tuple(reasons))
    return GateDecision(True, champion_name, improvement,
                        (f"held-out loss {cand:.4f} is {improvement:.2%} below the {champion_name}'s {champ:.4f}",))
