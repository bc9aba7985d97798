"""The promotion gate: a pure function of an evaluation report and the `[gate]` config section.

The champion is what the scope is served now: its adapter, or (for a developer with no personal adapter)
their team's, or the base model when nothing is served. A candidate is promoted when
1. its primary metric (`primary_metric`, default edit similarity: how close the generated middle is to the
   code the developer kept) beats the champion's by at least `min_improvement`, and is better than the
   base model's: an adapter worse than no adapter is never served, whatever it replaces;
2. no guardrail regresses against the champion beyond its tolerance: held-out loss (relative), edit
   similarity, exact match, replay preference accuracy (when the held-out set has logged pairs), and
   generated length. Acceptance alone rewards short output, so a candidate whose middles shrink (as a
   share of the kept middle's length, capped at 1) more than `generated_length_tolerance` below the
   served adapter's is refused even when everything else improved (against the base model length is not
   compared: a base model has not learned where a middle ends).
Every check that fails is named in the decision's reasons; a promotion lists the numbers it passed on.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pipelines.config import GateConfig


@dataclass(frozen=True)
class ModelScore:
    heldout_loss: float  # mean cross-entropy per middle token (nats); lower is better
    exact_match: float | None = None  # share of generated middles equal to the kept one
    edit_similarity: float | None = None  # mean 1 - Levenshtein / longer length, over characters
    preference_accuracy: float | None = None  # share of held-out pairs where log p(chosen) > log p(rejected)
    generated_tokens: float | None = None  # mean length of the generated middles, end token excluded

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelScore:
        values: dict[str, Any] = {f.name: data.get(f.name) for f in fields(cls)}
        return cls(**values)


@dataclass(frozen=True)
class EvalReport:
    """Scores of base, served (if any) and candidate on the same held-out rows."""

    rows: int  # held-out FIM rows scored for loss
    tokens: int  # middle tokens those rows hold
    base: ModelScore
    candidate: ModelScore
    served: ModelScore | None
    seconds: float = 0.0
    generated_rows: int = 0  # FIM rows each model completed
    reference_tokens: float = 0.0  # mean length of those rows' kept middles
    pair_rows: int = 0  # held-out logged pairs scored for preference accuracy
    generated_rows_per_s: float = 0.0  # generation throughput, all models together
    remembered_rows: int = 0  # row scores taken from an earlier evaluation of the same model (scores.py)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        served = data.get("served")
        scalars = {f.name: data[f.name] for f in fields(cls)
                   if f.name not in ("base", "candidate", "served") and f.name in data}
        return cls(base=ModelScore.from_dict(data["base"]), candidate=ModelScore.from_dict(data["candidate"]),
                   served=ModelScore.from_dict(served) if served else None, **scalars)

    @classmethod
    def load(cls, path: Path) -> EvalReport:
        return cls.from_dict(json.loads(path.read_text()))


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    champion: str  # "served" or "base"
    primary_metric: str
    improvement: float  # primary metric against the champion, signed so that positive is better
    reasons: tuple[str, ...]  # why it was promoted (the numbers), or every check that failed
    failed: tuple[str, ...] = ()  # names of the failed checks: "primary", "base", "guardrail:<metric>", ...

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Metrics where lower is better; all others are higher-is-better.
LOWER_IS_BETTER = {"heldout_loss"}
NAMES = {"heldout_loss": "held-out loss", "edit_similarity": "edit similarity", "exact_match": "exact match",
         "preference_accuracy": "preference accuracy", "generated_length": "generated/kept length"}


def metric(score: ModelScore, name: str, reference_tokens: float) -> float | None:
    """A score's value for `name`; generated_length is the generated/kept length ratio."""
    if name == "generated_length":
        if score.generated_tokens is None or reference_tokens <= 0:
            return None
        return score.generated_tokens / reference_tokens
    value: float | None = getattr(score, name)
    return value


def gate(report: EvalReport, cfg: GateConfig) -> GateDecision:
    """Decide whether the candidate replaces the champion, with the reasons either way."""
    champion_name = "served" if report.served is not None else "base"
    champion = report.served if report.served is not None else report.base
    primary = cfg.primary_metric
    ref = report.reference_tokens

    def reject(failed: str, reason: str) -> GateDecision:
        return GateDecision(False, champion_name, primary, 0.0, (reason,), (failed,))

    if report.rows == 0:
        return reject("rows", "no held-out rows were scored")
    cand_v, champ_v, base_v = (metric(s, primary, ref) for s in (report.candidate, champion, report.base))
    if cand_v is None or champ_v is None or base_v is None:
        return reject("primary", f"[gate] primary_metric = {primary} was not measured (no held-out pairs, or "
                      "[evaluate] generate_rows = 0): choose another primary metric or provide that data")
    cand, champ, base = cand_v, champ_v, base_v
    if not all(math.isfinite(x) for x in (cand, champ, base)):
        return reject("finite", f"non-finite {NAMES[primary]} (candidate {cand}, {champion_name} {champ}, "
                      f"base {base})")
    better = _better(primary, cand, champ)
    reasons: list[str] = []
    failed: list[str] = []
    if better < cfg.min_improvement:
        failed.append("primary")
        reasons.append(f"{NAMES[primary]} {cand:.4f} is {better:+.4f} against the {champion_name}'s {champ:.4f}; "
                       f"[gate] min_improvement is {cfg.min_improvement:+.4f}")
    if champion_name == "served" and _better(primary, cand, base) <= 0:
        failed.append("base")
        reasons.append(f"{NAMES[primary]} {cand:.4f} is not better than the base model's {base:.4f}")
    checked = []
    for name, tolerance, relative in _guardrails(cfg):
        if name == primary:
            continue
        c, h = metric(report.candidate, name, ref), metric(champion, name, ref)
        if c is None or h is None:
            continue
        if name == "generated_length" and champion_name == "base":
            # A base model has never learned where a middle ends (in the demo it ran to max_new_tokens on
            # every row); shrinking is a regression only against an adapter that has.
            continue
        if name == "generated_length":
            # Only shrinking counts, and only below the kept middle's own length: a champion that rambles
            # at 3x the kept length may be cut back to 1x freely.
            drop = min(h, 1.0) - c
            regressed, shown = drop > tolerance, f"{c:.2f} vs {h:.2f} (tolerance {tolerance:.2f} below min(that, 1))"
        else:
            worse = -_better(name, c, h)
            limit = tolerance * abs(h) if relative else tolerance
            regressed = worse > limit + 1e-12
            shown = f"{c:.4f} vs {h:.4f} (tolerance {limit:.4f})"
        checked.append(f"{NAMES[name]} {shown}")
        if regressed:
            failed.append(f"guardrail:{name}")
            reasons.append(f"guardrail {NAMES[name]} regressed against the {champion_name}: {shown}")
    if failed:
        return GateDecision(False, champion_name, primary, better, tuple(reasons), tuple(failed))
    passed = (f"{NAMES[primary]} {cand:.4f} is {better:+.4f} against the {champion_name}'s {champ:.4f} "
              f"(base {base:.4f})")
    return GateDecision(True, champion_name, primary, better, (passed, *(f"ok: {c}" for c in checked)))


def _better(name: str, candidate: float, champion: float) -> float:
    """How much better the candidate is, in the metric's units (positive = better)."""
    return champion - candidate if name in LOWER_IS_BETTER else candidate - champion


def _guardrails(cfg: GateConfig) -> list[tuple[str, float, bool]]:
    """(metric, tolerance, tolerance is relative to the champion's value)."""
    return [("heldout_loss", cfg.heldout_loss_tolerance_rel, True),
            ("edit_similarity", cfg.edit_similarity_tolerance, False),
            ("exact_match", cfg.exact_match_tolerance, False),
            ("preference_accuracy", cfg.preference_accuracy_tolerance, False),
            ("generated_length", cfg.generated_length_tolerance, False)]
